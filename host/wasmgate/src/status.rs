//! `wasmgate status`: asks a running gateway's admin listener for
//! `/v1/status`: the local socket in the manifest's `state_dir` by default,
//! or `--admin http://HOST:PORT` with `--token-file`.
//!
//! Exit codes: 0 shown, 1 the gateway could not be reached or refused the
//! request, 2 bad input.

use crate::cli::{AdminArgs, DeployArgs, Fatal, RollbackArgs, StatusArgs, TriggerArgs};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::process::ExitCode;
use std::sync::Arc;

/// Largest answer read from the admin listener.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Runs `wasmgate status`.
pub async fn status(args: StatusArgs) -> Result<ExitCode, Fatal> {
    let answer = match get(&args.admin, "/v1/status").await {
        Ok(a) => a,
        Err(Unreachable(message)) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(1));
        }
    };
    if args.json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: Value = serde_json::from_str(&answer)
        .map_err(|e| Fatal(format!("the gateway's answer is not JSON: {e}")))?;
    print!("{}", render(&v));
    Ok(ExitCode::SUCCESS)
}

/// Why the gateway could not be asked.
pub struct Unreachable(pub String);

/// Where and how to reach the admin listener.
enum Target {
    Socket(std::path::PathBuf),
    Tcp {
        authority: String,
        token: String,
        /// For `https://`: the client configuration (trusting `--ca`).
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

fn target(args: &AdminArgs) -> Result<Target, Unreachable> {
    let Some(url) = &args.admin else {
        let state_dir = wasmgate_manifest::Manifest::state_dir_of(&args.file)
            .map_err(|e| Unreachable(format!("{e} (or give --admin URL)")))?;
        return Ok(Target::Socket(state_dir.join(crate::admin::SOCKET_NAME)));
    };
    let (authority, https) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(a), _) => (a, false),
        (_, Some(a)) => (a, true),
        _ => {
            return Err(Unreachable(format!(
                "--admin {url}: give http://HOST:PORT, or https://HOST:PORT with --ca"
            )));
        }
    };
    let authority = authority.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(Unreachable(format!(
            "--admin {url}: give http(s)://HOST:PORT"
        )));
    }
    let tls = match (https, &args.ca) {
        (true, Some(ca)) => Some(client_config(ca)?),
        (true, None) => {
            return Err(Unreachable(format!(
                "--admin {url}: https needs --ca, the CA certificate (PEM) that signed the admin listener's"
            )));
        }
        (false, Some(_)) => {
            return Err(Unreachable("--ca is for an https:// admin listener".into()));
        }
        (false, None) => None,
    };
    let Some(file) = &args.token_file else {
        return Err(Unreachable(
            "--admin needs --token-file (the file holding the [admin] token)".into(),
        ));
    };
    let token = std::fs::read_to_string(file)
        .map_err(|e| Unreachable(format!("--token-file {}: {e}", file.display())))?
        .trim()
        .to_string();
    Ok(Target::Tcp {
        authority: authority.to_string(),
        token,
        tls,
    })
}

