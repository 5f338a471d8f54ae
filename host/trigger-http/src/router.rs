//! The ALB-style router: `[[trigger.http]]` rules compiled once at load.
//!
//! Pure logic, no I/O. A rule matches when all its conditions match (host,
//! path, methods, headers, query, source IP; an absent condition matches
//! everything); among the matching rules the lowest `priority` wins. Its
//! action forwards to a component (or one of several, by weight), answers
//! with a fixed response, or redirects.
//!
//! Patterns: `*` matches any run of characters (`/` included), `?` exactly
//! one. Host, header-value and query-value patterns ignore case; paths do
//! not. A path segment written `{name}` matches one non-empty segment and is
//! handed to the guest as the header `x-wasmgate-param-name`. Paths and
//! query strings are matched as the client sent them (percent-encoded);
//! query keys and values are decoded before matching.

use hyper::HeaderMap;
use ipnet::IpNet;
use std::net::IpAddr;
use std::ops::Range;
use toml::Spanned;
use wasmgate_manifest::{HttpTrigger, Manifest, ManifestError, OneOrMany};

/// Longest pattern accepted, in bytes (as ALB).
const MAX_PATTERN_LEN: usize = 128;
/// Most wildcards (`*`, `?`, `{name}`) in one pattern.
const MAX_WILDCARDS: usize = 8;

/// The request as the router sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Method, e.g. `GET`.
    pub method: &'a str,
    /// Host name without the port (`Host` header or URI authority); may be empty.
    pub host: &'a str,
    /// Path as sent, starting with `/`.
    pub path: &'a str,
    /// Query string without the `?`; may be empty.
    pub query: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The client's address.
    pub source: IpAddr,
}

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to one of the components; one target means no choice.
    Forward {
        /// `(component, weight)`; weights sum to more than zero.
        targets: Vec<(String, u32)>,
    },
    /// Answer without a component.
    Fixed {
        /// Status code.
        status: u16,
        /// `Content-Type`.
        content_type: String,
        /// Body.
        body: String,
    },
    /// Redirect to `location`, rendered per request.
    Redirect {
        /// 301, 302, 303, 307 or 308.
        status: u16,
        /// The target URL template.
        location: Template,
    },
}

impl Action {
    /// For [`Action::Forward`]: the component that `roll` (uniform over
    /// `0..total_weight`) selects. `None` for other actions.
    pub fn pick(&self, roll: u32) -> Option<&str> {
        let Action::Forward { targets } = self else {
            return None;
        };
        let total: u32 = targets.iter().map(|(_, w)| *w).sum();
        let mut roll = roll % total.max(1);
        for (component, weight) in targets {
            if roll < *weight {
                return Some(component);
            }
            roll -= weight;
        }
        targets.last().map(|(c, _)| c.as_str())
    }

    /// The sum of the weights (1 for a single target; 0 for other actions).
    pub fn total_weight(&self) -> u32 {
        match self {
            Action::Forward { targets } => targets.iter().map(|(_, w)| *w).sum(),
            _ => 0,
        }
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Position in the manifest (`trigger.http[index]`).
    pub index: usize,
    /// Priority: the lowest matching one wins.
    pub priority: u32,
    hosts: Vec<Pattern>,
    paths: Vec<PathPattern>,
    methods: Vec<String>,
    headers: Vec<(String, Vec<Pattern>)>,
    query: Vec<(String, Vec<Pattern>)>,
    sources: Vec<IpNet>,
    /// The action.
    pub action: Action,
}

/// The rule that matched a request and the path parameters it captured.
#[derive(Debug)]
pub struct Matched<'r> {
    /// The rule.
    pub rule: &'r Rule,
    /// `{name}` segments of the path pattern, in order.
    pub params: Vec<(&'r str, String)>,
}

/// All rules, by priority.
#[derive(Debug, Clone, Default)]
pub struct Router {
    rules: Vec<Rule>,
}

impl Router {
    /// A router over already compiled rules (sorted here by priority).
    pub fn new(mut rules: Vec<Rule>) -> Self {
        rules.sort_by_key(|r| r.priority);
        Self { rules }
    }

    /// Checks and compiles the manifest's `[[trigger.http]]` rules; errors
    /// name the rule and the key.
    pub fn build(manifest: &Manifest) -> Result<Router, ManifestError> {
        let mut rules: Vec<Rule> = Vec::new();
        for (index, t) in manifest.triggers.http.iter().enumerate() {
            let rule = compile_rule(manifest, index, t)?;
            if let Some(other) = rules.iter().find(|r| r.priority == rule.priority) {
                return Err(manifest.invalid(
                    t.priority.span(),
                    &format!("trigger.http[{index}].priority"),
                    format!(
                        "priority {} is already used by trigger.http[{}]; priorities must be unique",
                        rule.priority, other.index
                    ),
                ));
            }
            rules.push(rule);
        }
        Ok(Router::new(rules))
    }

