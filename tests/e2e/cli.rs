//! The `wasmgate` binary: `invoke`, `check` and `up`, and their exit codes.

use crate::util::{json, root, run, wasmgate};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use wasmgate_test_artifacts::{ECHO_MQTT, HELLO_HTTP, HOSTILE, TICK_TIMER};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn invoke_a_bare_http_guest_prints_the_response() {
    let out = run(&[
        "invoke",
        HELLO_HTTP,
        "--http-path",
        "/hello?x=1",
        "--method",
        "POST",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["component"], "hello_http");
    assert_eq!(v["http_response"]["status"], 200);
    assert_eq!(
        v["http_response"]["body"],
        "Hello from wasmgate: POST /hello?x=1\n"
    );
    assert!(v["fuel_consumed"].as_u64().unwrap() > 0);
    assert!(v["memory_peak_bytes"].as_u64().unwrap() > 0);
    assert!(v["invocation_id"].as_str().unwrap().len() >= 32);
}

#[test]
fn invoke_a_bare_timer_guest() {
    let out = run(&[
        "invoke",
        TICK_TIMER,
        "--timer",
        "--schedule",
        "0 * * * * *",
        "--id",
        "abc",
        "--attempt",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["invocation_id"], "abc");
    assert_eq!(v["attempt"], 3);
    let stdout = v["stdout"].as_str().unwrap();
    assert!(
        stdout.starts_with("tick schedule=\"0 * * * * *\""),
        "{stdout}"
    );
    assert!(stdout.contains("invocation=abc"), "{stdout}");
}

#[test]
fn invoke_mqtt_with_properties_and_a_payload_file() {
    let payload = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(payload.path(), [0u8, 159, 146, 150, 255]).unwrap();
    let out = run(&[
        "invoke",
        ECHO_MQTT,
        "--mqtt-topic",
        "dev/7/temp",
        "--payload-file",
        payload.path().to_str().unwrap(),
        "--response-topic",
        "replies/7",
        "--allow-response",
        "replies/+",
        "--correlation-data",
        "req-1",
        "--user-property",
        "unit=celsius",
        "--content-type",
        "application/octet-stream",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    let published = &v["published"][0];
    assert_eq!(published["topic"], "replies/7");
    assert_eq!(published["payload"], "hex:009f9296ff");
    assert_eq!(published["correlation_data"], "req-1");
    assert_eq!(published["user_properties"][0][0], "unit");
    assert_eq!(published["content_type"], "application/octet-stream");
}

#[test]
fn invoke_exits_1_when_the_invocation_fails() {
    let out = run(&[
        "invoke",
        HOSTILE,
        "--mqtt-topic",
        "loop",
        "--fuel",
        "50000000",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "fuel_exhausted");
    assert_eq!(v["fuel_consumed"], 50_000_000);

    let out = run(&[
        "invoke",
        HOSTILE,
        "--mqtt-topic",
        "memory-bomb",
        "--memory",
        "8MiB",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["status"], "memory_limit");

    let out = run(&[
        "invoke",
        HOSTILE,
        "--mqtt-topic",
        "sleep",
        "--payload",
        "30000",
        "--timeout",
        "200ms",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["status"], "timeout");
    assert_eq!(json(&out)["timeout_ms"], 200);

    let out = run(&[
        "invoke",
        HOSTILE,
        "--mqtt-topic",
        "reject",
        "--payload",
        "no",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["status"], "handler_error");
    assert_eq!(json(&out)["kind"], "reject");
}

#[test]
fn invoke_refuses_bad_input_with_exit_2() {
    let core = root().join("tests/ui/core-module.wasm");
    let core = core.to_str().unwrap();
    // A core module that imports wasi_snapshot_preview1.fd_write (what
    // `--target wasm32-wasip1` makes, before the adapter).
    let p1 = root().join("tests/ui/wasip1-module.wasm");
    let p1 = p1.to_str().unwrap();
    // 300 MiB that take no disk (sparse): refused before it is read.
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.wasm");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let huge = huge.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["invoke", "missing.wasm", "--timer"],
            "cannot read missing.wasm",
        ),
        (
            vec!["invoke", huge, "--timer"],
            "is 314572800 bytes, more than the 268435456 bytes a component may have",
        ),
        (
            vec!["invoke", core, "--timer"],
            "is a core WebAssembly module, not a component",
        ),
        (
            vec!["invoke", p1, "--timer"],
            "is a core WebAssembly module for WASI preview 1 (it imports wasi_snapshot_preview1), not a component: build it for wasm32-wasip2",
        ),
        (
            vec!["invoke", "README.md", "--timer"],
            "is not a WebAssembly file",
        ),
        (
            vec!["invoke", ECHO_MQTT, "--timer"],
            "does not export wasmgate:edge/timer-handler",
        ),
        (
            vec![
                "invoke",
                ECHO_MQTT,
                "--mqtt-topic",
                "a",
                "--payload-file",
                "/nonexistent/p",
            ],
            "--payload-file /nonexistent/p",
        ),
        (
            vec!["invoke", ECHO_MQTT, "--mqtt-topic", "a/#"],
            "--mqtt-topic: topic name \"a/#\" contains a wildcard",
        ),
        (vec!["invoke", ECHO_MQTT], "say which event to deliver"),
        (
            vec!["invoke", HOSTILE, "--mqtt-topic", "ok", "--fuel", "0"],
            "limits: fuel = 0 is out of range",
        ),
        (
            vec!["invoke", HOSTILE, "--mqtt-topic", "ok", "--memory", "lots"],
            "\"lots\" is not a size",
        ),
        (
            vec!["invoke", HOSTILE, "--mqtt-topic", "ok", "--timeout", "2h"],
            "timeout = 2h is out of range",
        ),
        (
            vec!["invoke", HOSTILE, "--mqtt-topic", "ok", "--frobnicate"],
            "unexpected argument '--frobnicate'",
        ),
        (
            vec![
                "invoke",
                "nosuch",
                "-f",
                "tests/ui/valid/full.toml",
                "--timer",
            ],
            "no component named \"nosuch\"",
        ),
        (
            vec![
                "invoke",
                HELLO_HTTP,
                "--http-path",
                "/",
                "--method",
                "NOT A METHOD",
            ],
            "invalid HTTP method",
        ),
        (
            vec![
                "invoke",
                "web",
                "-f",
                "tests/ui/valid/full.toml",
                "--timer",
                "--async",
                "--fuel",
                "5",
            ],
            "'--async' cannot be used with '--fuel <FUEL>'",
        ),
        (
            vec!["check", "-f", "does-not-exist.toml"],
            "does-not-exist.toml: cannot read the manifest",
        ),
    ];
    for (args, want) in cases {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{args:?}: want {want:?} in:\n{}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("panicked"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

#[test]
fn invoke_a_manifest_component_with_its_grants_and_limits() {
    let out = run(&[
        "invoke",
        "echo",
        "-f",
        "tests/ui/valid/full.toml",
        "--mqtt-topic",
        "greenhouse/1/temperature",
        "--payload",
        "21.5",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["component"], "echo");
    assert_eq!(v["published"][0]["topic"], "greenhouse/1/temperature/reply");

    let out = run(&[
        "invoke",
        "spin",
        "-f",
        "tests/ui/valid/full.toml",
        "--mqtt-topic",
        "loop",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "fuel_exhausted");
    assert_eq!(v["fuel_limit"], 50_000_000, "the manifest's limit applies");
}

#[test]
fn check_prints_components_and_triggers() {
    let out = run(&["check", "-f", "tests/ui/valid/full.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("trigger.http[0] priority 10 GET,POST /api/* -> web"),
        "{stdout}"
    );
    assert!(
        stdout.contains("trigger.mqtt[0] greenhouse/+/temperature qos 1 -> echo"),
        "{stdout}"
    );
    assert!(
        stdout.contains("trigger.timer[0] 0 */5 * * * * (Europe/Berlin) -> report"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: 4 component(s), 4 trigger(s)"),
        "{stdout}"
    );
}

#[test]
fn up_becomes_ready_and_stops_on_sigterm() {
    let mut child = crate::util::spawn_guarded(
        wasmgate()
            .args([
                "up",
                "-f",
                "examples/quickstart/wasmgate.toml",
                "--log-format",
                "json",
            ])
            .stderr(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no ready line; saw:\n{}",
            seen.join("\n")
        );
        let line = lines.next().expect("stderr open").unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        seen.push(line);
        if v["message"] == "ready" {
            assert_eq!(v["components"], 3);
            break;
        }
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(
        (status.code(), status.signal()),
        (Some(0), None),
        "up did not exit cleanly on SIGTERM; its log after ready:\n{}",
        rest.join("\n")
    );
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{rest:?}");
}

#[test]
fn up_build_reports_a_failing_build_command() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("wasmgate.toml");
    std::fs::write(
        &manifest,
        "[component.broken]\nsource = \"broken.wasm\"\nbuild = \"echo building; exit 3\"\n",
    )
    .unwrap();
    let out = run(&["up", "--build", "-f", manifest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("component.broken.build: `echo building; exit 3` failed"),
        "{}",
        stderr(&out)
    );
}

/// A one-shot HTTP server on 127.0.0.1 that answers 204 to every request.
fn upstream() -> (String, std::thread::JoinHandle<usize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let mut served = 0;
        // Serves until the test's last request (the test connects once more to stop it).
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            if n == 0 || buf.starts_with(b"STOP") {
                break;
            }
            served += 1;
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
        served
    });
    (addr, handle)
}

#[test]
fn outbound_http_reaches_only_allowed_hosts() {
    use wasmgate_test_artifacts::FETCH_HTTP;
    let (addr, server) = upstream();
    let path = format!("/?authority={addr}");

    let out = run(&[
        "invoke",
        FETCH_HTTP,
        "--http-path",
        &path,
        "--allow-outbound-http",
        "127.0.0.1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json(&out)["http_response"]["body"], "upstream 204\n");

    let out = run(&[
        "invoke",
        FETCH_HTTP,
        "--http-path",
        &path,
        "--allow-outbound-http",
        "example.com",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["http_response"]["status"], 502);
    assert_eq!(v["http_response"]["body"], "ErrorCode::HttpRequestDenied\n");

    use std::io::Write;
    std::net::TcpStream::connect(&addr)
        .unwrap()
        .write_all(b"STOP")
        .unwrap();
    assert_eq!(
        server.join().unwrap(),
        1,
        "only the allowed request reached the server"
    );
}

/// `up --build` installs a missing wasm32-wasip2 target itself, with rustup,
/// for the toolchain the build uses, before running a build command that
/// targets it. Stub `rustc` (a sysroot without the target) and `rustup` (it
/// records its arguments) come first on PATH.
#[test]
fn up_build_installs_a_missing_wasm_target_with_rustup() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let sysroot = dir.path().join("sysroot");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(sysroot.join("lib/rustlib")).unwrap();
    let calls = dir.path().join("rustup-calls");
    let stub = |name: &str, body: String| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    stub("rustc", format!("echo {}", sysroot.display()));
    stub(
        "rustup",
        format!(
            "echo \"$@\" >> {}\nmkdir -p {}/lib/rustlib/wasm32-wasip2",
            calls.display(),
            sysroot.display()
        ),
    );
    let manifest = dir.path().join("wasmgate.toml");
    std::fs::write(
        &manifest,
        format!(
            "[gateway]\nstate_dir = \"state\"\n\n[component.t]\nsource = \"{TICK_TIMER}\"\n\
             build = \"echo building for wasm32-wasip2 && false\"\n"
        ),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = wasmgate()
        .args(["up", "--build", "-f", manifest.to_str().unwrap()])
        .env("PATH", path)
        .output()
        .unwrap();
    // The build command itself fails on purpose, after the install.
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let recorded = std::fs::read_to_string(&calls).expect("rustup was run");
    assert_eq!(recorded.trim(), "target add wasm32-wasip2");
    assert!(
        stderr(&out).contains("the wasm32-wasip2 target is missing"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn hash_password_reads_stdin_and_prints_an_argon2id_hash() {
    use std::io::Write as _;
    let hash = |input: &[u8]| {
        let mut child = wasmgate()
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = hash(b"s3cret\n");
    assert_eq!(out.status.code(), Some(0));
    let first = String::from_utf8(out.stdout).unwrap();
    assert!(first.starts_with("$argon2id$v=19$"), "{first}");
    // A fresh salt each time.
    let second = String::from_utf8(hash(b"s3cret\n").stdout).unwrap();
    assert_ne!(first, second);
    let out = hash(b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no password on stdin"));
}

/// `wasmgate wit` writes the repository's `wit/` as it is (byte for byte)
/// and never overwrites a changed file without `--force`. (The Python
/// example's test generates bindings from what it writes.)
#[test]
fn wit_writes_the_packages_a_guest_builds_against() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("wit");
    let run_wit = |extra: &[&str]| {
        let mut args = vec!["wit", "--dir", out.to_str().unwrap()];
        args.extend(extra);
        run(&args)
    };
    let first = run_wit(&[]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let listed = String::from_utf8_lossy(&first.stdout).lines().count();
    let repo = crate::util::root().join("wit");
    let mut compared = 0;
    let mut stack = vec![repo.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(&repo).unwrap();
            assert_eq!(
                std::fs::read(out.join(rel)).unwrap(),
                std::fs::read(&path).unwrap(),
                "{}",
                rel.display()
            );
            compared += 1;
        }
    }
    assert_eq!(compared, listed, "each file written is listed once");

    // Unchanged files: writing again is fine.
    assert_eq!(run_wit(&[]).status.code(), Some(0));
    // A file the user changed is not overwritten without --force.
    let edge = out.join("edge.wit");
    std::fs::write(&edge, "// mine\n").unwrap();
    let refused = run_wit(&[]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("not overwriting files with other contents")
            && stderr(&refused).contains("edge.wit"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(std::fs::read_to_string(&edge).unwrap(), "// mine\n");
    assert_eq!(run_wit(&["--force"]).status.code(), Some(0));
    assert_eq!(
        std::fs::read(&edge).unwrap(),
        std::fs::read(repo.join("edge.wit")).unwrap()
    );
}

/// `invoke --event FILE` delivers an event written the way `dlq show`
/// prints it (the `event` object, or the whole record), and refuses a file
/// that is not one with exit 2, naming what is wrong.
#[test]
fn invoke_delivers_an_event_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let event = serde_json::json!({
        "kind": "mqtt",
        "topic": "devices/7/temperature",
        "payload_hex": hex_of("21.5"),
        "qos": 1,
        "retain": false,
        "content_type": null,
        "response_topic": "replies/7",
        "correlation_data_hex": hex_of("req-1"),
        "user_properties": [["unit", "C"]]
    });
    let bare = dir.path().join("event.json");
    std::fs::write(&bare, event.to_string()).unwrap();
    let record = dir.path().join("record.json");
    std::fs::write(
        &record,
        serde_json::json!({"id": "x", "component": "echo", "event": event}).to_string(),
    )
    .unwrap();
    for file in [&bare, &record] {
        let out = run(&[
            "invoke",
            ECHO_MQTT,
            "--event",
            file.to_str().unwrap(),
            "--allow-response",
            "replies/#",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let v = json(&out);
        assert_eq!(v["published"][0]["topic"], "replies/7", "{v}");
        assert_eq!(v["published"][0]["payload"], "21.5", "{v}");
    }
    let timer = dir.path().join("timer.json");
    std::fs::write(
        &timer,
        r#"{"kind": "timer", "schedule": "every 5s", "scheduled_at_ms": 1, "fired_at_ms": 2, "missed": 0}"#,
    )
    .unwrap();
    let out = run(&[
        "invoke",
        wasmgate_test_artifacts::TICK_TIMER,
        "--event",
        timer.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    for (text, want) in [
        ("{", "not JSON"),
        (
            r#"{"kind": "carrier-pigeon"}"#,
            "not an event as `wasmgate dlq show` prints it",
        ),
        (&event.to_string().replace(&hex_of("21.5"), "zz"), "not hex"),
        (
            &event
                .to_string()
                .replace("devices/7/temperature", "devices/+/temperature"),
            "topic",
        ),
        (
            r#"{"kind": "http", "method": "GET", "path": "no-slash", "authority": "h", "headers": [], "body_hex": ""}"#,
            "must start with '/'",
        ),
    ] {
        std::fs::write(&bare, text).unwrap();
        let out = run(&["invoke", ECHO_MQTT, "--event", bare.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{text}: {}", stderr(&out));
    }
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}
