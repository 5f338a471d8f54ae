//! `http-probe`: a wasi:http guest whose path selects a behaviour, for the
//! HTTP trigger's tests. The last path segment names the behaviour, so
//! `/anything/headers` works like `/headers`.
//!
//! | path              | behaviour                                                 |
//! |-------------------|-----------------------------------------------------------|
//! | `/headers`        | 200; body lists scheme, authority, path and every header  |
//! | `/echo`           | 200; body is the request body (read to its end)           |
//! | `/count`          | 200 `count=N`: requests this instance has served          |
//! | `/sleep?ms=N`     | sleeps N ms in a host call, then 200 `slept N`            |
//! | `/big?kb=N`       | 200 with N KiB of `x`, streamed in 4 KiB writes           |
//! | `/trap`           | panics before answering                                   |
//! | `/spin`           | loops forever (fuel or the deadline stops it)             |
//! | `/memory`         | allocates until the memory limit stops it                 |
//! | `/no-response`    | returns without setting a response                        |
//! | `/error-code`     | answers with a `wasi:http` error code, not a response     |
//! | anything else     | 200 `probe METHOD PATH`                                   |

wasmgate_guest::bindings!("http-app");

use exports::wasi::http::incoming_handler::Guest;
use std::sync::atomic::{AtomicU64, Ordering};
use wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse,
    ResponseOutparam, Scheme,
};
use wasi::io::streams::StreamError;

static SERVED: AtomicU64 = AtomicU64::new(0);

struct Probe;

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[(
        "content-type".to_string(),
        b"text/plain; charset=utf-8".to_vec(),
    )])
    .expect("static header is valid");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status");
    let outgoing = response.body().expect("body is taken once");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = outgoing.write().expect("stream is taken once");
        for chunk in body.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .expect("client is reading");
        }
    }
    OutgoingBody::finish(outgoing, None).expect("body is complete");
}

fn method_name(m: Method) -> String {
    match m {
        Method::Get => "GET".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Head => "HEAD".into(),
        Method::Other(m) => m,
        other => format!("{other:?}").to_uppercase(),
    }
}

fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, String> {
    let body = request.consume().map_err(|()| "body taken".to_string())?;
    let mut out = Vec::new();
    {
        let stream = body.stream().map_err(|()| "stream taken".to_string())?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
            }
        }
    }
    IncomingBody::finish(body);
    Ok(out)
}

fn query_number(path: &str, key: &str) -> u64 {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(0)
}

impl Guest for Probe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        let full = request.path_with_query().unwrap_or_default();
        let path = full.split('?').next().unwrap_or("");
        let last = format!("/{}", path.rsplit('/').next().unwrap_or(""));
        match last.as_str() {
            "/headers" => {
                let scheme = match request.scheme() {
                    Some(Scheme::Http) => "http".to_string(),
                    Some(Scheme::Https) => "https".to_string(),
                    Some(Scheme::Other(s)) => s,
                    None => "none".to_string(),
                };
                let mut text = format!(
                    "scheme: {scheme}\nauthority: {}\npath: {full}\n",
                    request.authority().unwrap_or_default()
                );
                for (name, value) in request.headers().entries() {
                    text.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(&value)));
                }
                respond(out, 200, text.as_bytes());
            }
            "/echo" => match read_body(&request) {
                Ok(body) => respond(out, 200, &body),
                Err(e) => respond(out, 400, format!("cannot read the body: {e}\n").as_bytes()),
            },
            "/count" => respond(out, 200, format!("count={served}\n").as_bytes()),
            "/sleep" => {
                let ms = query_number(&full, "ms");
                std::thread::sleep(std::time::Duration::from_millis(ms));
                respond(out, 200, format!("slept {ms}\n").as_bytes());
            }
            "/big" => {
                let kb = query_number(&full, "kb") as usize;
                respond(out, 200, &vec![b'x'; kb * 1024]);
            }
            "/trap" => panic!("the probe was asked to trap"),
            "/spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "/memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1024 * 1024]);
                    std::hint::black_box(&hoard);
                }
            }
            "/no-response" => {}
            "/error-code" => ResponseOutparam::set(
                out,
                Err(ErrorCode::InternalError(Some("the probe failed".into()))),
            ),
            _ => {
                let text = format!("probe {} {full}\n", method_name(request.method()));
                respond(out, 200, text.as_bytes());
            }
        }
    }
}

export!(Probe);
