//! MQTT trigger benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench mqtt      # WASMGATE_BENCH_MESSAGES=5000 for a shorter run
//!
//! Needs `mosquitto` on the PATH; the benchmark starts its own on an
//! ephemeral port (TCP_NODELAY, no queue cap, no persistence).
//!
//! 1. **Throughput**: a publisher sends N QoS 1 messages of 64 bytes as fast
//!    as its in-flight window allows; the consumer acknowledges each after
//!    its handler. The consumer is either the MQTT trigger with a trivial
//!    guest (`hostile` on topic `ok`: returns `ok` at once; `max_in_flight`
//!    16, Receive Maximum 100) or a native rumqttc consumer with manual acks
//!    (Receive Maximum 100, TCP_NODELAY) whose handler does nothing. Runs
//!    alternate (trigger, native, trigger, ...) on the same broker; the rate
//!    is N over the time from the first publish to the last ack.
//! 2. **Request/response round trip**: a requester publishes a QoS 1 request
//!    with a response topic and correlation data and waits for the reply,
//!    one at a time; the responder is the trigger with the `echo-mqtt` guest
//!    or a native rumqttc responder.
//!
//! Prints Markdown tables for BENCHMARKS.md.

mod common;

use common::{Broker, client_opts, median, percentile, spawn_client};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::Manifest;
use wasmgate_manifest::limits::Limits;
use wasmgate_manifest::topic::TopicFilter;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::Runtime;
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::Invocable;
use wasmgate_store::delivery::RetryPolicy;
use wasmgate_test_artifacts::{ECHO_MQTT, HOSTILE};
use wasmgate_trigger_mqtt::{MqttSpec, MqttTriggers, client_options};

fn runtime() -> Runtime {
    let cache = Cache::new(Some(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("precompiled"),
    ));
    Runtime::new(EngineOptions::default(), cache).expect("runtime")
}

fn invocable(runtime: &Runtime, path: &str) -> Arc<Invocable> {
    let compiled = runtime.compile(Path::new(path)).expect("guest compiles");
    Arc::new(Invocable::new(
        "bench".into(),
        compiled.pre,
        Limits::default(),
        Vec::new(),
        Vec::new(),
        runtime.engine(),
    ))
}

struct Host {
    tasks: TaskTracker,
    shutdown: CancellationToken,
    stats: Arc<wasmgate_trigger_mqtt::MqttStats>,
}

async fn start_host(port: u16, id: &str, component: Arc<Invocable>, topic: &str) -> Host {
    let text = format!(
        "[gateway]\nname = \"{id}\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\nsession_expiry = \"0s\"\n"
    );
    let m = Manifest::parse(Path::new("wasmgate.toml"), text).unwrap();
    let (o, receive_maximum) = client_options(&m).unwrap().unwrap();
    let spec = MqttSpec {
        label: "bench".into(),
        component,
        filter: TopicFilter::parse(topic).unwrap(),
        qos: 1,
        max_in_flight: 16,
        retry: RetryPolicy::default(),
        pause: Default::default(),
    };
    let t = MqttTriggers::new(o, receive_maximum, vec![spec]);
    let stats = t.stats();
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    tasks.spawn(t.run(tasks.clone(), shutdown.clone()));
    while stats.subscribed.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Host {
        tasks,
        shutdown,
        stats,
    }
}

impl Host {
    async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn publish_all(port: u16, id: &str, topic: &str, n: u64) -> (Instant, CancellationToken) {
    let stop = CancellationToken::new();
    let publisher = spawn_client(client_opts(id, port), None, |_, _| {}, stop.clone()).await;
    let started = Instant::now();
    let topic = topic.to_string();
    tokio::spawn(async move {
        let payload = vec![b'x'; 64];
        for _ in 0..n {
            publisher
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
    });
    (started, stop)
}

async fn throughput_trigger(broker: &Broker, component: Arc<Invocable>, n: u64, round: u32) -> f64 {
    let topic = "ok";
    let host = start_host(
        broker.port,
        &format!("bench-host-{round}"),
        component,
        topic,
    )
    .await;
    let (started, stop) = publish_all(broker.port, &format!("bench-pub-h{round}"), topic, n).await;
    while host.stats.acks_sent.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    host.stop().await;
    rate
}

async fn throughput_native(broker: &Broker, n: u64, round: u32) -> f64 {
    let topic = "ok";
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut o = client_opts(&format!("bench-native-{round}"), broker.port);
    o.set_manual_acks(true).set_receive_maximum(Some(100));
    let (a, f) = (acked.clone(), failed.clone());
    spawn_client(
        o,
        Some(topic),
        move |c, p| {
            // The handler: nothing. Then the ack (the channel holds 65,536).
            std::hint::black_box(&p.payload);
            if c.try_ack(&p).is_ok() {
                a.fetch_add(1, Ordering::Relaxed);
            } else {
                f.fetch_add(1, Ordering::Relaxed);
            }
        },
        stop.clone(),
    )
    .await;
    let (started, pub_stop) =
        publish_all(broker.port, &format!("bench-pub-n{round}"), topic, n).await;
    while acked.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "native try_ack failed");
    pub_stop.cancel();
    stop.cancel();
    rate
}

async fn round_trips(port: u16, id: &str, n: usize) -> Vec<f64> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let reply_topic = format!("rr/replies/{id}");
    let requester = spawn_client(
        client_opts(id, port),
        Some(&reply_topic),
        move |_, p| {
            let _ = tx.send(p);
        },
        stop.clone(),
    )
    .await;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let corr = format!("c{i}");
        let props = PublishProperties {
            response_topic: Some(reply_topic.clone()),
            correlation_data: Some(corr.clone().into()),
            ..PublishProperties::default()
        };
        let t = Instant::now();
        requester
            .publish_with_properties("rr/req", QoS::AtLeastOnce, false, "ping", props)
            .await
            .unwrap();
        loop {
            let p = rx.recv().await.unwrap();
            let c = p.properties.and_then(|p| p.correlation_data);
            if c.as_deref() == Some(corr.as_bytes()) {
                break;
            }
        }
        if i >= 100 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    stop.cancel();
    samples.sort_by(f64::total_cmp);
    samples
}

