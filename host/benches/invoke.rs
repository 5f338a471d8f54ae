//! Invocation-path benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench invoke
//!
//! Measures, in one run on this machine:
//! 1. fresh Store + instantiate + call of a trivial handler through the host's
//!    own invocation path (`Invocable::invoke_quiet`), pooling vs on-demand
//!    allocator, with and without fuel: median and p99;
//! 2. the fuel overhead on a compute-bound guest (fuel on vs off, alternating);
//! 3. cold start of `wasmgate up` with a warm precompile cache, to "ready".
//!
//! Prints Markdown tables for BENCHMARKS.md.
#![allow(missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wasmgate::component::Cache;
use wasmgate::engine::{AllocatorChoice, EngineOptions};
use wasmgate::gateway::Runtime;
use wasmgate::invoke::{Admission, Event, Invocable, InvocationContext, MqttMessage};
use wasmgate::limits::Limits;
use wasmgate_test_artifacts::HOSTILE;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn mqtt(topic: &str, payload: &str) -> Event {
    Event::Mqtt(MqttMessage {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        qos: 1,
        ..MqttMessage::default()
    })
}

fn invocable(runtime: &Runtime, limits: Limits) -> Invocable {
    let compiled = runtime.compile(Path::new(HOSTILE)).expect("guest compiles");
    Invocable::new(
        "hostile".into(),
        compiled.pre,
        limits,
        Vec::new(),
        Vec::new(),
        runtime.engine().fuel(),
    )
}

fn runtime(allocator: AllocatorChoice, fuel: bool) -> Runtime {
    let cache = Cache::new(Some(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("precompiled"),
    ));
    Runtime::new(
        EngineOptions {
            allocator,
            fuel,
            ..EngineOptions::default()
        },
        cache,
    )
    .expect("runtime")
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let iterations = 20_000;

    println!(
        "## Fresh instance per invocation: trivial handler, {iterations} sequential invocations\n"
    );
    println!("| allocator | fuel | median µs | p99 µs | invocations/s (1 thread) |");
    println!("|---|---|---|---|---|");
    for (allocator, name) in [
        (AllocatorChoice::Pooling, "pooling"),
        (AllocatorChoice::OnDemand, "on-demand"),
    ] {
        for fuel in [true, false] {
            let runtime = runtime(allocator, fuel);
            let inv = invocable(&runtime, Limits::default());
            let mut samples = Vec::with_capacity(iterations);
            let started = Instant::now();
            rt.block_on(async {
                for i in 0..(iterations + 1000) {
                    let t = Instant::now();
                    let outcome = inv
                        .invoke_quiet(
                            mqtt("ok", ""),
                            InvocationContext::new("bench"),
                            Admission::Wait,
                        )
                        .await;
                    let dt = t.elapsed();
                    assert!(outcome.is_ok(), "{outcome:?}");
                    if i >= 1000 {
                        samples.push(dt.as_secs_f64() * 1e6);
                    }
                }
            });
            let total = started.elapsed();
            samples.sort_by(f64::total_cmp);
            println!(
                "| {name} | {} | {:.1} | {:.1} | {:.0} |",
                if fuel { "on" } else { "off" },
                percentile(&samples, 0.5),
                percentile(&samples, 0.99),
                (iterations + 1000) as f64 / total.as_secs_f64()
            );
        }
    }

    let rounds = "30000000";
    let runs = 11;
    println!(
        "\n## Fuel overhead: compute-bound guest (`spin` {rounds} rounds), {runs} runs each, alternating\n"
    );
    let with_fuel = runtime(AllocatorChoice::Pooling, true);
    let without_fuel = runtime(AllocatorChoice::Pooling, false);
    let limits = Limits {
        timeout: Duration::from_secs(60),
        fuel: Limits::MAX_FUEL,
        ..Limits::default()
    };
    let a = invocable(&with_fuel, limits);
    let b = invocable(&without_fuel, limits);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let mut fuel_used = 0;
    rt.block_on(async {
        for _ in 0..runs {
            let o = a
                .invoke_quiet(
                    mqtt("spin", rounds),
                    InvocationContext::new("bench"),
                    Admission::Wait,
                )
                .await;
            assert!(o.is_ok());
            fuel_used = o.fuel_consumed;
            on.push(o.duration_us as f64 / 1000.0);
            let o = b
                .invoke_quiet(
                    mqtt("spin", rounds),
                    InvocationContext::new("bench"),
                    Admission::Wait,
                )
                .await;
            assert!(o.is_ok());
            off.push(o.duration_us as f64 / 1000.0);
        }
    });
    on.sort_by(f64::total_cmp);
    off.sort_by(f64::total_cmp);
    let (m_on, m_off) = (percentile(&on, 0.5), percentile(&off, 0.5));
    println!("| fuel | median ms | min ms | max ms |");
    println!("|---|---|---|---|");
    println!(
        "| on ({fuel_used} fuel) | {m_on:.1} | {:.1} | {:.1} |",
        on[0],
        on[on.len() - 1]
    );
    println!(
        "| off | {m_off:.1} | {:.1} | {:.1} |",
        off[0],
        off[off.len() - 1]
    );
    println!(
        "\nfuel overhead: {:+.1} % (median on / median off = {:.3})",
        (m_on / m_off - 1.0) * 100.0,
        m_on / m_off
    );

    println!(
        "\n## Cold start of `wasmgate up` (quick-start manifest, 3 components, warm precompile cache)\n"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut to_ready = Vec::new();
    let mut self_reported = Vec::new();
    for i in 0..11 {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
            .current_dir(&root)
            .args([
                "up",
                "-f",
                "examples/quickstart/wasmgate.toml",
                "--log-format",
                "json",
            ])
            .env("WASMGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wasmgate up");
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        for line in lines.map_while(Result::ok) {
            if line.contains("\"message\":\"ready\"") {
                let elapsed = started.elapsed().as_secs_f64() * 1000.0;
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let reported: f64 = v["startup_ms"].as_str().unwrap().parse().unwrap();
                // The first run fills the cache; it is not a warm start.
                if i > 0 {
                    to_ready.push(elapsed);
                    self_reported.push(reported);
                }
                break;
            }
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    to_ready.sort_by(f64::total_cmp);
    self_reported.sort_by(f64::total_cmp);
    println!("| measure | median ms | max ms |");
    println!("|---|---|---|");
    println!(
        "| spawn → \"ready\" log line (process start, engine, 3 components from cache) | {:.1} | {:.1} |",
        percentile(&to_ready, 0.5),
        to_ready[to_ready.len() - 1]
    );
    println!(
        "| main() → ready, as the process reports it | {:.1} | {:.1} |",
        percentile(&self_reported, 0.5),
        self_reported[self_reported.len() - 1]
    );
}
