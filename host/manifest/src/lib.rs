//! The manifest, `wasmgate.toml`: parsing and load-time validation.
//!
//! Everything that can be checked without compiling a component is checked
//! here, and every error names the file, the line and column where known, the
//! key, and what is wrong. Checks that need the compiled component (does it
//! export the trigger's handler? does it import only what it was granted?)
//! happen when the runtime loads it (`wasmgate_runtime::deployment`), and the
//! HTTP rules are compiled by the HTTP trigger's router; both report errors
//! of this same kind ([`Manifest::invalid`]).

use crate::limits::{HumanDuration, Limits, Size};
use crate::topic::TopicFilter;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use toml::Spanned;

pub mod admin;
mod broker_url;
mod http;
pub mod keyvalue;
pub mod limits;
pub mod signing;
pub mod topic;
pub use broker_url::BrokerUrl;
pub use http::{
    FixedResponse, HttpConfig, HttpLimits, HttpTrigger, OneOrMany, Redirect, TlsConfig, TlsFiles,
    WeightedTarget,
};

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{path}: cannot read the manifest: {source}")]
    Read {
        /// The manifest path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown or a value has the wrong form.
    /// `message` comes from the TOML parser and quotes the line and column.
    #[error("{path}: {message}")]
    Syntax {
        /// The manifest path.
        path: String,
        /// The parser's message, with line, column and an excerpt.
        message: String,
    },
    /// A value is well-formed but not acceptable (an unknown component, a
    /// limit out of range, an invalid topic filter, ...).
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid {
        /// The manifest path.
        path: String,
        /// 1-based line of the offending value.
        line: usize,
        /// 1-based column of the offending value.
        column: usize,
        /// The dotted key, e.g. `trigger.mqtt[0].topic`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A parsed and validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file it was read from.
    pub path: PathBuf,
    /// The directory relative paths are resolved against (the file's directory).
    pub base_dir: PathBuf,
    source: String,
    /// `[gateway]`.
    pub gateway: GatewayConfig,
    /// `[http]`, if present.
    pub http: Option<HttpConfig>,
    /// `[mqtt]`, if present.
    pub mqtt: Option<MqttConfig>,
    /// `[component.NAME]`, by name.
    pub components: BTreeMap<String, ComponentConfig>,
    /// `[[trigger.*]]`.
    pub triggers: Triggers,
    /// `[dead_letters]`.
    pub dead_letters: DeadLettersConfig,
    /// `[admin]`.
    pub admin: admin::AdminConfig,
    /// `[keyvalue]`.
    pub keyvalue: keyvalue::KeyValueConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    gateway: GatewayConfig,
    http: Option<HttpConfig>,
    mqtt: Option<MqttConfig>,
    #[serde(default)]
    component: BTreeMap<Spanned<String>, ComponentConfig>,
    #[serde(default)]
    trigger: Triggers,
    #[serde(default)]
    dead_letters: DeadLettersConfig,
    #[serde(default)]
    admin: admin::AdminConfig,
    #[serde(default)]
    keyvalue: keyvalue::KeyValueConfig,
}

/// `[dead_letters]`: bounds of the durable dead-letter store
/// (`state_dir/dead-letters.sqlite`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    /// Most records kept; past it the oldest are evicted (default 100,000).
    pub max_records: Option<Spanned<u64>>,
    /// Most bytes the records take, payloads included; past it the oldest
    /// are evicted (default 100 MiB, at least 1 MiB: one largest MQTT
    /// message).
    pub max_bytes: Option<Spanned<Size>>,
    /// Records older than this are removed (default 30 days).
    pub max_age: Option<Spanned<HumanDuration>>,
    /// Also publish each dead letter (as JSON, QoS 1) to this MQTT topic.
    pub mqtt_topic: Option<Spanned<String>>,
}

/// Whether a cron pattern (without a year field, as the manifest allows)
/// ever fires. Dates and weekdays repeat every 28 years between century
/// years, so such a pattern fires at all if and only if it fires in the 28
/// years before croner's search limit (4972–4999, no century year among
/// them): a short search, where one from today for a pattern that never
/// fires (31 February) runs to the year 5000.
pub fn cron_fires_at_all(cron: &croner::Cron) -> bool {
    // A time field or the month with no value at all (`,,,`): never, and
    // known without a search (which would step through every minute).
    let p = &cron.pattern;
    if [&p.seconds, &p.minutes, &p.hours, &p.months]
        .iter()
        .any(|c| c.values().is_empty())
    {
        return false;
    }
    let cycle_start = chrono::NaiveDate::from_ymd_opt(croner::YEAR_UPPER_LIMIT - 28, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc());
    cycle_start.is_some_and(|t| cron.find_next_occurrence(&t, true).is_ok())
}

/// `[gateway]`: identity and where the host keeps its state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// A name for this gateway, used in logs.
    #[serde(default = "default_gateway_name")]
    pub name: String,
    /// Where the host keeps its state: the precompiled-component cache and the
    /// timer state (`timers.json`). Relative to the
    /// manifest's directory.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Signers whose signatures (`SOURCE.sig`, `wasmgate sign`) are
    /// trusted: `ed25519:BASE64` each. A component with a signature file is
    /// loaded only if the signature is valid and by one of these.
    #[serde(default)]
    pub trusted_keys: Vec<Spanned<String>>,
    /// Refuse every component without a valid signature by a trusted key.
    #[serde(default)]
    pub require_signature: Option<Spanned<bool>>,
}

fn default_gateway_name() -> String {
    "wasmgate".into()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".wasmgate")
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            name: default_gateway_name(),
            state_dir: default_state_dir(),
            trusted_keys: Vec::new(),
            require_signature: None,
        }
    }
}

/// `[mqtt]`: the broker connection (see `trigger::mqtt` for how it is used).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `"mqtt://host:1883"` or `"mqtts://host:8883"`; `"embedded"` (the
    /// default) starts a broker inside the host (see [`EmbeddedBrokerConfig`])
    /// and connects to it.
    #[serde(default = "default_broker")]
    pub broker: Spanned<String>,
    /// Client id; defaults to the gateway name. With a persistent session the
    /// broker keeps this client's unacknowledged messages under this id, so
    /// two hosts must not share it.
    pub client_id: Option<Spanned<String>>,
    /// Username for the broker.
    pub username: Option<String>,
    /// Password for the broker (needs `username`).
    pub password: Option<Spanned<String>>,
    /// CA certificate (PEM) that signed the broker's certificate; required
    /// for an `mqtts://` broker.
    pub ca: Option<Spanned<PathBuf>>,
    /// Client certificate chain (PEM) for mutual TLS; needs `key`.
    pub cert: Option<Spanned<PathBuf>>,
    /// Client private key (PEM) for mutual TLS; needs `cert`.
    pub key: Option<Spanned<PathBuf>>,
    /// MQTT protocol version: 5 (the default) or 3 (MQTT 3.1.1: no
    /// properties, no session expiry, no Receive Maximum; see
    /// `trigger::connection`).
    #[serde(default = "default_mqtt_version")]
    pub version: Spanned<u8>,
    /// Keep-alive interval (default 30 s, 5 s to 65,535 s): how often an
    /// idle connection is checked; a dead broker is noticed after about 1.5
    /// times this.
    pub keep_alive: Option<Spanned<HumanDuration>>,
    /// How long the broker keeps this client's session (subscriptions and
    /// unacknowledged messages) after a disconnect (default 1 day). Messages
    /// published while the host is down longer than this are lost.
    pub session_expiry: Option<Spanned<HumanDuration>>,
    /// Receive Maximum sent to the broker (default 100): at most this many
    /// QoS 1/2 messages are unacknowledged at once. It bounds the host's
    /// memory for messages in progress and is the backpressure to the broker.
    pub receive_maximum: Option<Spanned<u32>>,
    /// The embedded broker's settings (with `broker = "embedded"` only).
    pub embedded: Option<Spanned<EmbeddedBrokerConfig>>,
    /// Bounds of the on-disk spool for QoS 1/2 publishes made while the
    /// broker is unreachable (`state_dir/mqtt-spool.sqlite`).
    #[serde(default)]
    pub spool: SpoolConfig,
}

