//! Hot deploy and rollback against the real binary: `wasmgate deploy` and
//! `wasmgate rollback` over the local admin socket while HTTP traffic
//! runs, the automatic rollback of a failing version, the active version
//! across a restart, and the refusals.

use crate::examples::Up;
use crate::util::wasmgate;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wasmgate_test_artifacts::{HELLO_HTTP, HTTP_PROBE, TICK_TIMER};

/// A manifest whose every HTTP request goes to component `app` (from
/// `source`), with `deploy` lines for `[component.app.deploy]`.
fn manifest(dir: &Path, source: &str, deploy: &str) -> String {
    manifest_with(dir, "", source, deploy)
}

/// [`manifest`] with more `[gateway]` lines.
fn manifest_with(dir: &Path, gateway: &str, source: &str, deploy: &str) -> String {
    let path = dir.join("wasmgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
name = "edge-7"
state_dir = "state"
{gateway}

[http]
listen = "127.0.0.1:0"

[component.app]
source = "{source}"
limits = {{ concurrency = 64, timeout = "20s" }}

[component.app.deploy]
{deploy}

[[trigger.http]]
priority = 1
component = "app"
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn start(manifest: &str) -> (Up, String) {
    let up = Up::spawn(wasmgate().args(["up", "-f", manifest]), manifest);
    let http = up.logged("http listening", "address");
    (up, http)
}

/// Runs the CLI off the async workers.
async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || wasmgate().args(&args).output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn digest(path: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes))
}

