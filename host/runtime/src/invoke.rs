//! One invocation: a fresh `Store` and instance under the component's limits,
//! and exactly one [`Outcome`], whatever the guest does.
//!
//! [`Invocable::invoke`] is the one path every trigger takes: an MQTT
//! message, a timer tick, a queued event or a replayed dead letter (an
//! [`Event`]), and the HTTP trigger's streaming requests (an
//! [`HttpExchange`]). So the limits, the outcome (an HTTP guest that answers
//! with an error code or not at all has failed), instance reuse (`reuse`:
//! only a successful invocation's instance is kept, decided once the outcome
//! is final), logging and publishing (to the one [`PublishSink`]) are the
//! same whatever caused an invocation.
//!
//! The limits and how each is enforced:
//!
//! - **fuel**: the store gets the component's budget; running out traps with
//!   `OutOfFuel` → [`Status::FuelExhausted`].
//! - **memory**: [`MemoryLimiter`] sums all linear memories of the instance
//!   and refuses growth past the cap with a trap → [`Status::MemoryLimit`].
//! - **timeout**: the engine's epoch ticker calls back into the store every
//!   tick; past the deadline the guest is interrupted, before it the guest
//!   yields so one busy guest cannot starve the others. Time blocked in host
//!   calls (sleeps, I/O) is bounded by `tokio::time::timeout` around the whole
//!   invocation. Either way → [`Status::Timeout`].
//! - **concurrency**: a semaphore per component; no permit → [`Status::Throttled`]
//!   (or wait, if the caller asks to).

use crate::bindings::{
    self, HandlerError, Invocation, Message, MqttHandlerIndices, PublishError, Tick,
    TimerHandlerIndices,
};
use crate::capture::CapturedOutput;
use crate::sink::PublishSink;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmgate_manifest::limits::Limits;
use wasmgate_manifest::topic::{self, TopicFilter};
use wasmtime::component::{InstancePre, ResourceTable};
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::exports::wasi::http::incoming_handler::GuestIndices as HttpHandlerIndices;
pub use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// How many bytes of a guest's stdout and of its stderr one invocation keeps.
/// The rest is counted ([`Outcome::stdout_dropped_bytes`]) and discarded, so a
/// log flood costs bounded memory.
pub const OUTPUT_CAPTURE_BYTES: usize = 64 * 1024;

pub use crate::event::{
    Event, HTTP_BODY_CAPTURE_BYTES, HttpRequest, HttpResponse, KvBatch, KvChange, KvGap,
    KvOperation, KvWriter, MAX_PACKET_SIZE, MAX_PUBLISH_SIZE, MqttMessage, TimerTick,
};

/// The per-store state of one invocation.
pub struct State {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    http: WasiHttpCtx,
    hooks: OutboundPolicy,
    limiter: MemoryLimiter,
    publish: PublishState,
    pub(crate) keyvalue: crate::keyvalue::KeyValueState,
    /// Set when the HTTP response body of the running invocation was
    /// dropped before its end (see `crate::watched_body`).
    client_gone: Option<Arc<AtomicBool>>,
    /// The `first-failed` of a failed batch of key-value changes.
    first_failed: Option<u64>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// The error a memory-limit breach traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: growing to {desired} bytes, limit {limit} bytes")]
pub struct MemoryLimitExceeded {
    /// Total bytes the instance asked for.
    pub desired: u64,
    /// The limit.
    pub limit: u64,
}

/// The error a passed deadline traps with.
#[derive(Debug, thiserror::Error)]
#[error("deadline exceeded")]
pub struct DeadlineExceeded;

/// Caps the sum of all linear memories of one instance, plus the publishes
/// the host holds for it, and records the peak.
#[derive(Debug)]
pub struct MemoryLimiter {
    limit: u64,
    current: u64,
    /// Bytes of the invocation's accepted publishes, held by the host until
    /// the invocation ends: host memory the guest made the host spend.
    held: u64,
    peak: u64,
    breached: bool,
}

/// Most table elements one instance may hold (a table element is a pointer).
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.current - current as u64 + desired as u64;
        if total + self.held > self.limit {
            self.breached = true;
            return Err(MemoryLimitExceeded {
                desired: total + self.held,
                limit: self.limit,
            }
            .into());
        }
        self.current = total;
        self.peak = self.peak.max(total + self.held);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}

/// Outbound HTTP: only to hosts in the component's `allow.outbound_http`.
#[derive(Debug, Clone, Default)]
struct OutboundPolicy {
    allowed: Arc<Vec<String>>,
    component: String,
    denials: Arc<Denials>,
}

/// Calls a component made to a capability it was not granted (or outside
/// its grant), counted over its lifetime. The first of each kind is logged
/// at warn, the rest at debug: a guest calling in a loop cannot flood the
/// log.
#[derive(Debug, Default)]
pub struct Denials {
    /// `mqtt-publisher.publish` calls denied (`denied`).
    pub publishes: AtomicU64,
    /// `wasi:http/outgoing-handler.handle` calls denied
    /// (`HTTP-request-denied`).
    pub outbound_http: AtomicU64,
    /// `wasi:keyvalue/store.open` of a bucket not granted
    /// (`access-denied`).
    pub keyvalue: AtomicU64,
}

impl Denials {
    /// Counts one more; whether it is the first (to log at warn).
    pub(crate) fn count(counter: &AtomicU64) -> bool {
        counter.fetch_add(1, Ordering::Relaxed) == 0
    }
}

impl OutboundPolicy {
    fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed.iter().any(|pattern| {
            let pattern = pattern.to_ascii_lowercase();
            match pattern.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => host == pattern,
            }
        })
    }
}

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        hyper::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let host = request.uri().host().unwrap_or_default().to_string();
        if !self.allows(&host) {
            let why = if self.allowed.is_empty() {
                "the component is not granted outbound HTTP (allow.outbound_http)"
            } else {
                "host not in allow.outbound_http"
            };
            if Denials::count(&self.denials.outbound_http) {
                tracing::warn!(component = %self.component, host, reason = why, "outbound HTTP request denied (logged once per component; later denials are counted)");
            } else {
                tracing::debug!(component = %self.component, host, reason = why, "outbound HTTP request denied");
            }
            return Box::new(async { Err(ErrorCode::HttpRequestDenied.into()) });
        }
        drop(fut);
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// Publishing state of one invocation: the ACL, the response topic that is
/// always allowed, its budget, and what the guest published.
#[derive(Debug, Default)]
struct PublishState {
    component: String,
    acl: Arc<Vec<TopicFilter>>,
    /// `allow.mqtt_response`: the response topics the guest may reply on.
    response_acl: Arc<Vec<TopicFilter>>,
    response_topic: Option<String>,
    /// `limits.publishes` and `limits.publish_bytes`.
    max_count: u32,
    max_bytes: u64,
    published: Vec<MqttMessage>,
    /// Bytes of `published`.
    bytes: u64,
    denied: u64,
    /// The component's denials (see [`Denials`]).
    denials: Arc<Denials>,
    /// Publishes refused for the budget (logged once per invocation).
    over_budget: u64,
}

