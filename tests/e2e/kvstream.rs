//! The key-value change stream (`[[trigger.keyvalue]]`) with real guests:
//! `kv-http` writes a bucket over HTTP, `kv-audit` (SDK, `kv-stream-app`)
//! handles its changes and writes what it saw to its own bucket, which the
//! test reads through the store as `wasmgate kv` does. Order per key, the
//! writer of each change, operators' writes from another process, partial
//! batch failure, dead letters, the retention gap, the self-trigger check,
//! and no acknowledged write lost across SIGKILLs.

use crate::examples::Up;
use crate::util::{http_get as get, json, run, spawn_guarded, text, wasmgate};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use wasmgate_manifest::keyvalue::KeyValueBounds;
use wasmgate_runtime::keyvalue::{Op, Reply};
use wasmgate_store::keyvalue::KeyValueStore;
use wasmgate_test_artifacts::{KV_AUDIT, KV_HTTP};

fn write_manifest(dir: &Path, extra: &str) -> String {
    write_manifest_with(dir, "", extra)
}

/// With `audit_env` as the audit component's `env` entries.
fn write_manifest_with(dir: &Path, audit_env: &str, extra: &str) -> String {
    let m = dir.join("wasmgate.toml");
    std::fs::write(
        &m,
        format!(
            r#"
[gateway]
state_dir = "state"
[http]
listen = "127.0.0.1:0"

[component.kv]
source = "{KV_HTTP}"
allow.keyvalue = ["orders"]
limits = {{ concurrency = 16 }}

[component.audit]
source = "{KV_AUDIT}"
allow.keyvalue = ["audit"]
limits = {{ concurrency = 1, timeout = "60s" }}
env = {{ {audit_env} }}

[[trigger.http]]
priority = 1
path = "/*"
component = "kv"
{extra}
"#
        ),
    )
    .unwrap();
    m.to_str().unwrap().to_string()
}

/// The gateway's key-value store, opened by the test as a second process
/// (as `wasmgate kv` does).
struct Kv {
    rt: tokio::runtime::Runtime,
    store: KeyValueStore,
}

impl Kv {
    fn open(dir: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = KeyValueStore::path_in(&dir.join("state"));
        let store = KeyValueStore::open(&path, KeyValueBounds::default()).unwrap();
        Self { rt, store }
    }

    fn run(&self, bucket: &str, op: Op) -> Reply {
        self.rt.block_on(self.store.run(bucket, op)).unwrap()
    }

    fn get(&self, key: &str) -> Option<String> {
        match self.run("audit", Op::Get(key.into())) {
            Reply::Value(v) => v.map(|v| String::from_utf8(v).unwrap()),
            other => panic!("{other:?}"),
        }
    }

    fn seen(&self, seq: u64) -> Option<String> {
        self.get(&format!("seen/{seq:010}"))
    }

    fn count(&self, seq: u64) -> u64 {
        self.get(&format!("count/{seq:010}"))
            .map_or(0, |v| v.parse().unwrap())
    }

    fn set_many(&self, pairs: &[(&str, &str)]) {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(self.run("orders", Op::SetMany(pairs)), Reply::Done);
    }
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Waits (at most 60 s) until `done`.
fn wait(up: &Up, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}:\n{}", up.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn changes_reach_the_handler_in_order_with_partial_failures_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_manifest_with(
        dir.path(),
        r#"AUDIT_CHECK_OLD = "1""#,
        r#"
[[trigger.keyvalue]]
component = "audit"
bucket = "orders"
view = "new_and_old"
batch_size = 10
batch_window = "300ms"
retry = { attempts = 3, backoff = "50ms" }

[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"
"#,
    );
    std::fs::write(dir.path().join("admin.token"), "t0k3n-for-the-test\n").unwrap();
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    up.wait_for(&["key-value trigger started", "orders"]);
    let http = up.logged("http listening", "address");