/// `[mqtt] spool = { max_messages, max_bytes, on_full }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Most publishes waiting (default 100,000).
    pub max_messages: Option<Spanned<u64>>,
    /// Most bytes of topics, payloads and properties waiting (default
    /// 64 MiB).
    pub max_bytes: Option<Spanned<Size>>,
    /// `"drop_oldest"` (the default) or `"refuse_new"`: which publish is
    /// lost when the spool is full.
    #[serde(default)]
    pub on_full: OnFull,
}

/// `[mqtt.embedded]`: the embedded broker's listener, bounds and clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBrokerConfig {
    /// Address the gateway's devices connect to (default 127.0.0.1:1883;
    /// `0.0.0.0:1883` for devices on the network).
    pub listen: Option<std::net::SocketAddr>,
    /// Messages queued per offline or slow session before the oldest is
    /// dropped (default 10,000).
    pub max_queued: Option<Spanned<u64>>,
    /// Sessions (connected or kept for an offline client) the broker holds
    /// at once; a new client past it is refused (default 1,024).
    pub max_sessions: Option<Spanned<u64>>,
    /// Longest a client's offline session is kept, whatever it asks for
    /// (default 1 day).
    pub max_session_expiry: Option<Spanned<HumanDuration>>,
    /// Clients that connect without a username. Default: allowed only when
    /// `listen` is a loopback address and no `users` are configured.
    /// Anonymous clients may publish and subscribe to any topic.
    pub allow_anonymous: Option<Spanned<bool>>,
    /// The clients that may connect with a username and password, each
    /// with the topics it may publish and subscribe to.
    #[serde(default)]
    pub users: Vec<Spanned<EmbeddedUser>>,
}

/// `[[mqtt.embedded.users]]`: one device (or group of devices) of the
/// embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedUser {
    /// The MQTT username.
    pub username: Spanned<String>,
    /// An Argon2id password hash in PHC format (`$argon2id$v=19$...`), as
    /// `wasmgate hash-password` prints it: the manifest never holds the
    /// password.
    pub password_hash: Spanned<String>,
    /// Topic filters the client may publish to.
    #[serde(default)]
    pub publish: Vec<Spanned<String>>,
    /// Topic filters the client may subscribe to: a subscription must be
    /// within one of them (`devices/7/#` allows `devices/7/cmd`, not `#`).
    #[serde(default)]
    pub subscribe: Vec<Spanned<String>>,
}

impl EmbeddedBrokerConfig {
    /// Whether clients without a username may connect.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.as_ref().map_or_else(
            || self.users.is_empty() && self.listen.is_none_or(|l| l.ip().is_loopback()),
            |a| *a.get_ref(),
        )
    }
}

impl MqttConfig {
    /// Whether the broker is the embedded one.
    pub fn is_embedded(&self) -> bool {
        self.broker.get_ref() == "embedded"
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        toml::from_str("").expect("every [mqtt] key has a default")
    }
}

fn default_broker() -> Spanned<String> {
    Spanned::new(0..0, "embedded".into())
}

fn default_mqtt_version() -> Spanned<u8> {
    Spanned::new(0..0, 5)
}

/// `[component.NAME]`: one guest component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// Path to the `.wasm` component, relative to the manifest's directory.
    pub source: Spanned<PathBuf>,
    /// Shell command that builds `source`; run in the manifest's directory by
    /// `wasmgate up --build`.
    pub build: Option<String>,
    /// Per-invocation limits; each one defaults (see [`Limits`]).
    #[serde(default = "default_limits")]
    pub limits: Spanned<LimitsConfig>,
    /// Capabilities granted to the component.
    #[serde(default)]
    pub allow: AllowConfig,
    /// Refuse to load the component when it imports a capability
    /// (`wasmgate:edge/mqtt-publisher`, `wasi:http/outgoing-handler`) that
    /// `allow` does not grant. Off by default: such a component loads (guest
    /// toolchains such as componentize-py and ComponentizeJS import every
    /// WASI interface) and each call to the capability is denied with the
    /// WIT's own error; `check` lists the ungranted imports.
    #[serde(default)]
    pub strict_imports: bool,
    /// Environment variables the guest sees (and nothing of the host's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How many invocations (HTTP requests, MQTT messages, timer ticks) one
    /// instance may serve, one after the other, before it is dropped
    /// (default 1: a fresh instance each time). State left by one invocation
    /// is visible to the next; a failed invocation drops its instance.
    pub reuse: Option<Spanned<u32>>,
    /// How a new version deployed while the gateway runs is tried and
    /// watched (`wasmgate deploy`).
    #[serde(default)]
    pub deploy: DeployConfig,
}

/// `[component.NAME.deploy]`: the smoke test of a deploy and the watch
/// after it that rolls a failing version back by itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// An event file (as `wasmgate invoke --event` reads) that the new
    /// version must handle successfully before it is swapped in.
    pub smoke_test: Option<Spanned<PathBuf>>,
    /// How long after a deploy its failure ratio is watched (default
    /// [`DeployConfig::DEFAULT_WATCH`]; `"0s"`: not watched).
    pub watch: Option<Spanned<HumanDuration>>,
    /// Invocations the new version must have run before its failure ratio
    /// counts (default [`DeployConfig::DEFAULT_MIN_INVOCATIONS`]).
    pub min_invocations: Option<Spanned<u32>>,
    /// The failure ratio past which the previous version comes back
    /// (default [`DeployConfig::DEFAULT_MAX_FAILURE_RATIO`]).
    pub max_failure_ratio: Option<Spanned<f64>>,
}

impl DeployConfig {
    /// The watch's length unless set.
    pub const DEFAULT_WATCH: Duration = Duration::from_secs(60);
    /// The invocations a watch needs unless set.
    pub const DEFAULT_MIN_INVOCATIONS: u32 = 10;
    /// The failure ratio a watch tolerates unless set.
    pub const DEFAULT_MAX_FAILURE_RATIO: f64 = 0.5;
    /// The longest watch.
    pub const MAX_WATCH: Duration = Duration::from_secs(24 * 3600);

