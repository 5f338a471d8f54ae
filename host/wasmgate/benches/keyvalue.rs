//! Key-value benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench keyvalue
//!
//! The same operations on the same store (`wasmgate_store::keyvalue`, an
//! SQLite file under `target/`, on disk: every write is an fsync'd commit)
//! from a guest (`guests/kv-http`, plain wit-bindgen) and from native Rust
//! calling the store directly, alternating in rounds:
//!
//! 1. **batch**: one invocation doing 1,000 sets (then gets, then
//!    increments), one call at a time, against a native loop of the same
//!    1,000 calls;
//! 2. **single**: 1,000 invocations doing one operation each, one after
//!    another, against 1,000 native calls;
//! 3. **concurrent**: 1,000 one-increment invocations, 16 at a time,
//!    against 16 native tasks doing the same (group commit shares fsyncs).
//!
//! Prints Markdown tables for BENCHMARKS.md: operations per second, each
//! round's ratio guest/native, and the median and p99 of one operation.
#![allow(missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmgate_manifest::keyvalue::KeyValueBounds;
use wasmgate_manifest::limits::Limits;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::Runtime;
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::{Admission, Event, HttpRequest, Invocable, InvocationContext};
use wasmgate_runtime::keyvalue::{Delta, Op};
use wasmgate_store::keyvalue::KeyValueStore;
use wasmgate_test_artifacts::KV_HTTP;

const OPS: usize = 1000;
const ROUNDS: usize = 5;
const CONCURRENCY: usize = 16;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn get(path: &str) -> Event {
    Event::Http(HttpRequest {
        method: "GET".into(),
        path: path.into(),
        authority: "bench".into(),
        ..HttpRequest::default()
    })
}

async fn call(guest: &Invocable, path: &str) {
    let outcome = guest
        .invoke_quiet(get(path), InvocationContext::new("bench"), Admission::Wait)
        .await;
    let status = outcome.http_response.as_ref().map(|r| r.status);
    assert!(
        outcome.is_ok() && status == Some(200),
        "{path}: {outcome:?}"
    );
}

/// Which operation a workload runs.
#[derive(Clone, Copy)]
enum Kind {
    Set,
    Get,
    Increment,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Set => "set",
            Kind::Get => "get",
            Kind::Increment => "increment",
        }
    }

    fn native(self, i: usize) -> Op {
        match self {
            Kind::Set => Op::Set(format!("k{i}"), b"x".to_vec()),
            Kind::Get => Op::Get(format!("k{i}")),
            Kind::Increment => Op::Increment("n".into(), Delta::Unsigned(1)),
        }
    }

    /// One invocation doing `n` of them.
    fn batch_path(self, n: usize) -> String {
        match self {
            Kind::Set => format!("/fill/bench/k?n={n}"),
            Kind::Get => format!("/gets/bench/k?n={n}"),
            Kind::Increment => format!("/incrs/bench/n?n={n}"),
        }
    }

    /// One invocation doing the `i`th alone.
    fn single_path(self, i: usize) -> String {
        match self {
            Kind::Set => format!("/set/bench/k{i}?v=x"),
            Kind::Get => format!("/get/bench/k{i}"),
            Kind::Increment => "/incr/bench/n".into(),
        }
    }
}

struct Bench {
    guest: Arc<Invocable>,
    store: KeyValueStore,
}

impl Bench {
    async fn native(&self, kind: Kind) -> Vec<f64> {
        let mut each = Vec::with_capacity(OPS);
        for i in 0..OPS {
            let t = Instant::now();
            self.store.run("bench", kind.native(i)).await.unwrap();
            each.push(t.elapsed().as_secs_f64() * 1e6);
        }
        each
    }

    async fn batch(&self, kind: Kind) -> f64 {
        let t = Instant::now();
        call(&self.guest, &kind.batch_path(OPS)).await;
        t.elapsed().as_secs_f64()
    }

    async fn single(&self, kind: Kind) -> Vec<f64> {
        let mut each = Vec::with_capacity(OPS);
        for i in 0..OPS {
            let t = Instant::now();
            call(&self.guest, &kind.single_path(i)).await;
            each.push(t.elapsed().as_secs_f64() * 1e6);
        }
        each
    }