    /// The rules, lowest priority first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The winning rule for `req`, if any.
    pub fn route<'r>(&'r self, req: &RequestInfo<'_>) -> Option<Matched<'r>> {
        self.rules
            .iter()
            .find_map(|rule| rule.matches(req).map(|params| Matched { rule, params }))
    }

    /// Rules that can never win: an earlier rule matches every request they
    /// match. One line per such rule.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, later) in self.rules.iter().enumerate() {
            if let Some(earlier) = self.rules[..i].iter().find(|e| e.covers(later)) {
                out.push(format!(
                    "trigger.http[{}] (priority {}) is unreachable: trigger.http[{}] (priority {}) matches every request it matches",
                    later.index, later.priority, earlier.index, earlier.priority
                ));
            }
        }
        out
    }
}

impl Rule {
    /// `Some(params)` when every condition matches `req`.
    pub fn matches(&self, req: &RequestInfo<'_>) -> Option<Vec<(&str, String)>> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return None;
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|p| p.matches(req.host)) {
            return None;
        }
        if !self.sources.is_empty() {
            let ip = req.source.to_canonical();
            if !self.sources.iter().any(|n| n.contains(&ip)) {
                return None;
            }
        }
        for (name, patterns) in &self.headers {
            let any = req
                .headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| patterns.iter().any(|p| p.matches(v)));
            if !any {
                return None;
            }
        }
        if !self.query.is_empty() {
            let pairs: Vec<(String, String)> = form_urlencoded::parse(req.query.as_bytes())
                .into_owned()
                .collect();
            for (key, patterns) in &self.query {
                let any = pairs
                    .iter()
                    .filter(|(k, _)| k == key)
                    .any(|(_, v)| patterns.iter().any(|p| p.matches(v)));
                if !any {
                    return None;
                }
            }
        }
        if self.paths.is_empty() {
            return Some(Vec::new());
        }
        self.paths.iter().find_map(|p| p.matches(req.path))
    }

    /// Does this rule match every request `other` matches?
    fn covers(&self, other: &Rule) -> bool {
        let methods = self.methods.is_empty()
            || (!other.methods.is_empty()
                && other.methods.iter().all(|m| self.methods.contains(m)));
        let hosts = covers_any(&self.hosts, &other.hosts, Pattern::covers);
        let paths = covers_any(&self.paths, &other.paths, PathPattern::covers);
        let sources = self.sources.is_empty()
            || (!other.sources.is_empty()
                && other
                    .sources
                    .iter()
                    .all(|o| self.sources.iter().any(|s| s.contains(o))));
        let keyed = |mine: &[(String, Vec<Pattern>)], theirs: &[(String, Vec<Pattern>)]| {
            mine.iter().all(|(k, ps)| {
                theirs
                    .iter()
                    .any(|(ok, ops)| ok == k && covers_any(ps, ops, Pattern::covers))
            })
        };
        methods
            && hosts
            && paths
            && sources
            && keyed(&self.headers, &other.headers)
            && keyed(&self.query, &other.query)
    }
}

/// `mine` (any of) covers `theirs` (any of): empty `mine` matches all; else
/// each of `theirs` must be covered by one of `mine`.
fn covers_any<T>(mine: &[T], theirs: &[T], covers: fn(&T, &T) -> bool) -> bool {
    mine.is_empty()
        || (!theirs.is_empty() && theirs.iter().all(|t| mine.iter().any(|m| covers(m, t))))
}

/// A `*`/`?` pattern over ASCII text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Vec<u8>,
    ignore_case: bool,
}

impl Pattern {
    /// Compiles `text`; `ignore_case` lowercases pattern and input.
    pub fn new(text: &str, ignore_case: bool) -> Result<Self, String> {
        check_pattern_size(text)?;
        let wildcards = text.bytes().filter(|b| matches!(b, b'*' | b'?')).count();
        if wildcards > MAX_WILDCARDS {
            return Err(format!(
                "{text:?} has {wildcards} wildcards; at most {MAX_WILDCARDS} are allowed"
            ));
        }
        let text = if ignore_case {
            text.to_ascii_lowercase()
        } else {
            text.to_string()
        };
        Ok(Self {
            text: text.into_bytes(),
            ignore_case,
        })
    }

    /// Does `input` match?
    pub fn matches(&self, input: &str) -> bool {
        glob(&self.text, input.as_bytes(), self.ignore_case)
    }

    fn covers(&self, other: &Pattern) -> bool {
        literal_prefix_covers(&self.text, &other.text)
    }
}

