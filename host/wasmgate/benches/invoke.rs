//! Invocation-path benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench invoke
//!
//! Measures, in one run on this machine:
//! 1. fresh Store + instantiate + call of a trivial handler through the host's
//!    own invocation path (`Invocable::invoke_quiet`), pooling vs on-demand
//!    allocator, with and without fuel: median and p99;
//! 2. the fuel overhead on a compute-bound guest (fuel on vs off, alternating);
//! 3. cold start of `wasmgate up` with a warm precompile cache, to "ready";
//! 4. the cost of the Prometheus invocation metrics: the same invocations
//!    through `Invocable::invoke` with metrics recorded and not, alternating
//!    in rounds, and the cost of one `InvocationMetrics::record` alone.
//!
//! `cargo bench -p wasmgate --bench invoke -- metrics` runs only 4.
//! Prints Markdown tables for BENCHMARKS.md.
#![allow(missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wasmgate_manifest::limits::Limits;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::Runtime;
use wasmgate_runtime::engine::{AllocatorChoice, EngineOptions};
use wasmgate_runtime::invoke::{Admission, Event, Invocable, InvocationContext, MqttMessage};
use wasmgate_runtime::metrics::InvocationMetrics;
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
        runtime.engine(),
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

/// The baseline: the smallest wasmtime embedding that runs the same handler
/// — a store with an empty WASI context, no limiter, no output capture, no
/// concurrency slot, no invocation id — on the same engine.
mod bare {
    #![allow(missing_docs, unreachable_pub, dead_code)]
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "wasmgate:edge/mqtt-app",
        imports: { default: async },
        exports: { default: async },
    });

    use self::wasmgate::edge::{mqtt_publisher, mqtt_types, types};
    use wasmtime::component::{HasSelf, InstancePre, Linker, ResourceTable};
    use wasmtime::{Engine, Store};
    use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

    pub struct State {
        wasi: WasiCtx,
        table: ResourceTable,
    }

    impl WasiView for State {
        fn ctx(&mut self) -> WasiCtxView<'_> {
            WasiCtxView {
                ctx: &mut self.wasi,
                table: &mut self.table,
            }
        }
    }

    impl types::Host for State {}
    impl mqtt_types::Host for State {}
    impl mqtt_publisher::Host for State {
        async fn publish(
            &mut self,
            _msg: mqtt_types::Message,
        ) -> Result<(), mqtt_publisher::PublishError> {
            Ok(())
        }
    }

    pub struct Bare {
        pre: InstancePre<State>,
        indices: exports::wasmgate::edge::mqtt_handler::GuestIndices,
    }

    impl Bare {
        pub fn new(engine: &Engine, path: &str) -> Self {
            let mut linker = Linker::new(engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
            // The interfaces the handler uses (not the world's key-value).
            types::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).unwrap();
            mqtt_types::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).unwrap();
            mqtt_publisher::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).unwrap();
            let component = wasmtime::component::Component::from_file(engine, path).unwrap();
            let pre = linker.instantiate_pre(&component).unwrap();
            let indices = exports::wasmgate::edge::mqtt_handler::GuestIndices::new(&pre).unwrap();
            Self { pre, indices }
        }

        pub async fn call(&self, fuel: bool) {
            let state = State {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
            };
            let mut store = Store::new(self.pre.engine(), state);
            if fuel {
                store.set_fuel(u64::MAX / 2).unwrap();
            }
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = self.pre.instantiate_async(&mut store).await.unwrap();
            let guest = self.indices.load(&mut store, &instance).unwrap();
            let ctx = types::Invocation {
                id: "bench".into(),
                component: "hostile".into(),
                trigger: "bench".into(),
                attempt: 1,
                deadline_ms: 0,
            };
            let msg = mqtt_types::Message {
                topic: "ok".into(),
                payload: Vec::new(),
                qos: mqtt_types::Qos::AtLeastOnce,
                retain: false,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            };
            guest
                .call_handle_message(&mut store, &ctx, &msg)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the benchmark's cases, alternated per round, and its report, in order"
)]
fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // WASMGATE_BENCH_PROFILE=1: only the pooling + fuel invocation loop, long
    // enough to profile (e.g. under `perf record`).
    let profile = std::env::var_os("WASMGATE_BENCH_PROFILE").is_some();
    let iterations = if profile { 300_000 } else { 20_000 };
    if std::env::args().any(|a| a == "metrics") {
        metrics_overhead(&rt);
        return;
    }

    println!(
        "## Fresh instance per invocation: trivial handler, {iterations} sequential invocations\n"
    );
    println!("| path | allocator | fuel | median µs | p99 µs | invocations/s (1 thread) |");
    println!("|---|---|---|---|---|---|");
    for (allocator, name) in [
        (AllocatorChoice::Pooling, "pooling"),
        (AllocatorChoice::OnDemand, "on-demand"),
    ] {
        for (fuel, path) in [
            (true, "wasmgate"),
            (false, "wasmgate"),
            (true, "bare wasmtime"),
        ] {
            let runtime = runtime(allocator, fuel);
            let inv = invocable(&runtime, Limits::default());
            let baseline = bare::Bare::new(runtime.engine().engine(), HOSTILE);
            let mut samples = Vec::with_capacity(iterations);
            let started = Instant::now();
            rt.block_on(async {
                for i in 0..(iterations + 1000) {
                    let t = Instant::now();
                    if path == "wasmgate" {
                        let outcome = inv
                            .invoke_quiet(
                                mqtt("ok", ""),
                                InvocationContext::new("bench"),
                                Admission::Wait,
                            )
                            .await;
                        assert!(outcome.is_ok(), "{outcome:?}");
                    } else {
                        baseline.call(fuel).await;
                    }
                    let dt = t.elapsed();
                    if i >= 1000 {
                        samples.push(dt.as_secs_f64() * 1e6);
                    }
                }
            });
            if profile {
                return;
            }
            let total = started.elapsed();
            samples.sort_by(f64::total_cmp);
            println!(
                "| {path} | {name} | {} | {:.1} | {:.1} | {:.0} |",
                if fuel { "on" } else { "off" },
                percentile(&samples, 0.5),
                percentile(&samples, 0.99),
                (iterations + 1000) as f64 / total.as_secs_f64()
            );
        }
    }

    let runs = 11;
    let with_fuel = runtime(AllocatorChoice::Pooling, true);
    let without_fuel = runtime(AllocatorChoice::Pooling, false);
    let limits = Limits {
        timeout: Duration::from_secs(60),
        fuel: Limits::MAX_FUEL,
        ..Limits::default()
    };
    let a = invocable(&with_fuel, limits);
    let b = invocable(&without_fuel, limits);
    println!(
        "\n## Fuel overhead on compute-bound guests, {runs} runs each, alternating fuel on/off\n"
    );
    println!("| workload | fuel burned | median ms, fuel on | median ms, fuel off | overhead |");
    println!("|---|---|---|---|---|");
    for (behaviour, arg, what) in [
        (
            "spin",
            "30000000",
            "`spin` 30M rounds (tight multiply loop)",
        ),
        ("sort", "1000000", "`sort` 1M numbers (branchy, memory)"),
    ] {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        let mut fuel_used = 0;
        rt.block_on(async {
            for _ in 0..runs {
                let o = a
                    .invoke_quiet(
                        mqtt(behaviour, arg),
                        InvocationContext::new("bench"),
                        Admission::Wait,
                    )
                    .await;
                assert!(o.is_ok(), "{o:?}");
                fuel_used = o.fuel_consumed;
                on.push(o.duration_us as f64 / 1000.0);
                let o = b
                    .invoke_quiet(
                        mqtt(behaviour, arg),
                        InvocationContext::new("bench"),
                        Admission::Wait,
                    )
                    .await;
                assert!(o.is_ok(), "{o:?}");
                off.push(o.duration_us as f64 / 1000.0);
            }
        });
        on.sort_by(f64::total_cmp);
        off.sort_by(f64::total_cmp);
        let (m_on, m_off) = (percentile(&on, 0.5), percentile(&off, 0.5));
        println!(
            "| {what} | {fuel_used} | {m_on:.1} | {m_off:.1} | {:+.1} % |",
            (m_on / m_off - 1.0) * 100.0
        );
    }

    println!(
        "\n## Cold start of `wasmgate up` (quick-start manifest, 3 components, warm precompile cache)\n"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
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

/// Section 4: invocations with and without metrics, alternating rounds of
/// `PER_ROUND` each, pooling allocator with fuel (the defaults of `up`).
fn metrics_overhead(rt: &tokio::runtime::Runtime) {
    const ROUNDS: usize = 9;
    const PER_ROUND: usize = 5_000;
    let runtime = runtime(AllocatorChoice::Pooling, true);
    let with = invocable(&runtime, Limits::default());
    let without = invocable(&runtime, Limits::default());
    let mut labels = std::collections::HashMap::new();
    labels.insert(
        ("hostile".to_string(), "mqtt:bench".to_string()),
        "mqtt[0]".to_string(),
    );
    let metrics = std::sync::Arc::new(InvocationMetrics::new(labels));
    let mut registry = prometheus_client::registry::Registry::with_prefix("wasmgate");
    metrics.register(&mut registry);
    with.set_metrics(metrics.clone());
    println!(
        "## Metrics overhead: {ROUNDS} rounds of {PER_ROUND} sequential invocations each way, alternating (pooling, fuel on)\n"
    );
    println!(
        "| round | median µs, metrics on | median µs, metrics off | p99 on | p99 off | on/off |"
    );
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut last = None;
    for round in 0..ROUNDS {
        let mut medians = [(0.0, 0.0); 2];
        // Which goes first alternates between rounds.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let inv = if which == 0 { &with } else { &without };
            let mut samples = Vec::with_capacity(PER_ROUND);
            rt.block_on(async {
                for i in 0..(PER_ROUND + 200) {
                    let t = Instant::now();
                    let outcome = inv
                        .invoke(
                            mqtt("ok", ""),
                            InvocationContext::new("mqtt:bench"),
                            Admission::Wait,
                        )
                        .await;
                    assert!(outcome.is_ok(), "{outcome:?}");
                    if i >= 200 {
                        samples.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    if which == 0 {
                        last = Some(outcome);
                    }
                }
            });
            samples.sort_by(f64::total_cmp);
            medians[which] = (percentile(&samples, 0.5), percentile(&samples, 0.99));
        }
        let ratio = medians[0].0 / medians[1].0;
        ratios.push(ratio);
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {ratio:.3} |",
            round + 1,
            medians[0].0,
            medians[1].0,
            medians[0].1,
            medians[1].1
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nMedian on/off ratio over the rounds: {:.3} (min {:.3}, max {:.3})",
        percentile(&ratios, 0.5),
        ratios[0],
        ratios[ratios.len() - 1]
    );
    // One record alone, on an outcome of the loop above.
    record_cost(&metrics, &registry, &last.expect("an outcome"));
}

/// The time of one `InvocationMetrics::record` of `outcome`.
fn record_cost(
    metrics: &InvocationMetrics,
    registry: &prometheus_client::registry::Registry,
    outcome: &wasmgate_runtime::invoke::Outcome,
) {
    let n = 1_000_000;
    let t = Instant::now();
    for _ in 0..n {
        metrics.record(std::hint::black_box(outcome));
    }
    let per = t.elapsed().as_secs_f64() * 1e9 / f64::from(n);
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry).unwrap();
    println!(
        "One `InvocationMetrics::record`: {per:.0} ns ({n} calls); the exposition of this registry: {} bytes",
        text.len()
    );
}