    // 4 clients × 30 writes over 6 keys, at once: commit order decides.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let http = http.clone();
            std::thread::spawn(move || {
                for i in 0..30 {
                    let path = format!("/set/orders/k{}?v=c{c}-{i}", (c + i) % 6);
                    assert_eq!(get(&http, &path), (200, "set".into()));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(get(&http, "/del/orders/k0").0, 200);
    let kv = Kv::open(dir.path());
    wait(&up, "121 changes handled", || kv.count(121) > 0);
    for seq in 1..=121 {
        assert!(kv.seen(seq).is_some(), "change {seq} handled");
        assert_eq!(kv.count(seq), 1, "change {seq} handled once");
    }
    assert_eq!(kv.get("disorder"), None, "a key's changes in commit order");
    // Each change's old value is what the key's previous change left: none
    // missing, none out of commit order.
    assert_eq!(kv.get("mismatch"), None);
    assert!(kv.get("largest").unwrap().parse::<u32>().unwrap() > 1);
    assert!(
        kv.seen(1).unwrap().ends_with("old=- by=kv via=http[0]"),
        "{:?}",
        kv.seen(1)
    );
    let delete = kv.seen(121).unwrap();
    assert!(
        delete.starts_with("delete k0 new=- old=c") && delete.ends_with("by=kv via=http[0]"),
        "{delete}"
    );

    // An operator's write from another process is found too.
    let out = run(&["kv", "set", "orders", "op", "by-hand", "-f", &m]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    wait(&up, "the operator's change handled", || kv.count(122) > 0);
    assert_eq!(
        kv.seen(122).unwrap(),
        "set op new=by-hand old=- by=operator via=-"
    );

    // Partial failure: the handler names the change that failed; the one
    // before it is handled once, the retry starts at the failed one.
    kv.set_many(&[("p1", "a"), ("p2", "fail-once"), ("p3", "b")]);
    wait(&up, "the retried batch handled", || kv.count(125) > 0);
    for seq in 123..=125 {
        assert_eq!(kv.count(seq), 1, "change {seq} handled once");
    }
    up.wait_for(&["key-value batch failed; retrying", "\"first_failed\":124"]);

    // A rejected change: the ones before it handled, it and the rest of the
    // batch dead-lettered as one record, and the stream goes on.
    kv.set_many(&[("r1", "a"), ("r2", "reject"), ("r3", "b")]);
    up.wait_for(&["event dead-lettered", "kv-"]);
    kv.set_many(&[("after", "c")]);
    wait(&up, "the change after the dead letter handled", || {
        kv.count(129) > 0
    });
    assert_eq!(kv.count(126), 1);
    assert_eq!((kv.seen(127), kv.seen(128)), (None, None));
    let out = run(&["dlq", "list", "-f", &m, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let records = json(&out);
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["component"], "audit");
    assert_eq!(r["trigger"], "keyvalue:orders");
    assert_eq!(r["condition"], "rejected");
    assert_eq!(r["event"]["kind"], "keyvalue");
    let changes: Vec<u64> = r["event"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(changes, [127, 128]);
    assert_eq!(r["event"]["changes"][0]["new_value_hex"], hex("reject"));
    // Its id is the one a redelivery from change 127 would have.
    let id = r["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("kv-") && id.ends_with("-127"), "{id}");
    // A replay delivers the same changes again: still rejected, one
    // attempt more on the record.
    let out = run(&["dlq", "replay", &id, "-f", &m]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = run(&["dlq", "show", &id, "-f", &m]);
    assert_eq!(json(&out)["attempts"], 2, "{}", text(&out));
    assert_eq!(json(&out)["last_error"]["message"], "rejected");

    // Operators: the trigger in status, paused and resumed, and its metrics.
    let status = run(&["status", "-f", &m]);
    assert!(
        text(&status).contains("keyvalue[0]") && text(&status).contains("keyvalue:orders"),
        "{}",
        text(&status)
    );
    let out = run(&["pause", "keyvalue[0]", "-f", &m]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    kv.set_many(&[("held", "x")]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(kv.seen(130), None, "a paused trigger takes no batch");
    let out = run(&["resume", "keyvalue[0]", "-f", &m]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    wait(&up, "the held change handled after resume", || {
        kv.count(130) > 0
    });
    // The host counts a batch once its handler returned and its
    // checkpoint is saved: poll.
    let admin = up.logged("admin listening", "address");
    let series = [
        "wasmgate_kv_stream_changes_total{trigger=\"keyvalue[0]\"} 128",
        "wasmgate_kv_stream_dead_lettered_changes_total{trigger=\"keyvalue[0]\"} 2",
        "wasmgate_kv_stream_behind_changes{trigger=\"keyvalue[0]\"} 0",
    ];
    let scrape = || get(&admin, "/metrics").1;
    wait(&up, "the stream's metrics", || {
        let metrics = scrape();
        series.iter().all(|s| metrics.contains(s))
    });
    drop(kv);
    up.stop();
}

#[test]
fn a_trigger_behind_the_retention_is_told_the_gap_and_self_triggers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = r#"
[keyvalue.bucket.orders]
stream_max_changes = 5

[[trigger.keyvalue]]
component = "audit"
bucket = "orders"
"#;
    let m = write_manifest(dir.path(), trigger);
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    up.wait_for(&["key-value trigger started", "orders"]);
    up.stop();
    // While the gateway is down, 20 changes; the stream keeps the last 5.
    for i in 1..=20 {
        let out = run(&["kv", "set", "orders", &format!("k{i}"), "v", "-f", &m]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    let kv = Kv::open(dir.path());
    wait(&up, "the kept changes handled", || kv.count(20) > 0);
    assert_eq!(kv.get("gap").as_deref(), Some("1-15 lost=15"));
    assert_eq!(kv.seen(15), None);
    for seq in 16..=20 {
        assert!(kv.seen(seq).is_some(), "{seq}");
    }
    up.wait_for(&["dropped by the stream's retention", "\"lost\":15"]);
    drop(kv);
    up.stop();

    // A component that may write the bucket it listens to is refused,
    // unless allowed.
    let own = trigger.replace("bucket = \"orders\"", "bucket = \"audit\"");
    let m = write_manifest(dir.path(), &own);
    let out = run(&["check", "-f", &m]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("trigger.keyvalue[0].bucket")
            && text(&out).contains("allow_self_trigger"),
        "{}",
        text(&out)
    );
    let m = write_manifest(dir.path(), &format!("{own}allow_self_trigger = true\n"));
    let out = run(&["check", "-f", &m]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A component without the handler is refused at load.
    let m = write_manifest(
        dir.path(),
        "[[trigger.keyvalue]]\ncomponent = \"kv\"\nbucket = \"audit\"\n",
    );
    let out = run(&["check", "-f", &m]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("kv-stream-handler"), "{}", text(&out));
}

/// Writes are acknowledged by the store while the gateway is SIGKILLed at
/// seeded-random points, and batches fail part-way (retried from the failed
/// change) or are rejected (dead-lettered): in the end every change was
/// handled or is in a dead letter.
#[test]
fn sigkill_at_random_points_loses_no_change() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_manifest(
        dir.path(),
        r#"
[[trigger.keyvalue]]
component = "audit"
bucket = "orders"
batch_size = 7
retry = { attempts = 3, backoff = "20ms" }
"#,
    );
    let spawn = || {
        spawn_guarded(
            wasmgate()
                .args(["up", "-f", &m])
                .stderr(Stdio::null())
                .stdout(Stdio::null()),
        )
    };
    // The first start makes the stream; changes before it are not in it.
    let up = Up::spawn(wasmgate().args(["up", "-f", &m]), &m);
    up.wait_for(&["key-value trigger started"]);
    drop(up);
    let n: u64 = 300;
    let writer = {
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let kv = Kv::open(&dir);
            for i in 0..n {
                let value = match i {
                    _ if i % 50 == 7 => "reject".to_string(),
                    _ if i % 10 == 3 => "fail-once".to_string(),
                    _ => i.to_string(),
                };
                kv.run(
                    "orders",
                    Op::Set(format!("k{}", i % 17), value.into_bytes()),
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let kv = Kv::open(dir.path());
    let dead = || -> std::collections::BTreeSet<u64> {
        let out = run(&["dlq", "list", "-f", &m, "--json", "--limit", "1000"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        json(&out)
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["event"]["changes"].as_array().unwrap().clone())
            .map(|c| c["sequence"].as_u64().unwrap())
            .collect()
    };
    let handled = || {
        let dead = dead();
        (1..=n)
            .filter(|s| dead.contains(s) || kv.seen(*s).is_some())
            .count() as u64
    };
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut host = spawn();
    let mut kills = 0;
    let mut done = 0;
    let mut progress_at = Instant::now();
    while done < n {
        std::thread::sleep(Duration::from_millis(rng.u64(30..400)));
        let now = handled();
        if now > done {
            progress_at = Instant::now();
        }
        done = now;
        assert!(
            progress_at.elapsed() < Duration::from_secs(60),
            "no progress for 60 s after {kills} SIGKILLs: {done} of {n} handled"
        );
        if kills < 30 && done < n {
            host.kill().unwrap(); // SIGKILL
            host.wait().unwrap();
            kills += 1;
            host = spawn();
        }
    }
    writer.join().unwrap();
    drop(host);
    eprintln!("{n} changes handled after {kills} SIGKILLs");
    assert!(kills >= 2, "the host was never killed mid-stream");
    let dead = dead();
    assert!(!dead.is_empty(), "rejected changes are dead-lettered");
    for seq in 1..=n {
        assert!(
            dead.contains(&seq) || kv.seen(seq).is_some(),
            "change {seq} neither handled nor dead-lettered"
        );
    }
}
