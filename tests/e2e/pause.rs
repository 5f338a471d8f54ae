//! `wasmgate pause` and `resume` on a running gateway: an HTTP rule
//! answers 503 while paused, a timer skips its ticks, an MQTT trigger
//! holds its messages (unacknowledged, not lost) until it resumes.

use crate::examples::Up;
use crate::util::{text, wasmgate};
use std::process::Command;
use std::time::Duration;
use wasmgate_test_artifacts::{ECHO_MQTT, HTTP_PROBE, TICK_TIMER};

/// Invocation log lines of `component` so far.
fn invocations(up: &Up, component: &str) -> usize {
    up.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "invocation" && v["component"] == component)
        .count()
}

fn http_status(http: &str) -> (u16, Option<String>) {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /x HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let code = answer[9..12].parse().unwrap();
    let retry = answer
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .map(String::from);
    (code, retry)
}

#[test]
fn paused_triggers_take_no_events_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::util::free_port();
    let m = dir.path().join("wasmgate.toml");
    std::fs::write(
        &m,
        format!(
            r#"
[gateway]
state_dir = "state"
[http]
listen = "127.0.0.1:0"
[mqtt]
broker = "embedded"
embedded = {{ listen = "127.0.0.1:{port}" }}

[component.probe]
source = "{HTTP_PROBE}"
[component.echo]
source = "{ECHO_MQTT}"
allow = {{ mqtt_publish = ["sensors/+/reply"] }}
[component.tick]
source = "{TICK_TIMER}"

[[trigger.http]]
priority = 1
component = "probe"
[[trigger.mqtt]]
component = "echo"
topic = "sensors/+"
qos = 1
[[trigger.timer]]
component = "tick"
every = "500ms"
"#
        ),
    )
    .unwrap();
    let m = m.to_str().unwrap().to_string();
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    let http = up.logged("http listening", "address");
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-f", &m]);
        wasmgate().args(&all).output().unwrap()
    };

    // HTTP: 503 with Retry-After while paused.
    assert_eq!(http_status(&http).0, 200);
    let out = cli(&["pause", "http[0]"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("http[0] paused"), "{}", text(&out));
    assert_eq!(http_status(&http), (503, Some("5".into())));
    let out = cli(&["status"]);
    assert!(
        text(&out)
            .lines()
            .any(|l| l.starts_with("http[0]") && l.ends_with("(paused)")),
        "{}",
        text(&out)
    );
    let out = cli(&["pause", "http[0]"]);
    assert!(text(&out).contains("(it already was)"), "{}", text(&out));
    let out = cli(&["resume", "http[0]"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(http_status(&http).0, 200);

    // Timer: no tick runs while paused; ticks again once resumed.
    up.wait_until("a first tick", || invocations(&up, "tick") > 0);
    let out = cli(&["pause", "timer[0]"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    let before = invocations(&up, "tick");
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(invocations(&up, "tick"), before, "ticked while paused");
    cli(&["resume", "timer[0]"]);
    up.wait_until("a tick after resume", || invocations(&up, "tick") > before);

    // MQTT: a message published while paused waits, then is handled.
    let out = cli(&["pause", "mqtt[0]"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let sent = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "sensors/7",
            "-q",
            "1",
            "-m",
            "21.5",
        ])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", text(&sent));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(invocations(&up, "echo"), 0, "handled while paused");
    cli(&["resume", "mqtt[0]"]);
    up.wait_until("the held message handled", || invocations(&up, "echo") == 1);

    // Bad names.
    let out = cli(&["pause", "timer[9]"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no trigger \"timer[9]\""),
        "{}",
        text(&out)
    );
    let out = cli(&["pause", "timer0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    up.stop();
}