impl bindings::types::Host for State {}
impl bindings::mqtt_types::Host for State {}

impl bindings::mqtt_publisher::Host for State {
    async fn publish(&mut self, msg: Message) -> Result<(), PublishError> {
        if let Err(e) = topic::validate_name(&msg.topic) {
            return Err(PublishError::InvalidTopic(e));
        }
        let p = &mut self.publish;
        if !p.acl.iter().any(|f| f.matches(&msg.topic)) {
            let is_reply = p.response_topic.as_deref() == Some(msg.topic.as_str());
            let why = if p.acl.is_empty() && p.response_acl.is_empty() {
                format!(
                    "component {:?} is not granted MQTT publish (allow.mqtt_publish or allow.mqtt_response)",
                    p.component
                )
            } else if !is_reply {
                format!(
                    "topic {:?} is not allowed: it matches no filter in allow.mqtt_publish of component {:?} and is not the response topic",
                    msg.topic, p.component
                )
            } else if !p.response_acl.iter().any(|f| f.matches(&msg.topic)) {
                format!(
                    "the response topic {:?} is not allowed: it matches no filter in allow.mqtt_response (or allow.mqtt_publish) of component {:?}",
                    msg.topic, p.component
                )
            } else if msg.retain {
                "a reply on a response topic cannot be retained".to_string()
            } else {
                String::new()
            };
            if !why.is_empty() {
                p.denied += 1;
                if Denials::count(&p.denials.publishes) {
                    tracing::warn!(component = %p.component, topic = %msg.topic, reason = %why, "publish denied (logged once per component; later denials are counted)");
                } else {
                    tracing::debug!(component = %p.component, topic = %msg.topic, reason = %why, "publish denied");
                }
                return Err(PublishError::Denied(why));
            }
        }
        let m = MqttMessage::from(msg);
        let size = m.size();
        if size > MAX_PUBLISH_SIZE {
            return Err(PublishError::Unavailable(format!(
                "the message is {size} bytes (topic, payload and properties); the host sends at most {MAX_PUBLISH_SIZE}"
            )));
        }
        if let Err(why) = self.charge(size) {
            let p = &mut self.publish;
            p.over_budget += 1;
            if p.over_budget == 1 {
                tracing::warn!(component = %p.component, reason = %why, "publish refused: the invocation's publish budget is spent");
            }
            return Err(PublishError::Unavailable(why));
        }
        let p = &mut self.publish;
        p.bytes += size;
        self.limiter.held += size;
        self.limiter.peak = self
            .limiter
            .peak
            .max(self.limiter.current + self.limiter.held);
        p.published.push(m);
        Ok(())
    }
}

impl State {
    /// Checks one more publish of `size` bytes against the invocation's
    /// budget: `limits.publishes`, `limits.publish_bytes`, and the memory
    /// cap, which counts the publishes the host holds.
    fn charge(&self, size: u64) -> Result<(), String> {
        let p = &self.publish;
        if p.published.len() >= p.max_count as usize {
            return Err(format!(
                "this invocation has already published {} messages, its limit (limits.publishes of component {:?})",
                p.max_count, p.component
            ));
        }
        if p.bytes + size > p.max_bytes {
            return Err(format!(
                "this invocation has published {} bytes; {size} more would pass its limit of {} (limits.publish_bytes of component {:?})",
                p.bytes, p.max_bytes, p.component
            ));
        }
        let l = &self.limiter;
        if l.current + l.held + size > l.limit {
            return Err(format!(
                "{size} more bytes held by the host would pass the memory limit of {} bytes (linear memory {} + publishes {}; limits.memory of component {:?})",
                l.limit, l.current, l.held, p.component
            ));
        }
        Ok(())
    }
}

/// Identity of one invocation.
#[derive(Debug, Clone)]
pub struct InvocationContext {
    /// Unique id, kept across retries of one event.
    pub id: String,
    /// The trigger, e.g. `invoke`, `mqtt:a/+/b`.
    pub trigger: String,
    /// 1 for the first delivery.
    pub attempt: u32,
}

impl InvocationContext {
    /// A new context with a fresh (time-ordered) id.
    pub fn new(trigger: impl Into<String>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            trigger: trigger.into(),
            attempt: 1,
        }
    }
}

/// What happens when the component's concurrency is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Return [`Status::Throttled`] at once.
    Reject,
    /// Wait for a slot (backpressure).
    Wait,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// The handler returned `ok` (for HTTP: it produced a response).
    Ok,
    /// The handler returned a `handler-error`.
    HandlerError {
        /// `retry` or `reject`.
        kind: HandlerErrorKind,
        /// The guest's message.
        message: String,
    },
    /// The guest trapped (panic, `unreachable`, stack overflow, ...).
    Trap {
        /// What happened, without host internals.
        message: String,
    },
    /// The fuel budget ran out.
    FuelExhausted {
        /// The budget.
        fuel_limit: u64,
    },
    /// The instance tried to grow its memory past the cap.
    MemoryLimit {
        /// The cap in bytes.
        memory_limit: u64,
    },
    /// The deadline passed.
    Timeout {
        /// The timeout in milliseconds.
        timeout_ms: u64,
    },
    /// No concurrency slot was free.
    Throttled {
        /// The component's concurrency.
        concurrency: u32,
    },
    /// An HTTP guest trapped after its client had gone (the connection
    /// closed, or hyper stopped reading the response body): a write to a
    /// body nobody reads failed. Not the component's fault, so neither a
    /// failure in its counts nor a reason to roll a deploy back.
    ClientClosed {
        /// What the guest's trap said.
        message: String,
    },
}

