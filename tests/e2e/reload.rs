//! `wasmgate reload` and SIGHUP on a running gateway: components, HTTP rules
//! and timers added, changed and removed without a restart; a manifest that
//! `check` would refuse, or one that changes what only a restart can, is
//! refused and the running configuration stays.

use crate::examples::Up;
use crate::util::{http_get as get, text, wasmgate};
use std::time::Duration;
use wasmgate_test_artifacts::{ECHO_MQTT, HTTP_PROBE, TICK_TIMER};

/// Log lines with `message` so far, as JSON.
fn logged(up: &Up, message: &str) -> Vec<serde_json::Value> {
    up.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

const HEAD: &str = r#"
[gateway]
state_dir = "state"
[http]
listen = "127.0.0.1:0"
"#;

fn first() -> String {
    format!(
        r#"{HEAD}
[component.probe]
source = "{HTTP_PROBE}"
[component.tick]
source = "{TICK_TIMER}"

[[trigger.http]]
priority = 1
path = "/a/*"
component = "probe"
[[trigger.timer]]
component = "tick"
every = "1h"
"#
    )
}

/// The first manifest, changed: `probe` reuses instances and has a 2 s
/// timeout, a new component `second` serves a new rule, the timer runs every
/// 200 ms, and a second timer is added.
fn second() -> String {
    format!(
        r#"{HEAD}
[component.probe]
source = "{HTTP_PROBE}"
reuse = 5
limits = {{ timeout = "2s" }}
[component.second]
source = "{HTTP_PROBE}"
[component.tick]
source = "{TICK_TIMER}"

[[trigger.http]]
priority = 1
path = "/a/*"
component = "probe"
[[trigger.http]]
priority = 2
path = "/b/*"
component = "second"
[[trigger.timer]]
component = "tick"
every = "200ms"
[[trigger.timer]]
component = "tick"
every = "1h"
"#
    )
}

#[test]
fn reload_applies_a_changed_manifest_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("wasmgate.toml");
    std::fs::write(&m, first()).unwrap();
    let m = m.to_str().unwrap().to_string();
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    let http = up.logged("http listening", "address");
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-f", &m]);
        wasmgate().args(&all).output().unwrap()
    };
    assert_eq!(get(&http, "/a/count"), (200, "count=1".into()));
    assert_eq!(get(&http, "/a/count"), (200, "count=1".into()));
    assert_eq!(get(&http, "/b/x").0, 404);
    assert_eq!(logged(&up, "timer armed").len(), 1);

    // A request in flight across the reload finishes on what it started on.
    let slow = {
        let http = http.clone();
        std::thread::spawn(move || get(&http, "/a/sleep?ms=1500"))
    };
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&m, second()).unwrap();
    let out = cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("components added: second"), "{said}");
    assert!(said.contains("components changed: probe"), "{said}");
    assert!(
        said.contains("triggers changed: http[1], timer[0], timer[1]"),
        "{said}"
    );
    assert_eq!(slow.join().unwrap(), (200, "slept 1500".into()));

    // The new rule and component answer; the changed one reuses instances.
    let (code, body) = get(&http, "/b/x");
    assert_eq!((code, body.as_str()), (200, "probe GET /b/x"));
    assert_eq!(get(&http, "/a/count"), (200, "count=1".into()));
    assert_eq!(get(&http, "/a/count"), (200, "count=2".into()));
    // The changed timer is re-armed (every 200 ms) and the new one armed;
    // the listener was never closed.
    up.wait_until("ticks of the re-armed timer", || {
        logged(&up, "invocation")
            .iter()
            .filter(|v| v["component"] == "tick")
            .count()
            >= 2
    });
    assert_eq!(logged(&up, "timer armed").len(), 3, "{}", up.logs());
    assert_eq!(logged(&up, "http listening").len(), 1);
    let status = cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let probe = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "probe")
        .unwrap()
        .clone();
    assert_eq!(probe["timeout_ms"], 2000, "{v}");
    let triggers: Vec<&str> = v["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["trigger"].as_str())
        .collect();
    assert_eq!(triggers, ["http[0]", "http[1]", "timer[0]", "timer[1]"]);
    // Refused, with `check`'s errors, and nothing changes.
    let refused = |manifest: String, wants: &[&str]| {
        std::fs::write(&m, manifest).unwrap();
        let out = cli(&["reload"]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{said}");
        // Refused by the gateway (the CLI finds its socket by the state
        // directory alone, whatever else is wrong with the file).
        assert!(said.contains("422 Unprocessable Entity"), "{said}");
        for w in wants {
            assert!(said.contains(w), "wants {w:?}: {said}");
        }
        assert!(
            said.contains("nothing was changed") || said.contains(".toml:"),
            "{said}"
        );
        assert_eq!(get(&http, "/b/x").0, 200, "the running rules stay");
    };
    refused(
        second().replace("component = \"second\"", "component = \"nobody\""),
        &["trigger.http[1].component", "nobody"],
    );
    refused(
        second().replace(
            "component = \"tick\"\nevery = \"200ms\"",
            "component = \"probe\"\nevery = \"200ms\"",
        ),
        &["trigger.timer[0].component", "timer-handler"],
    );
    refused(
        second().replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
        &["[http] changed", "restart"],
    );
    refused(
        format!(
            "{}\n[[trigger.mqtt]]\ncomponent = \"tick\"\ntopic = \"t\"\n",
            second()
        ),
        &["trigger.mqtt", "no MQTT connection", "restart"],
    );
    refused(
        second().replace(HTTP_PROBE, "/nonexistent/probe.wasm"),
        &["component.probe.source", "/nonexistent/probe.wasm"],
    );

    // SIGHUP reloads too: the first manifest again removes `second`, its
    // rule and the second timer.
    std::fs::write(&m, first()).unwrap();
    let before = logged(&up, "reloaded").len();
    up.signal("HUP");
    up.wait_until("the SIGHUP reload", || {
        logged(&up, "reloaded").len() > before
    });
    let last = logged(&up, "reloaded").pop().unwrap();
    assert_eq!(last["removed"], r#"["second"]"#, "{last}");
    assert_eq!(get(&http, "/b/x").0, 404);
    assert_eq!(get(&http, "/a/count"), (200, "count=1".into()));
    assert_eq!(
        logged(&up, "timer stopped (reload)").len(),
        1,
        "{}",
        up.logs()
    );
    let out = cli(&["reload"]);
    assert!(
        text(&out).contains("reloaded: nothing changed"),
        "{}",
        text(&out)
    );
}

/// Triggers on `a/+` and, if given, `second`.
fn mqtt_manifest(port: u16, second: Option<&str>) -> String {
    let second = second.map_or_else(String::new, |topic| {
        format!("[[trigger.mqtt]]\ncomponent = \"echo\"\ntopic = \"{topic}\"\nqos = 1\n")
    });
    format!(
        r#"
[gateway]
state_dir = "state"
[mqtt]
broker = "embedded"
embedded = {{ listen = "127.0.0.1:{port}" }}

[component.echo]
source = "{ECHO_MQTT}"
allow = {{ mqtt_publish = ["+/+/reply"] }}

[[trigger.mqtt]]
component = "echo"
topic = "a/+"
qos = 1
{second}"#
    )
}

/// Invocations logged for messages on filter `filter`.
fn handled(up: &Up, filter: &str) -> usize {
    logged(up, "invocation")
        .iter()
        .filter(|v| v["trigger"] == format!("mqtt:{filter}"))
        .count()
}

fn publish(port: u16, topic: &str) {
    let sent = std::process::Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-t", topic, "-q", "1", "-m", "1"])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", text(&sent));
}

#[test]
fn reload_changes_mqtt_subscriptions_on_the_live_session() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = dir.path().join("wasmgate.toml");
    std::fs::write(&m, mqtt_manifest(port, Some("c/+"))).unwrap();
    let m = m.to_str().unwrap().to_string();
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    up.wait_for(&["MQTT subscribed", "a/+, c/+"]);
    publish(port, "c/1");
    up.wait_until("c/1 handled", || handled(&up, "c/+") == 1);

    // mqtt[1] moves from c/+ to b/+; mqtt[0] stays as it is.
    std::fs::write(&m, mqtt_manifest(port, Some("b/+"))).unwrap();
    let out = wasmgate().args(["reload", "-f", &m]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("triggers changed: mqtt[1]"),
        "{}",
        text(&out)
    );
    // SUBSCRIBE goes out after the reload answered: publish until b/+ is
    // handled (earlier ones may find no subscription and are not counted).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while handled(&up, "b/+") == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", up.logs());
        publish(port, "b/1");
        std::thread::sleep(Duration::from_millis(200));
    }
    publish(port, "a/1");
    publish(port, "c/2");
    up.wait_until("a/1 handled", || handled(&up, "a/+") == 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(handled(&up, "c/+"), 1, "c/+ was unsubscribed");
    assert!(
        !up.logs().contains(r#""topic":"c/2""#),
        "c/2 reached the gateway: {}",
        up.logs()
    );
    // A paused trigger that a reload removes lets go of what it holds:
    // the message waiting for it is handled, and the connection goes on.
    let out = wasmgate()
        .args(["pause", "mqtt[1]", "-f", &m])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    publish(port, "b/2");
    std::thread::sleep(Duration::from_millis(500));
    let b = handled(&up, "b/+");
    std::fs::write(&m, mqtt_manifest(port, None)).unwrap();
    let out = wasmgate().args(["reload", "-f", &m]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    up.wait_until("b/2 handled once its trigger is gone", || {
        handled(&up, "b/+") == b + 1
    });
    publish(port, "a/2");
    up.wait_until("a/2 handled", || handled(&up, "a/+") == 2);
    // The session was never renewed.
    assert_eq!(logged(&up, "MQTT connected").len(), 1, "{}", up.logs());
    up.stop();
}

fn concurrency_manifest(concurrency: u32) -> String {
    format!(
        r#"{HEAD}
[component.probe]
source = "{HTTP_PROBE}"
limits = {{ concurrency = {concurrency} }}

[[trigger.http]]
priority = 1
component = "probe"
"#
    )
}

/// `n` requests to `/sleep?ms=ms` at once; their status codes, sorted.
fn at_once(http: &str, n: usize, ms: u32) -> Vec<std::thread::JoinHandle<u16>> {
    (0..n)
        .map(|_| {
            let http = http.to_string();
            std::thread::spawn(move || get(&http, &format!("/sleep?ms={ms}")).0)
        })
        .collect()
}

fn codes(requests: Vec<std::thread::JoinHandle<u16>>) -> Vec<u16> {
    let mut codes: Vec<u16> = requests.into_iter().map(|r| r.join().unwrap()).collect();
    codes.sort_unstable();
    codes
}

#[test]
fn reload_raises_and_lowers_a_components_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("wasmgate.toml");
    std::fs::write(&m, concurrency_manifest(1)).unwrap();
    let m = m.to_str().unwrap().to_string();
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    let http = up.logged("http listening", "address");
    let reload = || {
        let out = wasmgate().args(["reload", "-f", &m]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    };
    assert_eq!(codes(at_once(&http, 2, 1000)), [200, 503]);

    std::fs::write(&m, concurrency_manifest(3)).unwrap();
    reload();
    assert_eq!(codes(at_once(&http, 3, 1000)), [200, 200, 200]);

    // Lowered while three run: no new one starts until two have ended.
    let running = at_once(&http, 3, 1500);
    std::thread::sleep(Duration::from_millis(400));
    std::fs::write(&m, concurrency_manifest(1)).unwrap();
    reload();
    assert_eq!(get(&http, "/x").0, 503, "{}", up.logs());
    assert_eq!(codes(running), [200, 200, 200]);
    assert_eq!(codes(at_once(&http, 2, 500)), [200, 503]);
    up.stop();
}