    /// The watch's length.
    pub fn watch(&self) -> Duration {
        self.watch
            .as_ref()
            .map_or(Self::DEFAULT_WATCH, |w| w.get_ref().0)
    }

    /// The invocations a watch needs before it judges.
    pub fn min_invocations(&self) -> u32 {
        self.min_invocations
            .as_ref()
            .map_or(Self::DEFAULT_MIN_INVOCATIONS, |m| *m.get_ref())
    }

    /// The failure ratio a watch tolerates.
    pub fn max_failure_ratio(&self) -> f64 {
        self.max_failure_ratio
            .as_ref()
            .map_or(Self::DEFAULT_MAX_FAILURE_RATIO, |r| *r.get_ref())
    }
}

impl ComponentConfig {
    /// Requests per instance (see [`ComponentConfig::reuse`]).
    pub fn reuse(&self) -> u32 {
        self.reuse.as_ref().map_or(1, |r| *r.get_ref())
    }
}

fn default_limits() -> Spanned<LimitsConfig> {
    Spanned::new(0..0, LimitsConfig::default())
}

/// `limits = { fuel, memory, timeout, concurrency, publishes, publish_bytes }`;
/// omitted fields default.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// See [`Limits::fuel`].
    pub fuel: Option<u64>,
    /// See [`Limits::memory`].
    pub memory: Option<Size>,
    /// See [`Limits::timeout`].
    pub timeout: Option<HumanDuration>,
    /// See [`Limits::concurrency`].
    pub concurrency: Option<u32>,
    /// See [`Limits::publishes`].
    pub publishes: Option<u32>,
    /// See [`Limits::publish_bytes`].
    pub publish_bytes: Option<Size>,
    /// See [`Limits::keyvalue_ops`].
    pub keyvalue_ops: Option<u32>,
}

impl LimitsConfig {
    /// The limits with defaults filled in (not yet range-checked).
    pub fn resolve(&self) -> Limits {
        let d = Limits::default();
        Limits {
            fuel: self.fuel.unwrap_or(d.fuel),
            memory: self.memory.map_or(d.memory, |s| s.0),
            timeout: self.timeout.map_or(d.timeout, |t| t.0),
            concurrency: self.concurrency.unwrap_or(d.concurrency),
            publishes: self.publishes.unwrap_or(d.publishes),
            publish_bytes: self.publish_bytes.map_or(d.publish_bytes, |s| s.0),
            keyvalue_ops: self.keyvalue_ops.unwrap_or(d.keyvalue_ops),
        }
    }
}

/// `allow = { mqtt_publish, outbound_http }`: capabilities a component may use.
///
/// A component that imports a capability's interface must be granted it here,
/// or it is refused at load.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowConfig {
    /// Topic filters the component may publish to.
    pub mqtt_publish: Option<Vec<Spanned<String>>>,
    /// Topic filters a handled message's MQTT 5 response topic must match
    /// for the component to reply there. The response topic is chosen by
    /// whoever published the message, so replies need this grant; a reply
    /// through it is never retained.
    pub mqtt_response: Option<Vec<Spanned<String>>>,
    /// Hosts the component may send HTTP requests to.
    pub outbound_http: Option<Vec<Spanned<String>>>,
    /// Key-value buckets (`wasi:keyvalue`) the component may open; opening
    /// any other returns `access-denied`.
    pub keyvalue: Option<Vec<Spanned<String>>>,
}

impl AllowConfig {
    /// The parsed publish filters (validated at load, so parsing cannot fail here).
    pub fn publish_filters(&self) -> Vec<TopicFilter> {
        parse_filters(self.mqtt_publish.as_ref())
    }

    /// The parsed response-topic filters (validated at load).
    pub fn response_filters(&self) -> Vec<TopicFilter> {
        parse_filters(self.mqtt_response.as_ref())
    }

    /// Does the manifest grant MQTT publishing in any form (a publish ACL
    /// or replies on response topics)?
    pub fn grants_mqtt(&self) -> bool {
        self.mqtt_publish.is_some() || self.mqtt_response.is_some()
    }
}

fn parse_filters(filters: Option<&Vec<Spanned<String>>>) -> Vec<TopicFilter> {
    filters
        .into_iter()
        .flatten()
        .filter_map(|f| TopicFilter::parse(f.get_ref()).ok())
        .collect()
}

/// `[[trigger.http]]`, `[[trigger.mqtt]]`, `[[trigger.timer]]`,
/// `[[trigger.keyvalue]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    /// HTTP routes.
    #[serde(default)]
    pub http: Vec<HttpTrigger>,
    /// MQTT subscriptions.
    #[serde(default)]
    pub mqtt: Vec<MqttTrigger>,
    /// Schedules.
    #[serde(default)]
    pub timer: Vec<TimerTrigger>,
    /// Change streams of key-value buckets.
    #[serde(default)]
    pub keyvalue: Vec<keyvalue::KeyValueTrigger>,
}

/// One MQTT subscription bound to a component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTrigger {
    /// The component that handles the messages.
    pub component: Spanned<String>,
    /// Topic filter; `$share/GROUP/filter` for a shared subscription.
    pub topic: Spanned<String>,
    /// Subscription QoS: 0, 1 or 2.
    #[serde(default = "default_qos")]
    pub qos: Spanned<u8>,
    /// Deliver one message at a time, in arrival order (default false).
    #[serde(default)]
    pub ordered: bool,
    /// Without `ordered`: most messages of this trigger handled at once
    /// (default 16). Past it the trigger stops taking messages until one is
    /// settled.
    pub max_in_flight: Option<Spanned<u32>>,
    /// Retry policy for failed deliveries.
    pub retry: Option<RetryConfig>,
}

fn default_qos() -> Spanned<u8> {
    Spanned::new(0..0, 1)
}

/// `retry = { attempts, backoff, max_backoff, multiplier, jitter, max_event_age }`;
/// omitted fields default (see `delivery::RetryPolicy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts, the first delivery included (default 3).
    pub attempts: Option<Spanned<u32>>,
    /// Delay before the first retry (default 1 s).
    pub backoff: Option<Spanned<HumanDuration>>,
    /// Longest delay between attempts (default 60 s).
    pub max_backoff: Option<Spanned<HumanDuration>>,
    /// Growth factor of the delay, ≥ 1 (default 2).
    pub multiplier: Option<Spanned<f64>>,
    /// Fraction (0–1) of each delay taken off at random (default 0.1).
    pub jitter: Option<Spanned<f64>>,
    /// How long after its first attempt an event may still be retried.
    pub max_event_age: Option<Spanned<HumanDuration>>,
}

