//! Key-value buckets (`wasi:keyvalue@0.2.0-draft`) with real guests: a
//! guest built with plain wit-bindgen against the standard WIT (`kv-http`)
//! and an SDK guest that deduplicates MQTT deliveries (`dedup-mqtt`); the
//! grants, every bound, `wasmgate kv` beside a running gateway, `invoke` on
//! a temporary and on the state store, and writes surviving SIGKILL.

use crate::examples::Up;
use crate::util::{free_port, http_get as get, text, wasmgate};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use wasmgate_test_artifacts::{DEDUP_MQTT, KV_HTTP, KV2_HTTP};

fn manifest(dir: &std::path::Path) -> String {
    let m = dir.join("wasmgate.toml");
    std::fs::write(
        &m,
        format!(
            r#"
[gateway]
state_dir = "state"
[http]
listen = "127.0.0.1:0"

[keyvalue]
max_key_bytes = 64
max_value_bytes = "4KiB"
[keyvalue.bucket.small]
max_keys = 3

[component.kv]
source = "{KV_HTTP}"
allow.keyvalue = ["counters", "small", "big"]
limits = {{ keyvalue_ops = 100, concurrency = 64 }}
reuse = 5

[component.kv2]
source = "{KV2_HTTP}"
allow.keyvalue = ["counters", "big"]

[[trigger.http]]
priority = 1
path = "/v2/*"
component = "kv2"

[[trigger.http]]
priority = 2
path = "/*"
component = "kv"
"#
        ),
    )
    .unwrap();
    m.to_str().unwrap().to_string()
}

fn cli(m: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["-f", m]);
    wasmgate().args(&all).output().unwrap()
}

fn stdout(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 1,000 increments from 16 clients at once: every answer is a different
/// number from 1 to 1,000 (none lost, none repeated).
fn count_concurrently(http: &str) {
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (http, next) = (http.to_string(), next.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < 1000 {
                    let (code, body) = get(&http, "/incr/counters/c");
                    assert_eq!(code, 200, "{body}");
                    seen.push(body.parse::<u64>().unwrap());
                }
                seen
            })
        })
        .collect();
    let mut all: Vec<u64> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=1000).collect::<Vec<_>>());
}