/// A TLS client configuration that trusts the certificates in `ca`.
fn client_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, Unreachable> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |e: &dyn std::fmt::Display| Unreachable(format!("--ca {}: {e}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no PEM certificate in the file"));
    }
    let config =
        rustls::ClientConfig::builder_with_provider(wasmgate_trigger_http::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// GETs `path` from the admin listener; the body on 200.
pub async fn get(args: &AdminArgs, path: &str) -> Result<String, Unreachable> {
    let (status, text) = request(args, hyper::Method::GET, path, Bytes::new(), None).await?;
    if !status.is_success() {
        return Err(Unreachable(format!("{status}: {}", text.trim())));
    }
    Ok(text)
}

/// Sends one request to the admin listener; its status and body.
async fn request(
    args: &AdminArgs,
    method: hyper::Method,
    path: &str,
    body: Bytes,
    header: Option<(&str, String)>,
) -> Result<(hyper::StatusCode, String), Unreachable> {
    let target = target(args)?;
    let (io, host, token, place): (Box<dyn Io>, String, Option<String>, String) = match &target {
        Target::Socket(p) => {
            let s = tokio::net::UnixStream::connect(p).await.map_err(|e| {
                Unreachable(format!(
                    "cannot reach the gateway at {}: {e} (is `wasmgate up` running with this manifest?)",
                    p.display()
                ))
            })?;
            (
                Box::new(s),
                "localhost".into(),
                None,
                p.display().to_string(),
            )
        }
        Target::Tcp {
            authority,
            token,
            tls,
        } => {
            let s = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(|e| Unreachable(format!("cannot reach {authority}: {e}")))?;
            let s: Box<dyn Io> =
                match tls {
                    None => Box::new(s),
                    Some(config) => {
                        let host = authority
                            .rsplit_once(':')
                            .map_or(authority.as_str(), |(h, _)| h)
                            .trim_start_matches('[')
                            .trim_end_matches(']');
                        let name = rustls::pki_types::ServerName::try_from(host.to_string())
                            .map_err(|e| Unreachable(format!("--admin: {host}: {e}")))?;
                        let connector = tokio_rustls::TlsConnector::from(config.clone());
                        Box::new(connector.connect(name, s).await.map_err(|e| {
                            Unreachable(format!("TLS with {authority} failed: {e}"))
                        })?)
                    }
                };
            (s, authority.clone(), Some(token.clone()), authority.clone())
        }
    };
    let failed = |e: &dyn std::fmt::Display| Unreachable(format!("{place}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let request = request.body(Full::new(body)).map_err(|e| failed(&e))?;
    // A deploy uploads and compiles: as long as the listener allows.
    let wait = if request.method() == hyper::Method::POST {
        crate::admin::MAX_CONNECTION_AGE
    } else {
        std::time::Duration::from_secs(30)
    };
    let response = tokio::time::timeout(wait, sender.send_request(request))
        .await
        .map_err(|_| failed(&"no answer in time"))?
        .map_err(|e| failed(&e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The `error` of a JSON error answer, or the whole answer.
fn error_text(status: hyper::StatusCode, text: &str) -> String {
    let message = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| text.trim().to_string());
    format!("{status}: {message}")
}

/// Runs `wasmgate deploy NAME FILE`.
pub async fn deploy(args: DeployArgs) -> Result<ExitCode, Fatal> {
    use base64::Engine as _;
    let bytes =
        wasmgate_runtime::component::read(&args.component).map_err(|e| Fatal(e.to_string()))?;
    let sig_path = wasmgate_runtime::signature::signature_path(&args.component);
    let signature = match std::fs::read(&sig_path) {
        Ok(sig) if sig.len() <= 4096 => Some(base64::engine::general_purpose::STANDARD.encode(sig)),
        Ok(_) => {
            return Err(Fatal(format!(
                "{}: larger than 4096 bytes",
                sig_path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Fatal(format!("{}: {e}", sig_path.display()))),
    };
    let path = format!("/v1/components/{}/deploy", args.name);
    let header = signature.map(|s| (crate::admin::SIGNATURE_HEADER, s));
    let answer = request(
        &args.admin,
        hyper::Method::POST,
        &path,
        Bytes::from(bytes),
        header,
    )
    .await;
    let v = match answered(answer) {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    if v["unchanged"] == true {
        println!(
            "{}: {} is already active; nothing changed",
            args.name,
            s(&v["digest"])
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "deployed {} {} (was {}){}",
        args.name,
        s(&v["digest"]),
        s(&v["previous"]),
        match v["smoke_test"].as_str() {
            Some(outcome) => format!("; smoke test {outcome}"),
            None => String::new(),
        }
    );
    let watch_ms = v["watch_ms"].as_u64().unwrap_or(0);
    if watch_ms == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "watching it for {}; `wasmgate rollback {}` brings the previous version back",
        humantime::format_duration(std::time::Duration::from_millis(watch_ms)),
        args.name
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait_for_watch(&args, &s(&v["digest"])).await
}

/// Polls the component until its watch ended; 0 if `digest` stayed.
async fn wait_for_watch(args: &DeployArgs, digest: &str) -> Result<ExitCode, Fatal> {
    let path = format!("/v1/components/{}", args.name);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let v: Value = match get(&args.admin, &path).await {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Fatal(format!("the gateway's answer is not JSON: {e}")))?,
            Err(Unreachable(message)) => {
                eprintln!("error: {message}");
                return Ok(ExitCode::from(1));
            }
        };
        let versions = &v["versions"];
        if !versions["watch"].is_null() {
            continue;
        }
        let last = versions["history"]
            .as_array()
            .and_then(|h| h.last())
            .cloned()
            .unwrap_or(Value::Null);
        let active = s(&versions["active"]);
        if active == digest {
            println!("watch passed: {} stays ({})", digest, s(&last["reason"]));
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{}: {} is active again{}",
            if last["action"] == "automatic_rollback" {
                "rolled back"
            } else {
                "replaced"
            },
            active,
            match last["reason"].as_str() {
                Some(r) => format!(": {r}"),
                None => String::new(),
            }
        );
        return Ok(ExitCode::from(1));
    }
}

/// Runs `wasmgate rollback NAME`.
pub async fn rollback(args: RollbackArgs) -> Result<ExitCode, Fatal> {
    let path = format!("/v1/components/{}/rollback", args.name);
    let answer = request(&args.admin, hyper::Method::POST, &path, Bytes::new(), None).await;
    let v = match answered(answer) {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    println!(
        "rolled back {}: {} is active again (was {})",
        args.name,
        s(&v["to"]),
        s(&v["from"])
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `wasmgate reload`: exit 0 applied, 1 refused or unreachable.
pub async fn reload(args: crate::cli::ReloadArgs) -> Result<ExitCode, Fatal> {
    let answer = request(
        &args.admin,
        hyper::Method::POST,
        "/v1/reload",
        Bytes::new(),
        None,
    )
    .await;
    let v = match answered(answer) {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    let list = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    let mut lines = Vec::new();
    for (key, what) in [
        ("added", "components added"),
        ("removed", "components removed"),
        ("changed", "components changed"),
        ("triggers", "triggers changed"),
    ] {
        let names = list(key);
        if !names.is_empty() {
            lines.push(format!("  {what}: {}", names.join(", ")));
        }
    }
    if lines.is_empty() {
        println!("reloaded: nothing changed");
    } else {
        println!("reloaded:\n{}", lines.join("\n"));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `wasmgate pause TRIGGER` (`paused`) or `wasmgate resume TRIGGER`.
pub async fn set_paused(args: TriggerArgs, paused: bool) -> Result<ExitCode, Fatal> {
    let verb = if paused { "pause" } else { "resume" };
    let t = &args.trigger;
    let well_formed = t
        .split_once('[')
        .and_then(|(kind, rest)| Some((kind, rest.strip_suffix(']')?)))
        .is_some_and(|(kind, index)| {
            !kind.is_empty()
                && kind.bytes().all(|b| b.is_ascii_lowercase())
                && !index.is_empty()
                && index.bytes().all(|b| b.is_ascii_digit())
        });
    if !well_formed {
        return Err(Fatal(format!(
            "{t:?} is not a trigger: name one as `wasmgate status` lists them (http[0], mqtt[1], timer[2], keyvalue[0])"
        )));
    }
    // The label goes in the path: its brackets percent-encoded.
    let label = t.replace('[', "%5B").replace(']', "%5D");
    let path = format!("/v1/triggers/{label}/{verb}");
    let answer = request(&args.admin, hyper::Method::POST, &path, Bytes::new(), None).await;
    let v = match answered(answer) {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    println!(
        "{} {}{}",
        args.trigger,
        if paused { "paused" } else { "resumed" },
        if v["changed"] == true {
            ""
        } else {
            " (it already was)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The JSON of a successful answer; otherwise the error printed and exit
/// code 1.
fn answered(answer: Result<(hyper::StatusCode, String), Unreachable>) -> Result<Value, ExitCode> {
    match answer {
        Ok((status, text)) if status.is_success() => serde_json::from_str(&text).map_err(|e| {
            eprintln!("error: the gateway's answer is not JSON: {e}");
            ExitCode::from(1)
        }),
        Ok((status, text)) => {
            eprintln!("error: {}", error_text(status, &text));
            Err(ExitCode::from(1))
        }
        Err(Unreachable(message)) => {
            eprintln!("error: {message}");
            Err(ExitCode::from(1))
        }
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The last deploys and rollbacks (and running watches), newest last.
fn render_deploys(out: &mut String, v: &Value) {
    use std::fmt::Write;
    let short = |d: &Value| s(d).chars().take(19).collect::<String>();
    let mut lines = Vec::new();
    for c in v["components"].as_array().into_iter().flatten() {
        let versions = &c["versions"];
        for h in versions["history"].as_array().into_iter().flatten() {
            let at = h["at_ms"].as_i64().unwrap_or(0);
            let when = chrono::DateTime::from_timestamp_millis(at)
                .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
            let reason = h["reason"]
                .as_str()
                .map_or_else(String::new, |r| format!("  {r}"));
            lines.push((
                at,
                format!(
                    "{when}  {:<20} {:<18} {} -> {}{reason}",
                    s(&c["name"]),
                    s(&h["action"]),
                    short(&Value::String(format!("sha256:{}", s(&h["from"])))),
                    short(&Value::String(format!("sha256:{}", s(&h["to"])))),
                ),
            ));
        }
        if let Some(w) = versions["watch"].as_object() {
            lines.push((
                i64::MAX,
                format!(
                    "watching            {:<20} {} of {} invocations failed so far (rolls back past {} of at least {})",
                    s(&c["name"]),
                    s(&w["failures"]),
                    s(&w["invocations"]),
                    s(&w["max_failure_ratio"]),
                    s(&w["min_invocations"]),
                ),
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    lines.sort_by_key(|(at, _)| *at);
    let _ = writeln!(out);
    let _ = writeln!(out, "DEPLOYS (UTC, newest last)");
    let skip = lines.len().saturating_sub(10);
    for (_, line) in lines.into_iter().skip(skip) {
        let _ = writeln!(out, "{line}");
    }
}

/// The key-value buckets that hold something, with their bounds.
fn render_buckets(out: &mut String, v: &Value) {
    use std::fmt::Write;
    let buckets = v["buckets"].as_array().map_or(&[][..], Vec::as_slice);
    if buckets.is_empty() {
        return;
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<20} {:>21} {:>27}",
        "BUCKET", "KEYS (MAX)", "BYTES (MAX)"
    );
    for b in buckets {
        let _ = writeln!(
            out,
            "{:<20} {:>21} {:>27}",
            s(&b["name"]),
            format!("{} ({})", s(&b["keys"]), s(&b["max_keys"])),
            format!("{} ({})", s(&b["bytes"]), s(&b["max_bytes"])),
        );
    }
}

/// The status as text: the gateway, then a table of components and one
/// of triggers.
pub fn render(v: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let g = &v["gateway"];
    let _ = writeln!(
        out,
        "gateway {} (wasmgate {}), up {} s, state in {}",
        s(&g["name"]),
        s(&g["version"]),
        s(&g["uptime_s"]),
        s(&g["state_dir"])
    );
    if let Some(m) = v["mqtt"].as_object() {
        let _ = writeln!(
            out,
            "mqtt: {}, {} received, {} succeeded, {} dead-lettered, {} in the spool",
            if m["connected"] == true {
                "connected"
            } else {
                "not connected"
            },
            s(&m["received"]),
            s(&m["succeeded"]),
            s(&m["dead_lettered"]),
            s(&m["spool_messages"])
        );
    }
    let _ = writeln!(out, "queue: {} waiting", s(&v["queue_depth"]));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<20} {:<19} {:>11} {:>9} {:>12}  LAST ERROR",
        "COMPONENT", "DIGEST", "INVOCATIONS", "IN FLIGHT", "DEAD LETTERS"
    );
    for c in v["components"].as_array().into_iter().flatten() {
        let name = s(&c["name"]);
        let digest = s(&c["digest"]);
        let short: String = digest.chars().take(19).collect();
        let last = c["last_error"].as_object().map_or_else(
            || "-".to_string(),
            |e| format!("{} ({})", s(&e["outcome"]), s(&e["invocation_id"])),
        );
        let _ = writeln!(
            out,
            "{:<20} {:<19} {:>11} {:>9} {:>12}  {}",
            name,
            short,
            s(&c["invocations"]),
            format!("{}/{}", s(&c["in_flight"]), s(&c["concurrency"])),
            v["dead_letters"]
                .get(&name)
                .map_or_else(|| "0".to_string(), s),
            last
        );
    }
    render_deploys(&mut out, v);
    render_buckets(&mut out, v);
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<12} {:<20} SOURCE", "TRIGGER", "COMPONENT");
    for t in v["triggers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<12} {:<20} {}{}",
            s(&t["trigger"]),
            s(&t["component"]),
            s(&t["source"]),
            if t["paused"] == true {
                "  (paused)"
            } else {
                ""
            }
        );
    }
    out
}