impl RetryConfig {
    fn check(&self, manifest: &Manifest, key: &str) -> Result<(), ManifestError> {
        if let Some(a) = &self.attempts
            && *a.get_ref() == 0
        {
            return Err(manifest.invalid(
                a.span(),
                &format!("{key}.attempts"),
                "must be at least 1 (the first delivery counts)".into(),
            ));
        }
        if let Some(m) = &self.multiplier
            && !(m.get_ref().is_finite() && *m.get_ref() >= 1.0 && *m.get_ref() <= 100.0)
        {
            return Err(manifest.invalid(
                m.span(),
                &format!("{key}.multiplier"),
                format!(
                    "{} is out of range: it must be between 1 and 100",
                    m.get_ref()
                ),
            ));
        }
        if let Some(j) = &self.jitter
            && !(0.0..=1.0).contains(j.get_ref())
        {
            return Err(manifest.invalid(
                j.span(),
                &format!("{key}.jitter"),
                format!(
                    "{} is out of range: it is a fraction between 0 and 1",
                    j.get_ref()
                ),
            ));
        }
        if let Some(a) = &self.max_event_age
            && a.get_ref().0.is_zero()
        {
            return Err(manifest.invalid(
                a.span(),
                &format!("{key}.max_event_age"),
                "must be greater than zero".into(),
            ));
        }
        Ok(())
    }
}

/// One schedule bound to a component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerTrigger {
    /// The component whose `on-tick` runs.
    pub component: Spanned<String>,
    /// Cron expression, 5 fields or 6 with seconds first.
    pub cron: Option<Spanned<String>>,
    /// Fixed interval, e.g. `"30s"`.
    pub every: Option<Spanned<HumanDuration>>,
    /// IANA time zone for `cron`, e.g. `Europe/Berlin`; default UTC.
    pub timezone: Option<Spanned<String>>,
    /// What to do when a tick is due while the previous run still runs.
    #[serde(default)]
    pub overlap: Overlap,
    /// What to do with ticks missed while the host was down.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// With `catch_up = "all"`: the most missed ticks to run (default 10).
    pub max_catch_up: Option<Spanned<u32>>,
    /// A missed tick older than this is never run (default: no limit).
    pub starting_deadline: Option<Spanned<HumanDuration>>,
    /// Anchor of an `every` interval, RFC 3339 (default: the Unix epoch).
    pub start_at: Option<Spanned<String>>,
    /// Spread: every tick of this timer is delayed by a fixed offset in
    /// `[0, jitter)` derived from the gateway name.
    pub jitter: Option<HumanDuration>,
    /// Retry policy for failed ticks.
    pub retry: Option<RetryConfig>,
}

impl TimerTrigger {
    /// The schedule as the guest's tick shows it.
    pub fn schedule_text(&self) -> String {
        match (&self.cron, &self.every) {
            (Some(c), _) => c.get_ref().clone(),
            (None, Some(e)) => format!("every {}", humantime::format_duration(e.get_ref().0)),
            (None, None) => String::new(),
        }
    }
}

/// Overlap policy of a timer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Run concurrently, up to the component's concurrency.
    Allow,
    /// Skip the tick (counted as missed).
    #[default]
    Forbid,
    /// Cancel the running invocation and start the new one.
    Replace,
}

/// Catch-up policy of a timer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Ignore missed ticks.
    Skip,
    /// Run once for the most recent missed tick.
    #[default]
    Latest,
    /// Run every missed tick.
    All,
}