#[test]
fn a_guest_keeps_state_in_its_granted_buckets_within_every_bound() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    let http = up.logged("http listening", "address");

    assert_eq!(get(&http, "/incr/counters/n"), (200, "1".into()));
    assert_eq!(get(&http, "/incr/counters/n?n=41"), (200, "42".into()));
    assert_eq!(get(&http, "/get/counters/n"), (200, "42".into()));
    assert_eq!(get(&http, "/get/counters/none").0, 404);
    count_concurrently(&http);

    // Grants: a bucket not in allow.keyvalue is access-denied.
    assert_eq!(get(&http, "/open/secret/x"), (403, "access-denied".into()));
    // Bounds: each a guest-side error naming its key.
    let refused = |path: &str, wants: &str| {
        let (code, body) = get(&http, path);
        assert_eq!(code, 500, "{path}: {body}");
        assert!(body.contains(wants), "{path}: wants {wants:?}: {body}");
    };
    refused(&format!("/set/big/{}", "k".repeat(65)), "max_key_bytes");
    refused("/set/big/v?bytes=4097", "max_value_bytes");
    assert_eq!(get(&http, "/set/big/v?bytes=4096"), (200, "set".into()));
    refused(
        "/fill/small/k?n=5",
        "after 3: error: bucket \"small\" is full",
    );
    refused(
        "/ops/counters/x?n=101",
        "after 99: error: this invocation has made 100",
    );
    // Each invocation has the whole budget, on a reused instance too.
    assert_eq!(get(&http, "/ops/counters/x?n=60"), (200, "done 60".into()));
    assert_eq!(get(&http, "/ops/counters/x?n=60"), (200, "done 60".into()));
    refused("/many/counters/k?n=1001", "at most 1000 keys");
    refused("/setmany/big/k?n=1001", "at most 1000 keys");
    refused("/setmany/big/k?n=3&bytes=4097", "max_value_bytes");
    refused(
        &format!("/many/big/{}?n=2", "k".repeat(65)),
        "max_key_bytes",
    );
    assert_eq!(
        get(&http, "/setmany/big/s?n=3&bytes=10"),
        (200, "set 3".into())
    );
    refused("/incr/big/v", "not a u64 counter");
    assert_eq!(get(&http, "/list/small"), (200, "keys=3 pages=1".into()));
    assert_eq!(get(&http, "/many/small/k?n=4"), (200, "found=3".into()));

    // The operator's view, while the gateway runs.
    assert_eq!(stdout(&cli(&m, &["kv", "get", "counters", "c"])), "1000");
    let missing = cli(&m, &["kv", "get", "counters", "nothing"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    stdout(&cli(&m, &["kv", "set", "counters", "greeting", "hello"]));
    assert_eq!(get(&http, "/get/counters/greeting"), (200, "hello".into()));
    assert_eq!(stdout(&cli(&m, &["kv", "list", "small"])), "k0\nk1\nk2\n");
    let out = cli(&m, &["kv", "set", "small", "k3", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is full"), "{}", text(&out));
    stdout(&cli(&m, &["kv", "delete", "small", "k0"]));
    assert_eq!(get(&http, "/list/small"), (200, "keys=2 pages=1".into()));
    let buckets = stdout(&cli(&m, &["kv", "buckets"]));
    let small_row = buckets
        .lines()
        .find(|l| l.starts_with("small "))
        .unwrap_or_else(|| panic!("{buckets}"));
    assert_eq!(
        small_row.split_whitespace().take(3).collect::<Vec<_>>(),
        ["small", "2", "6"],
        "{buckets}"
    );
    let status = stdout(&cli(&m, &["status", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let small = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "small")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        (small["keys"].as_u64(), small["max_keys"].as_u64()),
        (Some(2), Some(3))
    );
    let table = stdout(&cli(&m, &["status"]));
    assert!(
        table.contains("BUCKET") && table.contains("counters"),
        "{table}"
    );
    let check = stdout(&cli(&m, &["check"]));
    assert!(
        check.contains("keyvalue: counters (3 of 100000 keys"),
        "{check}"
    );

    // Every answered write is on disk: SIGKILL, restart, read.
    assert_eq!(get(&http, "/incr/counters/c"), (200, "1001".into()));
    up.signal("KILL");
    drop(up);
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    let http = up.logged("http listening", "address");
    assert_eq!(get(&http, "/get/counters/c"), (200, "1001".into()));
    assert_eq!(get(&http, "/get/counters/greeting"), (200, "hello".into()));
    up.stop();
}

/// A Spin-style guest (`wasi:keyvalue@0.2.0-draft2`) beside a draft one, on
/// the same buckets: signed counters, compare-and-swap, string cursors,
/// Spin's `get-many`.
#[test]
fn draft2_guests_share_the_buckets_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    let http = up.logged("http listening", "address");
    assert_eq!(get(&http, "/incr/counters/n?n=5"), (200, "5".into()));
    assert_eq!(get(&http, "/v2/incr/counters/n?d=-7"), (200, "-2".into()));
    let (code, body) = get(&http, "/incr/counters/n");
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("not a u64 counter"), "{body}");
    assert_eq!(get(&http, "/v2/incr/counters/n?d=2"), (200, "0".into()));
    assert_eq!(get(&http, "/incr/counters/n"), (200, "1".into()));

    assert_eq!(
        get(&http, "/v2/cas/counters/k"),
        (
            200,
            "first=ok second=cas-failed current=one retry=ok".into()
        )
    );
    assert_eq!(get(&http, "/get/counters/k"), (200, "two".into()));

    // 1,080 keys (90 per invocation: kv's keyvalue_ops is 100).
    for i in 0..12 {
        let path = format!("/setmany/big/p{i}-?n=90");
        assert_eq!(get(&http, &path), (200, "set 90".into()));
    }
    let listed = (200, "keys=1080 pages=2".to_string());
    assert_eq!(get(&http, "/v2/list/big"), listed);
    assert_eq!(get(&http, "/list/big"), listed);
    let found = get(&http, "/v2/many/big/p0-?n=3");
    assert_eq!(found, (200, "found=3 of 3".into()));
    assert_eq!(
        get(&http, "/v2/many/big/z?n=2"),
        (200, "found=0 of 2".into())
    );
    assert_eq!(get(&http, "/v2/get/small/x"), (403, "access-denied".into()));
    up.stop();
}

#[test]
fn a_component_importing_keyvalue_without_a_grant_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("wasmgate.toml");
    std::fs::write(&m, format!("[component.kv]\nsource = \"{KV_HTTP}\"\n")).unwrap();
    let out = wasmgate()
        .args(["check", "-f", m.to_str().unwrap()])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("component.kv"), "{said}");
    assert!(said.contains("wasi:keyvalue/store"), "{said}");
    assert!(said.contains("allow.keyvalue"), "{said}");
    std::fs::write(
        &m,
        format!("[component.kv]\nsource = \"{KV_HTTP}\"\nallow.keyvalue = [\"a/b\"]\n"),
    )
    .unwrap();
    let out = wasmgate()
        .args(["check", "-f", m.to_str().unwrap()])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("component.kv.allow.keyvalue"), "{said}");
    assert!(said.contains("not a valid bucket name"), "{said}");
}