/// `mine` covers `theirs` when equal, or when `mine` is a literal prefix
/// followed by a single trailing `*` and `theirs` starts with that prefix.
fn literal_prefix_covers(mine: &[u8], theirs: &[u8]) -> bool {
    if mine == theirs {
        return true;
    }
    match mine.split_last() {
        Some((b'*', prefix)) if !prefix.iter().any(|b| matches!(b, b'*' | b'?' | b'{')) => {
            theirs.starts_with(prefix)
        }
        _ => false,
    }
}

/// Iterative `*`/`?` matching with one backtrack point (linear-ish).
fn glob(pattern: &[u8], input: &[u8], ignore_case: bool) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < input.len() {
        let c = if ignore_case {
            input[i].to_ascii_lowercase()
        } else {
            input[i]
        };
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == c) {
            p += 1;
            i += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Star,
    One,
    Param(String),
}

/// A path pattern: literals, `*`, `?` and `{name}` segments.
///
/// Compiled to a regular expression, so matching takes time linear in the
/// path whatever the pattern: `*` is a lazy `.*?` (the shortest run that
/// lets the rest match), `?` one byte, `{name}` a greedy `[^/]+` in a capture
/// group.
#[derive(Debug, Clone)]
pub struct PathPattern {
    text: String,
    regex: regex::bytes::Regex,
    /// The parameter names, in the order of their capture groups.
    names: Vec<String>,
}

impl PathPattern {
    /// Compiles a path pattern; it must start with `/`.
    pub fn new(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') && text != "*" {
            return Err(format!("{text:?} must start with '/'"));
        }
        check_pattern_size(text)?;
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut names: Vec<String> = Vec::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match c {
                '*' | '?' | '{' => {
                    if !literal.is_empty() {
                        tokens.push(Token::Literal(std::mem::take(&mut literal)));
                    }
                    if c == '{' {
                        let Some(end) = rest.find('}') else {
                            return Err(format!("{text:?} has a '{{' without a closing '}}'"));
                        };
                        let name = &rest[1..end];
                        let ok = !name.is_empty()
                            && name.bytes().all(|b| {
                                b.is_ascii_lowercase()
                                    || b.is_ascii_digit()
                                    || b == b'_'
                                    || b == b'-'
                            });
                        if !ok {
                            return Err(format!(
                                "{{{name}}} in {text:?} is not a parameter name: use lowercase letters, digits, '_' or '-'"
                            ));
                        }
                        if names.iter().any(|n| n == name) {
                            return Err(format!("{{{name}}} appears twice in {text:?}"));
                        }
                        names.push(name.to_string());
                        tokens.push(Token::Param(name.to_string()));
                        rest = &rest[end + 1..];
                        continue;
                    }
                    tokens.push(if c == '*' { Token::Star } else { Token::One });
                }
                '}' => return Err(format!("{text:?} has a '}}' without an opening '{{'")),
                _ => literal.push(c),
            }
            rest = &rest[c.len_utf8()..];
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        let wildcards = tokens
            .iter()
            .filter(|t| !matches!(t, Token::Literal(_)))
            .count();
        if wildcards > MAX_WILDCARDS {
            return Err(format!(
                "{text:?} has {wildcards} wildcards and parameters; at most {MAX_WILDCARDS} are allowed"
            ));
        }
        Ok(Self {
            text: text.to_string(),
            regex: compile_path(&tokens)?,
            names,
        })
    }

    /// `Some(params)` when `path` matches.
    pub fn matches(&self, path: &str) -> Option<Vec<(&str, String)>> {
        let caps = self.regex.captures(path.as_bytes())?;
        Some(
            self.names
                .iter()
                .enumerate()
                .filter_map(|(i, name)| {
                    let value = caps.get(i + 1)?;
                    Some((
                        name.as_str(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    ))
                })
                .collect(),
        )
    }

    fn covers(&self, other: &PathPattern) -> bool {
        self.text == "*" || literal_prefix_covers(self.text.as_bytes(), other.text.as_bytes())
    }
}

/// The regular expression of a path pattern, anchored at both ends and
/// matched on bytes (`.` is any byte, `/` and newlines included).
fn compile_path(tokens: &[Token]) -> Result<regex::bytes::Regex, String> {
    let mut re = String::from(r"(?s-u)\A");
    for token in tokens {
        match token {
            Token::Literal(lit) => re.push_str(&regex::escape(lit)),
            Token::Star => re.push_str(".*?"),
            Token::One => re.push('.'),
            Token::Param(_) => re.push_str("([^/]+)"),
        }
    }
    re.push_str(r"\z");
    regex::bytes::Regex::new(&re).map_err(|e| format!("cannot compile the path pattern: {e}"))
}

fn check_pattern_size(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("a pattern cannot be empty".into());
    }
    if !text.is_ascii() {
        return Err(format!(
            "{text:?} is not ASCII: write non-ASCII characters percent-encoded"
        ));
    }
    if text.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "the pattern is {} bytes long; at most {MAX_PATTERN_LEN} are allowed",
            text.len()
        ));
    }
    Ok(())
}