impl Status {
    /// A short name: `ok`, `retry`, `reject`, `trap`, `fuel_exhausted`,
    /// `memory_limit`, `timeout`, `throttled`, `client_closed`.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::HandlerError {
                kind: HandlerErrorKind::Retry,
                ..
            } => "retry",
            Status::HandlerError {
                kind: HandlerErrorKind::Reject,
                ..
            } => "reject",
            Status::Trap { .. } => "trap",
            Status::FuelExhausted { .. } => "fuel_exhausted",
            Status::MemoryLimit { .. } => "memory_limit",
            Status::Timeout { .. } => "timeout",
            Status::Throttled { .. } => "throttled",
            Status::ClientClosed { .. } => "client_closed",
        }
    }

    /// Whether the component failed: any outcome but `ok`, `throttled`
    /// (the host refused it before the guest ran) and `client_closed`
    /// (the client went away). What a component's failure count and a
    /// deploy's failure ratio count.
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            Status::Ok | Status::Throttled { .. } | Status::ClientClosed { .. }
        )
    }
}

/// The two kinds of `handler-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerErrorKind {
    /// Transient: retry with backoff.
    Retry,
    /// Permanent: dead-letter at once.
    Reject,
}

/// The result of one invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// How it ended (flattened: `"status": "...", ...details`).
    #[serde(flatten)]
    pub status: Status,
    /// The invocation id.
    pub invocation_id: String,
    /// The component.
    pub component: String,
    /// The trigger.
    pub trigger: String,
    /// The attempt number.
    pub attempt: u32,
    /// Fuel burned (0 when fuel is not counted).
    pub fuel_consumed: u64,
    /// Peak bytes of all linear memories together.
    pub memory_peak_bytes: u64,
    /// Wall-clock duration in microseconds, instantiation included.
    pub duration_us: u64,
    /// Captured stdout (lossy UTF-8), at most [`OUTPUT_CAPTURE_BYTES`].
    pub stdout: String,
    /// Captured stderr (lossy UTF-8), at most [`OUTPUT_CAPTURE_BYTES`].
    pub stderr: String,
    /// Bytes of stdout discarded past the capture limit.
    pub stdout_dropped_bytes: u64,
    /// Bytes of stderr discarded past the capture limit.
    pub stderr_dropped_bytes: u64,
    /// Messages the guest published (accepted by the ACL).
    pub published: Vec<MqttMessage>,
    /// Publishes the ACL refused.
    pub publish_denied: u64,
    /// The HTTP response, for HTTP events that produced one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_response: Option<HttpResponse>,
    /// For a batch of key-value changes that failed: the sequence number
    /// of the first change the handler says failed (those before it are
    /// handled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failed: Option<u64>,
}

impl Outcome {
    /// Whether the invocation succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }
}

/// A store for one invocation (or, with reuse, for several in a row).
struct StoreRun {
    store: Store<State>,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
    /// When the current invocation's time is up.
    deadline: Instant,
}

impl StoreRun {
    /// Gives the store a full fuel budget and a deadline `limits.timeout`
    /// after `started`, enforced through epoch interruption.
    fn arm(&mut self, fuel: bool, limits: Limits, started: Instant) {
        if fuel {
            self.store
                .set_fuel(limits.fuel)
                .expect("fuel is enabled on this engine");
        }
        let deadline = started + limits.timeout;
        self.deadline = deadline;
        let limiter = &mut self.store.data_mut().limiter;
        limiter.breached = false;
        // A reused store reports the peak of this invocation only.
        limiter.peak = limiter.current;
        self.store.set_epoch_deadline(1);
        self.store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(DeadlineExceeded.into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
    }
}

/// The body of a request in an [`HttpExchange`].
pub type HttpBody = UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Where the guest's response (or the `error-code` it answered with) goes.
pub type ResponseSender =
    tokio::sync::oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;

/// One request of the HTTP trigger for `wasi:http/incoming-handler`: the
/// request body streams into the guest, and the response head goes to the
/// [`ResponseSender`] as soon as the guest sets it, its body streaming out
/// while the guest runs. The invocation — and its limits — lasts until the
/// guest's `handle` returns.
pub struct HttpExchange {
    request: hyper::Request<HttpBody>,
    scheme: Scheme,
    response: ResponseSender,
}

impl HttpExchange {
    /// An exchange for `request` (an absolute-URI request) whose response
    /// goes to `response`. Dropped unanswered (e.g. throttled), `response`
    /// is closed.
    pub fn new<B>(request: hyper::Request<B>, scheme: Scheme, response: ResponseSender) -> Self
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        Self {
            request: request.map(|b| b.map_err(Into::into).boxed_unsync()),
            scheme,
            response,
        }
    }
}

impl std::fmt::Debug for HttpExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpExchange")
            .field("method", self.request.method())
            .field("uri", self.request.uri())
            .finish_non_exhaustive()
    }
}

/// What [`Invocable::invoke`] runs: a stored event or a live HTTP exchange.
#[derive(Debug)]
pub enum Input {
    /// An event (MQTT message, timer tick, buffered HTTP request).
    Event(Event),
    /// A streaming `wasi:http` exchange from the HTTP trigger.
    Http(HttpExchange),
}

impl From<Event> for Input {
    fn from(e: Event) -> Self {
        Input::Event(e)
    }
}

impl From<HttpExchange> for Input {
    fn from(e: HttpExchange) -> Self {
        Input::Http(e)
    }
}

/// A component ready to be invoked: its pre-instantiated code, limits,
/// grants, concurrency slots and warm instances.
pub struct Invocable {
    /// Component name.
    pub name: String,
    /// The code and settings new invocations run; swapped by a deploy, a
    /// rollback or a reload.
    version: std::sync::RwLock<Arc<Version>>,
    /// Calls denied to capabilities it was not granted (see [`Denials`]).
    pub denials: Arc<Denials>,
    /// As many permits as the current settings' concurrency (a reload
    /// that changes it adds permits, or takes them back as invocations
    /// end).
    slots: Arc<Semaphore>,
    fuel: bool,
    ticker: crate::engine::EpochTicker,
    invocations: AtomicU64,
    failures: AtomicU64,
    sink: std::sync::OnceLock<Arc<dyn PublishSink>>,
    keyvalue: std::sync::OnceLock<Arc<dyn crate::keyvalue::KeyValue>>,
    metrics: std::sync::OnceLock<Arc<crate::metrics::InvocationMetrics>>,
    last_error: std::sync::Mutex<Option<LastError>>,
}