async fn get(http: &str, path: &str) -> (u16, String) {
    let r = crate::http::client()
        .get(format!("http://{http}{path}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Requests `/load` over and over until stopped; counts answers and the
/// ones that were not `200`.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    bad: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(http: &str) -> Self {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, n, b, http) = (stop.clone(), sent.clone(), bad.clone(), http.to_string());
        let task = tokio::spawn(async move {
            let c = crate::http::client();
            while !s.load(Ordering::Relaxed) {
                let r = c.get(format!("http://{http}/load")).send().await;
                n.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.text().await;
                    }
                    Ok(r) => b.lock().unwrap().push(format!("{}", r.status())),
                    Err(e) => b.lock().unwrap().push(format!("{e:?}")),
                }
            }
        });
        Self {
            stop,
            sent,
            bad,
            task,
        }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let bad = self.bad.lock().unwrap().clone();
        (self.sent.load(Ordering::Relaxed), bad)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_and_rollback_swap_versions_without_failing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), HTTP_PROBE, "watch = \"0s\"");
    let (up, http) = start(&m);
    let (probe, hello) = (digest(HTTP_PROBE), digest(HELLO_HTTP));
    assert_eq!(get(&http, "/hi").await, (200, "probe GET /hi\n".into()));

    // Nothing to roll back to yet.
    let out = cli(&["rollback", "app", "-f", &m]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no previous version"), "{}", text(&out));

    let load = Load::start(&http);
    // An invocation of the old version in flight across the deploy ends on
    // the old version.
    let slow = {
        let http = http.clone();
        tokio::spawn(async move { get(&http, "/sleep?ms=6000").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = cli(&["deploy", "app", HELLO_HTTP, "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("deployed app sha256:{hello} (was sha256:{probe})")),
        "{}",
        text(&out)
    );
    // It was still running on the old version after the swap.
    assert!(!slow.is_finished());
    let out = cli(&["status", "-f", &m, "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["components"][0]["in_flight"].as_u64().unwrap() >= 1,
        "{v}"
    );
    assert_eq!(slow.await.unwrap(), (200, "slept 6000\n".into()));
    let (status, body) = get(&http, "/hi").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("Hello from wasmgate: GET /hi"), "{body}");
    let stored = dir
        .path()
        .join(format!("state/components/app/{hello}.wasm"));
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(HELLO_HTTP).unwrap()
    );

    // The same version again changes nothing.
    let out = cli(&["deploy", "app", HELLO_HTTP, "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("already active"), "{}", text(&out));

    let out = cli(&["rollback", "app", "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "rolled back app: sha256:{probe} is active again (was sha256:{hello})"
        )),
        "{}",
        text(&out)
    );
    assert_eq!(get(&http, "/hi").await, (200, "probe GET /hi\n".into()));
    // A rollback of the rollback brings the deployed version back.
    let out = cli(&["rollback", "app", "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, bad) = load.finish().await;
    assert!(sent > 20, "only {sent} requests");
    assert!(bad.is_empty(), "{} of {sent} failed: {bad:?}", bad.len());
    let (_, body) = get(&http, "/hi").await;
    assert!(body.starts_with("Hello from wasmgate"), "{body}");

    // Status shows the versions and the history.
    let out = cli(&["status", "-f", &m, "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let app = &v["components"][0];
    assert_eq!(app["digest"], format!("sha256:{hello}"), "{app}");
    let versions = &app["versions"];
    assert_eq!(versions["previous"], format!("sha256:{probe}"), "{app}");
    assert_eq!(versions["source"], format!("sha256:{probe}"), "{app}");
    let actions: Vec<&str> = versions["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["deploy", "rollback", "rollback"], "{app}");
    up.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_version_is_rolled_back_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        HELLO_HTTP,
        "watch = \"60s\"\nmin_invocations = 5\nmax_failure_ratio = 0.5",
    );
    let (up, http) = start(&m);
    let (probe, hello) = (digest(HTTP_PROBE), digest(HELLO_HTTP));
    // `deploy --wait` waits for the watch's verdict.
    let waiting = {
        let m = m.clone();
        tokio::spawn(async move { cli(&["deploy", "app", HTTP_PROBE, "-f", &m, "--wait"]).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&http, "/hi").await.1 != "probe GET /hi\n" {
        assert!(Instant::now() < deadline, "never deployed:\n{}", up.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The `/hi` above, two more successes, then traps: the 7th invocation
    // is the first past the ratio (4 of 7 failed).
    for path in ["/ok", "/ok", "/trap", "/trap", "/trap", "/trap"] {
        get(&http, path).await;
    }
    let out = waiting.await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "rolled back: sha256:{hello} is active again: 4 of its first 7 invocations failed"
        )),
        "{}",
        text(&out)
    );
    let (_, body) = get(&http, "/hi").await;
    assert!(body.starts_with("Hello from wasmgate"), "{body}");
    up.wait_for(&["rolled back", "\"automatic\":true"]);
    let out = cli(&["status", "-f", &m, "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let versions = &v["components"][0]["versions"];
    assert_eq!(versions["previous"], format!("sha256:{probe}"), "{v}");
    assert!(versions["watch"].is_null(), "{v}");
    assert_eq!(
        versions["history"][1]["action"], "automatic_rollback",
        "{v}"
    );
    // `status` prints it; the status page and the metrics show it.
    let out = cli(&["status", "-f", &m]).await;
    assert!(
        text(&out).contains("automatic_rollback") && text(&out).contains("4 of its first 7"),
        "{}",
        text(&out)
    );
    let socket = dir.path().join("state/admin.sock");
    let curl = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sf", "--unix-socket", socket.to_str().unwrap()])
            .arg(format!("http://gateway{path}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let page = curl("/");
    assert!(
        page.contains(r#"<td class="automatic_rollback">automatic_rollback</td>"#),
        "{page}"
    );
    let metrics = curl("/metrics");
    for line in [
        r#"wasmgate_deploys_total{component="app",result="ok"} 1"#,
        r#"wasmgate_rollbacks_total{component="app",kind="automatic"} 1"#,
        r#"wasmgate_rollbacks_total{component="app",kind="manual"} 0"#,
        &format!(r#"wasmgate_component_info{{component="app",digest="sha256:{hello}"}} 1"#),
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    up.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_version_survives_a_restart_until_the_source_changes() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("app.wasm");
    std::fs::copy(HTTP_PROBE, &source).unwrap();
    let m = manifest(dir.path(), source.to_str().unwrap(), "");
    let (up, http) = start(&m);
    let out = cli(&["deploy", "app", HELLO_HTTP, "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(get(&http, "/hi").await.1.starts_with("Hello"));
    up.stop();

    let (up, http) = start(&m);
    assert!(
        get(&http, "/hi").await.1.starts_with("Hello"),
        "{}",
        up.logs()
    );
    up.wait_for(&["running the deployed version"]);
    // The previous version came back too: a rollback works after a restart.
    let out = cli(&["rollback", "app", "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(get(&http, "/hi").await.1, "probe GET /hi\n");
    let out = cli(&["rollback", "app", "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    up.stop();

    // An operator changes the source (a custom section appended: other
    // bytes, the same code): the next start runs it, not the deployed one.
    let mut bytes = std::fs::read(HTTP_PROBE).unwrap();
    bytes.extend_from_slice(&[0, 5, 4, b'n', b'o', b't', b'e']);
    std::fs::write(&source, bytes).unwrap();
    let (up, http) = start(&m);
    assert_eq!(
        get(&http, "/hi").await.1,
        "probe GET /hi\n",
        "{}",
        up.logs()
    );
    up.wait_for(&["the manifest's source changed since the last deploy"]);
    assert!(
        !dir.path().join("state/components/app/active.json").exists(),
        "the old deploy state is gone"
    );
    up.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_versions_are_refused_and_the_running_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("smoke.json"),
        r#"{"kind": "http", "method": "GET", "path": "/smoke/ok", "authority": "edge", "headers": [], "body_hex": ""}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("trap.json"),
        r#"{"kind": "http", "method": "GET", "path": "/smoke/trap", "authority": "edge", "headers": [], "body_hex": ""}"#,
    )
    .unwrap();
    let m = manifest(dir.path(), HELLO_HTTP, "smoke_test = \"trap.json\"");
    let (up, http) = start(&m);
    let not_wasm = dir.path().join("notes.wasm");
    std::fs::write(&not_wasm, "not a component").unwrap();
    let refusals = [
        (not_wasm.to_str().unwrap(), "app", "not a WebAssembly"),
        (TICK_TIMER, "app", "trigger.http[0] calls it"),
        (HTTP_PROBE, "app", "the smoke test (trap.json) failed: trap"),
        (HTTP_PROBE, "nope", "no component \"nope\""),
    ];
    for (file, name, expected) in refusals {
        let out = cli(&["deploy", name, file, "-f", &m]).await;
        assert_eq!(out.status.code(), Some(1), "{file}: {}", text(&out));
        assert!(text(&out).contains(expected), "{file}: {}", text(&out));
        let (_, body) = get(&http, "/hi").await;
        assert!(body.starts_with("Hello from wasmgate"), "{body}");
    }
    // Refused versions leave no file behind, nor a precompiled artifact.
    let stored: Vec<_> = std::fs::read_dir(dir.path().join("state/components/app"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "{stored:?}");
    let artifacts: Vec<_> = std::fs::read_dir(dir.path().join("state/precompiled"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "only the source's: {artifacts:?}");
    let out = cli(&["deploy", "app", "/no/such.wasm", "-f", &m]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    up.stop();

    // A smoke test that passes lets the version in.
    let m = manifest(dir.path(), HELLO_HTTP, "smoke_test = \"smoke.json\"");
    let (up, http) = start(&m);
    let out = cli(&["deploy", "app", HTTP_PROBE, "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("smoke test ok"), "{}", text(&out));
    assert_eq!(get(&http, "/hi").await.1, "probe GET /hi\n");
    up.stop();
}

/// Runs the CLI (blocking) and asserts it exited 0.
fn ok(args: &[&str]) -> String {
    let out = wasmgate().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_signature_only_a_trusted_signed_version_deploys() {
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    ok(&["keygen", "--out", &d("dev.key")]);
    ok(&["keygen", "--out", &d("other.key")]);
    let trusted = std::fs::read_to_string(d("dev.key.pub")).unwrap();
    std::fs::copy(HELLO_HTTP, d("hello.wasm")).unwrap();
    ok(&["sign", &d("hello.wasm"), "--key", &d("dev.key")]);
    let m = manifest_with(
        dir.path(),
        &format!(
            "trusted_keys = [\"{}\"]\nrequire_signature = true",
            trusted.trim()
        ),
        &d("hello.wasm"),
        "",
    );
    let (up, http) = start(&m);
    let probe = d("probe.wasm");
    std::fs::copy(HTTP_PROBE, &probe).unwrap();
    let deploy = |expected: &'static str| {
        let (m, probe) = (m.clone(), probe.clone());
        async move {
            let out = cli(&["deploy", "app", &probe, "-f", &m]).await;
            assert_eq!(out.status.code(), Some(1), "{}", text(&out));
            assert!(text(&out).contains(expected), "{}", text(&out));
        }
    };
    deploy("no signature").await;
    ok(&["sign", &probe, "--key", &d("other.key")]);
    deploy("not a trusted key").await;
    // Signed by the trusted key, then changed: the signature is not its.
    ok(&["sign", &probe, "--key", &d("dev.key")]);
    let mut bytes = std::fs::read(&probe).unwrap();
    bytes.extend_from_slice(&[0, 5, 4, b'n', b'o', b't', b'e']);
    std::fs::write(&probe, &bytes).unwrap();
    deploy("not the file that was signed").await;
    assert!(get(&http, "/hi").await.1.starts_with("Hello from wasmgate"));

    std::fs::copy(HTTP_PROBE, &probe).unwrap();
    let out = cli(&["deploy", "app", &probe, "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(get(&http, "/hi").await.1, "probe GET /hi\n");
    let out = cli(&["status", "-f", &m, "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["components"][0]["signer"], trusted.trim(), "{v}");
    let probe_sig = dir.path().join(format!(
        "state/components/app/{}.wasm.sig",
        digest(HTTP_PROBE)
    ));
    assert!(probe_sig.exists());

    // Another signed version; the probe is the previous one now. The
    // probe's bytes again, unsigned, are refused and leave its kept
    // signature alone: a rollback and a restart still load it.
    let v2 = d("hello-v2.wasm");
    let mut bytes = std::fs::read(HELLO_HTTP).unwrap();
    bytes.extend_from_slice(&[0, 3, 2, b'v', b'2']);
    std::fs::write(&v2, bytes).unwrap();
    ok(&["sign", &v2, "--key", &d("dev.key")]);
    let out = cli(&["deploy", "app", &v2, "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::remove_file(format!("{probe}.sig")).unwrap();
    deploy("no signature").await;
    assert!(probe_sig.exists(), "the kept signature was removed");
    let out = cli(&["rollback", "app", "-f", &m]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    up.stop();
    let (up, http) = start(&m);
    assert_eq!(
        get(&http, "/hi").await.1,
        "probe GET /hi\n",
        "{}",
        up.logs()
    );
    up.stop();
}