/// A redirect target: text with `#{protocol}`, `#{host}`, `#{port}`,
/// `#{path}` and `#{query}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Protocol,
    Host,
    Port,
    Path,
    Query,
}

/// The values a redirect template can use.
#[derive(Debug, Clone, Copy)]
pub struct RedirectInput<'a> {
    /// `http` or `https`.
    pub protocol: &'a str,
    /// Host without the port.
    pub host: &'a str,
    /// Port the client connected to.
    pub port: u16,
    /// Path as sent.
    pub path: &'a str,
    /// Query without the `?`.
    pub query: &'a str,
}

impl Template {
    /// Parses a template; the result must be an absolute `http(s)://` URL
    /// or start with `/`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("#{") {
            if start > 0 {
                parts.push(TemplatePart::Text(rest[..start].to_string()));
            }
            let Some(len) = rest[start..].find('}') else {
                return Err(format!("{text:?} has a '#{{' without a closing '}}'"));
            };
            let name = &rest[start + 2..start + len];
            parts.push(match name {
                "protocol" => TemplatePart::Protocol,
                "host" => TemplatePart::Host,
                "port" => TemplatePart::Port,
                "path" => TemplatePart::Path,
                "query" => TemplatePart::Query,
                _ => {
                    return Err(format!(
                        "#{{{name}}} is not a placeholder: use #{{protocol}}, #{{host}}, #{{port}}, #{{path}} or #{{query}}"
                    ));
                }
            });
            rest = &rest[start + len + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        let absolute = match parts.first() {
            Some(TemplatePart::Protocol) => {
                matches!(parts.get(1), Some(TemplatePart::Text(t)) if t.starts_with("://"))
            }
            Some(TemplatePart::Text(t)) => {
                t.starts_with("http://") || t.starts_with("https://") || t.starts_with('/')
            }
            Some(TemplatePart::Path) => true,
            _ => false,
        };
        if !absolute {
            return Err(format!(
                "{text:?} is not a redirect target: start with \"https://\", \"http://\", \"#{{protocol}}://\" or \"/\""
            ));
        }
        if text.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!("{text:?} contains spaces or control characters"));
        }
        Ok(Self { parts })
    }

    /// The URL for one request. A `?` left dangling by an empty query is
    /// dropped.
    pub fn render(&self, input: &RedirectInput<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Text(t) => out.push_str(t),
                TemplatePart::Protocol => out.push_str(input.protocol),
                TemplatePart::Host => out.push_str(input.host),
                TemplatePart::Port => out.push_str(&input.port.to_string()),
                TemplatePart::Path => out.push_str(input.path),
                TemplatePart::Query => out.push_str(input.query),
            }
        }
        if out.ends_with('?') {
            out.pop();
        }
        out
    }
}

/// How a rule's checks report an error: the span, the field under the
/// rule's key (e.g. `.path`), and the message.
type RuleError<'a> = &'a dyn Fn(Range<usize>, &str, String) -> ManifestError;

/// Compiles one rule, checking its conditions and its action in the
/// manifest's order; each error names its key.
fn compile_rule(manifest: &Manifest, index: usize, t: &HttpTrigger) -> Result<Rule, ManifestError> {
    let key = format!("trigger.http[{index}]");
    let err = |span: Range<usize>, field: &str, message: String| {
        manifest.invalid(span, &format!("{key}{field}"), message)
    };
    one_action(t, &err)?;
    let patterns = |value: &Option<Spanned<OneOrMany>>,
                    field: &str,
                    compile: &dyn Fn(&str) -> Result<(), String>|
     -> Result<Vec<String>, ManifestError> {
        let Some(value) = value else {
            return Ok(Vec::new());
        };
        let values = value.get_ref().values();
        if values.is_empty() {
            return Err(err(value.span(), field, "the list is empty".into()));
        }
        for v in &values {
            compile(v).map_err(|m| err(value.span(), field, m))?;
        }
        Ok(values.into_iter().map(str::to_string).collect())
    };
    let hosts = patterns(&t.host, ".host", &|p| Pattern::new(p, true).map(drop))?
        .iter()
        .map(|p| Pattern::new(p, true).expect("checked"))
        .collect();
    let paths = patterns(&t.path, ".path", &|p| PathPattern::new(p).map(drop))?
        .iter()
        .map(|p| PathPattern::new(p).expect("checked"))
        .collect();
    let methods = compile_methods(t, &err)?;
    let (headers, query) = compile_header_and_query(t, &err)?;
    let sources = compile_sources(t, &err)?;
    let action = compile_action(t, &err)?;
    Ok(Rule {
        index,
        priority: *t.priority.get_ref(),
        hosts,
        paths,
        methods,
        headers,
        query,
        sources,
        action,
    })
}

