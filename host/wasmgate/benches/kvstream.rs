//! Change-stream lag benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench kvstream
//!
//! A writer sets keys of a streamed bucket at 1,000 writes/s (one commit
//! each, fsync'd, on an SQLite file under `target/`) for 5 s. Two consumers
//! of the same stream take turns, alternating which goes first in each
//! round:
//!
//! - **trigger**: the gateway's `[[trigger.keyvalue]]` code
//!   (`wasmgate_trigger_keyvalue`) calling a guest (`guests/kv-audit` with
//!   `AUDIT_COUNT_ONLY`: one key-value increment per batch), checkpointing
//!   each batch;
//! - **native**: a Rust loop over the same store calls (read after the
//!   checkpoint, wait for the store's change signal, queue the checkpoint),
//!   with no guest.
//!
//! Lag: from the change's commit (its timestamp, taken in the writer's
//! transaction just before the fsync) to the moment the batch that carries
//! it is handed to the handler, one sample per batch (its oldest change).
//! Prints a Markdown table for BENCHMARKS.md.
#![allow(missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use wasmgate_manifest::keyvalue::{KeyValueBounds, View};
use wasmgate_manifest::limits::Limits;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::Runtime;
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::Invocable;
use wasmgate_runtime::keyvalue::Op;
use wasmgate_store::delivery::RetryPolicy;
use wasmgate_store::keyvalue::KeyValueStore;
use wasmgate_store::keyvalue::stream::StreamRead;
use wasmgate_test_artifacts::KV_AUDIT;
use wasmgate_trigger_keyvalue::{KeyValueTrigger, StreamSpec};

const RATE: u64 = 1000;
const SECONDS: u64 = 5;
const ROUNDS: usize = 3;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Writes `RATE` × `SECONDS` changes at a steady pace; returns the writes
/// per second reached.
async fn write(store: &KeyValueStore, bucket: &str) -> f64 {
    let n = RATE * SECONDS;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..n {
        tick.tick().await;
        store
            .run(
                bucket,
                Op::Set(format!("k{}", i % 100), i.to_string().into_bytes()),
            )
            .await
            .unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The gateway's trigger, with the guest: lag samples (µs), and batches.
async fn trigger(
    store: &KeyValueStore,
    guest: &Arc<Invocable>,
    bucket: &str,
    batch_size: usize,
) -> (Vec<u64>, f64) {
    let spec = StreamSpec {
        consumer: format!("bench|{bucket}|"),
        label: "trigger.keyvalue[0]".into(),
        bucket: bucket.into(),
        key_prefix: None,
        view: View::New,
        batch_size,
        batch_window: Duration::ZERO,
        retry: RetryPolicy::default(),
    };
    let t = KeyValueTrigger::new(spec, guest.clone(), store.clone());
    let stats = t.stats();
    let stop = CancellationToken::new();
    let run = tokio::spawn(t.run(stop.clone()));
    let rate = write(store, bucket).await;
    let n = RATE * SECONDS;
    while stats.checkpoint.load(std::sync::atomic::Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    run.await.unwrap();
    (stats.take_lag_us(), rate)
}

/// The same store calls in a native loop.
async fn native(store: &KeyValueStore, bucket: &str, batch_size: usize) -> (Vec<u64>, f64) {
    let consumer = format!("native|{bucket}|");
    let stop = CancellationToken::new();
    let reader = {
        let (store, bucket, stop) = (store.clone(), bucket.to_string(), stop.clone());
        tokio::spawn(async move {
            let mut lag = Vec::new();
            let mut changed = store.changed();
            let mut after = store.stream_position(&consumer, &bucket).await.unwrap();
            let n = RATE * SECONDS;
            while after < n {
                changed.mark_unchanged();
                let batch = store
                    .read_stream(StreamRead {
                        bucket: bucket.clone(),
                        after,
                        prefix: None,
                        view: View::New,
                        max_changes: batch_size,
                        max_bytes: wasmgate_store::keyvalue::stream::BATCH_BYTES,
                        at_least_one: true,
                    })
                    .await
                    .unwrap();
                if batch.changes.is_empty() {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = changed.changed() => {}
                        () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    continue;
                }
                lag.push(now_us().saturating_sub(batch.first_committed_us.unwrap()));
                // As the trigger does: queued, not waited for.
                drop(
                    store
                        .queue_checkpoint(&consumer, &bucket, batch.through)
                        .await
                        .unwrap(),
                );
                after = batch.through;
            }
            lag
        })
    };
    let rate = write(store, bucket).await;
    let lag = reader.await.unwrap();
    stop.cancel();
    (lag, rate)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let buckets: Vec<String> = (0..2 * ROUNDS * 2).map(|i| format!("s{i}")).collect();
    let (store, guest) = rt.block_on(async {
        let store = KeyValueStore::open(
            &KeyValueStore::path_in(dir.path()),
            KeyValueBounds::default(),
        )
        .unwrap();
        store.set_streams(buckets.clone()).await.unwrap();
        let cache = Cache::new(Some(
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("precompiled"),
        ));
        let runtime = Runtime::new(EngineOptions::default(), cache).expect("runtime");
        let compiled = runtime
            .compile(Path::new(KV_AUDIT))
            .expect("guest compiles");
        let guest = Invocable::new(
            "audit".into(),
            compiled.pre,
            Limits::default(),
            Vec::new(),
            Vec::new(),
            runtime.engine(),
        )
        .with_keyvalue(vec!["audit".into()])
        .with_env(vec![("AUDIT_COUNT_ONLY".into(), "1".into())]);
        guest.set_keyvalue(Arc::new(store.clone()));
        (store, Arc::new(guest))
    });
    println!(
        "## Change-stream lag at {RATE} writes/s for {SECONDS} s: the trigger with a guest vs a native consumer ({ROUNDS} rounds, alternating)\n"
    );
    println!(
        "| batch_size | round | first | writes/s | trigger batches | trigger lag p50 / p99 ms | native batches | native lag p50 / p99 ms | ratio p50 trigger/native | ratio p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut b = buckets.iter();
    for batch_size in [1, 100] {
        for round in 0..ROUNDS {
            let trigger_first = round % 2 == 0;
            let (mut t, mut n, rate) = rt.block_on(async {
                let (t_bucket, n_bucket) = (b.next().unwrap(), b.next().unwrap());
                if trigger_first {
                    let (t, r) = trigger(&store, &guest, t_bucket, batch_size).await;
                    let (n, _) = native(&store, n_bucket, batch_size).await;
                    (t, n, r)
                } else {
                    let (n, r) = native(&store, n_bucket, batch_size).await;
                    let (t, _) = trigger(&store, &guest, t_bucket, batch_size).await;
                    (t, n, r)
                }
            });
            t.sort_unstable();
            n.sort_unstable();
            let (t50, t99) = (percentile(&t, 0.5), percentile(&t, 0.99));
            let (n50, n99) = (percentile(&n, 0.5), percentile(&n, 0.99));
            println!(
                "| {batch_size} | {} | {} | {rate:.0} | {} | {t50:.2} / {t99:.2} | {} | {n50:.2} / {n99:.2} | {:.2} | {:.2} |",
                round + 1,
                if trigger_first { "trigger" } else { "native" },
                t.len(),
                n.len(),
                t50 / n50,
                t99 / n99,
            );
        }
    }
}