#[test]
fn invoke_runs_a_keyvalue_guest_on_a_temporary_or_the_state_store() {
    let incr = |args: &[&str]| {
        let out = wasmgate().args(args).output().unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
        (
            v["http_response"]["status"].as_u64().unwrap(),
            v["http_response"]["body"].as_str().unwrap().to_string(),
        )
    };
    let bare = [
        "invoke",
        KV_HTTP,
        "--http-path",
        "/incr/b/n",
        "--allow-keyvalue",
        "b",
    ];
    // A fresh temporary store each time.
    assert_eq!(incr(&bare), (200, "1".into()));
    assert_eq!(incr(&bare), (200, "1".into()));
    let ungranted = ["invoke", KV_HTTP, "--http-path", "/incr/b/n"];
    assert_eq!(incr(&ungranted), (403, "access-denied".into()));

    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let state = [
        "invoke",
        "kv",
        "-f",
        &m,
        "--http-path",
        "/incr/counters/n",
        "--keyvalue",
        "state",
    ];
    assert_eq!(incr(&state), (200, "1".into()));
    assert_eq!(incr(&state), (200, "2".into()));
    assert_eq!(stdout(&cli(&m, &["kv", "get", "counters", "n"])), "2");
    let out = wasmgate()
        .args(["invoke", KV_HTTP, "--http-path", "/", "--keyvalue", "state"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--keyvalue state needs a component of a manifest"));
}

#[test]
fn a_deduplicating_mqtt_handler_counts_a_redelivered_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let m = dir.path().join("wasmgate.toml");
    std::fs::write(
        &m,
        format!(
            r#"
[gateway]
state_dir = "state"
[mqtt]
broker = "embedded"
embedded = {{ listen = "127.0.0.1:{port}" }}

[component.dedup]
source = "{DEDUP_MQTT}"
allow.keyvalue = ["dedup"]
limits = {{ concurrency = 1 }}

[[trigger.mqtt]]
topic = "d/#"
qos = 1
component = "dedup"
"#
        ),
    )
    .unwrap();
    let m = m.to_str().unwrap().to_string();
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    up.wait_for(&["MQTT subscribed"]);
    for payload in ["one", "fail-after-effect", "three"] {
        let status = std::process::Command::new("mosquitto_pub")
            .args([
                "-p",
                &port.to_string(),
                "-q",
                "1",
                "-t",
                "d/a",
                "-m",
                payload,
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
    up.wait_for(&["duplicate", "attempt 2"]);
    up.wait_until("three events counted", || {
        cli(&m, &["kv", "get", "dedup", "count/d/a"]).stdout == b"3"
    });
    let keys = stdout(&cli(&m, &["kv", "list", "dedup"]));
    assert_eq!(keys.lines().filter(|k| k.starts_with("seen/")).count(), 3);
    up.stop();
}

/// `wasmgate dlq replay` runs a key-value guest on the gateway's buckets
/// (its effects are real, as the gateway's would be); a deploy's smoke test
/// runs it on an empty temporary store (a trial has no effects).
#[test]
fn a_replay_writes_the_buckets_and_a_smoke_test_does_not() {
    use wasmgate_store::deadletter::{
        AttemptError, Bounds, Condition, DeadLetter, DeadLetterStore, StoredEvent,
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("smoke.json"),
        r#"{"kind": "http", "method": "GET", "path": "/incr/counters/smoke",
            "authority": "edge", "headers": [], "body_hex": ""}"#,
    )
    .unwrap();
    let m = dir.path().join("wasmgate.toml");
    std::fs::write(
        &m,
        format!(
            r#"
[gateway]
state_dir = "state"
[http]
listen = "127.0.0.1:0"

[component.dedup]
source = "{DEDUP_MQTT}"
allow.keyvalue = ["dedup"]

[component.kv]
source = "{KV_HTTP}"
allow.keyvalue = ["counters"]
deploy = {{ smoke_test = "smoke.json" }}

[[trigger.http]]
priority = 1
component = "kv"
"#
        ),
    )
    .unwrap();
    let m = m.to_str().unwrap().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let store = DeadLetterStore::open(
        &dir.path().join("state/dead-letters.sqlite"),
        Bounds::default(),
    )
    .unwrap();
    let err = AttemptError {
        outcome: "handler_error".into(),
        message: "retry".into(),
        at_ms: now,
    };
    store
        .put_blocking(DeadLetter {
            id: "rec-1".into(),
            component: "dedup".into(),
            trigger: "trigger.mqtt[0]".into(),
            condition: Condition::RetriesExhausted,
            attempts: 3,
            event: StoredEvent::Mqtt {
                topic: "d/a".into(),
                payload_hex: "78".into(),
                qos: 1,
                retain: false,
                content_type: None,
                response_topic: None,
                correlation_data_hex: None,
                user_properties: Vec::new(),
            },
            first_error: err.clone(),
            last_error: err,
            first_attempt_ms: now - 1000,
            dead_at_ms: now,
        })
        .unwrap();
    drop(store);
    let replay = cli(&m, &["dlq", "replay", "rec-1"]);
    assert_eq!(replay.status.code(), Some(0), "{}", text(&replay));
    assert_eq!(stdout(&cli(&m, &["kv", "get", "dedup", "count/d/a"])), "1");

    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    // Another version (the same path is a draft2 guest's `incr` too).
    let deploy = cli(&m, &["deploy", "kv", KV2_HTTP]);
    assert_eq!(deploy.status.code(), Some(0), "{}", text(&deploy));
    assert!(text(&deploy).contains("smoke test ok"), "{}", text(&deploy));
    let smoke = cli(&m, &["kv", "get", "counters", "smoke"]);
    assert_eq!(smoke.status.code(), Some(1), "{}", text(&smoke));
    // The deployed version runs on the gateway's buckets.
    let http = up.logged("http listening", "address");
    assert_eq!(get(&http, "/incr/counters/real"), (200, "1".into()));
    assert_eq!(stdout(&cli(&m, &["kv", "get", "counters", "real"])), "1");
    up.stop();
}
