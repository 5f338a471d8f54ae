//! `wasmgate new`: every template, generated into an empty directory outside
//! the repository, built with its own toolchain the way its README says,
//! invoked on its sample event, checked, and run under `up` with real
//! traffic (HTTP requests; MQTT messages through the embedded broker).
//!
//! One test per language, so no toolchain builds twice at once. The
//! templates listen on the same ports (HTTP 8080, the embedded broker on
//! 1884), so their `up`s take [`PORTS`] in turn. The Rust projects share one
//! target directory (a `target` symlink), and the Python projects one
//! `.venv`, so each toolchain's dependencies are built or installed once.

use crate::examples::Up;
use crate::util::json;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Held while a template's gateway runs (they all use 8080 and 1884).
static PORTS: Mutex<()> = Mutex::new(());

const KINDS: [&str; 3] = ["http", "mqtt", "timer"];

/// A Mosquitto command-line client for the embedded broker on `port`, as
/// the templates' READMEs run it (MQTT 3.1.1, the clients' default).
fn mosquitto(tool: &str, port: u16) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    cmd
}

/// `wasmgate ARGS` run in `dir` (like a user in the project's directory).
fn wasmgate_in(dir: &Path) -> Command {
    let mut cmd = crate::util::wasmgate();
    cmd.current_dir(dir);
    cmd
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `wasmgate new KIND NAME --lang LANG --dir ROOT/NAME`; the project's directory.
fn generate(root: &Path, kind: &str, lang: &str) -> (String, PathBuf) {
    let name = format!("{lang}-{kind}");
    let dir = root.join(&name);
    let out = crate::util::run(&[
        "new",
        kind,
        &name,
        "--lang",
        lang,
        "--dir",
        dir.to_str().unwrap(),
    ]);
    ok(&out, "wasmgate new");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "wasmgate invoke {name} --event events/{kind}.json"
        )),
        "{stdout}"
    );
    for file in [
        "wasmgate.toml",
        "README.md",
        ".gitignore",
        ".github/workflows/wasmgate.yml",
    ] {
        assert!(dir.join(file).is_file(), "{name}: no {file}");
    }
    (name, dir)
}

/// Builds the project with the command its README and manifest give.
fn build(dir: &Path, command: &str) {
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(readme.contains(command), "{readme}");
    let manifest = std::fs::read_to_string(dir.join("wasmgate.toml")).unwrap();
    assert!(
        manifest.contains(&format!("build = \"{command}\"")),
        "{manifest}"
    );
    let workflow = std::fs::read_to_string(dir.join(".github/workflows/wasmgate.yml")).unwrap();
    assert!(workflow.contains(&format!("run: {command}")), "{workflow}");
    let out = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .output()
        .unwrap();
    ok(&out, command);
}

/// `invoke NAME --event events/KIND.json`, then what the sample must do.
fn invoke_sample(dir: &Path, name: &str, kind: &str) {
    let out = wasmgate_in(dir)
        .args(["invoke", name, "--event", &format!("events/{kind}.json")])
        .output()
        .unwrap();
    ok(&out, "invoke on the sample event");
    let v = json(&out);
    assert_eq!(v["status"], "ok", "{v}");
    match kind {
        "http" => {
            assert_eq!(v["http_response"]["status"], 200, "{v}");
            let body: Value =
                serde_json::from_str(v["http_response"]["body"].as_str().unwrap()).unwrap();
            assert_eq!(
                body,
                json!({"method": "POST", "path": "/echo?from=sample", "echo": {"celsius": 21.5}})
            );
        }
        "mqtt" => {
            assert_eq!(v["published"][0]["topic"], "devices/7/heating", "{v}");
            assert_eq!(v["published"][0]["qos"], 1, "{v}");
            assert_heating(v["published"][0]["payload"].as_str().unwrap(), 18.5, true);
        }
        _ => {
            assert_eq!(
                v["published"][0]["topic"],
                format!("heartbeat/{name}"),
                "{v}"
            );
            let beat: Value =
                serde_json::from_str(v["published"][0]["payload"].as_str().unwrap()).unwrap();
            assert_eq!(beat["component"], name, "{beat}");
            assert_eq!(beat["schedule"], "every 5s", "{beat}");
            assert_eq!(beat["missed"], 0, "{beat}");
        }
    }
    let out = wasmgate_in(dir).arg("check").output().unwrap();
    ok(&out, "check");
}

/// The thermostat's command: `{"on": ON, "celsius": C, "setpoint": 20.5}`.
fn assert_heating(payload: &str, celsius: f64, on: bool) {
    let v: Value = serde_json::from_str(payload).unwrap();
    assert_eq!(v["on"], on, "{payload}");
    assert_eq!(v["celsius"].as_f64(), Some(celsius), "{payload}");
    assert_eq!(v["setpoint"].as_f64(), Some(20.5), "{payload}");
}

