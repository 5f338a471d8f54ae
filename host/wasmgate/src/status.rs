//! `wasmgate status`: asks a running gateway's admin listener for
//! `/v1/status`: the local socket in the manifest's `state_dir` by default,
//! or `--admin http://HOST:PORT` with `--token-file`.
//!
//! Exit codes: 0 shown, 1 the gateway could not be reached or refused the
//! request, 2 bad input.

use crate::cli::{Fatal, StatusArgs};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::process::ExitCode;

/// Largest answer read from the admin listener.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Runs `wasmgate status`.
pub async fn status(args: StatusArgs) -> Result<ExitCode, Fatal> {
    let answer = match get(&args, "/v1/status").await {
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
    Tcp { authority: String, token: String },
}

fn target(args: &StatusArgs) -> Result<Target, Unreachable> {
    let Some(url) = &args.admin else {
        let manifest = crate::cli::load_manifest(&args.file)
            .map_err(|e| Unreachable(format!("{e} (or give --admin URL)")))?;
        return Ok(Target::Socket(
            manifest.state_dir().join(crate::admin::SOCKET_NAME),
        ));
    };
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| {
            Unreachable(format!(
                "--admin {url}: give http://HOST:PORT (the admin listener speaks plain HTTP)"
            ))
        })?
        .trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(Unreachable(format!("--admin {url}: give http://HOST:PORT")));
    }
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
    })
}

/// GETs `path` from the admin listener; the body on 200.
pub async fn get(args: &StatusArgs, path: &str) -> Result<String, Unreachable> {
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
        Target::Tcp { authority, token } => {
            let s = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(|e| Unreachable(format!("cannot reach {authority}: {e}")))?;
            (
                Box::new(s),
                authority.clone(),
                Some(token.clone()),
                authority.clone(),
            )
        }
    };
    let failed = |e: &dyn std::fmt::Display| Unreachable(format!("{place}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(conn);
    let mut request = Request::get(path).header(hyper::header::HOST, host);
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(&e))?;
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        sender.send_request(request),
    )
    .await
    .map_err(|_| failed(&"no answer within 30 s"))?
    .map_err(|e| failed(&e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(failed(&format!("{status}: {}", text.trim())));
    }
    Ok(text)
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
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<12} {:<20} SOURCE", "TRIGGER", "COMPONENT");
    for t in v["triggers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<12} {:<20} {}",
            s(&t["trigger"]),
            s(&t["component"]),
            s(&t["source"])
        );
    }
    out
}