/// What the manifest sets for a component besides its code: limits,
/// grants, environment, instance reuse, and the concurrency slots.
#[derive(Clone)]
pub struct Settings {
    /// Its limits.
    pub limits: Limits,
    publish_acl: Arc<Vec<TopicFilter>>,
    response_acl: Arc<Vec<TopicFilter>>,
    outbound_http: Arc<Vec<String>>,
    /// `allow.keyvalue`.
    keyvalue: Arc<Vec<String>>,
    env: Arc<Vec<(String, String)>>,
    /// Invocations per instance (`reuse`; 1: fresh each time).
    reuse: u32,
}

/// One version of a component's code with the settings it runs under: what
/// an invocation instantiates. An invocation keeps the version it started
/// on to its end, so a deploy or a reload that swaps in another one never
/// changes the code or the limits under a running invocation.
pub struct Version {
    /// SHA-256 of the component file, lowercase hex.
    pub digest: String,
    /// Who signed it, when its signature was verified.
    pub signer: Option<String>,
    settings: Settings,
    pre: InstancePre<State>,
    mqtt: Option<MqttHandlerIndices>,
    timer: Option<TimerHandlerIndices>,
    kv_stream: Option<crate::bindings::KvStreamHandlerIndices>,
    http: Option<HttpHandlerIndices>,
    /// Healthy instances of this version waiting for their next invocation.
    warm: std::sync::Mutex<Vec<WarmInstance>>,
    /// Shared by the versions of the same code under other settings (a
    /// reload during a deploy's watch keeps what the watch judges).
    counts: Arc<VersionCounts>,
}

/// What a version ran and answered for.
#[derive(Debug, Default)]
struct VersionCounts {
    invocations: AtomicU64,
    failures: AtomicU64,
}

impl Version {
    fn new(
        pre: InstancePre<State>,
        digest: String,
        signer: Option<String>,
        settings: Settings,
    ) -> Self {
        Self {
            digest,
            signer,
            settings,
            mqtt: MqttHandlerIndices::new(&pre).ok(),
            timer: TimerHandlerIndices::new(&pre).ok(),
            kv_stream: crate::bindings::KvStreamHandlerIndices::new(&pre).ok(),
            http: HttpHandlerIndices::new(&pre).ok(),
            pre,
            warm: std::sync::Mutex::default(),
            counts: Arc::default(),
        }
    }

    /// The same code under other settings (a fresh warm pool).
    fn with_settings(&self, settings: Settings) -> Self {
        let mut v = Self::new(
            self.pre.clone(),
            self.digest.clone(),
            self.signer.clone(),
            settings,
        );
        v.counts = self.counts.clone();
        v
    }

    /// Whether it exports the handler `h` (a deployed version checked
    /// against the triggers of a reloaded manifest).
    pub fn exports(&self, h: crate::component::Handler) -> bool {
        use crate::component::Handler;
        match h {
            Handler::Mqtt => self.mqtt.is_some(),
            Handler::Timer => self.timer.is_some(),
            Handler::KeyValue => self.kv_stream.is_some(),
            Handler::Http => self.http.is_some(),
        }
    }

    /// Invocations this version ran and answered for (throttled ones never
    /// reach a version; client-closed ones are not counted).
    pub fn invocations(&self) -> u64 {
        self.counts.invocations.load(Ordering::Relaxed)
    }

    /// Of those, the failures ([`Status::is_failure`]).
    pub fn failures(&self) -> u64 {
        self.counts.failures.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Version")
            .field("digest", &self.digest)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// The last invocation of a component that did not succeed.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Its invocation id.
    pub invocation_id: String,
    /// [`Status::name`].
    pub outcome: &'static str,
    /// The trigger text of its context.
    pub trigger: String,
}

/// An instance kept for its next invocation (`reuse` > 1).
struct WarmInstance {
    run: StoreRun,
    instance: Loaded,
    served: u32,
}

/// An instance and the handlers already looked up in it: a reused instance
/// does not look its exports up again.
struct Loaded {
    instance: wasmtime::component::Instance,
    mqtt: Option<bindings::exports::wasmgate::edge::mqtt_handler::Guest>,
    timer: Option<bindings::exports::wasmgate::edge::timer_handler::Guest>,
    kv_stream: Option<bindings::kv_stream::exports::wasmgate::edge::kv_stream_handler::Guest>,
    http: Option<wasmtime_wasi_http::p2::bindings::exports::wasi::http::incoming_handler::Guest>,
}

impl std::fmt::Debug for Invocable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invocable")
            .field("name", &self.name)
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

impl Invocable {
    /// Wraps a component pre-instantiated on `engine`.
    pub fn new(
        name: String,
        pre: InstancePre<State>,
        limits: Limits,
        publish_acl: Vec<TopicFilter>,
        outbound_http: Vec<String>,
        engine: &crate::engine::HostEngine,
    ) -> Self {
        let settings = Settings {
            limits,
            publish_acl: Arc::new(publish_acl),
            response_acl: Arc::new(Vec::new()),
            outbound_http: Arc::new(outbound_http),
            keyvalue: Arc::default(),
            env: Arc::default(),
            reuse: 1,
        };
        Self {
            name,
            version: std::sync::RwLock::new(Arc::new(Version::new(
                pre,
                String::new(),
                None,
                settings,
            ))),
            denials: Arc::default(),
            slots: Arc::new(Semaphore::new(limits.concurrency as usize)),
            fuel: engine.fuel(),
            ticker: engine.ticker().clone(),
            invocations: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            sink: std::sync::OnceLock::new(),
            keyvalue: std::sync::OnceLock::new(),
            metrics: std::sync::OnceLock::new(),
            last_error: std::sync::Mutex::default(),
        }
    }

    /// Keeps an instance that handled an invocation successfully for up to
    /// `reuse` invocations, one at a time (the manifest's `reuse`; 1, the
    /// default, is a fresh instance each time). State one invocation leaves
    /// in the instance is seen by the next; an invocation that fails in any
    /// way — a trap, a limit, a `handler-error`, an HTTP guest that answers
    /// with an error code or not at all — drops its instance.
    pub fn with_reuse(mut self, reuse: u32) -> Self {
        self.settings_mut().reuse = reuse.max(1);
        self
    }

    /// Runs it under `limits` (before the component is shared).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.slots = Arc::new(Semaphore::new(limits.concurrency as usize));
        self.settings_mut().limits = limits;
        self
    }

    /// The first version's settings, before the component is shared.
    fn settings_mut(&mut self) -> &mut Settings {
        let v = self
            .version
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        &mut Arc::get_mut(v)
            .expect("settings are set before the component is shared")
            .settings
    }

