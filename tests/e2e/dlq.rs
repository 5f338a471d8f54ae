//! Dead letters end to end: a failing timer under `wasmgate up`, then the
//! `wasmgate dlq` commands, while the host runs and after.

use crate::util::{json, run, spawn_guarded, wasmgate};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use wasmgate_test_artifacts::{COUNTER, TICK_TIMER};

fn manifest(dir: &Path, env: &str) -> String {
    let path = dir.join("wasmgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
name = "dlq-test"
state_dir = "state"

[component.tick]
source = {TICK_TIMER:?}
env = {{ {env} }}

[[trigger.timer]]
component = "tick"
every = "1s"
retry = {{ attempts = 2, backoff = "10ms", jitter = 0.0 }}
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn dead_letters_are_listed_replayed_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let file = manifest(dir.path(), r#"TICK_FAIL = "sensor offline""#);

    // A host whose timer fails every tick.
    let mut host = spawn_guarded(
        wasmgate()
            .args(["up", "-f", &file, "--log-format", "json"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let mut lines = BufReader::new(host.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut dead = 0;
    while dead < 2 {
        assert!(
            Instant::now() < deadline,
            "no two dead letters were written"
        );
        let line = lines.next().expect("host stderr open").unwrap();
        if line.contains("event dead-lettered") {
            dead += 1;
        }
    }

    // While the host runs: the store is readable.
    let out = run(&["dlq", "list", "-f", &file, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let records = json(&out);
    let first = &records[0];
    assert_eq!(first["component"], "tick");
    assert_eq!(first["condition"], "retries_exhausted");
    assert_eq!(first["attempts"], 2);
    assert_eq!(first["last_error"]["message"], "sensor offline");
    assert_eq!(first["event"]["kind"], "timer");
    let id = first["id"].as_str().unwrap().to_string();

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    assert_eq!(host.wait().unwrap().code(), Some(0));

    let out = run(&["dlq", "list", "-f", &file]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&id) && table.contains("retries_exhausted"),
        "{table}"
    );
    // Pages: the table shows `--limit` records and how to get the next page.
    let all = json(&run(&["dlq", "list", "-f", &file, "--json"]));
    assert!(all.as_array().unwrap().len() >= 2, "{all}");
    let out = run(&["dlq", "list", "-f", &file, "--limit", "1"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let newest = all[0]["id"].as_str().unwrap();
    assert!(
        table.contains(&format!("more: wasmgate dlq list --before {newest}")),
        "{table}"
    );
    let next = json(&run(&[
        "dlq", "list", "-f", &file, "--json", "--limit", "1", "--before", newest,
    ]));
    assert_eq!(next[0]["id"], all[1]["id"]);

    let out = run(&["dlq", "show", &id, "-f", &file]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["id"], id);

    // The guest still fails: the replay fails and the record stays, one attempt more.
    let out = run(&["dlq", "replay", &id, "-f", &file]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = run(&["dlq", "show", &id, "-f", &file]);
    assert_eq!(json(&out)["attempts"], 3);

    // Fixed (no more TICK_FAIL): every record replays and is removed.
    manifest(dir.path(), r#"FIXED = "1""#);
    let out = run(&["dlq", "replay", "--all", "-f", &file]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{id}: replayed, ok; removed")));
    let out = run(&["dlq", "list", "-f", &file, "--json"]);
    assert_eq!(json(&out), serde_json::json!([]));

    // Bad input.
    let out = run(&["dlq", "replay", "no-such-id", "-f", &file]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no dead letter with id \"no-such-id\""),
        "{}",
        stderr(&out)
    );
    let out = run(&["dlq", "purge", "-f", &file]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("say what to purge"),
        "{}",
        stderr(&out)
    );
    let out = run(&["dlq", "purge", "--all", "-f", &file]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 0 dead letter(s)"));
}

#[test]
fn a_corrupt_store_stops_the_host_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = manifest(dir.path(), "");
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let store = dir.path().join("state/dead-letters.sqlite");
    std::fs::write(&store, vec![7u8; 4096]).unwrap();
    let out = run(&["up", "-f", &file]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("dead-letter store") && err.contains("dead-letters.sqlite"),
        "{err}"
    );
    assert!(err.contains("move it away"), "{err}");
    assert_eq!(
        std::fs::read(&store).unwrap(),
        vec![7u8; 4096],
        "the store is never discarded"
    );
}

#[test]
fn replaying_a_record_whose_component_is_gone_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = manifest(dir.path(), "");
    let store = wasmgate_store::deadletter::DeadLetterStore::open(
        &dir.path().join("state/dead-letters.sqlite"),
        wasmgate_store::deadletter::Bounds::default(),
    )
    .unwrap();
    // Recent times: records older than the store's max_age are evicted.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let err = wasmgate_store::deadletter::AttemptError {
        outcome: "trap".into(),
        message: "boom".into(),
        at_ms: now,
    };
    store
        .put_blocking(wasmgate_store::deadletter::DeadLetter {
            id: "orphan".into(),
            component: "removed".into(),
            trigger: "timer:every 1s".into(),
            condition: wasmgate_store::deadletter::Condition::RetriesExhausted,
            attempts: 3,
            event: wasmgate_store::deadletter::StoredEvent::Timer {
                schedule: "every 1s".into(),
                scheduled_at_ms: 1,
                fired_at_ms: 1,
                missed: 0,
            },
            first_error: err.clone(),
            last_error: err,
            first_attempt_ms: now - 1000,
            dead_at_ms: now,
        })
        .unwrap();
    drop(store);
    let out = run(&["dlq", "replay", "orphan", "-f", &file]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("component \"removed\", which"),
        "{}",
        stderr(&out)
    );
}

/// Runs `up` until `done` says so from its JSON log lines, then stops it.
fn run_host_until(file: &str, mut done: impl FnMut(&serde_json::Value) -> bool) {
    let mut host = spawn_guarded(
        wasmgate()
            .args(["up", "-f", file, "--log-format", "json"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let lines = BufReader::new(host.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in lines {
        assert!(Instant::now() < deadline, "the host did not get there");
        let line = line.unwrap();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if done(&v) {
            break;
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    assert_eq!(host.wait().unwrap().code(), Some(0));
}

fn queue_manifest(dir: &Path, env: &str) -> String {
    let path = dir.join("wasmgate.toml");
    std::fs::write(
        &path,
        format!("[gateway]\nstate_dir = \"state\"\n\n[component.tick]\nsource = {TICK_TIMER:?}\nenv = {{ {env} }}\n"),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn async_invocations_are_queued_durably_and_delivered_by_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let file = queue_manifest(dir.path(), "");
    // Accepted while no host runs.
    let mut ids = Vec::new();
    for n in 0..3 {
        let schedule = format!("job-{n}");
        let out = run(&[
            "invoke",
            "tick",
            "-f",
            &file,
            "--timer",
            "--schedule",
            &schedule,
            "--async",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let v = json(&out);
        assert_eq!(v["status"], "queued");
        ids.push(v["invocation_id"].as_str().unwrap().to_string());
    }
    let queue =
        wasmgate_store::queue::EventQueue::open(&dir.path().join("state/queue.sqlite")).unwrap();
    assert_eq!(queue.len().unwrap(), 3);

    // A host delivers them (each exactly once here, with its queued id) and empties the queue.
    let mut delivered = Vec::new();
    run_host_until(&file, |v| {
        if v["message"] == "invocation" && v["trigger"] == "invoke:async" {
            assert_eq!(v["outcome"], "ok", "{v}");
            delivered.push(v["id"].as_str().unwrap().to_string());
        }
        delivered.len() == 3
    });
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.len().unwrap() > 0 {
        assert!(Instant::now() < deadline, "the queue was not emptied");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Bad input.
    let out = run(&["invoke", TICK_TIMER, "--timer", "--async"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--async queues events for the components of a manifest"));
}

#[test]
fn a_failing_async_invocation_is_dead_lettered_under_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let file = queue_manifest(dir.path(), r#"TICK_REJECT = "not today""#);
    let out = run(&["invoke", "tick", "-f", &file, "--timer", "--async"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let id = json(&out)["invocation_id"].as_str().unwrap().to_string();
    run_host_until(&file, |v| v["message"] == "event dead-lettered");
    let out = run(&["dlq", "show", &id, "-f", &file]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let record = json(&out);
    assert_eq!(record["condition"], "rejected");
    assert_eq!(record["trigger"], "invoke:async");
    assert_eq!(record["last_error"]["message"], "not today");
}

#[test]
fn sigkill_at_random_points_loses_no_queued_event() {
    let dir = tempfile::tempdir().unwrap();
    let file = queue_manifest(dir.path(), r#"TICK_REJECT = "poison""#);
    let n = 200;
    let mut ids = Vec::new();
    for _ in 0..n {
        let out = run(&["invoke", "tick", "-f", &file, "--timer", "--async"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        ids.push(json(&out)["invocation_id"].as_str().unwrap().to_string());
    }
    let queue =
        wasmgate_store::queue::EventQueue::open(&dir.path().join("state/queue.sqlite")).unwrap();
    // Kill the host at seeded-random points (up to 50 times), then let the
    // last one drain the queue. The wait is on progress, not on a count of
    // runs: a busy machine makes each run slower, not lossy.
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut kills = 0;
    let spawn = || {
        spawn_guarded(
            wasmgate()
                .args(["up", "-f", &file])
                .stderr(Stdio::null())
                .stdout(Stdio::null()),
        )
    };
    let mut host = spawn();
    let mut left = queue.len().unwrap();
    let mut progress_at = Instant::now();
    while left > 0 {
        std::thread::sleep(Duration::from_millis(rng.u64(30..400)));
        let now = queue.len().unwrap();
        if now < left {
            progress_at = Instant::now();
        }
        left = now;
        assert!(
            progress_at.elapsed() < Duration::from_secs(90),
            "no progress for 90 s after {kills} SIGKILLs: {left} events still queued"
        );
        if kills < 50 && left > 0 {
            host.kill().unwrap(); // SIGKILL
            host.wait().unwrap();
            kills += 1;
            host = spawn();
        }
    }
    drop(host);
    eprintln!("queue drained after {kills} SIGKILLs");
    assert!(kills >= 2, "the host was never killed mid-stream");
    // Every event is in the dead-letter store (rejected), none lost.
    let store = wasmgate_store::deadletter::DeadLetterStore::open(
        &dir.path().join("state/dead-letters.sqlite"),
        wasmgate_store::deadletter::Bounds::default(),
    )
    .unwrap();
    let mut stored: Vec<String> = store
        .list(None, None)
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    stored.sort();
    ids.sort();
    assert_eq!(stored, ids, "after {kills} SIGKILLs");
}

/// A dead letter of a component that publishes is not replayed by the
/// command (its publishes would be lost): it moves, with its id, to the
/// event queue, and the host delivers it and sends the reply.
#[test]
fn replaying_a_publishing_components_record_hands_it_to_the_host() {
    use wasmgate_store::deadletter::{
        AttemptError, Bounds, Condition, DeadLetter, DeadLetterStore, StoredEvent,
    };
    let dir = tempfile::tempdir().unwrap();
    let port = crate::util::free_port();
    let path = dir.path().join("wasmgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
name = "dlq-publish"
state_dir = "state"

[mqtt]
broker = "embedded"
embedded = {{ listen = "127.0.0.1:{port}" }}

[component.echo]
source = {:?}
allow = {{ mqtt_publish = ["dev/+/temp/reply"] }}
"#,
            wasmgate_test_artifacts::ECHO_MQTT
        ),
    )
    .unwrap();
    let file = path.to_str().unwrap().to_string();
    let id = "0190d0c0-0000-7000-8000-00000000abcd";
    {
        let store = DeadLetterStore::open(
            &dir.path().join("state/dead-letters.sqlite"),
            Bounds::default(),
        )
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let err = AttemptError {
            outcome: "retry".into(),
            message: "the uplink was down".into(),
            at_ms: now,
        };
        store
            .put_blocking(DeadLetter {
                id: id.into(),
                component: "echo".into(),
                trigger: "mqtt:dev/+/temp".into(),
                condition: Condition::RetriesExhausted,
                attempts: 3,
                event: StoredEvent::Mqtt {
                    topic: "dev/7/temp".into(),
                    payload_hex: hex::encode("21.5"),
                    qos: 1,
                    retain: false,
                    content_type: None,
                    response_topic: None,
                    correlation_data_hex: None,
                    user_properties: Vec::new(),
                },
                first_error: err.clone(),
                last_error: err,
                first_attempt_ms: now - 10,
                dead_at_ms: now,
            })
            .unwrap();
    }
    let out = run(&["dlq", "replay", id, "-f", &file]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("{id}: queued for the host")),
        "{said}"
    );
    assert!(said.contains("1 queued"), "{said}");
    assert_eq!(
        run(&["dlq", "show", id, "-f", &file]).status.code(),
        Some(2)
    );
    let queue =
        wasmgate_store::queue::EventQueue::open(&dir.path().join("state/queue.sqlite")).unwrap();
    assert_eq!(queue.len().unwrap(), 1);

    // The host delivers it under its id, and the reply reaches the broker.
    let mut watch = None;
    let mut replied = false;
    run_host_until(&file, |v| {
        if v["message"] == "embedded MQTT broker listening" {
            watch = Some(
                std::process::Command::new("mosquitto_sub")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv5"])
                    .args(["-t", "dev/+/temp/reply", "-C", "1", "-W", "60", "-v"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        if v["message"] == "invocation" && v["id"] == id {
            assert_eq!(v["outcome"], "ok", "{v}");
            replied = true;
        }
        replied
    });
    let got = watch
        .expect("the broker started")
        .wait_with_output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "dev/7/temp/reply 21.5\n"
    );
}

/// `curl` to the admin socket: (HTTP status, body as JSON).
fn admin(socket: &Path, method: &str, path: &str) -> (u16, serde_json::Value) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-X", method, "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://gateway{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// The dead-letter routes of the admin API on a running gateway: pages,
/// show, a replay that fails again (kept, one more attempt), a deploy of a
/// fixed version and a replay that succeeds (removed), purge.
#[test]
fn the_admin_api_lists_replays_and_purges_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let file = queue_manifest(dir.path(), r#"TICK_REJECT = "not today""#);
    for _ in 0..4 {
        let out = run(&["invoke", "tick", "-f", &file, "--timer", "--async"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let up = crate::examples::Up::spawn(wasmgate().args(["up", "-f", &file]), &file);
    let socket = dir.path().join("state/admin.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin(&socket, "GET", "/v1/dead-letters").1["records"]
        .as_array()
        .map_or(0, Vec::len)
        < 4
    {
        assert!(Instant::now() < deadline, "{}", up.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Pages of 3 and 1.
    let (code, page) = admin(&socket, "GET", "/v1/dead-letters?limit=3");
    assert_eq!(code, 200);
    assert_eq!(page["records"].as_array().unwrap().len(), 3, "{page}");
    let next = page["next"].as_str().unwrap().to_string();
    let (_, rest) = admin(&socket, "GET", &format!("/v1/dead-letters?before={next}"));
    assert_eq!(rest["records"].as_array().unwrap().len(), 1, "{rest}");
    assert!(rest["next"].is_null());
    let id = page["records"][0]["id"].as_str().unwrap().to_string();
    let (code, record) = admin(&socket, "GET", &format!("/v1/dead-letters/{id}"));
    assert_eq!(code, 200);
    assert_eq!(record["last_error"]["message"], "not today");
    assert_eq!(admin(&socket, "GET", "/v1/dead-letters/nope").0, 404);

    // Still rejected: kept, with one more attempt.
    let (code, r) = admin(&socket, "POST", &format!("/v1/dead-letters/{id}/replay"));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["removed"], false, "{r}");
    assert_eq!(r["outcome"], "reject", "{r}");
    let (_, record) = admin(&socket, "GET", &format!("/v1/dead-letters/{id}"));
    assert_eq!(record["attempts"], 2, "{record}");

    // The fix deployed, the replay succeeds and removes the record.
    let out = run(&["deploy", "tick", COUNTER, "-f", &file]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (code, r) = admin(&socket, "POST", &format!("/v1/dead-letters/{id}/replay"));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["removed"], true, "{r}");
    assert_eq!(
        admin(&socket, "GET", &format!("/v1/dead-letters/{id}")).0,
        404
    );
    let (code, r) = admin(
        &socket,
        "POST",
        "/v1/dead-letters/replay?component=tick&limit=2",
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (r["replayed"].as_u64(), r["ok"].as_u64()),
        (Some(2), Some(2)),
        "{r}"
    );
    assert_eq!(r["more"], true, "{r}");

    // Purge needs to be told what.
    assert_eq!(admin(&socket, "POST", "/v1/dead-letters/purge").0, 400);
    assert_eq!(
        admin(&socket, "POST", "/v1/dead-letters/purge?older_than=soon").0,
        400
    );
    let (code, r) = admin(&socket, "POST", "/v1/dead-letters/purge?component=tick");
    assert_eq!(code, 200);
    assert_eq!(r["purged"], 1, "{r}");
    let (_, left) = admin(&socket, "GET", "/v1/dead-letters");
    assert_eq!(left["records"].as_array().unwrap().len(), 0, "{left}");
    up.stop();
}