impl Manifest {
    /// Reads, parses and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let source = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, source)
    }

    /// The state directory a manifest file names, read leniently: only its
    /// TOML syntax and `[gateway] state_dir` need be right (the CLI finds a
    /// running gateway's admin socket by it, even when the rest of the file
    /// is being edited into a manifest the gateway will refuse).
    pub fn state_dir_of(path: &Path) -> Result<PathBuf, ManifestError> {
        let source = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let syntax = |message: String| ManifestError::Syntax {
            path: path.display().to_string(),
            message,
        };
        let table: toml::Table =
            toml::from_str(&source).map_err(|e| syntax(e.to_string().trim_end().to_string()))?;
        let dir = match table.get("gateway").and_then(|g| g.get("state_dir")) {
            None => default_state_dir(),
            Some(toml::Value::String(s)) => PathBuf::from(s),
            Some(_) => return Err(syntax("gateway.state_dir: expected a path".into())),
        };
        if dir.is_absolute() {
            return Ok(dir);
        }
        let base = path.parent().filter(|p| !p.as_os_str().is_empty());
        Ok(base.unwrap_or(Path::new(".")).join(dir))
    }

    /// The manifest as written, without positions: two manifests that
    /// write a section alike have equal values there (see [`value_at`]; a
    /// reload compares them).
    pub fn written(&self) -> toml::Value {
        toml::from_str(&self.source)
            .map(toml::Value::Table)
            .unwrap_or(toml::Value::Table(toml::Table::new()))
    }

    /// Parses and validates manifest text that was read from `path`.
    pub fn parse(path: &Path, source: String) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(&source).map_err(|e| ManifestError::Syntax {
            path: path.display().to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base_dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let manifest = Manifest {
            path: path.to_path_buf(),
            base_dir,
            source,
            gateway: raw.gateway,
            http: raw.http,
            mqtt: raw.mqtt,
            components: BTreeMap::new(),
            triggers: raw.trigger,
            dead_letters: raw.dead_letters,
            admin: raw.admin,
            keyvalue: raw.keyvalue,
        };
        manifest.validate(raw.component)
    }

    /// The load-time pass over every section, in document order; each
    /// error names its key.
    fn validate(
        mut self,
        components: BTreeMap<Spanned<String>, ComponentConfig>,
    ) -> Result<Self, ManifestError> {
        self.check_signing()?;
        for (name, config) in components {
            self.check_component(&name, &config)?;
            self.components.insert(name.into_inner(), config);
        }
        if let Some(mqtt) = &self.mqtt {
            self.check_mqtt(mqtt)?;
        }
        self.check_dead_letters()?;
        self.check_admin()?;
        self.check_keyvalue()?;
        let triggers = self.triggers.clone();
        for (i, t) in triggers.http.iter().enumerate() {
            let key = format!("trigger.http[{i}]");
            for component in t.components() {
                self.check_component_ref(component, &key)?;
            }
        }
        if let Some(http) = &self.http {
            self.check_http_limits(http)?;
        }
        for (i, t) in triggers.mqtt.iter().enumerate() {
            self.check_mqtt_trigger(&format!("trigger.mqtt[{i}]"), t)?;
        }
        for (i, t) in triggers.timer.iter().enumerate() {
            self.check_timer_trigger(&format!("trigger.timer[{i}]"), t)?;
        }
        for (i, t) in triggers.keyvalue.iter().enumerate() {
            self.check_keyvalue_trigger(i, t)?;
        }
        Ok(self)
    }

    /// `[gateway] trusted_keys` and `require_signature`.
    fn check_signing(&self) -> Result<(), ManifestError> {
        for key in &self.gateway.trusted_keys {
            if let Err(message) = key.get_ref().parse::<signing::PublicKey>() {
                return Err(self.invalid(key.span(), "gateway.trusted_keys", message));
            }
        }
        if let Some(require) = &self.gateway.require_signature
            && *require.get_ref()
            && self.gateway.trusted_keys.is_empty()
        {
            return Err(self.invalid(
                require.span(),
                "gateway.require_signature",
                "no signature could be trusted: add the signers' public keys to trusted_keys (`wasmgate keygen` writes one)".into(),
            ));
        }
        Ok(())
    }

    /// `[admin]`: a TCP listener needs exactly one token source.
    fn check_admin(&self) -> Result<(), ManifestError> {
        let a = &self.admin;
        if let (Some(_), Some(env)) = (&a.token_file, &a.token_env) {
            return Err(self.invalid(
                env.span(),
                "admin.token_env",
                "set token_file or token_env, not both".into(),
            ));
        }
        if let Some(env) = &a.token_env
            && (env.get_ref().is_empty() || env.get_ref().contains(['=', '\0']))
        {
            return Err(self.invalid(
                env.span(),
                "admin.token_env",
                "not an environment variable name".into(),
            ));
        }
        if let Some(listen) = &a.listen
            && a.token_file.is_none()
            && a.token_env.is_none()
        {
            return Err(self.invalid(
                listen.span(),
                "admin.listen",
                "a TCP admin listener needs a bearer token: set token_file (a file holding it) or token_env (a variable holding it); the token never goes in the manifest".into(),
            ));
        }
        if let Some(tls) = &a.tls
            && a.listen.is_none()
        {
            return Err(self.invalid(
                tls.cert.span(),
                "admin.tls",
                "TLS is for the TCP listener: set admin.listen too (the local socket needs none)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The signers `[gateway] trusted_keys` names (validated at load).
    pub fn trusted_keys(&self) -> Vec<signing::PublicKey> {
        self.gateway
            .trusted_keys
            .iter()
            .filter_map(|k| k.get_ref().parse().ok())
            .collect()
    }

    /// Whether every component must carry a valid signature.
    pub fn requires_signature(&self) -> bool {
        self.gateway
            .require_signature
            .as_ref()
            .is_some_and(|r| *r.get_ref())
    }

    /// `[component.NAME]`: its name, source, limits, grants and reuse.
    fn check_component(
        &self,
        name: &Spanned<String>,
        config: &ComponentConfig,
    ) -> Result<(), ManifestError> {
        let key = format!("component.{}", name.get_ref());
        if let Err(message) = validate_component_name(name.get_ref()) {
            return Err(self.invalid(name.span(), &key, message));
        }
        if config.source.get_ref().as_os_str().is_empty() {
            return Err(self.invalid(
                config.source.span(),
                &format!("{key}.source"),
                "the path is empty".into(),
            ));
        }
        if let Err(message) = config.limits.get_ref().resolve().validate() {
            return Err(self.invalid(config.limits.span(), &format!("{key}.limits"), message));
        }
        for (field, filters) in [
            ("mqtt_publish", &config.allow.mqtt_publish),
            ("mqtt_response", &config.allow.mqtt_response),
        ] {
            for filter in filters.iter().flatten() {
                if let Err(message) = TopicFilter::parse(filter.get_ref()) {
                    return Err(self.invalid(
                        filter.span(),
                        &format!("{key}.allow.{field}"),
                        message,
                    ));
                }
            }
        }
        for bucket in config.allow.keyvalue.iter().flatten() {
            if let Err(message) = keyvalue::validate_bucket_name(bucket.get_ref()) {
                return Err(self.invalid(bucket.span(), &format!("{key}.allow.keyvalue"), message));
            }
        }
        for host in config.allow.outbound_http.iter().flatten() {
            let h = host.get_ref();
            if h.is_empty() || h.contains(['/', ' ']) {
                return Err(self.invalid(
                    host.span(),
                    &format!("{key}.allow.outbound_http"),
                    format!("{h:?} is not a host name (write e.g. \"api.example.com\" or \"*.example.com\")"),
                ));
            }
        }
        if let Some(r) = &config.reuse
            && *r.get_ref() == 0
        {
            return Err(self.invalid(
                r.span(),
                &format!("{key}.reuse"),
                "must be at least 1 (1 means a fresh instance per request)".into(),
            ));
        }
        self.check_deploy(&key, &config.deploy)
    }

    /// `[component.NAME.deploy]`.
    fn check_deploy(&self, key: &str, d: &DeployConfig) -> Result<(), ManifestError> {
        if let Some(w) = &d.watch
            && w.get_ref().0 > DeployConfig::MAX_WATCH
        {
            return Err(self.invalid(
                w.span(),
                &format!("{key}.deploy.watch"),
                "must be at most 24h".into(),
            ));
        }
        if let Some(m) = &d.min_invocations
            && *m.get_ref() == 0
        {
            return Err(self.invalid(
                m.span(),
                &format!("{key}.deploy.min_invocations"),
                "must be at least 1".into(),
            ));
        }
        if let Some(r) = &d.max_failure_ratio
            && !(0.0..1.0).contains(r.get_ref())
        {
            return Err(self.invalid(
                r.span(),
                &format!("{key}.deploy.max_failure_ratio"),
                format!(
                    "{} is not a ratio from 0 (no failure tolerated) up to, not including, 1",
                    r.get_ref()
                ),
            ));
        }
        if let Some(t) = &d.smoke_test
            && t.get_ref().as_os_str().is_empty()
        {
            return Err(self.invalid(
                t.span(),
                &format!("{key}.deploy.smoke_test"),
                "the path is empty".into(),
            ));
        }
        Ok(())
    }

    /// `[keyvalue]`: the store's and each bucket's bounds.
    fn check_keyvalue(&self) -> Result<(), ManifestError> {
        use keyvalue::KeyValueBounds as B;
        let kv = &self.keyvalue;
        if let Some(k) = &kv.max_key_bytes
            && !(1..=B::MAX_KEY_BYTES).contains(k.get_ref())
        {
            return Err(self.invalid(
                k.span(),
                "keyvalue.max_key_bytes",
                format!("must be between 1 and {}", B::MAX_KEY_BYTES),
            ));
        }
        if let Some(v) = &kv.max_value_bytes
            && !(1..=B::MAX_VALUE_BYTES).contains(&v.get_ref().0)
        {
            return Err(self.invalid(
                v.span(),
                "keyvalue.max_value_bytes",
                "must be between 1 byte and 16MiB".into(),
            ));
        }
        for (name, b) in &kv.bucket {
            let key = format!("keyvalue.bucket.{name}");
            if let Err(message) = keyvalue::validate_bucket_name(name) {
                return Err(self.invalid(b.span(), &key, message));
            }
            let c = b.get_ref();
            if c.max_keys == Some(0) {
                return Err(self.invalid(
                    b.span(),
                    &format!("{key}.max_keys"),
                    "must be at least 1".into(),
                ));
            }
            if c.stream_max_changes == Some(0) {
                return Err(self.invalid(
                    b.span(),
                    &format!("{key}.stream_max_changes"),
                    "must be at least 1".into(),
                ));
            }
            if c.stream_max_age.is_some_and(|a| a.0.is_zero()) {
                return Err(self.invalid(
                    b.span(),
                    &format!("{key}.stream_max_age"),
                    "must be greater than zero".into(),
                ));
            }
            if let Some(m) = c.stream_max_bytes
                && m.0 < 1024
            {
                return Err(self.invalid(
                    b.span(),
                    &format!("{key}.stream_max_bytes"),
                    "must be at least 1KiB".into(),
                ));
            }
            if let Some(m) = c.max_bytes
                && m.0 < 1024
            {
                return Err(self.invalid(
                    b.span(),
                    &format!("{key}.max_bytes"),
                    "must be at least 1KiB".into(),
                ));
            }
        }
        Ok(())
    }

    /// `[dead_letters]`: bounds and the topic records are published to.
    fn check_dead_letters(&self) -> Result<(), ManifestError> {
        if let Some(m) = &self.dead_letters.max_records
            && *m.get_ref() == 0
        {
            return Err(self.invalid(
                m.span(),
                "dead_letters.max_records",
                "must be at least 1".into(),
            ));
        }
        if let Some(b) = &self.dead_letters.max_bytes
            && b.get_ref().0 < 1024 * 1024
        {
            return Err(self.invalid(
                b.span(),
                "dead_letters.max_bytes",
                "must be at least 1MiB (the largest MQTT message the host takes)".into(),
            ));
        }
        if let Some(a) = &self.dead_letters.max_age
            && a.get_ref().0.is_zero()
        {
            return Err(self.invalid(
                a.span(),
                "dead_letters.max_age",
                "must be greater than zero".into(),
            ));
        }
        if let Some(t) = &self.dead_letters.mqtt_topic
            && let Err(message) = crate::topic::validate_name(t.get_ref())
        {
            return Err(self.invalid(t.span(), "dead_letters.mqtt_topic", message));
        }
        Ok(())
    }

    /// One `[[trigger.mqtt]]`.
    fn check_mqtt_trigger(&self, key: &str, t: &MqttTrigger) -> Result<(), ManifestError> {
        self.check_component_ref(&t.component, key)?;
        if let Err(message) = TopicFilter::parse(t.topic.get_ref()) {
            return Err(self.invalid(t.topic.span(), &format!("{key}.topic"), message));
        }
        if *t.qos.get_ref() > 2 {
            return Err(self.invalid(
                t.qos.span(),
                &format!("{key}.qos"),
                format!("{} is not a QoS: use 0, 1 or 2", t.qos.get_ref()),
            ));
        }
        if let Some(m) = &t.max_in_flight {
            if *m.get_ref() == 0 || *m.get_ref() > 10_000 {
                return Err(self.invalid(
                    m.span(),
                    &format!("{key}.max_in_flight"),
                    format!("{} is out of range: use 1 to 10000", m.get_ref()),
                ));
            }
            if t.ordered {
                return Err(self.invalid(
                    m.span(),
                    &format!("{key}.max_in_flight"),
                    "`ordered = true` handles one message at a time; remove one of the two".into(),
                ));
            }
        }
        if let Some(r) = &t.retry {
            r.check(self, &format!("{key}.retry"))?;
        }
        Ok(())
    }

    /// One `[[trigger.keyvalue]]`: its bucket, batch and retry, and that
    /// its component cannot trigger itself unless allowed to.
    fn check_keyvalue_trigger(
        &self,
        index: usize,
        t: &keyvalue::KeyValueTrigger,
    ) -> Result<(), ManifestError> {
        use keyvalue::KeyValueTrigger as T;
        let key = &format!("trigger.keyvalue[{index}]");
        self.check_component_ref(&t.component, key)?;
        let bucket = t.bucket.get_ref();
        if let Err(message) = keyvalue::validate_bucket_name(bucket) {
            return Err(self.invalid(t.bucket.span(), &format!("{key}.bucket"), message));
        }
        if let Some(b) = &t.batch_size
            && !(1..=T::MAX_BATCH_SIZE).contains(b.get_ref())
        {
            return Err(self.invalid(
                b.span(),
                &format!("{key}.batch_size"),
                format!(
                    "{} is out of range: use 1 to {}",
                    b.get_ref(),
                    T::MAX_BATCH_SIZE
                ),
            ));
        }
        if let Some(w) = &t.batch_window
            && w.get_ref().0 > T::MAX_BATCH_WINDOW
        {
            return Err(self.invalid(
                w.span(),
                &format!("{key}.batch_window"),
                "must be at most 5m".into(),
            ));
        }
        if let Some(p) = &t.key_prefix
            && (p.get_ref().is_empty()
                || p.get_ref().contains('\0')
                || p.get_ref().len() as u64 > keyvalue::KeyValueBounds::MAX_KEY_BYTES)
        {
            return Err(self.invalid(
                p.span(),
                &format!("{key}.key_prefix"),
                "must be 1 to 8192 bytes, without NUL (leave it out for every key)".into(),
            ));
        }
        let same = |o: &T| {
            o.component.get_ref() == t.component.get_ref()
                && o.bucket.get_ref() == bucket
                && o.key_prefix.as_ref().map(|p| p.get_ref())
                    == t.key_prefix.as_ref().map(|p| p.get_ref())
        };
        if let Some(j) = self.triggers.keyvalue[..index].iter().position(same) {
            return Err(self.invalid(
                t.bucket.span(),
                key,
                format!("the same component, bucket and key_prefix as trigger.keyvalue[{j}]: the two would share one checkpoint; make them one trigger"),
            ));
        }
        if let Some(r) = &t.retry {
            r.check(self, &format!("{key}.retry"))?;
        }
        if !t.allow_self_trigger
            && let Some(path) = self.keyvalue_loop(index)
        {
            return Err(self.invalid(
                t.bucket.span(),
                &format!("{key}.bucket"),
                format!(
                    "this trigger listens to bucket {bucket:?}, and {path}: each change can trigger another, possibly forever. Have the handlers write other buckets, or set allow_self_trigger = true on a trigger of the loop whose handler's writes end (e.g. it writes only keys outside key_prefix, or only when a value changes)"
                ),
            ));
        }
        Ok(())
    }

    /// A loop of key-value triggers back to the bucket of
    /// `trigger.keyvalue[start]`: its component may write that bucket, or a
    /// bucket another trigger listens to whose component may write it, and
    /// so on (a trigger with `allow_self_trigger` ends a loop). The path,
    /// in words.
    fn keyvalue_loop(&self, start: usize) -> Option<String> {
        let triggers = &self.triggers.keyvalue;
        let target = triggers[start].bucket.get_ref();
        let mut stack = vec![(start, Vec::<String>::new())];
        let mut seen = std::collections::BTreeSet::new();
        while let Some((i, path)) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            let component = triggers[i].component.get_ref();
            let Some(config) = self.components.get(component) else {
                continue;
            };
            for b in config.allow.keyvalue.iter().flatten() {
                let mut path = path.clone();
                path.push(format!(
                    "component {component:?} (trigger.keyvalue[{i}]) may write bucket {:?}",
                    b.get_ref()
                ));
                if b.get_ref() == target {
                    return Some(path.join(", which "));
                }
                for (j, t) in triggers.iter().enumerate() {
                    if t.bucket.get_ref() == b.get_ref() && !t.allow_self_trigger {
                        let mut path = path.clone();
                        path.push(format!("trigger.keyvalue[{j}] listens to"));
                        stack.push((j, path));
                    }
                }
            }
        }
        None
    }

    /// One `[[trigger.timer]]`: its options, then its schedule.
    fn check_timer_trigger(&self, key: &str, t: &TimerTrigger) -> Result<(), ManifestError> {
        if let Some(start) = &t.start_at {
            if t.every.is_none() {
                return Err(self.invalid(
                    start.span(),
                    &format!("{key}.start_at"),
                    "`start_at` anchors an `every` interval; it does not apply to `cron`".into(),
                ));
            }
            if chrono::DateTime::parse_from_rfc3339(start.get_ref()).is_err() {
                return Err(self.invalid(
                    start.span(),
                    &format!("{key}.start_at"),
                    format!(
                        "{:?} is not an RFC 3339 time (write e.g. \"2026-01-01T00:00:00Z\")",
                        start.get_ref()
                    ),
                ));
            }
        }
        if let Some(max) = &t.max_catch_up {
            if t.catch_up != CatchUp::All {
                return Err(self.invalid(
                    max.span(),
                    &format!("{key}.max_catch_up"),
                    "applies only with catch_up = \"all\"".into(),
                ));
            }
            if *max.get_ref() == 0 {
                return Err(self.invalid(
                    max.span(),
                    &format!("{key}.max_catch_up"),
                    "must be at least 1 (use catch_up = \"skip\" to run none)".into(),
                ));
            }
        }
        if let Some(d) = &t.starting_deadline
            && d.get_ref().0.is_zero()
        {
            return Err(self.invalid(
                d.span(),
                &format!("{key}.starting_deadline"),
                "must be greater than zero".into(),
            ));
        }
        if let Some(r) = &t.retry {
            r.check(self, &format!("{key}.retry"))?;
        }
        self.check_component_ref(&t.component, key)?;
        self.check_timer_schedule(key, t)
    }

    /// A timer's `cron` or `every`, and its time zone.
    fn check_timer_schedule(&self, key: &str, t: &TimerTrigger) -> Result<(), ManifestError> {
        match (&t.cron, &t.every) {
            (Some(_), Some(every)) => {
                return Err(self.invalid(
                    every.span(),
                    key,
                    "set either `cron` or `every`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(self.invalid(
                    t.component.span(),
                    key,
                    "a timer needs `cron = \"...\"` or `every = \"30s\"`".into(),
                ));
            }
            (Some(cron), None) => {
                let parser = croner::parser::CronParser::builder()
                    .year(croner::parser::Year::Disallowed)
                    .build();
                let parsed = parser.parse(cron.get_ref()).map_err(|e| {
                    self.invalid(
                        cron.span(),
                        &format!("{key}.cron"),
                        format!("{:?} is not a cron expression: {e}", cron.get_ref()),
                    )
                })?;
                if !cron_fires_at_all(&parsed) {
                    return Err(self.invalid(
                        cron.span(),
                        &format!("{key}.cron"),
                        format!("{:?} never fires: no date matches it", cron.get_ref()),
                    ));
                }
            }
            (None, Some(every)) => {
                if every.get_ref().0.is_zero() {
                    return Err(self.invalid(
                        every.span(),
                        &format!("{key}.every"),
                        "the interval must be greater than zero".into(),
                    ));
                }
            }
        }
        if let Some(tz) = &t.timezone
            && tz.get_ref().parse::<chrono_tz::Tz>().is_err()
        {
            return Err(self.invalid(
                tz.span(),
                &format!("{key}.timezone"),
                format!(
                    "{:?} is not an IANA time zone (write e.g. \"Europe/Berlin\" or \"UTC\")",
                    tz.get_ref()
                ),
            ));
        }
        Ok(())
    }

    /// `[mqtt]`: protocol version, spool and embedded broker, broker
    /// address and TLS files, then the session settings.
    fn check_mqtt(&self, mqtt: &MqttConfig) -> Result<(), ManifestError> {
        self.check_mqtt_version(mqtt)?;
        self.check_mqtt_spool(mqtt)?;
        self.check_mqtt_broker(mqtt)?;
        self.check_mqtt_session(mqtt)
    }

    /// `version`, and the MQTT 5 settings 3.1.1 cannot send.
    fn check_mqtt_version(&self, mqtt: &MqttConfig) -> Result<(), ManifestError> {
        let version = *mqtt.version.get_ref();
        match version {
            5 => {}
            3 => {
                // Settings MQTT 3.1.1 has no way to send.
                for (key, span) in [
                    (
                        "mqtt.session_expiry",
                        mqtt.session_expiry.as_ref().map(|v| v.span()),
                    ),
                    (
                        "mqtt.receive_maximum",
                        mqtt.receive_maximum.as_ref().map(|v| v.span()),
                    ),
                ] {
                    if let Some(span) = span {
                        return Err(self.invalid(
                            span,
                            key,
                            "exists only in MQTT 5: remove it, or use version = 5 (with 3.1.1 a session lasts until the broker drops it, and the broker's own in-flight limit applies)".into(),
                        ));
                    }
                }
            }
            _ => {
                return Err(self.invalid(
                    mqtt.version.span(),
                    "mqtt.version",
                    format!(
                        "{version} is not a supported MQTT version: use 5, or 3 for MQTT 3.1.1"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `spool` bounds and `embedded` broker settings.
    fn check_mqtt_spool(&self, mqtt: &MqttConfig) -> Result<(), ManifestError> {
        for (key, value) in [
            (
                "mqtt.spool.max_messages",
                mqtt.spool
                    .max_messages
                    .as_ref()
                    .map(|v| (v.span(), *v.get_ref())),
            ),
            (
                "mqtt.spool.max_bytes",
                mqtt.spool
                    .max_bytes
                    .as_ref()
                    .map(|v| (v.span(), v.get_ref().0)),
            ),
        ] {
            if let Some((span, 0)) = value {
                return Err(self.invalid(span, key, "must be at least 1".into()));
            }
        }
        if let Some(e) = &mqtt.embedded {
            if !mqtt.is_embedded() {
                return Err(self.invalid(
                    e.span(),
                    "mqtt.embedded",
                    "applies only with broker = \"embedded\"".into(),
                ));
            }
            self.check_embedded_broker(e.get_ref())?;
        }
        Ok(())
    }

    /// `[mqtt.embedded]`: bounds, and users with their hashes and filters.
    fn check_embedded_broker(&self, e: &EmbeddedBrokerConfig) -> Result<(), ManifestError> {
        for (key, value) in [
            ("mqtt.embedded.max_queued", &e.max_queued),
            ("mqtt.embedded.max_sessions", &e.max_sessions),
        ] {
            if let Some(q) = value
                && *q.get_ref() == 0
            {
                return Err(self.invalid(q.span(), key, "must be at least 1".into()));
            }
        }
        if let Some(x) = &e.max_session_expiry
            && x.get_ref().0 > Duration::from_secs(u32::MAX as u64)
        {
            return Err(self.invalid(
                x.span(),
                "mqtt.embedded.max_session_expiry",
                "must be at most 136 years".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for user in &e.users {
            let u = user.get_ref();
            let name = u.username.get_ref();
            if name.is_empty() || name.starts_with('$') || name.len() > 256 {
                return Err(self.invalid(
                    u.username.span(),
                    "mqtt.embedded.users.username",
                    format!("{name:?} is not allowed: 1 to 256 characters, not starting with '$' (reserved for the gateway)"),
                ));
            }
            if !seen.insert(name.clone()) {
                return Err(self.invalid(
                    u.username.span(),
                    "mqtt.embedded.users.username",
                    format!("{name:?} appears twice"),
                ));
            }
            if !u.password_hash.get_ref().starts_with("$argon2id$") {
                return Err(self.invalid(
                    u.password_hash.span(),
                    "mqtt.embedded.users.password_hash",
                    "is not an Argon2id hash: make one with `wasmgate hash-password` (it reads the password from stdin)".into(),
                ));
            }
            for (field, filters) in [("publish", &u.publish), ("subscribe", &u.subscribe)] {
                for f in filters {
                    if let Err(message) = TopicFilter::parse(f.get_ref()) {
                        return Err(self.invalid(
                            f.span(),
                            &format!("mqtt.embedded.users.{field}"),
                            message,
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// `broker`, and the TLS files an `mqtts://` broker needs (and only it).
    fn check_mqtt_broker(&self, mqtt: &MqttConfig) -> Result<(), ManifestError> {
        let tls = match BrokerUrl::parse(mqtt.broker.get_ref()) {
            Ok(url) => url.map(|u| u.tls),
            Err(message) => return Err(self.invalid(mqtt.broker.span(), "mqtt.broker", message)),
        };
        if tls != Some(true) {
            for (key, value) in [("ca", &mqtt.ca), ("cert", &mqtt.cert), ("key", &mqtt.key)] {
                if let Some(v) = value {
                    return Err(self.invalid(
                        v.span(),
                        &format!("mqtt.{key}"),
                        "applies only to an mqtts:// broker".into(),
                    ));
                }
            }
        }
        if tls == Some(true) && mqtt.ca.is_none() {
            return Err(self.invalid(
                mqtt.broker.span(),
                "mqtt.ca",
                "an mqtts:// broker needs `ca`, the CA certificate (PEM) that signed the broker's certificate".into(),
            ));
        }
        match (&mqtt.cert, &mqtt.key) {
            (Some(c), None) => {
                return Err(self.invalid(
                    c.span(),
                    "mqtt.cert",
                    "mutual TLS needs both `cert` and `key`".into(),
                ));
            }
            (None, Some(k)) => {
                return Err(self.invalid(
                    k.span(),
                    "mqtt.key",
                    "mutual TLS needs both `cert` and `key`".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Credentials, client id, keep-alive, session expiry, Receive Maximum.
    fn check_mqtt_session(&self, mqtt: &MqttConfig) -> Result<(), ManifestError> {
        if let Some(p) = &mqtt.password
            && mqtt.username.is_none()
        {
            return Err(self.invalid(
                p.span(),
                "mqtt.password",
                "a password needs a `username`".into(),
            ));
        }
        if let Some(id) = &mqtt.client_id
            && (id.get_ref().is_empty() || id.get_ref().len() > 256)
        {
            return Err(self.invalid(
                id.span(),
                "mqtt.client_id",
                "must be 1 to 256 characters".into(),
            ));
        }
        if let Some(k) = &mqtt.keep_alive
            && !(Duration::from_secs(5)..=Duration::from_secs(65_535)).contains(&k.get_ref().0)
        {
            // The MQTT client (rumqttc) refuses keep-alives under 5 s.
            return Err(self.invalid(
                k.span(),
                "mqtt.keep_alive",
                "must be between 5s and 65535s".into(),
            ));
        }
        if let Some(e) = &mqtt.session_expiry
            && e.get_ref().0 > Duration::from_secs(u32::MAX as u64)
        {
            return Err(self.invalid(
                e.span(),
                "mqtt.session_expiry",
                "must be at most 4294967295s (about 136 years)".into(),
            ));
        }
        if let Some(r) = &mqtt.receive_maximum
            && !(1..=65_535).contains(r.get_ref())
        {
            return Err(self.invalid(
                r.span(),
                "mqtt.receive_maximum",
                format!("{} is out of range: use 1 to 65535", r.get_ref()),
            ));
        }
        Ok(())
    }

    fn check_http_limits(&self, http: &HttpConfig) -> Result<(), ManifestError> {
        if let Some(b) = &http.max_body
            && b.get_ref().0 == 0
        {
            return Err(self.invalid(
                b.span(),
                "http.max_body",
                "must be greater than zero".into(),
            ));
        }
        for (key, value) in [
            ("http.header_timeout", &http.header_timeout),
            ("http.request_timeout", &http.request_timeout),
            ("http.idle_timeout", &http.idle_timeout),
            ("http.drain_timeout", &http.drain_timeout),
        ] {
            if let Some(t) = value
                && t.get_ref().0.is_zero()
            {
                return Err(self.invalid(t.span(), key, "must be greater than zero".into()));
            }
        }
        if let Some(n) = &http.max_connections
            && *n.get_ref() == 0
        {
            return Err(self.invalid(
                n.span(),
                "http.max_connections",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn check_component_ref(
        &self,
        component: &Spanned<String>,
        key: &str,
    ) -> Result<(), ManifestError> {
        if self.components.contains_key(component.get_ref()) {
            return Ok(());
        }
        let known: Vec<&str> = self.components.keys().map(String::as_str).collect();
        let known = if known.is_empty() {
            "none are defined".to_string()
        } else {
            format!("known: {}", known.join(", "))
        };
        Err(self.invalid(
            component.span(),
            &format!("{key}.component"),
            format!("unknown component {:?} ({known})", component.get_ref()),
        ))
    }

    /// An [`ManifestError::Invalid`] for the value at `span` (byte offsets
    /// into the file; `0..0` when the value has no position of its own).
    pub fn invalid(&self, span: Range<usize>, key: &str, message: String) -> ManifestError {
        let (line, column) = self.line_column(span.start);
        ManifestError::Invalid {
            path: self.path.display().to_string(),
            line,
            column,
            key: key.to_string(),
            message,
        }
    }

    fn line_column(&self, offset: usize) -> (usize, usize) {
        let before = &self.source[..offset.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, column)
    }

    /// Resolves a path from the manifest against the manifest's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The state directory, resolved.
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.gateway.state_dir)
    }
}

/// A manifest, or a part of it, as written ([`Manifest::written`]).
pub type Written = toml::Value;

/// The value at `path` in `v` ([`Manifest::written`]): table keys, and
/// array indices as numbers.
pub fn value_at<'v>(v: &'v toml::Value, path: &[&str]) -> Option<&'v toml::Value> {
    let mut v = v;
    for key in path {
        v = match v {
            toml::Value::Table(t) => t.get(*key)?,
            toml::Value::Array(a) => a.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// What happens to a message that does not fit in a full spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// The oldest waiting messages are dropped to make room (the default:
    /// for telemetry, the newest readings matter most).
    #[default]
    DropOldest,
    /// The new message is refused; what waits is kept.
    RefuseNew,
}

impl std::fmt::Display for OnFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnFull::DropOldest => "drop_oldest",
            OnFull::RefuseNew => "refuse_new",
        })
    }
}

/// Component names: a lowercase ASCII letter, then lowercase letters, digits,
/// `-` or `_`; at most 64 characters.
pub fn validate_component_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if first_ok && rest_ok && name.len() <= 64 {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid component name: use a lowercase letter, then lowercase letters, digits, '-' or '_' (at most 64)"
        ))
    }
}