/// A rule has exactly one action.
fn one_action(t: &HttpTrigger, err: RuleError<'_>) -> Result<(), ManifestError> {
    let actions: Vec<&str> = [
        ("component", t.component.is_some()),
        ("targets", t.targets.is_some()),
        ("fixed_response", t.fixed_response.is_some()),
        ("redirect", t.redirect.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if actions.len() != 1 {
        let found = if actions.is_empty() {
            "none".to_string()
        } else {
            actions.join(" and ")
        };
        return Err(err(
            t.priority.span(),
            "",
            format!(
                "a rule needs exactly one action: component, targets, fixed_response or redirect (found {found})"
            ),
        ));
    }
    Ok(())
}

/// `methods`: upper-case tokens.
fn compile_methods(t: &HttpTrigger, err: RuleError<'_>) -> Result<Vec<String>, ManifestError> {
    let mut methods = Vec::new();
    for m in &t.methods {
        let ok = !m.get_ref().is_empty() && m.get_ref().bytes().all(|b| b.is_ascii_uppercase());
        if !ok {
            return Err(err(
                m.span(),
                ".methods",
                format!(
                    "{:?} is not an HTTP method (write e.g. \"GET\")",
                    m.get_ref()
                ),
            ));
        }
        methods.push(m.get_ref().clone());
    }
    Ok(methods)
}

/// Headers and query parameters alike: a name and its value patterns.
type Conditions = Vec<(String, Vec<Pattern>)>;

/// `headers` and `query`.
fn compile_header_and_query(
    t: &HttpTrigger,
    err: RuleError<'_>,
) -> Result<(Conditions, Conditions), ManifestError> {
    let mut headers = Vec::new();
    for (name, values) in &t.headers {
        let field = format!(".headers.{name}");
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(err(
                values.span(),
                &field,
                format!("{name:?} is not a header name"),
            ));
        }
        let compiled = compile_values(values, &|m| err(values.span(), &field, m))?;
        headers.push((name.to_ascii_lowercase(), compiled));
    }
    let mut query = Vec::new();
    for (k, values) in &t.query {
        let field = format!(".query.{k}");
        let compiled = compile_values(values, &|m| err(values.span(), &field, m))?;
        query.push((k.clone(), compiled));
    }
    Ok((headers, query))
}

/// `source_ip`: CIDR ranges or single addresses.
fn compile_sources(t: &HttpTrigger, err: RuleError<'_>) -> Result<Vec<IpNet>, ManifestError> {
    let mut sources = Vec::new();
    for s in &t.source_ip {
        let text = s.get_ref().trim();
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                err(
                    s.span(),
                    ".source_ip",
                    format!(
                        "{text:?} is not a CIDR range (write e.g. \"10.0.0.0/8\" or \"2001:db8::/32\")"
                    ),
                )
            })?;
        sources.push(net.trunc());
    }
    Ok(sources)
}

/// The rule's one action: a component (or weighted targets), a fixed
/// response or a redirect.
fn compile_action(t: &HttpTrigger, err: RuleError<'_>) -> Result<Action, ManifestError> {
    Ok(if let Some(c) = &t.component {
        Action::Forward {
            targets: vec![(c.get_ref().clone(), 1)],
        }
    } else if let Some(targets) = &t.targets {
        if targets.get_ref().is_empty() {
            return Err(err(
                targets.span(),
                ".targets",
                "list at least one {component, weight}".into(),
            ));
        }
        let mut out = Vec::new();
        for target in targets.get_ref() {
            let w = *target.weight.get_ref();
            if w > 1000 {
                return Err(err(
                    target.weight.span(),
                    ".targets.weight",
                    format!("{w} is out of range: weights are 0 to 1000"),
                ));
            }
            out.push((target.component.get_ref().clone(), w));
        }
        if out.iter().all(|(_, w)| *w == 0) {
            return Err(err(
                targets.span(),
                ".targets",
                "at least one weight must be greater than zero".into(),
            ));
        }
        Action::Forward { targets: out }
    } else if let Some(f) = &t.fixed_response {
        let f = f.get_ref();
        let status = *f.status.get_ref();
        if !(200..=599).contains(&status) {
            return Err(err(
                f.status.span(),
                ".fixed_response.status",
                format!("{status} is out of range: use 200 to 599"),
            ));
        }
        let content_type = f
            .content_type
            .clone()
            .unwrap_or_else(|| "text/plain; charset=utf-8".into());
        if hyper::header::HeaderValue::from_str(&content_type).is_err() {
            return Err(err(
                f.status.span(),
                ".fixed_response.content_type",
                format!("{content_type:?} is not a valid header value"),
            ));
        }
        Action::Fixed {
            status,
            content_type,
            body: f.body.clone(),
        }
    } else if let Some(r) = &t.redirect {
        let r = r.get_ref();
        let status = *r.status.get_ref();
        if ![301, 302, 303, 307, 308].contains(&status) {
            return Err(err(
                r.status.span(),
                ".redirect.status",
                format!("{status} is not a redirect status: use 301 or 302 (or 303, 307, 308)"),
            ));
        }
        let location = Template::parse(r.location.get_ref())
            .map_err(|m| err(r.location.span(), ".redirect.location", m))?;
        Action::Redirect { status, location }
    } else {
        unreachable!("exactly one action was checked above")
    })
}