    /// Lets the guest reply on a handled message's response topic when the
    /// topic matches one of `acl` (`allow.mqtt_response`).
    pub fn with_response_acl(mut self, acl: Vec<TopicFilter>) -> Self {
        self.settings_mut().response_acl = Arc::new(acl);
        self
    }

    /// Lets the guest open these key-value buckets (`allow.keyvalue`).
    pub fn with_keyvalue(mut self, buckets: Vec<String>) -> Self {
        self.settings_mut().keyvalue = Arc::new(buckets);
        self
    }

    /// Sets the environment variables the guest sees.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Self {
        self.settings_mut().env = Arc::new(env);
        self
    }

    /// Sends the publishes of every successful invocation to `sink`,
    /// whatever triggered it (the first sink set stays). Without one (as in
    /// `wasmgate invoke`) publishes are only recorded in the outcome.
    pub fn set_publish_sink(&self, sink: Arc<dyn PublishSink>) {
        let _ = self.sink.set(sink);
    }

    /// Keeps the buckets the guest opens in `store` (the first store set
    /// stays). Without one, opening a granted bucket returns an error.
    pub fn set_keyvalue(&self, store: Arc<dyn crate::keyvalue::KeyValue>) {
        let _ = self.keyvalue.set(store);
    }

    /// The publish sink, once one is set.
    pub fn publish_sink(&self) -> Option<&Arc<dyn PublishSink>> {
        self.sink.get()
    }

    /// Sets the digest and signer of the first version (before the
    /// component is shared).
    pub fn with_identity(self, digest: String, signer: Option<String>) -> Self {
        {
            let mut v = self.version.write().expect("version lock");
            let pre = v.pre.clone();
            let settings = v.settings.clone();
            *v = Arc::new(Version::new(pre, digest, signer, settings));
        }
        self
    }

    /// Its limits (the current version's).
    pub fn limits(&self) -> Limits {
        self.version().settings.limits
    }

    /// A compiled component as a version of this one, under its current
    /// settings (a deploy).
    pub fn version_of(&self, compiled: crate::component::Compiled) -> Version {
        Version::new(
            compiled.pre,
            compiled.digest,
            compiled.signer.map(|s| s.to_string()),
            self.version().settings.clone(),
        )
    }

    /// `v`'s code under this component's current settings (a rollback
    /// to a version kept from before a reload).
    pub fn rebase(&self, v: &Version) -> Arc<Version> {
        Arc::new(v.with_settings(self.version().settings.clone()))
    }

    /// Takes the settings of `next` (the same component built from a
    /// reloaded manifest) and, unless `keep_code`, its code too; returns the
    /// version it replaces. Invocations running on that one finish on it,
    /// under its settings.
    pub fn reconfigure(&self, next: &Invocable, keep_code: bool) -> Arc<Version> {
        let incoming = next.version();
        let settings = incoming.settings.clone();
        let current = self.version();
        let (was, will) = (
            current.settings.limits.concurrency as usize,
            settings.limits.concurrency as usize,
        );
        if will > was {
            self.slots.add_permits(will - was);
        } else if will < was {
            // Free slots go now; the rest as the invocations holding them end.
            let owed = (was - will) - self.slots.forget_permits(was - will);
            if let Ok(owed) = u32::try_from(owed)
                && owed > 0
            {
                let slots = self.slots.clone();
                tokio::spawn(async move {
                    if let Ok(p) = slots.acquire_many_owned(owed).await {
                        p.forget();
                    }
                });
            }
        }
        let version = if keep_code {
            current.with_settings(settings)
        } else {
            incoming.with_settings(settings)
        };
        self.swap(Arc::new(version))
    }

    /// The version new invocations run.
    pub fn version(&self) -> Arc<Version> {
        self.version
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `next` the version new invocations run and returns the one it
    /// replaces; invocations running on that one finish on it.
    pub fn swap(&self, next: Arc<Version>) -> Arc<Version> {
        let old = std::mem::replace(
            &mut *self
                .version
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            next,
        );
        // Its warm instances go: were it swapped back in, it starts fresh.
        old.warm.lock().expect("warm pool").clear();
        old
    }

    /// Instances kept for reuse (`reuse` > 1), waiting for an invocation.
    pub fn warm_instances(&self) -> usize {
        self.version().warm.lock().expect("warm pool").len()
    }

    /// Invocations started so far.
    pub fn invocations(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    /// Invocations through [`Self::invoke`] that failed
    /// ([`Status::is_failure`]: throttled and client-closed ones are not).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Invocations running now.
    pub fn in_flight(&self) -> u32 {
        let free = u32::try_from(self.slots.available_permits()).unwrap_or(u32::MAX);
        self.limits().concurrency.saturating_sub(free)
    }

    /// Records every invocation's outcome in `metrics` from now on (the
    /// first set stays).
    pub fn set_metrics(&self, metrics: Arc<crate::metrics::InvocationMetrics>) {
        metrics.declare(&self.name);
        let _ = self.metrics.set(metrics);
    }

    /// The last invocation that failed ([`Status::is_failure`]), if any.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs one invocation — the one path every trigger takes — logs one
    /// line with its outcome (a successful HTTP exchange at debug level) and,
    /// when it succeeded, hands what the guest published to the publish sink
    /// and waits until the sink has them (sent, spooled, or counted as lost).
    pub async fn invoke(
        &self,
        input: impl Into<Input>,
        ctx: InvocationContext,
        admission: Admission,
    ) -> Outcome {
        let input = input.into();
        let quiet_success = matches!(input, Input::Http(_));
        let (mut outcome, version) = self.invoke_on_version(input, ctx, admission).await;
        if let Some(sink) = self.sink.get()
            && outcome.is_ok()
            && !outcome.published.is_empty()
        {
            let lost = sink.publish(&self.name, outcome.published.clone()).await;
            let lost: Vec<_> = lost.into_iter().filter(|l| l.qos > 0).collect();
            if let Some(first) = lost.first() {
                // Its output is gone: the event must not count as handled.
                outcome.status = Status::HandlerError {
                    kind: HandlerErrorKind::Retry,
                    message: format!(
                        "{} of its {} publishes could neither be sent nor spooled (the first, to {:?}: {})",
                        lost.len(),
                        outcome.published.len(),
                        first.topic,
                        first.reason
                    ),
                };
            }
        }
        log_invocation(&outcome, quiet_success);
        if let Some(metrics) = self.metrics.get() {
            metrics.record(&outcome);
        }
        // A deploy's watch judges the invocations the component answered
        // for: not those whose client went away.
        if let Some(v) = &version
            && !matches!(outcome.status, Status::ClientClosed { .. })
        {
            v.counts.invocations.fetch_add(1, Ordering::Relaxed);
            if outcome.status.is_failure() {
                v.counts.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        if outcome.status.is_failure() {
            self.failures.fetch_add(1, Ordering::Relaxed);
            let at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            *self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(LastError {
                at_ms,
                invocation_id: outcome.invocation_id.clone(),
                outcome: outcome.status.name(),
                trigger: outcome.trigger.clone(),
            });
        }
        outcome
    }

    /// [`Self::invoke`] without the log line and the publish sink
    /// (benchmarks).
    pub async fn invoke_quiet(
        &self,
        input: impl Into<Input>,
        ctx: InvocationContext,
        admission: Admission,
    ) -> Outcome {
        self.invoke_on_version(input.into(), ctx, admission).await.0
    }

    /// Runs one invocation on the current version; returns the version it
    /// ran on (none when it was throttled).
    async fn invoke_on_version(
        &self,
        input: Input,
        ctx: InvocationContext,
        admission: Admission,
    ) -> (Outcome, Option<Arc<Version>>) {
        let started = Instant::now();
        let slots = self.slots.clone();
        let permit: OwnedSemaphorePermit = match admission {
            Admission::Reject => match slots.try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let status = Status::Throttled {
                        concurrency: self.limits().concurrency,
                    };
                    return (self.bare_outcome(&ctx, status, started), None);
                }
            },
            Admission::Wait => slots.acquire_owned().await.expect("semaphore never closes"),
        };
        self.invocations.fetch_add(1, Ordering::Relaxed);
        // The limits (and the reported duration) start once the invocation
        // has its slot: time spent waiting for one is not the guest's.
        let started = Instant::now();
        let version = self.version();
        let outcome = self.run(&version, input, &ctx, started).await;
        drop(permit);
        (outcome, Some(version))
    }

    fn bare_outcome(&self, ctx: &InvocationContext, status: Status, started: Instant) -> Outcome {
        Outcome {
            status,
            invocation_id: ctx.id.clone(),
            component: self.name.clone(),
            trigger: ctx.trigger.clone(),
            attempt: ctx.attempt,
            fuel_consumed: 0,
            memory_peak_bytes: 0,
            duration_us: started.elapsed().as_micros() as u64,
            stdout: String::new(),
            stderr: String::new(),
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
            published: Vec::new(),
            publish_denied: 0,
            http_response: None,
            first_failed: None,
        }
    }

    /// Runs the guest in a warm or a fresh store; the outcome is final
    /// (HTTP answers included) before the instance may go back to the warm
    /// pool, and only a successful invocation's instance goes back.
    async fn run(
        &self,
        v: &Version,
        input: Input,
        ctx: &InvocationContext,
        started: Instant,
    ) -> Outcome {
        let _ticking = self.ticker.busy();
        let response_topic = match &input {
            Input::Event(Event::Mqtt(m)) => m.response_topic.clone(),
            _ => None,
        };
        let reuse = v.settings.reuse;
        let warm = if reuse > 1 {
            v.warm.lock().expect("warm pool").pop()
        } else {
            None
        };
        let (mut run, mut instance, served) = match warm {
            Some(mut w) => {
                w.run.store.data_mut().publish.response_topic = response_topic;
                (w.run, Some(w.instance), w.served)
            }
            None => (self.new_store(v, response_topic), None, 0),
        };
        if !v.settings.keyvalue.is_empty() {
            // Who writes, for the buckets' change streams.
            run.store.data_mut().keyvalue.origin = Some(Arc::new(crate::keyvalue::Origin {
                invocation: ctx.id.clone(),
                component: self.name.clone(),
                trigger: ctx.trigger.clone(),
            }));
        }
        run.arm(self.fuel, v.settings.limits, started);
        let mut http_response = None;
        let remaining = run.deadline.saturating_duration_since(Instant::now());
        let result = tokio::time::timeout(
            remaining,
            self.call(
                v,
                &mut run.store,
                &mut instance,
                input,
                (ctx, started),
                &mut http_response,
            ),
        )
        .await;
        let mut outcome = self.finish(&mut run, v.settings.limits, ctx, started, result);
        outcome.http_response = http_response;
        if reuse > 1
            && outcome.is_ok()
            && served + 1 < reuse
            && let Some(instance) = instance
        {
            v.warm.lock().expect("warm pool").push(WarmInstance {
                run,
                instance,
                served: served + 1,
            });
        }
        outcome
    }

    /// The `invocation` record the guest sees.
    fn wit_invocation(&self, v: &Version, ctx: &InvocationContext, started: Instant) -> Invocation {
        Invocation {
            id: ctx.id.clone(),
            component: self.name.clone(),
            trigger: ctx.trigger.clone(),
            attempt: ctx.attempt,
            deadline_ms: unix_ms(
                SystemTime::now() + v.settings.limits.timeout.saturating_sub(started.elapsed()),
            ),
        }
    }

    /// A new store with its own WASI context, output capture, memory
    /// limiter and publish state. [`StoreRun::arm`] sets fuel and deadline.
    fn new_store(&self, v: &Version, response_topic: Option<String>) -> StoreRun {
        let s = &v.settings;
        let stdout = CapturedOutput::new(OUTPUT_CAPTURE_BYTES);
        let stderr = CapturedOutput::new(OUTPUT_CAPTURE_BYTES);
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&[self.name.as_str()])
            .envs(&s.env)
            // No preopened directories, no network: a guest gets neither files
            // nor sockets unless a future capability grants them.
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: OutboundPolicy {
                allowed: s.outbound_http.clone(),
                component: self.name.clone(),
                denials: self.denials.clone(),
            },
            limiter: MemoryLimiter {
                limit: s.limits.memory,
                current: 0,
                held: 0,
                peak: 0,
                breached: false,
            },
            publish: PublishState {
                component: self.name.clone(),
                denials: self.denials.clone(),
                acl: s.publish_acl.clone(),
                response_acl: s.response_acl.clone(),
                response_topic,
                max_count: s.limits.publishes,
                max_bytes: s.limits.publish_bytes,
                ..PublishState::default()
            },
            keyvalue: crate::keyvalue::KeyValueState {
                component: self.name.clone(),
                origin: None,
                store: self.keyvalue.get().cloned(),
                grants: s.keyvalue.clone(),
                max_ops: s.limits.keyvalue_ops,
                ops: 0,
                open: 0,
                denials: self.denials.clone(),
            },
            client_gone: None,
            first_failed: None,
        };
        let mut store = Store::new(v.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        StoreRun {
            store,
            stdout,
            stderr,
            deadline: Instant::now(),
        }
    }

    /// Turns the result of a call into an [`Outcome`]; takes the captured
    /// output and the publish counters (the store stays usable).
    fn finish(
        &self,
        run: &mut StoreRun,
        limits: Limits,
        ctx: &InvocationContext,
        started: Instant,
        result: Result<wasmtime::Result<Result<(), HandlerError>>, tokio::time::error::Elapsed>,
    ) -> Outcome {
        let fuel_consumed = if self.fuel {
            limits
                .fuel
                .saturating_sub(run.store.get_fuel().unwrap_or(0))
        } else {
            0
        };
        let status = match result {
            Err(_elapsed) => Status::Timeout {
                timeout_ms: limits.timeout.as_millis() as u64,
            },
            Ok(Ok(Ok(()))) => Status::Ok,
            Ok(Ok(Err(HandlerError::Retry(message)))) => Status::HandlerError {
                kind: HandlerErrorKind::Retry,
                message,
            },
            Ok(Ok(Err(HandlerError::Reject(message)))) => Status::HandlerError {
                kind: HandlerErrorKind::Reject,
                message,
            },
            Ok(Err(e)) => {
                let data = run.store.data_mut();
                match classify(&e, &limits, data.limiter.breached) {
                    Status::Trap { message }
                        if data
                            .client_gone
                            .as_ref()
                            .is_some_and(|g| g.load(Ordering::Relaxed)) =>
                    {
                        Status::ClientClosed { message }
                    }
                    status => status,
                }
            }
        };
        run.store.data_mut().client_gone = None;
        let (out, out_dropped) = run.stdout.take();
        let (err, err_dropped) = run.stderr.take();
        let data = run.store.data_mut();
        data.limiter.held = 0;
        data.publish.bytes = 0;
        data.publish.over_budget = 0;
        // A reused instance starts its next invocation with a full budget.
        data.keyvalue.ops = 0;
        Outcome {
            fuel_consumed,
            memory_peak_bytes: data.limiter.peak,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            stdout_dropped_bytes: out_dropped,
            stderr_dropped_bytes: err_dropped,
            published: std::mem::take(&mut data.publish.published),
            publish_denied: std::mem::take(&mut data.publish.denied),
            http_response: None,
            first_failed: data.first_failed.take(),
            ..self.bare_outcome(ctx, status, started)
        }
    }

    /// The instance to call: the warm one, or a new one.
    async fn instance<'a>(
        v: &Version,
        store: &mut Store<State>,
        instance: &'a mut Option<Loaded>,
    ) -> wasmtime::Result<&'a mut Loaded> {
        Ok(match instance {
            Some(loaded) => loaded,
            None => instance.insert(Loaded {
                instance: v.pre.instantiate_async(store).await?,
                mqtt: None,
                timer: None,
                kv_stream: None,
                http: None,
            }),
        })
    }

    /// Calls the handler for `input`. The outer `Result` is a trap or host
    /// error; the inner one the guest's `handler-error`.
    async fn call(
        &self,
        v: &Version,
        store: &mut Store<State>,
        instance: &mut Option<Loaded>,
        input: Input,
        (ctx, started): (&InvocationContext, Instant),
        http_response: &mut Option<HttpResponse>,
    ) -> wasmtime::Result<Result<(), HandlerError>> {
        match input {
            Input::Event(Event::Mqtt(msg)) => {
                let Some(indices) = &v.mqtt else {
                    return Ok(Err(not_exported(crate::component::Handler::Mqtt)));
                };
                let loaded = Self::instance(v, store, instance).await?;
                if loaded.mqtt.is_none() {
                    loaded.mqtt = Some(indices.load(&mut *store, &loaded.instance)?);
                }
                let guest = loaded.mqtt.as_ref().expect("looked up above");
                let ctx = self.wit_invocation(v, ctx, started);
                guest
                    .call_handle_message(&mut *store, &ctx, &Message::from(&msg))
                    .await
            }
            Input::Event(Event::Timer(tick)) => {
                let Some(indices) = &v.timer else {
                    return Ok(Err(not_exported(crate::component::Handler::Timer)));
                };
                let loaded = Self::instance(v, store, instance).await?;
                if loaded.timer.is_none() {
                    loaded.timer = Some(indices.load(&mut *store, &loaded.instance)?);
                }
                let guest = loaded.timer.as_ref().expect("looked up above");
                let ctx = self.wit_invocation(v, ctx, started);
                let tick = Tick {
                    schedule: tick.schedule,
                    scheduled_at_ms: tick.scheduled_at_ms,
                    fired_at_ms: tick.fired_at_ms,
                    missed: tick.missed,
                };
                guest.call_on_tick(&mut *store, &ctx, &tick).await
            }
            Input::Event(Event::KeyValue(batch)) => {
                let Some(indices) = &v.kv_stream else {
                    return Ok(Err(not_exported(crate::component::Handler::KeyValue)));
                };
                let loaded = Self::instance(v, store, instance).await?;
                if loaded.kv_stream.is_none() {
                    loaded.kv_stream = Some(indices.load(&mut *store, &loaded.instance)?);
                }
                let guest = loaded.kv_stream.as_ref().expect("looked up above");
                let ctx = self.wit_invocation(v, ctx, started);
                let (gap, changes) = crate::event::wit_batch(batch);
                match guest
                    .call_handle_changes(&mut *store, &ctx, gap, &changes)
                    .await?
                {
                    Ok(()) => Ok(Ok(())),
                    Err(e) => {
                        store.data_mut().first_failed = e.first_failed;
                        Ok(Err(e.error))
                    }
                }
            }
            // Boxed: a rare path (`invoke`, replays) whose large future
            // would otherwise grow every invocation's future, which is
            // moved into its task on every request.
            Input::Event(Event::Http(request)) => {
                Box::pin(self.call_buffered_http(v, store, instance, request, http_response)).await
            }
            Input::Http(exchange) => {
                self.call_http(
                    v,
                    store,
                    instance,
                    exchange.request,
                    exchange.scheme,
                    exchange.response,
                )
                .await
            }
        }
    }

    /// A buffered request (`wasmgate invoke`, replays): the response is
    /// collected, up to [`HTTP_BODY_CAPTURE_BYTES`], while the guest runs
    /// (it may stream more than a pipe's buffer).
    async fn call_buffered_http(
        &self,
        v: &Version,
        store: &mut Store<State>,
        instance: &mut Option<Loaded>,
        request: HttpRequest,
        http_response: &mut Option<HttpResponse>,
    ) -> wasmtime::Result<Result<(), HandlerError>> {
        let mut builder = hyper::Request::builder()
            .method(request.method.as_str())
            .uri(format!("http://{}{}", request.authority, request.path));
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let req = builder
            .body(
                Full::new(Bytes::from(request.body))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| wasmtime::format_err!("invalid request: {e}"))?;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let returned = tokio::sync::Notify::new();
        let call = async {
            let r = self
                .call_http(v, store, instance, req, Scheme::Http, sender)
                .await;
            returned.notify_one();
            r
        };
        let collect = async {
            let mut receiver = receiver;
            let response = tokio::select! {
                biased;
                r = &mut receiver => r.ok(),
                // Returned without an answer: there is none to wait for.
                _ = returned.notified() => receiver.try_recv().ok(),
            };
            match response {
                Some(Ok(response)) => Some(collect_response(response).await),
                _ => None,
            }
        };
        let (called, response) = tokio::join!(call, collect);
        *http_response = response;
        called
    }

    /// Runs `wasi:http/incoming-handler` for `request`. The guest's answer
    /// goes to `response` as soon as it sets it; a guest that returns
    /// without setting one, or answers with an `error-code`, has failed
    /// (a trap), so its instance is not reused and the caller sees why.
    async fn call_http(
        &self,
        v: &Version,
        store: &mut Store<State>,
        instance: &mut Option<Loaded>,
        request: hyper::Request<HttpBody>,
        scheme: Scheme,
        response: ResponseSender,
    ) -> wasmtime::Result<Result<(), HandlerError>> {
        let Some(indices) = &v.http else {
            return Ok(Err(not_exported(crate::component::Handler::Http)));
        };
        let loaded = Self::instance(v, store, instance).await?;
        if loaded.http.is_none() {
            loaded.http = Some(indices.load(&mut *store, &loaded.instance)?);
        }
        let guest = loaded.http.as_ref().expect("looked up above");
        let answer = Arc::new(std::sync::Mutex::new(Answer::None));
        let seen = answer.clone();
        let head = request.method() == hyper::Method::HEAD;
        let gone = Arc::new(AtomicBool::new(false));
        store.data_mut().client_gone = Some(gone.clone());
        let (req, out) = {
            let mut http = store.data_mut().http();
            let req = http.new_incoming_request(scheme, request)?;
            let out = http.new_response_outparam_from_callback(move |r| {
                *seen.lock().expect("answer lock") = match &r {
                    Ok(_) => Answer::Response,
                    Err(code) => Answer::Error(format!("{code:?}")),
                };
                let r = r.map(|r| {
                    if head || matches!(r.status().as_u16(), 204 | 304) {
                        crate::watched_body::without_body(r)
                    } else {
                        r.map(|body| crate::watched_body::WatchedBody::wrap(body, gone))
                    }
                });
                // The client may have gone; the guest goes on regardless.
                let _ = response.send(r);
            })?;
            (req, out)
        };
        guest.call_handle(&mut *store, req, out).await?;
        let answer = std::mem::replace(&mut *answer.lock().expect("answer lock"), Answer::None);
        match answer {
            Answer::Response => Ok(Ok(())),
            Answer::Error(code) => Err(wasmtime::format_err!(
                "the guest answered with an error: {code}"
            )),
            Answer::None => Err(wasmtime::format_err!(
                "the guest returned without setting a response"
            )),
        }
    }
}

