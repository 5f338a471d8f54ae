//! The guests written in other languages (`examples/python-mqtt`,
//! `examples/js-http`), run the way their manifests tell a user to: `up
//! --build` (each example's `build.sh` installs its pinned toolchain on first
//! use and builds the component), then `check` and `invoke` on the manifest.
//!
//! These need python3 (with venv) and Node.js 20+ with npm, and reach PyPI
//! and the npm registry the first time; `.ci/run` installs the tools when
//! missing. Each example is one test, so its build never runs twice at once.

use crate::util::{json, run, wasmgate};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `wasmgate up --build` on an example's manifest.
struct Up {
    child: crate::util::KillOnDrop,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Up {
    /// Starts `up --build -f MANIFEST` and waits for `ready` (the first run
    /// installs the guest toolchain and compiles a runtime of 10–20 MB).
    fn start(manifest: &str) -> Up {
        let mut child = crate::util::spawn_guarded(
            wasmgate()
                .args(["up", "--build", "-f", manifest, "--log-format", "json"])
                .stderr(Stdio::piped())
                .stdout(Stdio::null()),
        );
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let ready = serde_json::from_str::<serde_json::Value>(&line)
                    .is_ok_and(|v| v["message"] == "ready");
                sink.lock().unwrap().push(line);
                if ready {
                    let _ = tx.send(());
                }
            }
        });
        let up = Up { child, logs };
        if rx.recv_timeout(Duration::from_secs(600)).is_err() {
            panic!("{manifest}: not ready; saw:\n{}", up.logs());
        }
        up
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until the log has a line containing every one of `needles`.
    fn wait_for(&self, needles: &[&str]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| needles.iter().all(|n| l.contains(n)))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needles:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the host must exit 0.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.logs());
    }
}

fn mosquitto(tool: &str, port: u16) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"]);
    cmd
}

#[cfg(feature = "embedded-broker")]
#[test]
fn the_python_mqtt_example_builds_and_runs() {
    let manifest = "examples/python-mqtt/wasmgate.toml";
    let up = Up::start(manifest);
    // A device reports 18.5 °C; the thermostat turns the heating on.
    let heating = mosquitto("mosquitto_sub", 1885)
        .args(["-t", "devices/+/heating", "-C", "1", "-W", "20", "-v"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is installed (CI installs mosquitto-clients)");
    std::thread::sleep(Duration::from_millis(300));
    let status = mosquitto("mosquitto_pub", 1885)
        .args(["-q", "1", "-t", "devices/7/temperature"])
        .args(["-m", r#"{"celsius": 18.5}"#])
        .status()
        .unwrap();
    assert!(status.success());
    let got = heating.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "devices/7/heating {\"on\": true, \"celsius\": 18.5, \"setpoint\": 20.0}\n",
        "{}",
        up.logs()
    );
    // A payload that is not a reading is rejected: dead-lettered at once.
    let status = mosquitto("mosquitto_pub", 1885)
        .args(["-q", "1", "-t", "devices/7/temperature", "-m", "hot"])
        .status()
        .unwrap();
    assert!(status.success());
    up.wait_for(&["event dead-lettered", r#""condition":"Rejected""#]);
    up.stop();

    let out = run(&["check", "-f", manifest]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("exports: exports, wasmgate:edge/mqtt-handler@0.1.0"),
        "{stdout}"
    );

    let out = run(&[
        "invoke",
        "thermostat",
        "-f",
        manifest,
        "--mqtt-topic",
        "devices/3/temperature",
        "--payload",
        r#"{"celsius": 23}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json(&out);
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["published"][0]["topic"], "devices/3/heating", "{v}");
    assert_eq!(
        v["published"][0]["payload"],
        r#"{"on": false, "celsius": 23.0, "setpoint": 20.0}"#
    );
    assert_eq!(v["published"][0]["qos"], 1);

    // Outside this repository a Python developer gets the WIT from the
    // binary: componentize-py generates the bindings from what it writes.
    let dir = tempfile::tempdir().unwrap();
    let wit = dir.path().join("wit");
    let out = run(&["wit", "--dir", wit.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let bindings = dir.path().join("bindings");
    let out =
        Command::new(crate::util::root().join("examples/python-mqtt/.venv/bin/componentize-py"))
            .arg("-d")
            .arg(&wit)
            .args(["-w", "wasmgate:edge/mqtt-app", "bindings"])
            .arg(&bindings)
            .output()
            .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        bindings
            .join("wit_world/imports/mqtt_publisher.py")
            .exists()
    );
}

#[test]
fn the_js_http_example_builds_and_runs_and_its_fetch_is_denied() {
    let manifest = "examples/js-http/wasmgate.toml";
    let up = Up::start(manifest);
    assert_eq!(
        request("GET", "/hello?name=ada", ""),
        (200, r#"{"hello":"ada"}"#.into()),
        "{}",
        up.logs()
    );
    let (status, body) = request("POST", "/readings", r#"{"celsius": 21.5}"#);
    assert_eq!(status, 201, "{body}");
    assert!(
        body.starts_with(r#"{"celsius":21.5,"received_at":"#),
        "{body}"
    );
    // The component imports wasi:http/outgoing-handler (ComponentizeJS links
    // it into every component) without a grant: it loaded, and the call is
    // denied at the call, which the guest sees as a failed fetch().
    let (status, body) = request("GET", "/upstream", "");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream call failed"), "{body}");
    up.wait_for(&["outbound HTTP request denied", "allow.outbound_http"]);
    up.wait_for(&["imports capabilities it is not granted", "outgoing-handler"]);
    up.stop();

    let out = run(&["check", "-f", manifest]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("note: imports wasi:http/outgoing-handler without a grant"),
        "{stdout}"
    );

    let out = run(&["invoke", "api", "-f", manifest, "--http-path", "/nowhere"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json(&out);
    assert_eq!(v["http_response"]["status"], 404, "{v}");
}

/// One HTTP/1.1 request to the example's listener: (status, body).
fn request(method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect("127.0.0.1:8081").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}