fn compile_values(
    values: &Spanned<OneOrMany>,
    err: &dyn Fn(String) -> ManifestError,
) -> Result<Vec<Pattern>, ManifestError> {
    let list = values.get_ref().values();
    if list.is_empty() {
        return Err(err("the list is empty".into()));
    }
    list.into_iter()
        .map(|v| Pattern::new(v, true).map_err(&err))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(rules: &str) -> Router {
        let text = format!(
            "[component.a]\nsource = \"a.wasm\"\n[component.b]\nsource = \"b.wasm\"\n{rules}"
        );
        let m = Manifest::parse(Path::new("t.toml"), text).expect("valid manifest");
        Router::build(&m).unwrap()
    }

    /// The error of the manifest's own checks, else of the router's.
    fn build_err(rules: &str) -> String {
        let text = format!("[component.a]\nsource = \"a.wasm\"\n{rules}");
        match Manifest::parse(Path::new("t.toml"), text) {
            Ok(m) => Router::build(&m).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        }
    }

    struct Req {
        method: &'static str,
        host: &'static str,
        path: &'static str,
        query: &'static str,
        headers: HeaderMap,
        source: IpAddr,
    }

    fn req(method: &'static str, host: &'static str, path: &'static str) -> Req {
        Req {
            method,
            host,
            path,
            query: "",
            headers: HeaderMap::new(),
            source: "192.0.2.1".parse().unwrap(),
        }
    }

    impl Req {
        fn query(mut self, q: &'static str) -> Self {
            self.query = q;
            self
        }
        fn header(mut self, k: &'static str, v: &'static str) -> Self {
            self.headers.append(k, v.parse().unwrap());
            self
        }
        fn from(mut self, ip: &str) -> Self {
            self.source = ip.parse().unwrap();
            self
        }
        fn info(&self) -> RequestInfo<'_> {
            RequestInfo {
                method: self.method,
                host: self.host,
                path: self.path,
                query: self.query,
                headers: &self.headers,
                source: self.source,
            }
        }
    }

    /// The index of the winning rule, or None.
    fn winner(r: &Router, q: &Req) -> Option<usize> {
        r.route(&q.info()).map(|m| m.rule.index)
    }

    #[test]
    fn conditions_table() {
        let r = router(
            r#"
[[trigger.http]]
priority = 1
host = "*.example.com"
path = "/api/*"
component = "a"
[[trigger.http]]
priority = 2
path = ["/static/*", "/favicon.ico"]
methods = ["GET", "HEAD"]
component = "b"
[[trigger.http]]
priority = 3
headers = { "X-Canary" = ["yes", "tru?"] }
component = "b"
[[trigger.http]]
priority = 4
query = { version = "v2*" }
component = "b"
[[trigger.http]]
priority = 5
source_ip = ["10.0.0.0/8", "2001:db8::/32"]
component = "b"
[[trigger.http]]
priority = 9
path = "/users/{id}/posts/{post}"
component = "a"
"#,
        );
        let cases: Vec<(Req, Option<usize>)> = vec![
            (req("GET", "api.example.com", "/api/x"), Some(0)),
            (req("GET", "API.Example.COM", "/api/x/y"), Some(0)),
            (req("GET", "example.com", "/api/x"), None),
            (req("GET", "a.example.org", "/api/x"), None),
            (req("GET", "h", "/static/app.js"), Some(1)),
            (req("HEAD", "h", "/favicon.ico"), Some(1)),
            (req("POST", "h", "/static/app.js"), None),
            (req("GET", "h", "/Static/app.js"), None),
            (req("GET", "h", "/x").header("x-canary", "YES"), Some(2)),
            (req("GET", "h", "/x").header("x-canary", "true"), Some(2)),
            (req("GET", "h", "/x").header("x-canary", "no"), None),
            (req("GET", "h", "/x").query("a=1&version=v2.1"), Some(3)),
            (req("GET", "h", "/x").query("version=v2%2E1"), Some(3)),
            (req("GET", "h", "/x").query("version=v1"), None),
            (req("GET", "h", "/x").from("10.1.2.3"), Some(4)),
            (req("GET", "h", "/x").from("::ffff:10.1.2.3"), Some(4)),
            (req("GET", "h", "/x").from("2001:db8::7"), Some(4)),
            (req("GET", "h", "/x").from("11.0.0.1"), None),
            (req("GET", "h", "/users/42/posts/7"), Some(5)),
            (req("GET", "h", "/users//posts/7"), None),
            (req("GET", "h", "/users/4/2/posts/7"), None),
        ];
        for (q, want) in cases {
            assert_eq!(
                winner(&r, &q),
                want,
                "{} {} {}?{} {:?} from {}",
                q.method,
                q.host,
                q.path,
                q.query,
                q.headers,
                q.source
            );
        }
    }

    #[test]
    fn params_are_captured_in_order() {
        let r = router(
            "[[trigger.http]]\npriority = 1\npath = \"/users/{id}/posts/{post-id}*\"\ncomponent = \"a\"\n",
        );
        let q = req("GET", "h", "/users/42/posts/7/comments");
        let m = r.route(&q.info()).unwrap();
        assert_eq!(
            m.params,
            vec![("id", "42".to_string()), ("post-id", "7".to_string())]
        );
    }

    #[test]
    fn path_patterns_keep_their_semantics() {
        let p = |t: &str| PathPattern::new(t).unwrap();
        // `*` takes the shortest run, `{name}` the longest segment.
        assert_eq!(
            p("/{a}*").matches("/xyz/more"),
            Some(vec![("a", "xyz".to_string())])
        );
        assert_eq!(
            p("/{a}?").matches("/xyz"),
            Some(vec![("a", "xy".to_string())])
        );
        assert!(p("/{a}").matches("/").is_none());
        assert!(p("/{a}").matches("/x/y").is_none());
        assert!(p("/a?c").matches("/abc").is_some());
        assert!(p("/a?c").matches("/ac").is_none());
        // Regex metacharacters in literals are literal.
        assert!(p("/a.b+(c)|$").matches("/a.b+(c)|$").is_some());
        assert!(p("/a.b").matches("/aXb").is_none());
        // `*` and `?` cross `/` and match newlines and any byte.
        assert!(p("/*").matches("/a/b\nc").is_some());
        assert!(p("/?").matches("/\n").is_some());
    }

    /// A hostile path against the pattern that made the backtracking
    /// matcher cubic (`/*a*b*c`, 60 KB without a `c`): the match must end,
    /// and a watchdog turns a hang into a failure instead of a stuck run.
    #[test]
    fn matching_is_linear_in_the_path() {
        let r = router(
            "[[trigger.http]]\npriority = 1\npath = \"/*a*b*c*d*e*f*g*h\"\ncomponent = \"a\"\n",
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let path = format!("/{}", "ab".repeat(30_000));
            let hostile = req("GET", "h", Box::leak(path.into_boxed_str()));
            let matched = r.route(&hostile.info()).is_some();
            let _ = tx.send(matched);
        });
        let matched = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("routing a 60 KB path did not finish");
        assert!(!matched);
    }

    #[test]
    fn lowest_priority_wins_whatever_the_order_in_the_file() {
        let r = router(
            "[[trigger.http]]\npriority = 20\ncomponent = \"a\"\n[[trigger.http]]\npriority = 10\npath = \"/x\"\ncomponent = \"b\"\n",
        );
        assert_eq!(winner(&r, &req("GET", "h", "/x")), Some(1));
        assert_eq!(winner(&r, &req("GET", "h", "/y")), Some(0));
    }

    #[test]
    fn glob_edge_cases() {
        let p = |t: &str| Pattern::new(t, false).unwrap();
        assert!(p("*").matches(""));
        assert!(p("a*b*c").matches("aXbYc"));
        assert!(p("a*b*c").matches("abc"));
        assert!(!p("a*b*c").matches("acb"));
        assert!(p("??").matches("ab"));
        assert!(!p("??").matches("a"));
        assert!(p("*.example.com").matches("a.b.example.com"));
        assert!(!p("a").matches("A"));
        assert!(Pattern::new("A", true).unwrap().matches("a"));
        let path = PathPattern::new("/a/*/c").unwrap();
        assert!(path.matches("/a/b/x/c").is_some());
        assert!(path.matches("/a/b/x/d").is_none());
        assert!(
            PathPattern::new("*")
                .unwrap()
                .matches("/anything")
                .is_some()
        );
    }

    #[test]
    fn weighted_split_follows_the_weights() {
        let r = router(
            "[[trigger.http]]\npriority = 1\ntargets = [{ component = \"a\", weight = 90 }, { component = \"b\", weight = 10 }]\n",
        );
        let action = &r.rules()[0].action;
        assert_eq!(action.total_weight(), 100);
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 20_000;
        let b = (0..n)
            .filter(|_| action.pick(rng.u32(..action.total_weight())) == Some("b"))
            .count();
        let share = b as f64 / n as f64;
        assert!((0.08..0.12).contains(&share), "canary share {share}");
        // Every roll maps to a target; the boundaries are exact.
        assert_eq!(action.pick(0), Some("a"));
        assert_eq!(action.pick(89), Some("a"));
        assert_eq!(action.pick(90), Some("b"));
        assert_eq!(action.pick(99), Some("b"));
    }

    #[test]
    fn fixed_and_redirect_actions() {
        let r = router(
            r#"
[[trigger.http]]
priority = 1
path = "/health"
fixed_response = { status = 200, content_type = "application/json", body = "{\"ok\":true}" }
[[trigger.http]]
priority = 2
redirect = { status = 301, location = "https://#{host}:8443#{path}?#{query}" }
"#,
        );
        assert_eq!(
            r.rules()[0].action,
            Action::Fixed {
                status: 200,
                content_type: "application/json".into(),
                body: "{\"ok\":true}".into()
            }
        );
        let Action::Redirect { status, location } = &r.rules()[1].action else {
            panic!("redirect expected");
        };
        assert_eq!(*status, 301);
        let mut input = RedirectInput {
            protocol: "http",
            host: "h.example",
            port: 8080,
            path: "/a/b",
            query: "x=1",
        };
        assert_eq!(location.render(&input), "https://h.example:8443/a/b?x=1");
        input.query = "";
        assert_eq!(location.render(&input), "https://h.example:8443/a/b");
        let t = Template::parse("#{protocol}://#{host}:#{port}/new#{path}").unwrap();
        assert_eq!(t.render(&input), "http://h.example:8080/new/a/b");
    }

    #[test]
    fn unreachable_rules_are_reported() {
        let r = router(
            r#"
[[trigger.http]]
priority = 1
path = "/api/*"
component = "a"
[[trigger.http]]
priority = 2
path = "/api/v1/*"
methods = ["GET"]
component = "b"
[[trigger.http]]
priority = 3
path = "/api/*"
host = "x.example"
component = "b"
[[trigger.http]]
priority = 4
path = "/other"
component = "b"
[[trigger.http]]
priority = 5
headers = { x-a = "1" }
component = "b"
[[trigger.http]]
priority = 6
headers = { x-a = "1" }
path = "/z"
component = "b"
"#,
        );
        let w = r.warnings();
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].starts_with("trigger.http[1] (priority 2) is unreachable: trigger.http[0]"));
        assert!(w[1].starts_with("trigger.http[2] (priority 3) is unreachable: trigger.http[0]"));
        assert!(w[2].starts_with("trigger.http[5] (priority 6) is unreachable: trigger.http[4]"));
    }

    #[test]
    fn invalid_rules_name_the_rule() {
        let cases = [
            (
                "[[trigger.http]]\npriority = 1\ncomponent = \"a\"\n[[trigger.http]]\npriority = 1\ncomponent = \"a\"\n",
                "trigger.http[1].priority: priority 1 is already used by trigger.http[0]",
            ),
            (
                "[[trigger.http]]\npriority = 1\ncomponent = \"a\"\nfixed_response = { status = 200 }\n",
                "trigger.http[0]: a rule needs exactly one action: component, targets, fixed_response or redirect (found component and fixed_response)",
            ),
            (
                "[[trigger.http]]\npriority = 1\npath = \"/x\"\n",
                "(found none)",
            ),
            (
                "[[trigger.http]]\npriority = 1\nsource_ip = [\"10.0.0/8\"]\ncomponent = \"a\"\n",
                "trigger.http[0].source_ip: \"10.0.0/8\" is not a CIDR range",
            ),
            (
                "[[trigger.http]]\npriority = 1\ncomponent = \"nope\"\n",
                "trigger.http[0].component: unknown component \"nope\"",
            ),
            (
                "[[trigger.http]]\npriority = 1\nredirect = { location = \"https://#{hots}/\" }\n",
                "trigger.http[0].redirect.location: #{hots} is not a placeholder",
            ),
            (
                "[[trigger.http]]\npriority = 1\nredirect = { location = \"example.com\" }\n",
                "is not a redirect target",
            ),
            (
                "[[trigger.http]]\npriority = 1\nredirect = { status = 200, location = \"/x\" }\n",
                "trigger.http[0].redirect.status: 200 is not a redirect status",
            ),
            (
                "[[trigger.http]]\npriority = 1\npath = \"/a/{id\"\ncomponent = \"a\"\n",
                "without a closing",
            ),
            (
                "[[trigger.http]]\npriority = 1\ntargets = [{ component = \"a\", weight = 0 }]\n",
                "at least one weight must be greater than zero",
            ),
            (
                "[[trigger.http]]\npriority = 1\npath = \"/*/*/*/*/*/*/*/*/*\"\ncomponent = \"a\"\n",
                "at most 8 are allowed",
            ),
        ];
        for (rules, want) in cases {
            let got = build_err(rules);
            assert!(got.contains(want), "for\n{rules}\ngot: {got}\nwant: {want}");
        }
    }
}