/// What an HTTP guest did with its `response-outparam`.
enum Answer {
    None,
    Response,
    Error(String),
}

/// Reads a response's head and up to [`HTTP_BODY_CAPTURE_BYTES`] of its body.
async fn collect_response(response: hyper::Response<HyperOutgoingBody>) -> HttpResponse {
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            let room = HTTP_BODY_CAPTURE_BYTES.saturating_sub(bytes.len());
            bytes.extend_from_slice(&data[..room.min(data.len())]);
        }
    }
    HttpResponse {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: bytes,
    }
}

/// Logs one line with an invocation's outcome, then the guest's output, one
/// line each, tagged with the invocation id. With `quiet_success` (HTTP
/// exchanges, which are high volume) a success logs its `invocation` line at
/// debug level (set `WASMGATE_LOG=info,wasmgate::invocation=debug` to see
/// every one); a failure, and what the guest wrote, always at info.
fn log_invocation(outcome: &Outcome, quiet_success: bool) {
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                target: "wasmgate::invocation",
                id = %outcome.invocation_id,
                component = %outcome.component,
                trigger = %outcome.trigger,
                attempt = outcome.attempt,
                outcome = outcome.status.name(),
                duration_us = outcome.duration_us,
                fuel = outcome.fuel_consumed,
                memory_peak = outcome.memory_peak_bytes,
                "invocation"
            )
        };
    }
    if quiet_success && outcome.is_ok() {
        line!(debug);
    } else {
        line!(info);
    }
    for (stream, text) in [("stdout", &outcome.stdout), ("stderr", &outcome.stderr)] {
        for line in text.lines() {
            tracing::info!(
                target: "wasmgate::guest",
                id = %outcome.invocation_id,
                component = %outcome.component,
                stream,
                "{line}"
            );
        }
    }
}

fn not_exported(handler: crate::component::Handler) -> HandlerError {
    HandlerError::Reject(format!(
        "the component does not export {}",
        handler.interface()
    ))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Turns a trap or host error into a status. Messages carry what the guest
/// did, never host paths or backtraces.
fn classify(e: &wasmtime::Error, limits: &Limits, memory_breached: bool) -> Status {
    if memory_breached
        || e.chain()
            .any(|c| c.downcast_ref::<MemoryLimitExceeded>().is_some())
    {
        return Status::MemoryLimit {
            memory_limit: limits.memory,
        };
    }
    if e.chain()
        .any(|c| c.downcast_ref::<DeadlineExceeded>().is_some())
    {
        return Status::Timeout {
            timeout_ms: limits.timeout.as_millis() as u64,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Status::FuelExhausted {
            fuel_limit: limits.fuel,
        },
        Some(Trap::Interrupt) => Status::Timeout {
            timeout_ms: limits.timeout.as_millis() as u64,
        },
        Some(trap) => Status::Trap {
            message: trap.to_string(),
        },
        None => Status::Trap {
            message: e.root_cause().to_string(),
        },
    }
}