/// `wasmgate up` in the project, with the traffic its README shows.
fn run_up(dir: &Path, name: &str, kind: &str) {
    let _ports = PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let up = Up::spawn(wasmgate_in(dir).arg("up"), name);
    match kind {
        "http" => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let (status, body) = rt.block_on(post("/echo", r#"{"celsius": 21.5}"#));
            assert_eq!(status, 200, "{body}\n{}", up.logs());
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                body,
                json!({"method": "POST", "path": "/echo", "echo": {"celsius": 21.5}})
            );
            let (status, body) = rt.block_on(post("/echo", "not json"));
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("\"error\""), "{body}");
            // Far past the bound: the handler answers without reading the
            // rest, and the 413 still reaches the client (the host lingers
            // over the unread upload before it closes).
            let big = format!("\"{}\"", "x".repeat(8_000_000));
            let (status, body) = rt.block_on(post("/echo", &big));
            assert_eq!(status, 413, "{body}\n{}", up.logs());
        }
        "mqtt" => {
            let heating = mosquitto("mosquitto_sub", 1884)
                .args(["-t", "devices/+/heating", "-C", "1", "-W", "20", "-v"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("mosquitto_sub is installed (CI installs mosquitto-clients)");
            std::thread::sleep(Duration::from_millis(300));
            let status = mosquitto("mosquitto_pub", 1884)
                .args(["-q", "1", "-t", "devices/9/temperature"])
                .args(["-m", r#"{"celsius": 21.5}"#])
                .status()
                .unwrap();
            assert!(status.success());
            let got = heating.wait_with_output().unwrap();
            let line = String::from_utf8_lossy(&got.stdout).into_owned();
            let payload = line
                .trim_end()
                .strip_prefix("devices/9/heating ")
                .unwrap_or_else(|| panic!("{line:?}\n{}", up.logs()));
            assert_heating(payload, 21.5, false);
            let status = mosquitto("mosquitto_pub", 1884)
                .args(["-q", "1", "-t", "devices/9/temperature", "-m", "hot"])
                .status()
                .unwrap();
            assert!(status.success());
            up.wait_for(&["event dead-lettered", r#""condition":"Rejected""#]);
        }
        _ => {
            let beat = mosquitto("mosquitto_sub", 1884)
                .args(["-t", "heartbeat/#", "-C", "1", "-W", "20", "-v"])
                .output()
                .unwrap();
            let line = String::from_utf8_lossy(&beat.stdout).into_owned();
            let payload = line
                .trim_end()
                .strip_prefix(&format!("heartbeat/{name} "))
                .unwrap_or_else(|| panic!("{line:?}\n{}", up.logs()));
            let v: Value = serde_json::from_str(payload).unwrap();
            assert_eq!(v["component"], name, "{payload}");
            assert!(v["fired_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
        }
    }
    up.stop();
}

/// POSTs `body` to the template's listener: (status, body).
async fn post(path: &str, body: &str) -> (u16, String) {
    let response = crate::http::client()
        .post(format!("http://127.0.0.1:8080{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Generates, builds, invokes and runs every kind in `lang`; `prepare` runs
/// on each project before its build (to share what a toolchain installs).
fn every_kind(lang: &str, command: &str, prepare: impl Fn(usize, &Path)) {
    let root = tempfile::tempdir().unwrap();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let (name, dir) = generate(root.path(), kind, lang);
        prepare(i, &dir);
        build(&dir, command);
        invoke_sample(&dir, &name, kind);
        run_up(&dir, &name, kind);
    }
}

#[test]
fn the_rust_templates_build_invoke_and_run() {
    // One target directory for the three projects: wit-bindgen and
    // serde_json are compiled once.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("templates-rust-target");
    std::fs::create_dir_all(&target).unwrap();
    every_kind(
        "rust",
        "cargo build --release --target wasm32-wasip2",
        |_, dir| {
            std::os::unix::fs::symlink(&target, dir.join("target")).unwrap();
            let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
            assert!(lib.contains("wit_bindgen::generate!"), "{lib}");
            let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
            assert!(
                !cargo.contains("path ="),
                "no path into the repository:\n{cargo}"
            );
        },
    );
}

#[test]
fn the_python_templates_build_invoke_and_run() {
    // The first project's build installs componentize-py into its .venv;
    // the others use it (build.sh checks the pinned version is there).
    every_kind("python", "./build.sh", |i, dir| {
        if i > 0 {
            let first = dir.parent().unwrap().join("python-http/.venv");
            std::os::unix::fs::symlink(first, dir.join(".venv")).unwrap();
        }
    });
}

#[test]
fn the_js_templates_build_invoke_and_run() {
    every_kind("js", "./build.sh", |_, _| {});
}

#[test]
fn new_refuses_a_bad_name_and_a_directory_in_use() {
    let root = tempfile::tempdir().unwrap();
    let out = crate::util::run(&["new", "mqtt", "Thermostat", "--dir", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a valid component name"), "{stderr}");

    std::fs::write(root.path().join("notes.txt"), "mine").unwrap();
    let out = crate::util::run(&[
        "new",
        "http",
        "echo",
        "--dir",
        root.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exists and is not empty"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        1,
        "nothing was written"
    );

    let out = crate::util::run(&["new", "ftp", "echo"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("http, mqtt, timer"), "{stderr}");
}
