//! `[http]` and `[[trigger.http]]`: the listener and its ALB-style rules.
//!
//! This file only describes the TOML. The rules are checked and compiled by
//! the HTTP trigger's router (`wasmgate_trigger_http::router::Router::build`),
//! which every command of the binary runs right after [`crate::Manifest::load`],
//! so a bad rule is a load-time error naming the rule.

use crate::limits::{HumanDuration, Size};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// `[http]`: the HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// TLS. Without it the listener speaks plain HTTP (HTTP/1.1 and h2c).
    pub tls: Option<TlsConfig>,
    /// Largest request body accepted (default 10 MiB); larger ones get 413.
    pub max_body: Option<Spanned<Size>>,
    /// Time a client has to send the request head, and to finish a TLS
    /// handshake (default 10 s). Bounds slow-header (slowloris) clients.
    pub header_timeout: Option<Spanned<HumanDuration>>,
    /// Time from the request head to the response head (default 60 s); past
    /// it the client gets 504.
    pub request_timeout: Option<Spanned<HumanDuration>>,
    /// How long a connection may stay open with no request in flight
    /// (default 60 s, as ALB): an idle HTTP/1.1 keep-alive or HTTP/2
    /// connection, or one that never sends a request, is then closed
    /// gracefully so it cannot hold one of `max_connections` for ever.
    pub idle_timeout: Option<Spanned<HumanDuration>>,
    /// Connections served at once (default 1,024); further clients wait in
    /// the kernel's accept queue.
    pub max_connections: Option<Spanned<u32>>,
    /// On shutdown, how long in-flight requests may take to finish
    /// (default 30 s).
    pub drain_timeout: Option<Spanned<HumanDuration>>,
}

/// The listener's limits, with their defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// See [`HttpConfig::max_body`].
    pub max_body: u64,
    /// See [`HttpConfig::header_timeout`].
    pub header_timeout: Duration,
    /// See [`HttpConfig::request_timeout`].
    pub request_timeout: Duration,
    /// See [`HttpConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`HttpConfig::max_connections`].
    pub max_connections: u32,
    /// See [`HttpConfig::drain_timeout`].
    pub drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_body: 10 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl HttpConfig {
    /// The limits, defaults applied.
    pub fn limits(&self) -> HttpLimits {
        let d = HttpLimits::default();
        HttpLimits {
            max_body: self.max_body.as_ref().map_or(d.max_body, |s| s.get_ref().0),
            header_timeout: self
                .header_timeout
                .as_ref()
                .map_or(d.header_timeout, |t| t.get_ref().0),
            request_timeout: self
                .request_timeout
                .as_ref()
                .map_or(d.request_timeout, |t| t.get_ref().0),
            idle_timeout: self
                .idle_timeout
                .as_ref()
                .map_or(d.idle_timeout, |t| t.get_ref().0),
            max_connections: self
                .max_connections
                .as_ref()
                .map_or(d.max_connections, |n| *n.get_ref()),
            drain_timeout: self
                .drain_timeout
                .as_ref()
                .map_or(d.drain_timeout, |t| t.get_ref().0),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
            tls: None,
            max_body: None,
            header_timeout: None,
            request_timeout: None,
            idle_timeout: None,
            max_connections: None,
            drain_timeout: None,
        }
    }
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// `[http.tls]`: the default certificate, more certificates chosen by SNI,
/// and optional client-certificate verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM: served when no `sni` certificate fits the
    /// name the client asked for.
    pub cert: Spanned<PathBuf>,
    /// Its private key, PEM.
    pub key: Spanned<PathBuf>,
    /// Further certificates; each serves the names its certificate is valid
    /// for (its subject alternative names, wildcards included).
    #[serde(default)]
    pub sni: Vec<TlsFiles>,
    /// CA certificates (PEM). When set, every client must present a
    /// certificate signed by one of them (mutual TLS).
    pub client_ca: Option<Spanned<PathBuf>>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: Spanned<PathBuf>,
    /// Private key, PEM.
    pub key: Spanned<PathBuf>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several values (any may match).
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values.
    pub fn values(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One `[[trigger.http]]` rule: conditions (all must match) and one action.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTrigger {
    /// Rule priority: the lowest number wins; unique among the rules.
    pub priority: Spanned<u32>,
    /// Host patterns (`*` and `?`, case-insensitive), any may match.
    pub host: Option<Spanned<OneOrMany>>,
    /// Path patterns (`*`, `?`, `{name}` for one segment), any may match.
    pub path: Option<Spanned<OneOrMany>>,
    /// Methods the rule matches; empty means all.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Header name = value pattern(s), case-insensitive; all names must match.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<OneOrMany>>,
    /// Query key = value pattern(s); all keys must match.
    #[serde(default)]
    pub query: BTreeMap<String, Spanned<OneOrMany>>,
    /// Client address ranges (CIDR), any may match.
    #[serde(default)]
    pub source_ip: Vec<Spanned<String>>,
    /// Action: forward to this component.
    pub component: Option<Spanned<String>>,
    /// Action: forward to one of these components, chosen by weight.
    pub targets: Option<Spanned<Vec<WeightedTarget>>>,
    /// Action: answer with a fixed response.
    pub fixed_response: Option<Spanned<FixedResponse>>,
    /// Action: redirect.
    pub redirect: Option<Spanned<Redirect>>,
}

impl HttpTrigger {
    /// The components this rule can forward to, with their positions.
    pub fn components(&self) -> Vec<&Spanned<String>> {
        let mut out: Vec<&Spanned<String>> = self.component.iter().collect();
        if let Some(targets) = &self.targets {
            out.extend(targets.get_ref().iter().map(|t| &t.component));
        }
        out
    }

    /// A one-line summary of the action, for `wasmgate check`.
    pub fn action_text(&self) -> String {
        if let Some(c) = &self.component {
            return c.get_ref().clone();
        }
        if let Some(t) = &self.targets {
            return t
                .get_ref()
                .iter()
                .map(|t| format!("{}({})", t.component.get_ref(), t.weight.get_ref()))
                .collect::<Vec<_>>()
                .join(" ");
        }
        if let Some(f) = &self.fixed_response {
            return format!("fixed {}", f.get_ref().status.get_ref());
        }
        if let Some(r) = &self.redirect {
            let r = r.get_ref();
            return format!("redirect {} {}", r.status.get_ref(), r.location.get_ref());
        }
        "(no action)".into()
    }
}

/// One weighted target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTarget {
    /// The component.
    pub component: Spanned<String>,
    /// Its share, relative to the other targets' weights (0–1000).
    pub weight: Spanned<u32>,
}

/// `fixed_response = { status, content_type, body }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedResponse {
    /// Status code, 200–599.
    pub status: Spanned<u16>,
    /// Content type (default `text/plain; charset=utf-8`).
    pub content_type: Option<String>,
    /// Body (default empty).
    #[serde(default)]
    pub body: String,
}

/// `redirect = { status, location }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// 301 or 302 (default 302).
    #[serde(default = "default_redirect_status")]
    pub status: Spanned<u16>,
    /// Target URL template over `#{protocol}`, `#{host}`, `#{port}`,
    /// `#{path}` and `#{query}`, e.g. `"https://#{host}#{path}?#{query}"`.
    pub location: Spanned<String>,
}

fn default_redirect_status() -> Spanned<u16> {
    Spanned::new(0..0, 302)
}
