//! Timer benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench timers
//!     WASMGATE_BENCH_SECONDS=10 cargo bench -p wasmgate --bench timers   # shorter
//!
//! 1. Fire jitter (actual − scheduled) of 100 timers ticking every 100 ms,
//!    each running the trivial `tick-timer` guest, for a minute; side by side
//!    in the same run with the baseline: 100 plain tokio `sleep_until` loops
//!    on the same schedule (no guest).
//! 2. The process's CPU time while idle: the host with no timers, then with
//!    100 timers at 1/min.
//!
//! Prints Markdown tables for BENCHMARKS.md.

use chrono::Utc;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::Overlap;
use wasmgate_manifest::limits::Limits;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::Runtime;
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::Invocable;
use wasmgate_store::delivery::RetryPolicy;
use wasmgate_store::timer_state::TimerState;
use wasmgate_test_artifacts::TICK_TIMER;
use wasmgate_trigger_timer::clock::Clock;
use wasmgate_trigger_timer::schedule::{CatchUpPolicy, Schedule};
use wasmgate_trigger_timer::{SchedulerThread, TimerSpec, TimerTrigger, jitter_offset};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut us: Vec<u64>) {
    us.sort_unstable();
    println!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} |",
        us.len(),
        percentile(&us, 0.5) as f64 / 1000.0,
        percentile(&us, 0.99) as f64 / 1000.0,
        *us.last().unwrap() as f64 / 1000.0
    );
}

/// utime + stime of this process, in seconds (from /proc/self/stat).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of the file; after the command name they are 12 and 13 (1-based: 14-2).
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn spec(i: usize, every: Duration) -> TimerSpec {
    TimerSpec {
        key: format!("bench-{i}"),
        label: format!("trigger.timer[{i}]"),
        schedule: Schedule::every(every, None).unwrap(),
        schedule_text: format!("every {}ms", every.as_millis()),
        overlap: Overlap::Forbid,
        catch_up: CatchUpPolicy::Skip,
        starting_deadline: None,
        offset: Duration::ZERO,
        retry: RetryPolicy::default(),
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the benchmark's cases and its report, in order"
)]
fn main() {
    let seconds: u64 = std::env::var("WASMGATE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = Cache::new(Some(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("precompiled"),
    ));
    let runtime = Runtime::new(EngineOptions::default(), cache).unwrap();
    let compiled = runtime.compile(Path::new(TICK_TIMER)).unwrap();
    let guest = Arc::new(Invocable::new(
        "tick".into(),
        compiled.pre,
        Limits::default(),
        Vec::new(),
        Vec::new(),
        runtime.engine(),
    ));
    let every = Duration::from_millis(100);

    println!("## Fire jitter: 100 timers every 100 ms for {seconds} s (actual − scheduled)\n");
    println!("| timers | ticks | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");

    // Baseline: plain tokio timers on the same schedule, no guest.
    let baseline: Vec<u64> = rt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..100 {
            handles.push(tokio::spawn(async move {
                let schedule = Schedule::every(every, None).unwrap();
                let mut samples = Vec::new();
                let end = Utc::now() + chrono::Duration::seconds(seconds as i64);
                let mut cursor = Utc::now();
                while cursor < end {
                    let due = schedule.next_after(cursor).unwrap();
                    let wait = (due - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep_until(tokio::time::Instant::now() + wait).await;
                    samples.push((Utc::now() - due).num_microseconds().unwrap().max(0) as u64);
                    cursor = due;
                }
                samples
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        all
    });
    summary("baseline: tokio `sleep_until`, no guest", baseline);

    for (spread, what) in [
        (false, "all 100 due at the same instants"),
        (true, "spread over the period (`jitter = \"100ms\"`)"),
    ] {
        let (dispatch, start) = rt.block_on(async {
            let clock = Clock::system().unwrap();
            let state = Arc::new(TimerState::in_memory());
            let tasks = TaskTracker::new();
            let shutdown = CancellationToken::new();
            let scheduler = SchedulerThread::start().unwrap();
            let mut stats = Vec::new();
            for i in 0..100 {
                let mut spec = spec(i, every);
                if spread {
                    spec.offset = jitter_offset("bench", &spec.key, every);
                }
                let t = TimerTrigger::new(spec, guest.clone(), state.clone(), clock.clone())
                    .with_delivery_runtime(tokio::runtime::Handle::current());
                stats.push(t.stats());
                tasks.spawn_on(t.run(tasks.clone(), shutdown.clone()), scheduler.handle());
            }
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            shutdown.cancel();
            tasks.close();
            tasks.wait().await;
            let ok: u64 = stats
                .iter()
                .map(|s| s.succeeded.load(Ordering::Relaxed))
                .sum();
            let skipped: u64 = stats
                .iter()
                .map(|s| s.skipped_overlap.load(Ordering::Relaxed))
                .sum();
            eprintln!("timer trigger ({what}): {ok} ticks ok, {skipped} skipped by overlap");
            let dispatch: Vec<u64> = stats.iter().flat_map(|s| s.take_lateness_us()).collect();
            let start: Vec<u64> = stats
                .iter()
                .flat_map(|s| s.take_start_lateness_us())
                .collect();
            (dispatch, start)
        });
        summary(&format!("wasmgate, {what}: tick dispatched"), dispatch);
        summary(
            &format!("wasmgate, {what}: delivery started (guest runs next)"),
            start,
        );
    }

    let idle = seconds.min(30);
    println!("\n## Idle CPU over {idle} s\n");
    println!("| host state | CPU ms per second | % of one core |");
    println!("|---|---|---|");
    let before = cpu_seconds();
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(idle)).await });
    let base = (cpu_seconds() - before) / idle as f64;
    println!(
        "| engine + epoch ticker, no timers | {:.2} | {:.3} % |",
        base * 1000.0,
        base * 100.0
    );
    let busy = rt.block_on(async {
        let clock = Clock::system().unwrap();
        let state = Arc::new(TimerState::in_memory());
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        for i in 0..100 {
            let t = TimerTrigger::new(
                spec(i, Duration::from_secs(60)),
                guest.clone(),
                state.clone(),
                clock.clone(),
            );
            tasks.spawn(t.run(tasks.clone(), shutdown.clone()));
        }
        let before = cpu_seconds();
        tokio::time::sleep(Duration::from_secs(idle)).await;
        let used = cpu_seconds() - before;
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        used / idle as f64
    });
    println!(
        "| 100 timers at 1/min (armed, waiting) | {:.2} | {:.3} % |",
        busy * 1000.0,
        busy * 100.0
    );
}
