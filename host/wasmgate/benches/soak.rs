//! Soak benchmark (a benchmark, not a test: it asserts nothing).
//!
//!     cargo bench -p wasmgate --bench soak      # WASMGATE_SOAK_SECS=120 for a shorter run
//!
//! `WASMGATE_SOAK_HTTP_RATE` and `WASMGATE_SOAK_MQTT_RATE` (per second)
//! replace the rates derived from the measured capacity, to compare builds
//! at the same load.
//!
//! Runs this build's `wasmgate up` (release) against a Mosquitto of its own
//! (`mosquitto` on the PATH) under a steady mixed load, and reports per
//! window (a tenth of the run) what an operator would watch: the host's
//! RSS, CPU, open file descriptors and threads, and the p50/p99 latency of
//! its HTTP and MQTT request/response paths.
//!
//! - **Capacity** first, each path alone, closed loop for 15 s: HTTP GETs
//!   to `hello-http` (fresh instance per request) from 32 concurrent
//!   requests; MQTT request/response through `echo-mqtt` with 16 requests
//!   in flight.
//! - **Soak**: open loop (requests are sent on a schedule, not when the last
//!   one answered) at 40 % of each path's capacity alone, together about
//!   80 % of what the machine serves; plus a timer every
//!   100 ms whose guest publishes a QoS 1 message, and hostile guests on
//!   MQTT, 5 per second in turn: an endless loop (stopped by fuel), a
//!   memory bomb (stopped at `limits.memory`), a publish flood (stopped by
//!   the publish budget), a 1 MiB log flood (capture bounded), a trap and a
//!   stack overflow — each dead-lettered after its one attempt.
//!
//! The load generator runs in this process on the same cores (two tokio
//! workers), as does Mosquitto. Prints a Markdown table for BENCHMARKS.md.

mod common;

use common::{Broker, client_opts, percentile, spawn_client};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wasmgate_test_artifacts::{ECHO_MQTT, HELLO_HTTP, HOSTILE, PUBLISH_TIMER};

/// The share of the machine's capacity the soak offers, split evenly
/// between HTTP and MQTT.
const LOAD: f64 = 0.8;

/// Hostile behaviours, in turn (topic, payload).
const HOSTILE_MIX: &[(&str, &str)] = &[
    ("loop", ""),
    ("memory-bomb", ""),
    ("publish-flood", "20"),
    ("log-flood", "1"),
    ("trap", ""),
    ("stack-overflow", ""),
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn manifest(dir: &std::path::Path, http_port: u16, mqtt_port: u16) -> std::path::PathBuf {
    let path = dir.join("wasmgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"[gateway]
name = "soak"
state_dir = "{state}"

[http]
listen = "127.0.0.1:{http_port}"

[mqtt]
broker = "mqtt://127.0.0.1:{mqtt_port}"

[component.hello]
source = "{hello}"
limits = {{ fuel = 100_000_000, memory = "16MiB", timeout = "2s", concurrency = 64 }}

[component.echo]
source = "{echo}"
limits = {{ fuel = 50_000_000, memory = "16MiB", timeout = "1s", concurrency = 32 }}
allow = {{ mqtt_publish = [], mqtt_response = ["soak/replies/#"] }}

[component.tick]
source = "{tick}"
env = {{ PUBLISH_TOPIC = "soak/ticks" }}
allow = {{ mqtt_publish = ["soak/#"] }}

[component.hostile]
source = "{hostile}"
limits = {{ fuel = 20_000_000, memory = "16MiB", timeout = "500ms", concurrency = 4 }}
allow = {{ mqtt_publish = ["flood/#"] }}

[[trigger.http]]
priority = 1
component = "hello"
path = "/hello"

[[trigger.mqtt]]
component = "echo"
topic = "soak/req"
qos = 1
max_in_flight = 16

[[trigger.mqtt]]
component = "hostile"
topic = "+"
qos = 1
max_in_flight = 2
retry = {{ attempts = 1 }}

[[trigger.timer]]
component = "tick"
every = "100ms"
"#,
            state = dir.join("state").display(),
            hello = HELLO_HTTP,
            echo = ECHO_MQTT,
            tick = PUBLISH_TIMER,
            hostile = HOSTILE,
        ),
    )
    .unwrap();
    path
}

