//! The admin listener against the real binary: `/metrics` checked by
//! `promtool` and scraped by a real Prometheus server, the bearer token,
//! the local socket and `wasmgate status`, and a client that holds
//! connections open.

use crate::examples::Up;
use crate::util::{free_port, wasmgate};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wasmgate_test_artifacts::{HELLO_HTTP, HTTP_PROBE};

const TOKEN: &str = "3f9c2e7a61b04d58a9e1c0f27b6d8e43";

/// Writes a manifest with an HTTP rule to `hello` and an admin listener on
/// an ephemeral port, and the token file.
fn manifest(dir: &Path, extra: &str) -> String {
    std::fs::write(dir.join("admin.token"), format!("{TOKEN}\n")).unwrap();
    let path = dir.join("wasmgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
name = "edge-7"
state_dir = "state"

[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"

[component.hello]
source = "{HELLO_HTTP}"
[component.probe]
source = "{HTTP_PROBE}"

[[trigger.http]]
priority = 1
path = "/probe/*"
component = "probe"
[[trigger.http]]
priority = 2
component = "hello"
{extra}"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn start(dir: &Path) -> (Up, String, String) {
    let path = manifest(dir, "");
    let up = Up::spawn(wasmgate().args(["up", "-f", &path]), &path);
    let http = up.logged("http listening", "address");
    let admin = up.logged("admin listening", "address");
    (up, http, admin)
}

/// The value of the sample `name{labels}` in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The sum of the samples whose series starts with `prefix`.
fn sum_of(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes `/metrics` until `done` accepts the text (at most 20 s).
async fn scrape_until(admin: &str, done: impl Fn(&str) -> bool) -> String {
    let c = crate::http::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = c
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never came:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_prometheus_scrapes_the_invocations() {
    let dir = tempfile::tempdir().unwrap();
    let (up, http, admin) = start(dir.path());
    let c = crate::http::client();
    for _ in 0..7 {
        let r = c.get(format!("http://{http}/hi")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Read to the end: a client that hangs up before the body makes
        // the guest's write fail (outcome `client_closed`, tested below).
        assert!(r.text().await.unwrap().starts_with("Hello from wasmgate"));
    }
    // A trap and a request no rule... every request has a rule here: a
    // trap gives a 5xx and outcome "trap".
    let r = c
        .get(format!("http://{http}/probe/trap"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);

    // /metrics needs no token. (The outcome is recorded just after the
    // guest returns, so wait until all 8 are.)
    let ok = r#"wasmgate_invocations_total{component="hello",trigger="http[1]",outcome="ok"}"#;
    scrape_until(&admin, |text| sample(text, ok) == Some(7.0)).await;
    let r = c
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers()
    );
    let text = r.text().await.unwrap();
    // All 7 ok, and nothing else for hello.
    assert_eq!(
        sum_of(&text, r#"wasmgate_invocations_total{component="hello","#),
        7.0,
        "{text}"
    );
    let trap = r#"wasmgate_invocations_total{component="probe",trigger="http[0]",outcome="trap"}"#;
    assert_eq!(sample(&text, trap), Some(1.0), "{text}");
    for series in [
        r#"wasmgate_http_requests_total{rule="http[1]",code_class="2xx"}"#,
        r#"wasmgate_invocation_duration_seconds_count{component="hello"}"#,
    ] {
        assert_eq!(sample(&text, series), Some(7.0), "{series}\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"wasmgate_http_requests_total{rule="http[0]",code_class="5xx"}"#
        ),
        Some(1.0)
    );
    assert!(
        sample(&text, r#"wasmgate_fuel_consumed_total{component="hello"}"#).unwrap() > 0.0,
        "{text}"
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(text.contains("wasmgate_component_info{component=\"hello\",digest=\"sha256:"));
    // No label carries a path or an id.
    assert!(!text.contains("/hi") && !text.contains("/probe"), "{text}");

    // promtool, Prometheus' own checker, accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes the gateway and answers, through its own
    // query API, the count the requests above caused.
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: wasmgate\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let _prometheus = crate::util::spawn_guarded(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let query = "sum(wasmgate_invocations_total{component=\"hello\",outcome=\"ok\"})";
    let deadline = Instant::now() + Duration::from_secs(90);
    let value = loop {
        let answer = c
            .post(format!("http://127.0.0.1:{port}/api/v1/query"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "query={}",
                form_urlencoded::byte_serialize(query.as_bytes()).collect::<String>()
            ))
            .send()
            .await;
        if let Ok(r) = answer
            && let Ok(text) = r.text().await
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(value) = v["data"]["result"][0]["value"][1].as_str()
        {
            break value.to_string();
        }
        assert!(Instant::now() < deadline, "Prometheus never had the series");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(value, "7");
    up.stop();
}

/// A client that hangs up while the guest streams its body makes the
/// guest's next write fail, and the probe traps on that (`expect`). The
/// outcome is `client_closed`: not a failure of the component, so not in
/// its failure count or last error (which a deploy's automatic rollback
/// watches: a hostile client must not be able to roll a deploy back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_is_not_a_component_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, http, admin) = start(dir.path());
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&http).unwrap();
        s.write_all(b"GET /probe/big?kb=16384 HTTP/1.1\r\nHost: edge\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 512];
        let n = s.read(&mut head).unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
        drop(s);
    }
    let closed = r#"wasmgate_invocations_total{component="probe",trigger="http[0]",outcome="client_closed"}"#;
    let text = scrape_until(&admin, |t| sample(t, closed) == Some(3.0)).await;
    assert_eq!(
        sum_of(&text, r#"wasmgate_invocations_total{component="probe","#),
        3.0,
        "{text}"
    );
    let status: serde_json::Value = serde_json::from_str(
        &crate::http::client()
            .get(format!("http://{admin}/v1/status"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let probe = status["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "probe")
        .unwrap();
    assert_eq!(probe["invocations"], 3, "{probe}");
    assert_eq!(probe["failures"], 0, "{probe}");
    assert!(probe["last_error"].is_null(), "{probe}");

    // A HEAD request: no body goes out, and the guest's writes still
    // succeed (the host drains them): ok, not client_closed, not a trap.
    let r = crate::http::client()
        .head(format!("http://{http}/probe/big?kb=1024"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ok = r#"wasmgate_invocations_total{component="probe",trigger="http[0]",outcome="ok"}"#;
    scrape_until(&admin, |t| sample(t, ok) == Some(1.0)).await;

    // A trap with the client still there is a trap.
    let r = crate::http::client()
        .get(format!("http://{http}/probe/trap"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let trap = r#"wasmgate_invocations_total{component="probe",trigger="http[0]",outcome="trap"}"#;
    scrape_until(&admin, |t| sample(t, trap) == Some(1.0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_token_and_the_local_socket_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let (up, http, admin) = start(dir.path());
    let manifest = dir.path().join("wasmgate.toml");
    let c = crate::http::client();
    let r = c.get(format!("http://{http}/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Over TCP: no token, a wrong one, another scheme → 401.
    for auth in [
        None,
        Some(format!("Bearer {TOKEN}x")),
        Some("Bearer short".to_string()),
        Some(format!("Basic {TOKEN}")),
    ] {
        let mut req = c.get(format!("http://{admin}/v1/status"));
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
    }
    // Deploy (before its body is read), rollback and reload too.
    for (path, body) in [
        (
            "/v1/components/hello/deploy",
            std::fs::read(HTTP_PROBE).unwrap(),
        ),
        ("/v1/components/hello/rollback", Vec::new()),
        ("/v1/reload", Vec::new()),
    ] {
        let r = c
            .post(format!("http://{admin}{path}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    assert!(
        c.get(format!("http://{http}/x"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .starts_with("Hello")
    );
    let r = c
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("http://{admin}/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["gateway"]["name"], "edge-7");
    let hello = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hello")
        .unwrap();
    // The request above and the one after the refused deploys.
    assert_eq!(hello["invocations"], 2);
    assert_eq!(hello["in_flight"], 0);
    assert!(
        hello["digest"].as_str().unwrap().starts_with("sha256:"),
        "{v}"
    );

    // The local socket: mode 0600, no token needed; `wasmgate status`
    // reads it from the manifest's state_dir.
    let socket = dir.path().join("state/admin.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let out = wasmgate()
        .args(["status", "-f", manifest.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("gateway edge-7"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("hello ") && l.contains("sha256:")),
        "{text}"
    );
    assert!(text.contains("http[1]"), "{text}");
    // Over TCP with the token file; with a wrong token, exit 1 and the 401.
    let out = wasmgate()
        .args(["status", "--json", "--admin", &format!("http://{admin}")])
        .arg("--token-file")
        .arg(dir.path().join("admin.token"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gateway"]["name"], "edge-7");
    std::fs::write(dir.path().join("wrong"), "not-the-token-at-all").unwrap();
    let out = wasmgate()
        .args(["status", "--admin", &format!("http://{admin}")])
        .arg("--token-file")
        .arg(dir.path().join("wrong"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Clients holding every connection open without a request are closed
    // after the head timeout, and the listener serves again.
    let held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&admin).unwrap())
        .collect();
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(&admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "{:?}",
        started.elapsed()
    );
    drop(held);

    // Stopped: the socket is gone and status says it cannot reach it.
    up.stop();
    assert!(!socket.exists());
    let out = wasmgate()
        .args(["status", "-f", manifest.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the gateway"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn admin_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let check = |body: &str| {
        std::fs::write(d.join("wasmgate.toml"), body).unwrap();
        let out = wasmgate()
            .args(["check", "-f"])
            .arg(d.join("wasmgate.toml"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check("[admin]\nlisten = \"127.0.0.1:9100\"\n");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("admin.listen") && err.contains("bearer token"),
        "{err}"
    );
    let (code, err) = check("[admin]\ntoken_file = \"t\"\ntoken_env = \"T\"\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("admin.token_env"), "{err}");

    // A weak token stops `up` with the key named.
    std::fs::write(d.join("t"), "hunter2\n").unwrap();
    let path = d.join("wasmgate.toml");
    std::fs::write(
        &path,
        "[gateway]\nstate_dir = \"state\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"t\"\n",
    )
    .unwrap();
    let out = wasmgate().args(["up", "-f"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("admin.token_file") && err.contains("at least 16"),
        "{err}"
    );

    // TLS is for the TCP listener; its files are read before anything starts.
    let (code, err) = check("[admin]\ntls = { cert = \"c.pem\", key = \"k.pem\" }\n");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("admin.tls") && err.contains("admin.listen"),
        "{err}"
    );
    std::fs::write(d.join("t"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        &path,
        "[gateway]\nstate_dir = \"state\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"t\"\ntls = { cert = \"missing.pem\", key = \"k.pem\" }\n",
    )
    .unwrap();
    let out = wasmgate().args(["up", "-f"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("admin.tls.cert") && err.contains("missing.pem"),
        "{err}"
    );
}

/// `[admin.tls]`: the listener speaks HTTPS; `status` and `deploy` reach it
/// with `--admin https://… --ca`; plain HTTP to it gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_speaks_tls() {
    let dir = tempfile::tempdir().unwrap();
    crate::mqtt::make_certs(dir.path());
    let path = manifest(
        dir.path(),
        "[admin.tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n",
    );
    let up = Up::spawn(wasmgate().args(["up", "-f", &path]), &path);
    let http = up.logged("http listening", "address");
    let admin = up.logged("admin listening", "address");
    assert_eq!(up.logged("admin listening", "scheme"), "https");
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    let url = format!("https://{admin}");
    let token = d("admin.token");
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--admin", &url, "--token-file", &token]);
        let out = wasmgate().args(&all).output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let ca = d("ca.pem");
    let (code, out) = run(&["status", "--ca", &ca]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("gateway edge-7"), "{out}");
    let (code, out) = run(&["deploy", "hello", HTTP_PROBE, "--ca", &ca]);
    assert_eq!(code, Some(0), "{out}");
    let r = crate::http::client()
        .get(format!("http://{http}/hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "probe GET /hi\n");
    // Without the CA, or trusting another one: refused, exit 1.
    let (code, out) = run(&["status"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--ca"), "{out}");
    let (code, out) = run(&["status", "--ca", &d("server.pem")]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("TLS with"), "{out}");
    // Plain HTTP to the TLS listener gets no answer.
    let plain = format!("http://{admin}");
    let out = wasmgate()
        .args([
            "status",
            "--admin",
            &plain,
            "--token-file",
            &d("admin.token"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // curl with the CA: /metrics needs no token, over TLS too.
    let out = Command::new("curl")
        .args(["-sf", "--cacert", &ca, &format!("https://{admin}/healthz")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    up.stop();
}

/// Loads `url` in headless Chromium and returns the DOM it built.
fn chromium_dom(url: &str, profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .stderr(Stdio::null())
        .output()
        .expect("chromium (Debian package chromium; .ci/run installs it)");
    assert!(out.status.success(), "chromium failed on {url}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The invocation count in the component table's row of `component`.
fn invocations_in(dom: &str, component: &str) -> u64 {
    let row = dom
        .split("<tr ")
        .find(|r| r.contains(&format!("data-component=\"{component}\"")))
        .unwrap_or_else(|| panic!("no row for {component}:\n{dom}"));
    let cell = row
        .split("class=\"n invocations\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no invocation cell:\n{row}"));
    cell[..cell.find('<').unwrap()].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_browser_shows_invocations_go_up() {
    let dir = tempfile::tempdir().unwrap();
    let (up, http, admin) = start(dir.path());
    let profile = dir.path().join("chromium");
    let url = format!("http://{admin}/");
    let before = chromium_dom(&url, &profile);
    assert!(before.contains("<h1>edge-7</h1>"), "{before}");
    assert!(
        before.contains("http-equiv=\"refresh\""),
        "the page reloads itself:\n{before}"
    );
    let first = invocations_in(&before, "hello");
    let c = crate::http::client();
    for _ in 0..3 {
        let r = c.get(format!("http://{http}/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .get(format!("http://{http}/probe/trap"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let after = chromium_dom(&url, &profile);
    assert_eq!(invocations_in(&after, "hello"), first + 3, "{after}");
    // The trap shows as a failure of probe, with its outcome.
    let probe = after
        .split("<tr ")
        .find(|r| r.contains("data-component=\"probe\""))
        .unwrap();
    assert!(
        probe.contains("class=\"n failures bad\">1<") && probe.contains("trap ("),
        "{probe}"
    );
    // The triggers, and a paused one shown as paused.
    let r = c
        .post(format!("http://{admin}/v1/triggers/http%5B0%5D/pause"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let paused = chromium_dom(&url, &profile);
    let row = |dom: &str, label: &str| {
        dom.split("<tr ")
            .find(|r| r.contains(&format!("data-trigger=\"{label}\"")))
            .map(String::from)
            .unwrap_or_else(|| panic!("no {label} row:\n{dom}"))
    };
    assert!(row(&paused, "http[0]").contains(">paused<"), "{paused}");
    assert!(row(&paused, "http[1]").contains(">running<"), "{paused}");
    up.stop();
}
