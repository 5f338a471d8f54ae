//! The gateway's Prometheus metrics: the runtime's invocation metrics, the
//! timers' lateness, and what the triggers and stores already count, read
//! when scraped (so the hot paths pay nothing for them), plus process and
//! build information. Served at the admin listener's `/metrics`.
//!
//! Names carry the `wasmgate_` prefix (the process metrics keep Prometheus'
//! standard `process_` names). Labels are bounded by the manifest: see
//! [`wasmgate_runtime::metrics`].

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use wasmgate_manifest::Manifest;
use wasmgate_runtime::deployment::Deployment;
use wasmgate_runtime::invoke::Invocable;
use wasmgate_runtime::metrics::{InvocationMetrics, duration_buckets};
use wasmgate_store::deadletter::DeadLetterStore;
use wasmgate_store::queue::EventQueue;
use wasmgate_trigger_http::HttpStats;
use wasmgate_trigger_keyvalue::StreamStats;
use wasmgate_trigger_mqtt::MqttStats;

/// A trigger's kind and index as the one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    /// `timer[0]`, ...
    pub trigger: String,
}

/// Everything `/metrics` shows, and the runtime's side of it.
pub struct GatewayMetrics {
    registry: Registry,
    /// Recorded by every component's invocations.
    pub invocations: Arc<InvocationMetrics>,
    /// Each timer's lateness, by trigger.
    pub timer_lateness: Family<TriggerLabel, Histogram, fn() -> Histogram>,
    sources: Arc<Sources>,
}

/// What the collector reads at each scrape; set as the gateway starts.
#[derive(Default)]
pub struct Sources {
    http: std::sync::OnceLock<Arc<HttpStats>>,
    mqtt: std::sync::OnceLock<Arc<MqttStats>>,
    stores: std::sync::OnceLock<(Arc<DeadLetterStore>, Arc<EventQueue>)>,
    deployment: std::sync::OnceLock<Arc<Deployment>>,
    deployer: std::sync::OnceLock<Arc<crate::deploy::Deployer>>,
    kv_streams: std::sync::OnceLock<Vec<(String, Arc<StreamStats>)>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

fn lateness_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

/// `(component, trigger text)` → `kind[index]` for every trigger of `m`:
/// the `trigger` label of [`InvocationMetrics`].
pub fn trigger_labels(m: &Manifest) -> HashMap<(String, String), String> {
    let mut labels = HashMap::new();
    for (i, t) in m.triggers.http.iter().enumerate() {
        for c in t.components() {
            labels.insert(
                (c.get_ref().clone(), format!("http[{i}]")),
                format!("http[{i}]"),
            );
        }
    }
    for (i, t) in m.triggers.mqtt.iter().enumerate() {
        labels.insert(
            (
                t.component.get_ref().clone(),
                format!("mqtt:{}", t.topic.get_ref()),
            ),
            format!("mqtt[{i}]"),
        );
    }
    for (spec, t) in wasmgate_trigger_timer::specs(m)
        .into_iter()
        .zip(&m.triggers.timer)
    {
        let i = spec
            .label
            .trim_start_matches("trigger.timer[")
            .trim_end_matches(']');
        labels.insert(
            (
                t.component.get_ref().clone(),
                format!("timer:{}", spec.schedule_text),
            ),
            format!("timer[{i}]"),
        );
    }
    for (spec, t) in wasmgate_trigger_keyvalue::specs(m)
        .into_iter()
        .zip(&m.triggers.keyvalue)
    {
        let label = spec.label.trim_start_matches("trigger.").to_string();
        labels.insert((t.component.get_ref().clone(), spec.trigger_text()), label);
    }
    labels
}

impl GatewayMetrics {
    /// The metrics of `deployment`; its components record into them.
    pub fn new(deployment: &Arc<Deployment>, started: SystemTime) -> Self {
        let current = deployment.current();
        let invocations = Arc::new(InvocationMetrics::new(trigger_labels(&current.manifest)));
        for c in current.components.values() {
            c.set_metrics(invocations.clone());
        }
        let timer_lateness: Family<TriggerLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(lateness_histogram);
        let sources = Arc::new(Sources {
            deployment: deployment.clone().into(),
            ..Sources::default()
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector {
            started: Some(started),
        }));
        let ours = registry.sub_registry_with_prefix("wasmgate");
        invocations.register(ours);
        ours.register_with_unit(
            "timer_lateness",
            "How late each timer tick was dispatched, past its due time",
            Unit::Seconds,
            timer_lateness.clone(),
        );
        ours.register_collector(Box::new(GatewayCollector(sources.clone())));
        Self {
            registry,
            invocations,
            timer_lateness,
            sources,
        }
    }

    /// The HTTP listener's response counts.
    pub fn set_http(&self, stats: Arc<HttpStats>) {
        let _ = self.sources.http.set(stats);
    }

    /// The MQTT trigger's counters.
    pub fn set_mqtt(&self, stats: Arc<MqttStats>) {
        let _ = self.sources.mqtt.set(stats);
    }

