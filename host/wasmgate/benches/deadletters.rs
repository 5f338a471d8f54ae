//! Dead-letter store benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench deadletters
//!
//! Durable (fsync'd) writes of dead letters to `DeadLetterStore`, in a
//! temporary directory under the target dir (the same disk as `state_dir`
//! would be): one writer awaiting each commit, then 64 concurrent writers
//! whose records the store commits in groups. Baseline in the same run: a
//! plain SQLite insert + commit per record (same pragmas) with no store.
//!
//! Prints a Markdown table for BENCHMARKS.md.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use wasmgate_store::deadletter::{
    AttemptError, Bounds, Condition, DeadLetter, DeadLetterStore, StoredEvent,
};

fn letter(i: usize) -> DeadLetter {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let err = AttemptError {
        outcome: "retry".into(),
        message: "sensor offline".into(),
        at_ms: now,
    };
    DeadLetter {
        id: format!("{}-{i}", uuid::Uuid::now_v7()),
        component: "thermostat".into(),
        trigger: "mqtt:greenhouse/+/temperature".into(),
        condition: Condition::RetriesExhausted,
        attempts: 3,
        event: StoredEvent::Mqtt {
            topic: format!("greenhouse/{i}/temperature"),
            payload_hex: hex::encode(b"{\"celsius\": 21.5}"),
            qos: 1,
            retain: false,
            content_type: Some("application/json".into()),
            response_topic: None,
            correlation_data_hex: None,
            user_properties: vec![],
        },
        first_error: err.clone(),
        last_error: err,
        first_attempt_ms: now - 3000,
        dead_at_ms: now,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn row(name: &str, n: usize, elapsed: Duration, mut latencies_ms: Vec<f64>, commits: u64) {
    latencies_ms.sort_by(f64::total_cmp);
    println!(
        "| {name} | {n} | {:.0} | {:.2} | {:.2} | {commits} |",
        n as f64 / elapsed.as_secs_f64(),
        percentile(&latencies_ms, 0.5),
        percentile(&latencies_ms, 0.99),
    );
}

#[expect(
    clippy::too_many_lines,
    reason = "the benchmark's cases and its report, in order"
)]
fn main() {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-deadletters");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let sequential = 500;
    let writers = 64;
    let per_writer = 200;

    println!("## Durable dead-letter writes\n");
    println!("| writer | records | records/s | commit latency p50 ms | p99 ms | transactions |");
    println!("|---|---|---|---|---|---|");

    // Baseline: plain SQLite, one transaction per record, same pragmas.
    {
        let conn = rusqlite::Connection::open(base.join("baseline.sqlite")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT NOT NULL);",
        )
        .unwrap();
        let mut lat = Vec::new();
        let started = Instant::now();
        for i in 0..sequential {
            let body = serde_json::to_string(&letter(i)).unwrap();
            let t = Instant::now();
            conn.execute(
                "INSERT INTO t (id, body) VALUES (?1, ?2)",
                rusqlite::params![i.to_string(), body],
            )
            .unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        row(
            "baseline: plain SQLite insert + commit, 1 writer",
            sequential,
            started.elapsed(),
            lat,
            sequential as u64,
        );
    }

    let store =
        Arc::new(DeadLetterStore::open(&base.join("store.sqlite"), Bounds::default()).unwrap());
    {
        let mut lat = Vec::new();
        let started = Instant::now();
        rt.block_on(async {
            for i in 0..sequential {
                let t = Instant::now();
                store.put(letter(i)).await.unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
        let commits = store.stats().commits.load(Ordering::Relaxed);
        row(
            "DeadLetterStore, 1 writer awaiting each commit",
            sequential,
            started.elapsed(),
            lat,
            commits,
        );
    }
    {
        let before = store.stats().commits.load(Ordering::Relaxed);
        let started = Instant::now();
        let lat: Vec<f64> = rt.block_on(async {
            let mut tasks = Vec::new();
            for w in 0..writers {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    for i in 0..per_writer {
                        let t = Instant::now();
                        store.put(letter(w * per_writer + i)).await.unwrap();
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    lat
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        let commits = store.stats().commits.load(Ordering::Relaxed) - before;
        row(
            &format!("DeadLetterStore, {writers} concurrent writers (group commit)"),
            writers * per_writer,
            started.elapsed(),
            lat,
            commits,
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}