/// What `/proc` says of the host process.
#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    rss_kib: u64,
    cpu_ticks: u64,
    fds: usize,
    threads: u64,
}

fn sample(pid: u32) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with the last ')').
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> u64 { rest.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    ProcSample {
        rss_kib: field("VmRSS:"),
        // utime and stime are fields 14 and 15; `rest` starts at field 3.
        cpu_ticks: ticks(11) + ticks(12),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
        threads: field("Threads:"),
    }
}

/// Latencies (µs) and failures of one path in the current window.
#[derive(Default)]
struct Window {
    latencies: Mutex<Vec<f64>>,
    failed: AtomicU64,
}

impl Window {
    fn take(&self) -> (Vec<f64>, u64) {
        let mut v = std::mem::take(&mut *self.latencies.lock().unwrap());
        v.sort_by(f64::total_cmp);
        (v, self.failed.swap(0, Relaxed))
    }
}

async fn http_capacity(client: &reqwest::Client, url: &str, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, url, done) = (client.clone(), url.to_string(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                if let Ok(r) = client.get(&url).send().await
                    && r.bytes().await.is_ok()
                {
                    done.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Relaxed) as f64 / secs as f64
}

/// The MQTT requester: publishes requests with a correlation id and times
/// the replies.
struct Requester {
    client: rumqttc::v5::AsyncClient,
    sent: Arc<Mutex<HashMap<u64, Instant>>>,
    replies: tokio::sync::mpsc::UnboundedReceiver<(u64, Instant)>,
    next: u64,
    _stop: CancellationToken,
}

impl Requester {
    async fn connect(port: u16, id: &str) -> Self {
        let (tx, replies) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let client = spawn_client(
            client_opts(id, port),
            Some("soak/replies/bench"),
            move |_, p| {
                let id = p
                    .properties
                    .and_then(|p| p.correlation_data)
                    .and_then(|c| std::str::from_utf8(&c).ok()?.parse().ok());
                if let Some(id) = id {
                    let _ = tx.send((id, Instant::now()));
                }
            },
            stop.clone(),
        )
        .await;
        Self {
            client,
            sent: Arc::default(),
            replies,
            next: 0,
            _stop: stop,
        }
    }

    async fn request(&mut self) {
        let id = self.next;
        self.next += 1;
        let props = PublishProperties {
            response_topic: Some("soak/replies/bench".into()),
            correlation_data: Some(id.to_string().into()),
            ..PublishProperties::default()
        };
        self.sent.lock().unwrap().insert(id, Instant::now());
        self.client
            .publish_with_properties("soak/req", QoS::AtLeastOnce, false, "21.5", props)
            .await
            .unwrap();
    }
}

async fn mqtt_capacity(r: &mut Requester, secs: u64) -> f64 {
    let until = Instant::now() + Duration::from_secs(secs);
    for _ in 0..16 {
        r.request().await;
    }
    let mut done = 0u64;
    while Instant::now() < until {
        if let Ok(Some((id, _))) =
            tokio::time::timeout(Duration::from_secs(5), r.replies.recv()).await
        {
            r.sent.lock().unwrap().remove(&id);
            done += 1;
            r.request().await;
        }
    }
    // Let the last ones come back before the soak.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(Some((id, _))) =
        tokio::time::timeout(Duration::from_millis(200), r.replies.recv()).await
    {
        r.sent.lock().unwrap().remove(&id);
    }
    r.sent.lock().unwrap().clear();
    done as f64 / secs as f64
}

/// The host process, killed if the benchmark panics.
struct Host(std::process::Child);

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_host(manifest: &std::path::Path) -> (Host, std::path::PathBuf) {
    let log = manifest.with_file_name("host.log");
    let mut host = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["up", "-f", manifest.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wasmgate up");
    let stderr = host.stderr.take().unwrap();
    let host = Host(host);
    let (tx, rx) = std::sync::mpsc::channel();
    let log_file = log.clone();
    std::thread::spawn(move || {
        let mut out = std::fs::File::create(log_file).unwrap();
        let mut ready = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ready")
                && let Some(r) = ready.take()
            {
                let _ = r.send(());
            }
            let _ = std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes());
        }
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        std::thread::sleep(Duration::from_millis(200));
        panic!(
            "wasmgate up did not log ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    (host, log)
}

fn fmt_ms(sorted: &[f64], p: f64) -> String {
    if sorted.is_empty() {
        "-".into()
    } else {
        format!("{:.2}", percentile(sorted, p) / 1000.0)
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the soak reads as one run: set-up, capacity, the loads, the windows, the report"
)]
fn main() {
    let secs: u64 = std::env::var("WASMGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let file = manifest(dir.path(), http_port, broker.port);
    let (mut host, log) = spawn_host(&file);
    let pid = host.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{http_port}/hello");
    let _ = rustls::crypto::ring::default_provider().install_default();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap();
        let mut requester = Requester::connect(broker.port, "soak-requester").await;
        // Each path alone, closed loop (measured together, the generator's
        // MQTT requester starved behind the HTTP load on these cores).
        let http_cap = http_capacity(&client, &url, 15).await;
        let mqtt_cap = mqtt_capacity(&mut requester, 15).await;
        // Fixed rates instead (to compare builds at the same load).
        let rate = |var: &str, measured: f64| -> f64 {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(LOAD / 2.0 * measured)
        };
        let http_rate = rate("WASMGATE_SOAK_HTTP_RATE", http_cap);
        let mqtt_rate = rate("WASMGATE_SOAK_MQTT_RATE", mqtt_cap);
        assert!(http_rate >= 1.0 && mqtt_rate >= 1.0, "no capacity measured");
        eprintln!(
            "capacity alone: HTTP {http_cap:.0} req/s, MQTT request/response {mqtt_cap:.0} msg/s; \
             soak offers {http_rate:.0} + {mqtt_rate:.0} per second for {secs} s"
        );

        let stop = CancellationToken::new();
        let http = Arc::new(Window::default());
        let mqtt = Arc::new(Window::default());
        // HTTP, open loop: one request per tick, at most 512 outstanding
        // (past that the host is not keeping up: counted as failed).
        {
            let (client, url, http, stop) = (client.clone(), url.clone(), http.clone(), stop.clone());
            let outstanding = Arc::new(tokio::sync::Semaphore::new(512));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / http_rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                        http.failed.fetch_add(1, Relaxed);
                        continue;
                    };
                    let (client, url, http) = (client.clone(), url.clone(), http.clone());
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let ok = match client.get(&url).send().await {
                            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        if ok {
                            let us = t.elapsed().as_secs_f64() * 1e6;
                            http.latencies.lock().unwrap().push(us);
                        } else {
                            http.failed.fetch_add(1, Relaxed);
                        }
                        drop(permit);
                    });
                }
            });
        }
        // MQTT request/response, open loop; replies are timed as they come.
        let sent = requester.sent.clone();
        let Requester {
            client: mqtt_client,
            replies: mut mqtt_replies,
            next: mut next_id,
            ..
        } = requester;
        {
            let (mqtt, sent) = (mqtt.clone(), sent.clone());
            tokio::spawn(async move {
                while let Some((id, at)) = mqtt_replies.recv().await {
                    if let Some(t) = sent.lock().unwrap().remove(&id) {
                        let us = at.duration_since(t).as_secs_f64() * 1e6;
                        mqtt.latencies.lock().unwrap().push(us);
                    }
                }
            });
        }
        {
            let (c, stop, sent) = (mqtt_client.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / mqtt_rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let id = next_id;
                    next_id += 1;
                    let props = PublishProperties {
                        response_topic: Some("soak/replies/bench".into()),
                        correlation_data: Some(id.to_string().into()),
                        ..PublishProperties::default()
                    };
                    sent.lock().unwrap().insert(id, Instant::now());
                    let _ = c
                        .publish_with_properties("soak/req", QoS::AtLeastOnce, false, "21.5", props)
                        .await;
                }
            });
        }
        // Hostile guests, 5 per second in turn.
        let hostile_sent = Arc::new(AtomicU64::new(0));
        {
            let (c, stop, n) = (mqtt_client.clone(), stop.clone(), hostile_sent.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                let mut i = 0;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let (topic, payload) = HOSTILE_MIX[i % HOSTILE_MIX.len()];
                    i += 1;
                    if c.publish(topic, QoS::AtLeastOnce, false, payload).await.is_ok() {
                        n.fetch_add(1, Relaxed);
                    }
                }
            });
        }

        let window = Duration::from_secs(secs.max(10) / 10);
        let hz = 100.0; // USER_HZ on Linux
        let mut rows = Vec::new();
        let mut last = sample(pid);
        let started = Instant::now();
        for w in 1..=10 {
            tokio::time::sleep(window).await;
            let now = sample(pid);
            let cpu = (now.cpu_ticks - last.cpu_ticks) as f64 / hz / window.as_secs_f64();
            last = now;
            let (h, h_failed) = http.take();
            let (m, _) = mqtt.take();
            // Requests older than 10 s without a reply.
            let lost = {
                let s = sent.lock().unwrap();
                s.values()
                    .filter(|t| t.elapsed() > Duration::from_secs(10))
                    .count()
            };
            let row = format!(
                "| {w} | {:.0} | {:.1} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {h_failed} / {lost} |",
                started.elapsed().as_secs_f64(),
                now.rss_kib as f64 / 1024.0,
                now.fds,
                now.threads,
                cpu * 100.0,
                h.len(),
                fmt_ms(&h, 0.5),
                fmt_ms(&h, 0.99),
                m.len() as f64 / window.as_secs_f64(),
                fmt_ms(&m, 0.5),
                fmt_ms(&m, 0.99),
            );
            eprintln!("{row}");
            rows.push(row);
        }
        stop.cancel();
        println!(
            "\ncapacity alone: HTTP {http_cap:.0} req/s, MQTT request/response {mqtt_cap:.0} msg/s; \
             offered: HTTP {http_rate:.0} req/s, MQTT {mqtt_rate:.0} msg/s, timer 10/s, hostile 5/s \
             ({} hostile messages)\n",
            hostile_sent.load(Relaxed)
        );
        println!(
            "| window | at s | RSS MiB | fds | threads | CPU % | HTTP reqs | HTTP p50 ms | HTTP p99 ms | MQTT msg/s | MQTT p50 ms | MQTT p99 ms | HTTP failed / MQTT unanswered |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in rows {
            println!("{r}");
        }
    });
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = host.0.wait().unwrap();
    let kept = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("soak-host.log");
    let _ = std::fs::copy(&log, &kept);
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    println!(
        "\nhost exit: {status}; ERROR and WARN lines in its log ({}): {}",
        kept.display(),
        errors.len()
    );
    // The kinds of error, by message (the text after the last field).
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in &errors {
        let words: Vec<&str> = e.split_whitespace().filter(|w| !w.contains('=')).collect();
        let kind = words
            .iter()
            .skip(2)
            .take(12)
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        *kinds.entry(kind).or_default() += 1;
    }
    for (kind, n) in kinds {
        println!("- {n} × {kind}");
    }
    let dl = dir.path().join("state/dead-letters.sqlite");
    if dl.exists() {
        let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
            .args(["dlq", "list", "-f", file.to_str().unwrap(), "--limit", "1"])
            .output();
        if let Ok(o) = out {
            for l in String::from_utf8_lossy(&o.stdout).lines().take(3) {
                println!("{l}");
            }
        }
        println!(
            "dead-letter store on disk: {:.1} MiB",
            std::fs::metadata(&dl).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0
        );
    }
}