    /// The deploys and rollbacks.
    pub fn set_deployer(&self, deployer: Arc<crate::deploy::Deployer>) {
        let _ = self.sources.deployer.set(deployer);
    }

    /// The dead-letter store and the event queue.
    pub fn set_stores(&self, dead_letters: Arc<DeadLetterStore>, queue: Arc<EventQueue>) {
        let _ = self.sources.stores.set((dead_letters, queue));
    }

    /// The key-value triggers' counters, by trigger (`keyvalue[0]`).
    pub fn set_kv_streams(&self, stats: Vec<(String, Arc<StreamStats>)>) {
        let _ = self.sources.kv_streams.set(stats);
    }

    /// The histogram a timer records its lateness in.
    pub fn timer_histogram(&self, trigger: &str) -> Histogram {
        self.timer_lateness.get_or_create_owned(&TriggerLabel {
            trigger: trigger.to_string(),
        })
    }

    /// The text exposition (Prometheus text format 0.0.4). Reads the
    /// stores: call it off the async workers.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// The `Content-Type` of [`GatewayMetrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug)]
struct GatewayCollector(Arc<Sources>);

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&'static str, String)>, u64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&'static str, String)>, i64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let components = s
            .deployment
            .get()
            .map(|d| d.current().components.clone())
            .unwrap_or_default();
        let info: Vec<_> = components
            .iter()
            .map(|(name, c)| {
                (
                    vec![
                        ("component", name.clone()),
                        ("digest", format!("sha256:{}", c.version().digest)),
                    ],
                    1,
                )
            })
            .collect();
        gauge(
            &mut encoder,
            "component_info",
            "The running version of each component (content digest)",
            &info,
        )?;
        gauge(
            &mut encoder,
            "build_info",
            "The wasmgate build",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
        )?;
        if let Some(http) = s.http.get() {
            let rows: Vec<_> = http
                .snapshot()
                .into_iter()
                .map(|(rule, class, n)| {
                    let rule = rule.map_or_else(|| "none".to_string(), |i| format!("http[{i}]"));
                    (vec![("rule", rule), ("code_class", class.to_string())], n)
                })
                .collect();
            counter(
                &mut encoder,
                "http_requests",
                "HTTP responses by rule (none: no rule took the request) and status class",
                &rows,
            )?;
        }
        if let Some(d) = s.deployer.get() {
            encode_deploys(&mut encoder, d)?;
        }
        if let Some(m) = s.mqtt.get() {
            encode_mqtt(&mut encoder, m)?;
        }
        if let Some((dead_letters, queue)) = s.stores.get() {
            encode_stores(&mut encoder, &components, dead_letters, queue)?;
        }
        if let Some(streams) = s.kv_streams.get() {
            encode_kv_streams(&mut encoder, streams)?;
        }
        Ok(())
    }
}

fn encode_kv_streams(
    encoder: &mut DescriptorEncoder,
    streams: &[(String, Arc<StreamStats>)],
) -> std::fmt::Result {
    let rows = |pick: &dyn Fn(&StreamStats) -> u64| {
        streams
            .iter()
            .map(|(label, s)| (vec![("trigger", label.clone())], pick(s)))
            .collect::<Vec<_>>()
    };
    for (name, help, pick) in [
        (
            "kv_stream_changes",
            "Changes a key-value trigger's handler handled",
            (|s: &StreamStats| load(&s.changes)) as fn(&StreamStats) -> u64,
        ),
        (
            "kv_stream_failed_attempts",
            "Batches of changes whose attempt failed (each retry counts)",
            |s| load(&s.failures),
        ),
        (
            "kv_stream_dead_lettered_changes",
            "Changes dead-lettered by a key-value trigger",
            |s| load(&s.dead_lettered),
        ),
        (
            "kv_stream_lost_changes",
            "Changes the stream's retention dropped before the trigger read them (told in a gap)",
            |s| load(&s.lost),
        ),
    ] {
        counter(encoder, name, help, &rows(&pick))?;
    }
    let behind: Vec<_> = rows(&|s| load(&s.head).saturating_sub(load(&s.checkpoint)))
        .into_iter()
        .map(|(l, n)| (l, n as i64))
        .collect();
    gauge(
        encoder,
        "kv_stream_behind_changes",
        "Changes of the bucket after a key-value trigger's checkpoint, as last read (not yet handled)",
        &behind,
    )
}