    async fn concurrent_guest(&self) -> f64 {
        let t = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let guest = self.guest.clone();
                tokio::spawn(async move {
                    for _ in 0..OPS / CONCURRENCY {
                        call(&guest, "/incr/bench/c").await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        t.elapsed().as_secs_f64()
    }

    async fn concurrent_native(&self) -> f64 {
        let t = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let store = self.store.clone();
                tokio::spawn(async move {
                    for _ in 0..OPS / CONCURRENCY {
                        store
                            .run("bench", Op::Increment("c".into(), Delta::Unsigned(1)))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        t.elapsed().as_secs_f64()
    }
}

fn ops_per_s(seconds: f64, ops: usize) -> f64 {
    ops as f64 / seconds
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bench = rt.block_on(async {
        let store = KeyValueStore::open(
            &KeyValueStore::path_in(dir.path()),
            KeyValueBounds::default(),
        )
        .unwrap();
        let cache = Cache::new(Some(
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("precompiled"),
        ));
        let runtime = Runtime::new(EngineOptions::default(), cache).expect("runtime");
        let compiled = runtime.compile(Path::new(KV_HTTP)).expect("guest compiles");
        let limits = Limits {
            timeout: Duration::from_secs(120),
            concurrency: CONCURRENCY as u32,
            ..Limits::default()
        };
        let guest = Invocable::new(
            "kv".into(),
            compiled.pre,
            limits,
            Vec::new(),
            Vec::new(),
            runtime.engine(),
        )
        .with_keyvalue(vec!["bench".into()]);
        guest.set_keyvalue(Arc::new(store.clone()));
        Bench {
            guest: Arc::new(guest),
            store,
        }
    });
    println!(
        "## Key-value from a guest vs native Rust on the same store ({OPS} operations, {ROUNDS} rounds, alternating)\n"
    );
    rt.block_on(batch_and_single(&bench));
    rt.block_on(concurrent(&bench));
}

async fn batch_and_single(bench: &Bench) {
    println!(
        "| workload | op | guest ops/s (median) | native ops/s (median) | ratio guest/native, each round | median ratio | guest p50 / p99 µs per op | native p50 / p99 µs per op |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (workload, batched) in [
        ("1 invocation × 1,000 ops", true),
        ("1,000 invocations × 1 op", false),
    ] {
        for kind in [Kind::Set, Kind::Get, Kind::Increment] {
            let (mut guest, mut native, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let (mut guest_each, mut native_each) = (Vec::new(), Vec::new());
            for round in 0..ROUNDS {
                // Alternate which goes first.
                let (g, n) = if round % 2 == 0 {
                    let g = run_guest(bench, kind, batched).await;
                    (g, bench.native(kind).await)
                } else {
                    let n = bench.native(kind).await;
                    (run_guest(bench, kind, batched).await, n)
                };
                let native_s: f64 = n.iter().sum::<f64>() / 1e6;
                let (g_ops, n_ops) = (ops_per_s(g.0, OPS), ops_per_s(native_s, OPS));
                guest.push(g_ops);
                native.push(n_ops);
                ratios.push(g_ops / n_ops);
                guest_each.extend(g.1);
                native_each.extend(n);
            }
            guest_each.sort_by(f64::total_cmp);
            native_each.sort_by(f64::total_cmp);
            let each = |v: &[f64]| {
                if v.is_empty() {
                    "–".to_string()
                } else {
                    format!("{:.0} / {:.0}", percentile(v, 0.5), percentile(v, 0.99))
                }
            };
            let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "| {workload} | {} | {:.0} | {:.0} | {} | {:.2} | {} | {} |",
                kind.name(),
                median(&guest),
                median(&native),
                list.join(", "),
                median(&ratios),
                each(&guest_each),
                each(&native_each),
            );
        }
    }
}

/// Seconds for `OPS` operations from the guest, and each invocation's µs
/// (for the one-op-per-invocation workload).
async fn run_guest(bench: &Bench, kind: Kind, batched: bool) -> (f64, Vec<f64>) {
    if batched {
        (bench.batch(kind).await, Vec::new())
    } else {
        let each = bench.single(kind).await;
        (each.iter().sum::<f64>() / 1e6, each)
    }
}

async fn concurrent(bench: &Bench) {
    println!(
        "\n## {OPS} increments, {CONCURRENCY} at a time (group commit): guest invocations vs native tasks\n"
    );
    println!(
        "| guest ops/s (median) | native ops/s (median) | ratio guest/native, each round | median ratio |"
    );
    println!("|---|---|---|---|");
    let (mut guest, mut native, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (g, n) = if round % 2 == 0 {
            let g = bench.concurrent_guest().await;
            (g, bench.concurrent_native().await)
        } else {
            let n = bench.concurrent_native().await;
            (bench.concurrent_guest().await, n)
        };
        let total = OPS / CONCURRENCY * CONCURRENCY;
        guest.push(ops_per_s(g, total));
        native.push(ops_per_s(n, total));
        ratios.push(n / g);
    }
    let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "| {:.0} | {:.0} | {} | {:.2} |",
        median(&guest),
        median(&native),
        list.join(", "),
        median(&ratios)
    );
}
