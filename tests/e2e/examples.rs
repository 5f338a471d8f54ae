//! The JavaScript example (`examples/js-http`), run the way its manifest
//! tells a user to: `up --build` (its `build.sh` installs the pinned
//! toolchain on first use and builds the component), then `check` and
//! `invoke` on the manifest. (Python guests are `wasmgate new`'s templates:
//! `templates.rs`.)
//!
//! This needs Node.js 20+ with npm and reaches the npm registry the first
//! time; `.ci/run` installs the tools when missing.

use crate::util::{json, run, wasmgate};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `wasmgate up` (also used by the `new` templates' tests).
pub(crate) struct Up {
    child: crate::util::KillOnDrop,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Up {
    /// Starts `up --build -f MANIFEST` and waits for `ready` (the first run
    /// installs the guest toolchain and compiles a runtime of 10–20 MB).
    fn start(manifest: &str) -> Up {
        Up::spawn(wasmgate().args(["up", "--build", "-f", manifest]), manifest)
    }

    /// Starts `command` (a `wasmgate up`) with JSON logs and waits for `ready`.
    pub(crate) fn spawn(command: &mut Command, manifest: &str) -> Up {
        let mut child = crate::util::spawn_guarded(
            command
                .args(["--log-format", "json"])
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

    /// The `field` of the first log line whose message is `message`.
    pub(crate) fn logged(&self, message: &str, field: &str) -> String {
        for line in self.logs().lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                && v["message"] == message
            {
                return v[field].as_str().unwrap().to_string();
            }
        }
        panic!("no {message:?} line:\n{}", self.logs());
    }

    pub(crate) fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until the log has a line containing every one of `needles`.
    pub(crate) fn wait_for(&self, needles: &[&str]) {
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

    /// Waits (at most 20 s) until `done`; else fails, saying `what` and
    /// showing the log.
    pub(crate) fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (`HUP`, `TERM`, …) to the host.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM; the host must exit 0.
    pub(crate) fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.logs());
    }
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