fn encode_deploys(
    encoder: &mut DescriptorEncoder,
    d: &crate::deploy::Deployer,
) -> std::fmt::Result {
    let counts = d.counts();
    let rows = |pick: &dyn Fn(&crate::deploy::Counts) -> [(&'static str, u64); 2]| {
        counts
            .iter()
            .flat_map(|(name, c)| pick(c).map(|(label, n)| (name.clone(), label.to_string(), n)))
            .collect::<Vec<_>>()
    };
    let deploys: Vec<_> = rows(&|c| [("ok", c.deploys), ("refused", c.refused)])
        .into_iter()
        .map(|(c, r, n)| (vec![("component", c), ("result", r)], n))
        .collect();
    counter(
        encoder,
        "deploys",
        "Deploys of a new version: swapped in (ok) or refused by a check or the smoke test",
        &deploys,
    )?;
    let rollbacks: Vec<_> = rows(&|c| {
        [
            ("manual", c.rollbacks),
            ("automatic", c.automatic_rollbacks),
        ]
    })
    .into_iter()
    .map(|(c, k, n)| (vec![("component", c), ("kind", k)], n))
    .collect();
    counter(
        encoder,
        "rollbacks",
        "Rollbacks to the previous version: asked for (manual) or made by a deploy's watch (automatic)",
        &rollbacks,
    )
}

fn encode_mqtt(encoder: &mut DescriptorEncoder, m: &MqttStats) -> std::fmt::Result {
    gauge(
        encoder,
        "mqtt_connected",
        "1 while the MQTT connection is up",
        &[(Vec::new(), i64::from(m.connected.load(Ordering::Relaxed)))],
    )?;
    let result = |name: &str, c: &AtomicU64| (vec![("result", name.to_string())], load(c));
    counter(
        encoder,
        "mqtt_messages",
        "MQTT messages received, and how their deliveries ended (per trigger: wasmgate_invocations_total)",
        &[
            result("received", &m.received),
            result("succeeded", &m.succeeded),
            result("dead_lettered", &m.failed),
            result("unsettled", &m.unsettled),
            result("expired", &m.expired),
            result("dropped_qos0", &m.dropped_qos0),
            result("left_unacknowledged", &m.overflow),
            result("unrouted", &m.unrouted),
        ],
    )?;
    counter(
        encoder,
        "mqtt_connection_errors",
        "Failed MQTT connection attempts and dropped connections",
        &[(Vec::new(), load(&m.connection_errors))],
    )?;
    counter(
        encoder,
        "mqtt_publishes",
        "Guest publishes, by what became of them",
        &[
            result("sent", &m.published),
            result("denied", &m.publish_denied),
            result("failed", &m.publish_failed),
            result("broker_refused", &m.broker_refused),
            result("spooled", &m.spooled),
            result("spool_dropped", &m.spool_dropped),
            result("spool_refused", &m.spool_refused),
            result("spool_errors", &m.spool_errors),
        ],
    )?;
    gauge(
        encoder,
        "spool_messages",
        "Publishes waiting in the spool for the broker",
        &[(
            Vec::new(),
            i64::try_from(load(&m.spool_waiting)).unwrap_or(i64::MAX),
        )],
    )
}

fn encode_stores(
    encoder: &mut DescriptorEncoder,
    components: &BTreeMap<String, Arc<Invocable>>,
    dead_letters: &DeadLetterStore,
    queue: &EventQueue,
) -> std::fmt::Result {
    match queue.len() {
        Ok(n) => gauge(
            encoder,
            "queue_depth",
            "Events waiting in the durable queue",
            &[(Vec::new(), i64::try_from(n).unwrap_or(i64::MAX))],
        )?,
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count the queue"),
    }
    match dead_letters.counts_by_component() {
        Ok(counts) => {
            // Records of components no longer in the manifest count under
            // "other": the label stays bounded by the manifest.
            let mut rows: BTreeMap<String, u64> =
                components.keys().map(|c| (c.clone(), 0)).collect();
            for (component, n) in counts {
                let key = if components.contains_key(&component) {
                    component
                } else {
                    "other".to_string()
                };
                *rows.entry(key).or_default() += n;
            }
            let rows: Vec<_> = rows
                .into_iter()
                .map(|(c, n)| (vec![("component", c)], i64::try_from(n).unwrap_or(i64::MAX)))
                .collect();
            gauge(
                encoder,
                "dead_letters",
                "Dead letters kept, per component",
                &rows,
            )?;
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count the dead letters"),
    }
    let stats = dead_letters.stats();
    counter(
        encoder,
        "dead_letter_write_failures",
        "Dead letters that could not be written (those events are lost)",
        &[(Vec::new(), load(&stats.write_failures))],
    )
}

/// Prometheus' standard process metrics, from `/proc/self`.
#[derive(Debug)]
struct ProcessCollector {
    started: Option<SystemTime>,
}

/// Clock ticks per second of `/proc/self/stat`'s times (`USER_HZ`, 100 on
/// every Linux architecture we build for).
const USER_HZ: f64 = 100.0;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces): state
            // is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
            if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
                let m = ConstCounter::new((user + system) as f64 / USER_HZ);
                let e = encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "User and system CPU time of the process",
                    None,
                    MetricType::Counter,
                )?;
                m.encode(e)?;
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status")
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        {
            let e = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of the process",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(kb * 1024).encode(e)?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let e = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of the process",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(dir.count() as i64).encode(e)?;
        }
        if let Some(started) = self.started {
            let secs = started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let e = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start of the process, in seconds since the Unix epoch",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(secs).encode(e)?;
        }
        Ok(())
    }
}
