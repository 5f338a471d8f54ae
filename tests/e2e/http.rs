//! The HTTP trigger end to end: the `wasmgate` binary on an ephemeral port,
//! real clients (reqwest, curl, raw TCP), real guests, certificates made
//! here.

use crate::util::{Tmpfs, is_root, json, wasmgate};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmgate_test_artifacts::{
    ECHO_MQTT, FETCH_HTTP, HELLO_HTTP, HTTP_PROBE, TICK_TIMER, WASI_HELLO,
};

/// A running `wasmgate up` with an HTTP listener.
struct Server {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Writes `manifest` (with `[http] listen = "127.0.0.1:0"` prepended
    /// unless it has its own `[http]`) and starts `up` on it.
    fn start(manifest: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, manifest)
    }

    fn start_in(dir: tempfile::TempDir, manifest: &str) -> Server {
        let text = if manifest.contains("[http]") {
            manifest.to_string()
        } else {
            format!("[http]\nlisten = \"127.0.0.1:0\"\n{manifest}")
        };
        let text = format!("[gateway]\nstate_dir = \"state\"\n{text}");
        let path = dir.path().join("wasmgate.toml");
        std::fs::write(&path, text).unwrap();
        let mut child = wasmgate()
            .args(["up", "-f", path.to_str().unwrap(), "--log-format", "json"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "http listening"
                {
                    let _ = tx.send(v["address"].as_str().unwrap().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!(
                    "no `http listening` line; saw:\n{}",
                    logs.lock().unwrap().join("\n")
                )
            });
        Server {
            child,
            addr: addr.parse().unwrap(),
            logs,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn sigterm(&mut self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .use_preconfigured_tls(tls_client(None, None))
        .build()
        .unwrap()
}

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A rustls client trusting `ca` (or nothing) and presenting `identity`.
fn tls_client(ca: Option<&str>, identity: Option<(&str, &str)>) -> rustls::ClientConfig {
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

async fn text(r: reqwest::Response) -> (u16, reqwest::header::HeaderMap, String) {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

fn has_id(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get("x-wasmgate-invocation-id")
        .is_some_and(|v| v.len() == 36)
}

#[tokio::test]
async fn rules_route_requests_to_components_fixed_responses_and_redirects() {
    let server = Server::start(&format!(
        r#"
[component.hello]
source = "{HELLO_HTTP}"
[component.probe]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
path = "/health"
methods = ["GET"]
fixed_response = {{ status = 200, content_type = "application/json", body = "{{\"ok\":true}}" }}

[[trigger.http]]
priority = 2
path = "/old/*"
redirect = {{ status = 301, location = "https://#{{host}}:8443/new#{{path}}?#{{query}}" }}

[[trigger.http]]
priority = 3
host = "*.probe.test"
path = "/users/{{id}}/headers"
component = "probe"

[[trigger.http]]
priority = 4
headers = {{ x-canary = "yes" }}
component = "probe"

[[trigger.http]]
priority = 5
query = {{ split = "1" }}
targets = [{{ component = "hello", weight = 1 }}, {{ component = "probe", weight = 1 }}]

[[trigger.http]]
priority = 6
path = "/hello/*"
methods = ["GET", "POST"]
component = "hello"
"#
    ));
    let c = client();

    let (status, headers, body) = text(c.get(server.url("/health")).send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (200, "{\"ok\":true}"));
    assert_eq!(headers["content-type"], "application/json");
    assert!(has_id(&headers));

    let (status, headers, _) = text(
        c.get(server.url("/old/page?x=1"))
            .header("host", "site.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 301);
    assert_eq!(
        headers["location"],
        "https://site.example:8443/new/old/page?x=1"
    );

    let (status, headers, body) = text(
        c.get(server.url("/users/42/headers?a=b"))
            .header("host", "API.probe.test")
            .header("x-forwarded-for", "203.0.113.9")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(has_id(&headers));
    let id = headers["x-wasmgate-invocation-id"].to_str().unwrap();
    for want in [
        "scheme: http\n",
        "authority: API.probe.test\n",
        "path: /users/42/headers?a=b\n",
        "x-wasmgate-param-id: 42\n",
        "x-forwarded-for: 203.0.113.9, 127.0.0.1\n",
        "x-forwarded-proto: http\n",
        &format!("x-wasmgate-invocation-id: {id}\n"),
    ] {
        assert!(body.contains(want), "{want:?} missing from:\n{body}");
    }

    let (status, _, body) = text(
        c.get(server.url("/anything"))
            .header("x-canary", "YES")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "probe GET /anything\n"));

    let (status, _, body) = text(c.post(server.url("/hello/x")).send().await.unwrap()).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "Hello from wasmgate: POST /hello/x\n")
    );

    // No rule matches: PUT is not among /hello's methods.
    let (status, headers, body) = text(c.put(server.url("/hello/x")).send().await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    assert!(has_id(&headers));

    // A 1:1 split sends both ways.
    let (mut hello, mut probe) = (0, 0);
    for _ in 0..100 {
        let (_, _, body) = text(c.get(server.url("/s?split=1")).send().await.unwrap()).await;
        if body.starts_with("Hello from wasmgate") {
            hello += 1;
        } else if body.starts_with("probe GET") {
            probe += 1;
        }
    }
    assert_eq!(hello + probe, 100);
    assert!(
        (20..=80).contains(&hello),
        "hello {hello}, probe {probe} of 100"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_map_to_statuses_without_host_internals() {
    let server = Server::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
max_body = "4KiB"

[component.probe]
source = "{HTTP_PROBE}"
limits = {{ fuel = 50_000_000, memory = "8MiB", timeout = "700ms" }}
[component.single]
source = "{HTTP_PROBE}"
limits = {{ timeout = "10s", concurrency = 1 }}

[[trigger.http]]
priority = 1
path = "/single/*"
component = "single"
[[trigger.http]]
priority = 2
component = "probe"
"#
    ));
    let c = client();
    let cases = [
        ("/trap", 500),
        ("/spin", 500),
        ("/memory", 500),
        ("/sleep?ms=5000", 504),
        ("/no-response", 500),
        ("/error-code", 500),
    ];
    for (path, want) in cases {
        let (status, headers, body) = text(c.get(server.url(path)).send().await.unwrap()).await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(has_id(&headers), "{path}");
        for leak in [
            "wasm",
            "panicked",
            "backtrace",
            "/work",
            "trap",
            "fuel",
            "memory",
        ] {
            assert!(
                !body.to_lowercase().contains(leak),
                "{path}: body leaks {leak:?}: {body}"
            );
        }
    }
    // The log says what happened.
    let logs = server.logs();
    for outcome in ["trap", "fuel_exhausted", "memory_limit", "timeout"] {
        assert!(
            logs.contains(&format!("\"outcome\":\"{outcome}\"")),
            "{outcome} not logged"
        );
    }

    // Bodies: within the limit echoed, over it 413 (declared or streamed).
    let small = vec![7u8; 3000];
    let r = c
        .post(server.url("/echo"))
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), small.as_slice());
    let r = c
        .post(server.url("/echo"))
        .body(vec![7u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..5).map(|_| Ok(vec![1u8; 1024])).collect();
    let streamed = reqwest::Body::wrap_stream(futures_stream(chunks));
    let r = c
        .post(server.url("/echo"))
        .body(streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Concurrency 1: a second request while one sleeps is turned away.
    let slow = tokio::spawn({
        let c = c.clone();
        let url = server.url("/single/sleep?ms=1500");
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    });
    // Let the slow request take the only slot first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let r = c.get(server.url("/single/x")).send().await.unwrap();
        if r.status() == 503 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "1");
    assert_eq!(slow.await.unwrap(), 200);

    // The component and the listener are fine afterwards.
    let (status, _, body) = text(c.get(server.url("/after")).send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (200, "probe GET /after\n"));
}

/// A stream of body chunks without a declared length.
fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    struct Chunks(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Chunks(chunks.into_iter())
}

/// Sends raw bytes and returns what came back before the server closed or
/// `wait` passed.
fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_slow_clients_get_errors_and_the_listener_goes_on() {
    let server = Server::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
header_timeout = "1s"
request_timeout = "1s"

[component.probe]
source = "{HTTP_PROBE}"
limits = {{ timeout = "20s" }}

[[trigger.http]]
priority = 1
component = "probe"
"#
    ));
    let addr = server.addr;
    let got = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        got.push(raw(
            addr,
            b"NOT HTTP AT ALL\r\n\r\n",
            Duration::from_secs(5),
        ));
        let huge = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        got.push(raw(addr, huge.as_bytes(), Duration::from_secs(5)));
        // Slowloris: half a request head, then nothing.
        let started = Instant::now();
        got.push(raw(
            addr,
            b"GET / HTTP/1.1\r\nhost: x\r\n",
            Duration::from_secs(10),
        ));
        got.push(format!("{}", started.elapsed().as_millis()));
        got.push(raw(
            addr,
            b"GET /headers HTTP/1.1\r\nhost: x\r\nx-raw: caf\xe9\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        ));
        got.push(raw(
            addr,
            b"GET / HTTP/1.1\r\nhost: h\xe9st\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        ));
        got.push(raw(
            addr,
            b"GET /caf\xe9 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        ));
        got
    })
    .await
    .unwrap();
    assert!(got[0].starts_with("HTTP/1.1 400"), "{}", got[0]);
    assert!(
        got[1].starts_with("HTTP/1.1 431"),
        "{}",
        &got[1][..got[1].len().min(200)]
    );
    // The slow client was cut off by the header timeout, not the read timeout.
    let cut_after_ms: u128 = got[3].parse().unwrap();
    assert!(
        cut_after_ms < 9_000,
        "slow client held {cut_after_ms} ms: {}",
        got[2]
    );
    assert!(got[4].starts_with("HTTP/1.1 200"), "{}", got[4]);
    assert!(got[4].contains("x-raw: caf\u{fffd}"), "{}", got[4]);
    assert!(got[5].starts_with("HTTP/1.1 400"), "{}", got[5]);
    assert!(
        got[6].starts_with("HTTP/1.1 400"),
        "non-UTF-8 path: {}",
        got[6]
    );

    // The request timeout answers 504 while the guest would still run.
    let r = client()
        .get(server.url("/sleep?ms=5000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(has_id(r.headers()));

    let (status, _, body) = text(client().get(server.url("/ok")).send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (200, "probe GET /ok\n"));
    let logs = server.logs();
    assert!(logs.contains("connection ended with an error"), "{logs}");
    assert!(logs.contains("request timed out"), "{logs}");
}

#[tokio::test]
async fn past_max_connections_clients_wait_for_a_free_connection() {
    let server = Server::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
max_connections = 1

[component.probe]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
component = "probe"
"#
    ));
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        // The first client holds the only connection without sending.
        let holder = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mut waiting = TcpStream::connect(addr).unwrap();
        waiting
            .write_all(b"GET /second HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        waiting
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let mut buf = [0u8; 64];
        let early = waiting.read(&mut buf);
        assert!(
            early.is_err(),
            "served while the only connection was taken: {early:?}"
        );
        drop(holder);
        waiting
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = Vec::new();
        waiting.read_to_end(&mut out).unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("probe GET /second\n"), "{out}");
    })
    .await
    .unwrap();
}

#[test]
fn bad_tls_files_stop_up_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("not.pem"), "hello\n").unwrap();
    let cases = [
        (
            "cert = \"missing.pem\"\nkey = \"not.pem\"",
            "http.tls.cert: ",
        ),
        (
            "cert = \"not.pem\"\nkey = \"not.pem\"",
            "contains no PEM certificate",
        ),
    ];
    for (tls, want) in cases {
        let path = dir.path().join("wasmgate.toml");
        std::fs::write(
            &path,
            format!(
                "[http]\nlisten = \"127.0.0.1:0\"\n[http.tls]\n{tls}\n[component.hello]\nsource = \"{HELLO_HTTP}\"\n[[trigger.http]]\npriority = 1\ncomponent = \"hello\"\n"
            ),
        )
        .unwrap();
        let out = wasmgate()
            .args(["up", "-f", path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(want), "{want:?} not in {stderr}");
    }
}

#[tokio::test]
async fn reuse_keeps_an_instance_for_n_requests_and_fresh_is_the_default() {
    let server = Server::start(&format!(
        r#"
[component.warm]
source = "{HTTP_PROBE}"
reuse = 3
limits = {{ concurrency = 1 }}
[component.fresh]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
path = "/warm/*"
component = "warm"
[[trigger.http]]
priority = 2
component = "fresh"
"#
    ));
    let c = client();
    let mut warm = Vec::new();
    let mut fresh = Vec::new();
    for _ in 0..7 {
        warm.push(
            text(c.get(server.url("/warm/count")).send().await.unwrap())
                .await
                .2,
        );
        fresh.push(
            text(c.get(server.url("/count")).send().await.unwrap())
                .await
                .2,
        );
    }
    let counts = |v: &[String]| -> Vec<String> { v.iter().map(|s| s.trim().to_string()).collect() };
    assert_eq!(
        counts(&warm),
        [
            "count=1", "count=2", "count=3", "count=1", "count=2", "count=3", "count=1"
        ]
    );
    assert!(counts(&fresh).iter().all(|c| c == "count=1"), "{fresh:?}");
    // A failed request drops the warm instance.
    assert_eq!(
        c.get(server.url("/warm/trap"))
            .send()
            .await
            .unwrap()
            .status(),
        500
    );
    assert_eq!(
        text(c.get(server.url("/warm/count")).send().await.unwrap())
            .await
            .2
            .trim(),
        "count=1"
    );
}

/// With `reuse`, a request whose guest answers with an error code or not at
/// all gets a 500 and its instance is dropped: the next request meets a
/// fresh instance, not one in an unknown state.
#[tokio::test]
async fn reuse_drops_an_instance_that_answered_with_an_error_or_not_at_all() {
    let server = Server::start(&format!(
        r#"
[component.warm]
source = "{HTTP_PROBE}"
reuse = 100
limits = {{ concurrency = 1 }}

[[trigger.http]]
priority = 1
component = "warm"
"#
    ));
    let c = client();
    let count = || async {
        text(c.get(server.url("/count")).send().await.unwrap())
            .await
            .2
    };
    assert_eq!(count().await.trim(), "count=1");
    assert_eq!(count().await.trim(), "count=2");
    for bad in ["/no-response", "/error-code"] {
        let r = c.get(server.url(bad)).send().await.unwrap();
        assert_eq!(r.status(), 500, "{bad}");
        assert_eq!(
            count().await.trim(),
            "count=1",
            "after {bad}: a fresh instance"
        );
        assert_eq!(count().await.trim(), "count=2");
    }
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_exits() {
    let mut server = Server::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
drain_timeout = "10s"

[component.probe]
source = "{HTTP_PROBE}"
limits = {{ timeout = "10s" }}

[[trigger.http]]
priority = 1
component = "probe"
"#
    ));
    let c = client();
    let in_flight = tokio::spawn({
        let c = c.clone();
        let url = server.url("/single/sleep?ms=1500");
        async move { text(c.get(url).send().await.unwrap()).await }
    });
    // Give the request time to reach the guest, then ask the host to stop.
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.sigterm();
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slept 1500\n"));
    let code = tokio::task::spawn_blocking(move || {
        let code = server.child.wait().unwrap();
        (code, server.logs(), server.addr)
    })
    .await
    .unwrap();
    assert_eq!(code.0.code(), Some(0), "{}", code.1);
    assert!(code.1.contains("stopped accepting"), "{}", code.1);
    assert!(
        TcpStream::connect(code.2).is_err(),
        "still accepting after exit"
    );
}

#[tokio::test]
async fn outbound_http_only_to_allowed_hosts() {
    // An upstream that counts the requests it gets.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let hits = Arc::new(Mutex::new(0));
    let seen = hits.clone();
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            *seen.lock().unwrap() += 1;
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
    });
    let server = Server::start(&format!(
        r#"
[component.fetch]
source = "{FETCH_HTTP}"
allow = {{ outbound_http = ["127.0.0.1"] }}

[[trigger.http]]
priority = 1
component = "fetch"
"#
    ));
    let c = client();
    let (status, _, body) = text(
        c.get(server.url(&format!("/?authority={up_addr}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "upstream 204\n"));
    let (status, _, body) = text(
        c.get(server.url(&format!("/?authority=localhost:{}", up_addr.port())))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    assert_eq!(*hits.lock().unwrap(), 1);
}

/// A CA, and certificates it signs, as PEM files in `dir`.
struct Pki {
    ca: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wasmgate test CA");
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names`: (cert PEM, key PEM).
    fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if client {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn tls_with_sni_http2_and_client_certificates() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (default_cert, default_key) = pki.leaf(&["localhost"], false);
    let (sni_cert, sni_key) = pki.leaf(&["*.sni.test"], false);
    let (client_cert, client_key) = pki.leaf(&["device-7"], true);
    let ca = write(dir.path(), "ca.pem", &pki.ca);
    write(dir.path(), "server.pem", &default_cert);
    write(dir.path(), "server.key", &default_key);
    write(dir.path(), "sni.pem", &sni_cert);
    write(dir.path(), "sni.key", &sni_key);
    let client_cert_path = write(dir.path(), "client.pem", &client_cert);
    let client_key_path = write(dir.path(), "client.key", &client_key);
    let server = Server::start_in(
        dir,
        &format!(
            r#"
[http]
listen = "127.0.0.1:0"
[http.tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
sni = [{{ cert = "sni.pem", key = "sni.key" }}]

[component.probe]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
component = "probe"
"#
        ),
    );
    let port = server.addr.port();
    let with_cert = reqwest::Client::builder()
        .use_preconfigured_tls(tls_client(Some(&pki.ca), Some((&client_cert, &client_key))))
        .resolve("api.sni.test", server.addr)
        .resolve("localhost", server.addr)
        .build()
        .unwrap();

    // The default certificate, HTTP/2 by ALPN, the guest sees https.
    let r = with_cert
        .get(format!("https://localhost:{port}/headers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (status, headers, body) = text(r).await;
    assert_eq!(status, 200, "{body}");
    assert!(has_id(&headers));
    assert!(body.contains("scheme: https\n"), "{body}");
    assert!(body.contains("x-forwarded-proto: https\n"), "{body}");

    // SNI picks the wildcard certificate (the default one is not valid for
    // this name, so verification would fail if it were served).
    let r = with_cert
        .get(format!("https://api.sni.test:{port}/hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(text(r).await.2, "probe GET /hi\n");

    // Without a client certificate the handshake is refused.
    let anonymous = reqwest::Client::builder()
        .use_preconfigured_tls(tls_client(Some(&pki.ca), None))
        .resolve("localhost", server.addr)
        .build()
        .unwrap();
    assert!(
        anonymous
            .get(format!("https://localhost:{port}/"))
            .send()
            .await
            .is_err()
    );

    // Plain HTTP and garbage at the TLS port end only that connection.
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        raw(addr, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5))
    })
    .await
    .unwrap();

    // curl, HTTP/1.1 over TLS with the client certificate.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--cacert"])
        .arg(&ca)
        .arg("--cert")
        .arg(&client_cert_path)
        .arg("--key")
        .arg(&client_key_path)
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(format!("https://localhost:{port}/curl"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "probe GET /curl\n\n1.1 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        server.logs().contains("TLS handshake failed"),
        "{}",
        server.logs()
    );
}

#[tokio::test]
async fn curl_over_plain_http_and_h2c() {
    let server = Server::start(&format!(
        "[component.hello]\nsource = \"{HELLO_HTTP}\"\n[[trigger.http]]\npriority = 1\ncomponent = \"hello\"\n"
    ));
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", flag, "-w", "\n%{http_version} %{http_code}"])
            .arg(server.url("/c"))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let want_version = if flag == "--http1.1" { "1.1" } else { "2" };
        assert_eq!(
            stdout,
            format!("Hello from wasmgate: GET /c\n\n{want_version} 200"),
            "{flag}"
        );
    }
}

#[tokio::test]
async fn a_guest_built_with_the_upstream_wasi_crate_runs_unchanged() {
    let server = Server::start(&format!(
        "[component.upstream]\nsource = \"{WASI_HELLO}\"\n[[trigger.http]]\npriority = 1\ncomponent = \"upstream\"\n"
    ));
    let c = client();
    let r = c
        .get(server.url("/greet?x=1"))
        .header("x-echo", "round trip")
        .send()
        .await
        .unwrap();
    let (status, headers, body) = text(r).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-echo"], "round trip");
    assert!(has_id(&headers));
    assert_eq!(body, "hello from an upstream wasi guest: GET /greet?x=1\n");
    // A body larger than one pipe buffer streams in and back out.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let r = c
        .post(server.url("/body"))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), payload.as_slice());
}

/// The state directory fills up while a timer keeps failing: the dead
/// letters that cannot be written are reported (with a running count), HTTP
/// goes on, and once space is free dead letters are written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_http_keeps_serving() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mount = Tmpfs::mount(&state, "2m");
    let server = Server::start_in(
        dir,
        &format!(
            r#"
[component.hello]
source = "{HELLO_HTTP}"
[component.tick]
source = "{TICK_TIMER}"
env = {{ TICK_FAIL = "sensor offline" }}

[[trigger.http]]
priority = 1
component = "hello"

[[trigger.timer]]
component = "tick"
every = "300ms"
retry = {{ attempts = 1 }}
"#
        ),
    );
    let wait_for = |text: &str, after: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let logs = server.logs();
            if logs[after.min(logs.len())..].contains(text) {
                return logs.len();
            }
            assert!(Instant::now() < deadline, "{text:?} never logged:\n{logs}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mark = wait_for("event dead-lettered", 0);

    // Fill the disk.
    let filler = mount.fill("filler");
    let mark = wait_for("could not be dead-lettered", mark);
    assert!(
        server.logs().contains("\"write_failures\":"),
        "no failure count logged"
    );
    let c = client();
    for _ in 0..5 {
        let r = c.get(server.url("/still-serving")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    // Space again: dead letters are written again.
    std::fs::remove_file(&filler).unwrap();
    wait_for("event dead-lettered", mark);
    let r = c.get(server.url("/after")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// The HTTP/2 client preface and an empty SETTINGS frame: what an h2c
/// client sends before its first request.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Reads until the server closes the connection (or `wait` passes);
/// `true` when it closed.
fn closed_within(mut s: &TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) if started.elapsed() < wait => {}
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Idle clients that hold every connection slot: an HTTP/2 client that sent
/// its preface and nothing more (and never answers a ping), an HTTP/1.1
/// keep-alive client after one request, a client that never sends a byte.
/// Each is closed after `idle_timeout`, and a new client is then served.
#[tokio::test]
async fn idle_connections_are_closed_and_cannot_lock_out_new_clients() {
    let server = Server::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
max_connections = 3
idle_timeout = "1s"
header_timeout = "30s"

[component.probe]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
component = "probe"
"#
    ));
    let addr = server.addr;
    let closed = tokio::task::spawn_blocking(move || {
        let mut h2 = TcpStream::connect(addr).unwrap();
        h2.write_all(H2_PREFACE).unwrap();
        let mut h1 = TcpStream::connect(addr).unwrap();
        h1.write_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let silent = TcpStream::connect(addr).unwrap();
        // Every slot is now taken. The HTTP/1.1 client reads its response
        // and keeps the connection open.
        h1.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = [0u8; 12];
        h1.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        let wait = Duration::from_secs(20);
        [
            closed_within(&h2, wait),
            closed_within(&h1, wait),
            closed_within(&silent, wait),
        ]
    })
    .await
    .unwrap();
    assert_eq!(closed, [true, true, true], "h2, h1 keep-alive, silent");
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        client().get(server.url("/after")).send(),
    )
    .await
    .expect("a new client waited behind idle connections")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "probe GET /after\n");
}

/// A client cannot pass its own headers off as the host's, and a Host
/// header that is not a host name (user info, spaces, a path) is refused
/// before it can reach a redirect's `Location`.
#[tokio::test]
async fn client_wasmgate_headers_are_stripped_and_bad_hosts_refused() {
    let server = Server::start(&format!(
        r#"
[component.probe]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
path = "/old/*"
redirect = {{ status = 301, location = "https://#{{host}}#{{path}}" }}

[[trigger.http]]
priority = 2
path = "/users/{{id}}/*"
component = "probe"
"#
    ));
    let (status, headers, body) = text(
        client()
            .get(server.url("/users/42/headers"))
            .header("x-wasmgate-param-id", "spoofed")
            .header("x-wasmgate-param-role", "admin")
            .header("x-wasmgate-invocation-id", "forged")
            .header("x-wasmgate-anything", "forged")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = headers["x-wasmgate-invocation-id"].to_str().unwrap();
    assert!(body.contains("x-wasmgate-param-id: 42\n"), "{body}");
    assert!(
        body.contains(&format!("x-wasmgate-invocation-id: {id}\n")),
        "{body}"
    );
    for forged in ["spoofed", "admin", "forged", "x-wasmgate-param-role"] {
        assert!(
            !body.contains(forged),
            "{forged} reached the guest:\n{body}"
        );
    }

    let addr = server.addr;
    let answers = tokio::task::spawn_blocking(move || {
        [
            "a@evil.example",
            "user:pw@evil.example",
            "evil.example/x",
            "good.example:99999",
        ]
        .map(|host| {
            raw(
                addr,
                format!("GET /old/page HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
                Duration::from_secs(10),
            )
        })
    })
    .await
    .unwrap();
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("location:"),
            "{answer}"
        );
    }
    let (status, headers, _) = text(
        client()
            .get(server.url("/old/page"))
            .header("host", "good.example:8080")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 301);
    assert_eq!(headers["location"], "https://good.example/old/page");
}

/// A component that imports capabilities it is not granted (outbound HTTP
/// here, MQTT publish too: the SDK's http-app world imports both) loads, as
/// components from ComponentizeJS or componentize-py do; `check` notes the
/// ungranted imports; each call is denied with the WIT's own error
/// (`HTTP-request-denied`), nothing leaves the host, and the denial is
/// logged once for the component however often the guest calls. With
/// `strict_imports = true` the component is refused at load instead.
#[tokio::test]
async fn an_ungranted_import_loads_and_each_call_is_denied() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    upstream.set_nonblocking(true).unwrap();
    let component = format!(
        r#"
[component.fetch]
source = "{FETCH_HTTP}"
{{strict}}
[component.echo]
source = "{ECHO_MQTT}"

[[trigger.http]]
priority = 1
component = "fetch"
"#
    );
    // check: a note per ungranted import, not an error.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wasmgate.toml");
    std::fs::write(
        &file,
        format!(
            "[gateway]\nstate_dir = \"state\"\n{}",
            component.replace("{strict}", "")
        ),
    )
    .unwrap();
    let out = wasmgate()
        .args(["check", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for interface in ["wasi:http/outgoing-handler", "wasmgate:edge/mqtt-publisher"] {
        assert!(
            stdout.contains(&format!(
                "note: imports {interface} without a grant: each call is denied"
            )),
            "{stdout}"
        );
    }
    // strict_imports = true: refused at load, naming the grant to add.
    std::fs::write(
        &file,
        format!(
            "[gateway]\nstate_dir = \"state\"\n{}",
            component.replace("{strict}", "strict_imports = true\n")
        ),
    )
    .unwrap();
    let out = wasmgate()
        .args(["check", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("(strict_imports = true)") && stderr.contains("component.fetch"),
        "{stderr}"
    );
    // A publish without a grant is denied at the call (`denied`), and counted.
    std::fs::write(
        &file,
        format!(
            "[gateway]\nstate_dir = \"state\"\n{}",
            component.replace("{strict}", "")
        ),
    )
    .unwrap();
    let out = wasmgate()
        .args([
            "invoke",
            "-f",
            file.to_str().unwrap(),
            "echo",
            "--mqtt-topic",
            "devices/d1/temperature",
            "--payload",
            "21.5",
        ])
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["publish_denied"], 1, "{v}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not granted MQTT publish"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // up: loads and serves; every outbound call is denied at the call.
    let server = Server::start(&component.replace("{strict}", ""));
    let c = client();
    for _ in 0..3 {
        let (status, _, body) = text(
            c.get(server.url(&format!("/?authority={up_addr}")))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("HttpRequestDenied"), "{body}");
    }
    assert!(
        upstream.accept().is_err(),
        "a denied request reached the upstream"
    );
    let logs = server.logs();
    assert_eq!(
        logs.matches("outbound HTTP request denied").count(),
        1,
        "logged once for the component: {logs}"
    );
    assert!(logs.contains("is not granted outbound HTTP"), "{logs}");
    assert!(
        logs.contains("imports capabilities it is not granted"),
        "{logs}"
    );
}

/// An answer given before the request body has been read (the host's 413
/// for a declared or streamed body past `max_body`, or a guest that does
/// not read the body) reaches a client that is still uploading: the host
/// reads and discards the rest for a bounded time before it closes, so the
/// close does not reset the connection over the unread upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_a_client_still_uploading() {
    let server = Server::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
max_body = "64KiB"

[component.probe]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
component = "probe"
"#
    ));
    let c = client();
    let big = vec![b'x'; 8 << 20];
    for round in 0..3 {
        // Declared past the limit: the host answers 413 unread.
        let r = c
            .post(server.url("/echo"))
            .body(big.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}, declared: {e:?}"));
        assert_eq!(r.status(), 413);
        // Streamed past the limit: 413 once 64 KiB have arrived.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..128).map(|_| Ok(vec![1u8; 64 * 1024])).collect();
        let r = c
            .post(server.url("/echo"))
            .body(reqwest::Body::wrap_stream(futures_stream(chunks)))
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}, streamed: {e:?}"));
        assert_eq!(r.status(), 413);
        // The guest answers without reading the body at all.
        let r = c
            .post(server.url("/count"))
            .body(vec![b'y'; 60 * 1024])
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}, unread: {e:?}"));
        assert_eq!(r.status(), 200);
    }
    // With a raw client: the 413 is readable after the upload is written.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(&big);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out:?}");
}