#[expect(
    clippy::too_many_lines,
    reason = "the benchmark's rounds, alternating the systems, and its report, in order"
)]
fn main() {
    let n: u64 = std::env::var("WASMGATE_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let rounds = 3;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = Broker::start();
        let runtime = runtime();
        let trivial = invocable(&runtime, HOSTILE);
        // The same guest with `reuse = 1000` (one instance for up to 1,000
        // messages, one at a time).
        let warm = Arc::new(
            Arc::into_inner(invocable(&runtime, HOSTILE))
                .unwrap()
                .with_reuse(1000),
        );
        let echo = invocable(&runtime, ECHO_MQTT);
        // Warm-up: compile caches, first connections.
        throughput_trigger(&broker, trivial.clone(), 1000, 100).await;
        throughput_native(&broker, 1000, 100).await;

        let (mut trig, mut reused, mut native) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            trig.push(throughput_trigger(&broker, trivial.clone(), n, round).await);
            reused.push(throughput_trigger(&broker, warm.clone(), n, 10 + round).await);
            native.push(throughput_native(&broker, n, round).await);
        }
        println!("### QoS 1 throughput, {n} × 64 B per run, {rounds} runs each, alternating\n");
        println!("| consumer | runs (msgs/s) | median (msgs/s) |");
        println!("|---|---|---|");
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| wasmgate MQTT trigger, trivial guest | {} | {:.0} |",
            fmt(&trig),
            median(&trig)
        );
        println!(
            "| wasmgate MQTT trigger, trivial guest, reuse = 1000 | {} | {:.0} |",
            fmt(&reused),
            median(&reused)
        );
        println!(
            "| native rumqttc consumer | {} | {:.0} |",
            fmt(&native),
            median(&native)
        );
        println!(
            "\nratio of medians (trigger / native): {:.2} fresh, {:.2} with reuse\n",
            median(&trig) / median(&native),
            median(&reused) / median(&native)
        );

        // Request/response.
        let samples = 2000;
        let host = start_host(broker.port, "bench-rr-host", echo.clone(), "rr/req").await;
        let via_trigger = round_trips(broker.port, "bench-rr-a", samples).await;
        host.stop().await;
        let stop = CancellationToken::new();
        let mut o = client_opts("bench-rr-native", broker.port);
        o.set_manual_acks(true).set_receive_maximum(Some(100));
        spawn_client(
            o,
            Some("rr/req"),
            |c, p| {
                let props = p.properties.clone().unwrap_or_default();
                if let Some(t) = props.response_topic {
                    let reply = PublishProperties {
                        correlation_data: props.correlation_data,
                        ..PublishProperties::default()
                    };
                    c.try_publish_with_properties(
                        t,
                        QoS::AtLeastOnce,
                        false,
                        p.payload.clone(),
                        reply,
                    )
                    .unwrap();
                }
                c.try_ack(&p).unwrap();
            },
            stop.clone(),
        )
        .await;
        let via_native = round_trips(broker.port, "bench-rr-b", samples).await;
        stop.cancel();
        println!("### QoS 1 request/response round trip, {samples} sequential requests\n");
        println!("| responder | p50 (µs) | p99 (µs) |");
        println!("|---|---|---|");
        for (name, s) in [
            ("wasmgate MQTT trigger, echo-mqtt guest", &via_trigger),
            ("native rumqttc responder", &via_native),
        ] {
            println!(
                "| {name} | {:.0} | {:.0} |",
                percentile(s, 0.5),
                percentile(s, 0.99)
            );
        }
    });
}
