//! The admin listener: `/metrics` (Prometheus), `/healthz`, and the JSON
//! API under `/v1/`, built with axum on the gateway's tokio runtime.
//!
//! It is always served on the Unix socket `state_dir/admin.sock` (mode
//! 0600: the local CLI, `wasmgate status`), and on TCP when `[admin]
//! listen` is set. On TCP every request but `/metrics`, `/healthz` and the
//! status page `/` (which shows what `/metrics` shows) must carry
//! `Authorization: Bearer TOKEN` (401 otherwise; the comparison takes
//! the same time wherever the tokens differ).
//!
//! Bounds, since a TCP client may be hostile: [`MAX_CONNECTIONS`] served at
//! once per listener (more wait in the accept queue), [`HEAD_TIMEOUT`] to
//! send a request head, [`IDLE_TIMEOUT`] for a connection with no request,
//! and every route answers from memory or one bounded store query.

use crate::deploy::{DeployError, Deployer};
use crate::metrics::GatewayMetrics;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use wasmgate_manifest::Manifest;
use wasmgate_manifest::admin::{MAX_TOKEN_FILE_BYTES, validate_token};
use wasmgate_runtime::deployment::Deployment;
use wasmgate_runtime::invoke::{Invocable, LastError};
use wasmgate_store::deadletter::DeadLetterStore;
use wasmgate_store::queue::EventQueue;
use wasmgate_trigger_mqtt::MqttStats;

/// The Unix socket's file name in `state_dir`.
pub const SOCKET_NAME: &str = "admin.sock";
/// Connections one admin listener serves at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed this long after it was accepted (long enough to
/// upload and compile a large component).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// What the admin routes read.
pub struct AdminState {
    metrics: Arc<GatewayMetrics>,
    gateway: String,
    state_dir: PathBuf,
    started: Instant,
    deployment: Arc<Deployment>,
    deployer: Arc<Deployer>,
    reloader: std::sync::OnceLock<Arc<crate::reload::Reloader>>,
    mqtt: std::sync::OnceLock<Arc<MqttStats>>,
    stores: std::sync::OnceLock<(Arc<DeadLetterStore>, Arc<EventQueue>)>,
    keyvalue: std::sync::OnceLock<wasmgate_store::keyvalue::KeyValueStore>,
    rates: crate::page::Rates,
    /// One deploy's upload is read at a time: each may be as large as a
    /// component file may be.
    uploads: Arc<Semaphore>,
}

impl AdminState {
    /// The state of `deployment`, with its metrics.
    pub fn new(
        deployment: &Arc<Deployment>,
        deployer: Arc<Deployer>,
        metrics: Arc<GatewayMetrics>,
        started: Instant,
    ) -> Self {
        let m = &deployment.current().manifest;
        Self {
            metrics,
            gateway: m.gateway.name.clone(),
            state_dir: m.state_dir(),
            started,
            deployment: deployment.clone(),
            deployer,
            reloader: std::sync::OnceLock::new(),
            mqtt: std::sync::OnceLock::new(),
            stores: std::sync::OnceLock::new(),
            keyvalue: std::sync::OnceLock::new(),
            rates: crate::page::Rates::default(),
            uploads: Arc::new(Semaphore::new(1)),
        }
    }

    /// Per component: invocations started and failures.
    fn counts(&self) -> crate::page::Counts {
        self.deployment
            .current()
            .components
            .iter()
            .map(|(name, c)| (name.clone(), (c.invocations(), c.failures())))
            .collect()
    }

    /// The dead-letter store, once the gateway opened it.
    pub(crate) fn dead_letters(&self) -> Option<Arc<DeadLetterStore>> {
        self.stores.get().map(|(d, _)| d.clone())
    }

    /// A component of the running gateway.
    pub(crate) fn component(&self, name: &str) -> Option<Arc<Invocable>> {
        self.deployment.current().components.get(name).cloned()
    }

    /// What `POST /v1/reload` runs, once the gateway is up.
    pub fn set_reloader(&self, reloader: Arc<crate::reload::Reloader>) {
        let _ = self.reloader.set(reloader);
    }

    /// The MQTT trigger's counters.
    pub fn set_mqtt(&self, stats: Arc<MqttStats>) {
        let _ = self.mqtt.set(stats);
    }

    /// The dead-letter store and the event queue.
    pub fn set_stores(&self, dead_letters: Arc<DeadLetterStore>, queue: Arc<EventQueue>) {
        let _ = self.stores.set((dead_letters, queue));
    }

    /// The key-value store, for the buckets' sizes.
    pub fn set_keyvalue(&self, store: wasmgate_store::keyvalue::KeyValueStore) {
        let _ = self.keyvalue.set(store);
    }

    /// Each bucket that holds something, with its bounds (from the running
    /// manifest).
    async fn buckets(&self) -> Option<Vec<serde_json::Value>> {
        let usage = self.keyvalue.get()?.usage().await.ok()?;
        let bounds = self.deployment.current().manifest.keyvalue.bounds();
        Some(
            usage
                .into_iter()
                .map(|u| {
                    let b = bounds.bucket(&u.name);
                    serde_json::json!({
                        "name": u.name,
                        "keys": u.keys,
                        "bytes": u.bytes,
                        "max_keys": b.max_keys,
                        "max_bytes": b.max_bytes,
                    })
                })
                .collect(),
        )
    }
}

/// One trigger of the manifest, as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
struct TriggerStatus {
    trigger: String,
    component: String,
    source: String,
    paused: bool,
}

/// The triggers, each with whether it is paused now.
fn trigger_statuses(state: &AdminState) -> Vec<TriggerStatus> {
    let current = state.deployment.current();
    triggers(&current.manifest)
        .into_iter()
        .map(|t| TriggerStatus {
            paused: current
                .pauses
                .get(&t.trigger)
                .is_some_and(|p| p.is_paused()),
            ..t
        })
        .collect()
}

/// `POST /v1/triggers/LABEL/pause` and `/resume`.
async fn set_paused(state: &AdminState, label: &str, paused: bool) -> Response {
    let current = state.deployment.current();
    let Some(pause) = current.pauses.get(label) else {
        return error(
            404,
            format!(
                "no trigger {label:?}: name one as status lists them (http[0], mqtt[1], timer[2], keyvalue[0])"
            ),
        );
    };
    let changed = pause.set(paused);
    if changed {
        tracing::warn!(
            trigger = label,
            paused,
            "{}",
            if paused {
                "trigger paused"
            } else {
                "trigger resumed"
            }
        );
    }
    axum::Json(serde_json::json!({ "trigger": label, "paused": paused, "changed": changed }))
        .into_response()
}

async fn pause(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(label): axum::extract::Path<String>,
) -> Response {
    set_paused(&state, &label, true).await
}

async fn resume(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(label): axum::extract::Path<String>,
) -> Response {
    set_paused(&state, &label, false).await
}

fn triggers(m: &Manifest) -> Vec<TriggerStatus> {
    let mut out = Vec::new();
    for (i, t) in m.triggers.http.iter().enumerate() {
        for c in t.components() {
            out.push(TriggerStatus {
                trigger: format!("http[{i}]"),
                component: c.get_ref().clone(),
                source: format!("priority {}", t.priority.get_ref()),
                paused: false,
            });
        }
    }
    for (i, t) in m.triggers.mqtt.iter().enumerate() {
        out.push(TriggerStatus {
            trigger: format!("mqtt[{i}]"),
            component: t.component.get_ref().clone(),
            source: t.topic.get_ref().clone(),
            paused: false,
        });
    }
    for (spec, t) in wasmgate_trigger_timer::specs(m)
        .into_iter()
        .zip(&m.triggers.timer)
    {
        out.push(TriggerStatus {
            trigger: spec.label.trim_start_matches("trigger.").to_string(),
            component: t.component.get_ref().clone(),
            source: spec.schedule_text,
            paused: false,
        });
    }
    for (spec, t) in wasmgate_trigger_keyvalue::specs(m)
        .into_iter()
        .zip(&m.triggers.keyvalue)
    {
        out.push(TriggerStatus {
            trigger: spec.label.trim_start_matches("trigger.").to_string(),
            component: t.component.get_ref().clone(),
            source: spec.trigger_text(),
            paused: false,
        });
    }
    out
}

/// The bearer token of `[admin]` (from its file or variable), checked.
pub fn read_token(m: &Manifest) -> Result<Option<String>, String> {
    let a = &m.admin;
    let text = if let Some(file) = &a.token_file {
        let path = m.resolve(file.get_ref());
        let len = std::fs::metadata(&path)
            .map_err(|e| format!("admin.token_file: cannot read {}: {e}", path.display()))?
            .len();
        if len > MAX_TOKEN_FILE_BYTES {
            return Err(format!(
                "admin.token_file: {} has {len} bytes; a token file holds one token (at most {MAX_TOKEN_FILE_BYTES} bytes)",
                path.display()
            ));
        }
        std::fs::read_to_string(&path)
            .map_err(|e| format!("admin.token_file: cannot read {}: {e}", path.display()))?
    } else if let Some(var) = &a.token_env {
        std::env::var(var.get_ref()).map_err(|_| {
            format!(
                "admin.token_env: the environment variable {} is not set (or not UTF-8)",
                var.get_ref()
            )
        })?
    } else {
        return Ok(None);
    };
    let token = text.trim().to_string();
    let key = if a.token_file.is_some() {
        "admin.token_file"
    } else {
        "admin.token_env"
    };
    validate_token(&token).map_err(|e| format!("{key}: {e}"))?;
    Ok(Some(token))
}

/// The routes, with the bearer check when `token` is set.
fn router(state: Arc<AdminState>, token: Option<Arc<str>>) -> Router {
    let api = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/components", get(components))
        .route("/v1/components/{name}", get(component))
        .route("/v1/components/{name}/deploy", post(deploy))
        .route("/v1/components/{name}/rollback", post(rollback))
        .route("/v1/reload", post(reload))
        .route("/v1/triggers/{label}/pause", post(pause))
        .route("/v1/triggers/{label}/resume", post(resume))
        .route("/v1/dead-letters", get(crate::dlq_api::list))
        .route("/v1/dead-letters/replay", post(crate::dlq_api::replay_many))
        .route("/v1/dead-letters/purge", post(crate::dlq_api::purge))
        .route("/v1/dead-letters/{id}", get(crate::dlq_api::show))
        .route(
            "/v1/dead-letters/{id}/replay",
            post(crate::dlq_api::replay_one),
        );
    let api = match token {
        Some(token) => api.layer(axum::middleware::from_fn(move |req, next| {
            require_token(token.clone(), req, next)
        })),
        None => api,
    };
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state)
}

async fn require_token(token: Arc<str>, req: Request, next: Next) -> Response {
    if bearer_matches(req.headers(), &token) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "send Authorization: Bearer TOKEN (the token of [admin])\n",
        )
            .into_response()
    }
}

/// Whether the request carries `Bearer token`. Both sides are hashed first
/// and the digests compared in constant time: neither the length nor the
/// first differing byte shows in the time taken.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let a = ring::digest::digest(&ring::digest::SHA256, given.trim().as_bytes());
    let b = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    // The collector reads the stores (SQLite): off the async workers.
    match tokio::task::spawn_blocking(move || state.metrics.encode()).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The status page (see [`crate::page`]).
async fn page(State(state): State<Arc<AdminState>>) -> Response {
    let s = state.clone();
    let (queue_depth, dead_letters) = tokio::task::spawn_blocking(move || {
        s.stores.get().map(|(dead_letters, queue)| {
            (
                queue.len().ok(),
                dead_letters
                    .counts_by_component()
                    .ok()
                    .map(|v| v.into_iter().collect::<BTreeMap<_, _>>()),
            )
        })
    })
    .await
    .ok()
    .flatten()
    .unwrap_or((None, None));
    let mqtt = state.mqtt.get();
    let summary = crate::page::Summary {
        gateway: state.gateway.clone(),
        uptime_s: state.started.elapsed().as_secs(),
        mqtt_connected: mqtt.map(|m| m.connected.load(Ordering::Relaxed)),
        queue_depth,
        spool_messages: mqtt.map(|m| m.spool_waiting.load(Ordering::Relaxed)),
        deploys: state.deployer.recent(10),
        triggers: trigger_statuses(&state)
            .into_iter()
            .map(|t| (t.trigger, t.component, t.source, t.paused))
            .collect(),
    };
    let rows: Vec<crate::page::Row> = component_statuses(&state)
        .into_iter()
        .map(|c| crate::page::Row {
            dead_letters: dead_letters
                .as_ref()
                .map(|d| d.get(&c.name).copied().unwrap_or(0)),
            failures: c.failures,
            digest: c.digest,
            invocations: c.invocations,
            in_flight: (c.in_flight, c.concurrency),
            last_error: c
                .last_error
                .map(|e| format!("{} ({})", e.outcome, e.invocation_id)),
            name: c.name,
        })
        .collect();
    let rates = state.rates.per_minute(&state.counts());
    axum::response::Html(crate::page::render(&summary, &rows, &rates)).into_response()
}

/// One component, as `/v1/status` shows it.
#[derive(Debug, Serialize)]
struct ComponentStatus {
    name: String,
    /// The active version (`sha256:…`).
    digest: String,
    /// Who signed it, when verified.
    signer: Option<String>,
    /// Active (its digest and signer) and previous versions, the running
    /// watch and the last deploys and rollbacks.
    versions: Option<crate::deploy::Versions>,
    fuel: u64,
    memory_bytes: u64,
    timeout_ms: u64,
    concurrency: u32,
    in_flight: u32,
    invocations: u64,
    failures: u64,
    last_error: Option<LastError>,
}

fn component_statuses(state: &AdminState) -> Vec<ComponentStatus> {
    state
        .deployment
        .current()
        .components
        .iter()
        .map(|(name, c)| (name, c, c.limits()))
        .map(|(name, c, limits)| ComponentStatus {
            name: name.clone(),
            digest: format!("sha256:{}", c.version().digest),
            signer: c.version().signer.clone(),
            versions: state.deployer.versions(name),
            fuel: limits.fuel,
            memory_bytes: limits.memory,
            timeout_ms: limits.timeout.as_millis() as u64,
            concurrency: limits.concurrency,
            in_flight: c.in_flight(),
            invocations: c.invocations(),
            failures: c.failures(),
            last_error: c.last_error(),
        })
        .collect()
}

async fn components(State(state): State<Arc<AdminState>>) -> Response {
    axum::Json(component_statuses(&state)).into_response()
}

/// The header that carries a deploy's detached signature: the `.sig`
/// file, base64.
pub const SIGNATURE_HEADER: &str = "wasmgate-signature";

/// A JSON error answer: `{"error": message}`.
pub(crate) fn error(status: u16, message: impl std::fmt::Display) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

impl IntoResponse for DeployError {
    fn into_response(self) -> Response {
        error(self.status(), self)
    }
}

async fn component(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match component_statuses(&state)
        .into_iter()
        .find(|c| c.name == name)
    {
        Some(c) => axum::Json(c).into_response(),
        None => DeployError::Unknown(name).into_response(),
    }
}

/// `POST /v1/components/NAME/deploy`: the body is the component file, at
/// most [`MAX_COMPONENT_BYTES`](wasmgate_runtime::component::MAX_COMPONENT_BYTES).
async fn deploy(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    use base64::Engine as _;
    use http_body_util::BodyExt;
    if state.component(&name).is_none() {
        return DeployError::Unknown(name).into_response();
    }
    let signature = match headers.get(SIGNATURE_HEADER) {
        None => None,
        Some(v) => match base64::engine::general_purpose::STANDARD.decode(v.as_bytes()) {
            Ok(sig) => Some(sig),
            Err(e) => {
                return error(400, format!("{SIGNATURE_HEADER}: not base64 ({e})"));
            }
        },
    };
    // Held until the deploy ends, even if this client goes away.
    let upload = state
        .uploads
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let max = wasmgate_runtime::component::MAX_COMPONENT_BYTES as usize;
    let bytes = match http_body_util::Limited::new(body, max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(413, format!("the component is larger than {max} bytes"));
        }
        Err(e) => return error(400, format!("cannot read the component: {e}")),
    };
    match state.deployer.deploy(&name, bytes, signature, upload).await {
        Ok(d) => axum::Json(d).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn rollback(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match state.deployer.rollback(&name).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/reload`: 200 with what changed, or 422 with why the new
/// manifest was refused (then nothing changed).
async fn reload(State(state): State<Arc<AdminState>>) -> Response {
    let Some(reloader) = state.reloader.get() else {
        return error(503, "the gateway is still starting");
    };
    // Run to its end even if the client goes.
    let reloader = reloader.clone();
    let result = match tokio::spawn(async move { reloader.reload().await }).await {
        Ok(result) => result,
        Err(e) => Err(format!("the reload failed: {e}")),
    };
    crate::reload::log(&result);
    match result {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => error(422, e),
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> Response {
    let s = state.clone();
    let stores = tokio::task::spawn_blocking(move || {
        s.stores.get().map(|(dead_letters, queue)| {
            (
                queue.len().ok(),
                dead_letters
                    .counts_by_component()
                    .ok()
                    .map(|v| v.into_iter().collect::<BTreeMap<_, _>>()),
            )
        })
    })
    .await
    .ok()
    .flatten();
    let (queue_depth, dead_letters) = stores.unwrap_or((None, None));
    let mqtt = state.mqtt.get().map(|m| {
        serde_json::json!({
            "connected": m.connected.load(Ordering::Relaxed),
            "received": m.received.load(Ordering::Relaxed),
            "succeeded": m.succeeded.load(Ordering::Relaxed),
            "dead_lettered": m.failed.load(Ordering::Relaxed),
            "published": m.published.load(Ordering::Relaxed),
            "spool_messages": m.spool_waiting.load(Ordering::Relaxed),
        })
    });
    axum::Json(serde_json::json!({
        "gateway": {
            "name": state.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": state.started.elapsed().as_secs(),
            "state_dir": state.state_dir.display().to_string(),
        },
        "components": component_statuses(&state),
        "triggers": trigger_statuses(&state),
        "mqtt": mqtt,
        "queue_depth": queue_depth,
        "dead_letters": dead_letters,
        "buckets": state.buckets().await,
    }))
    .into_response()
}

/// A running admin listener (or two).
pub struct Admin {
    socket: Option<PathBuf>,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    /// The TCP listener's address, when `[admin] listen` is set.
    pub tcp: Option<std::net::SocketAddr>,
}

impl Admin {
    /// Binds the Unix socket (and the TCP listener of `[admin] listen`)
    /// and serves them until [`Admin::stop`].
    pub async fn start(m: &Manifest, state: Arc<AdminState>) -> Result<Self, String> {
        let token = read_token(m)?;
        let stop = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let path = m.state_dir().join(SOCKET_NAME);
        let socket = match bind_socket(&path).await {
            Ok(listener) => {
                let app = router(state.clone(), None);
                tasks.spawn(serve(Listener::Unix(listener), app, stop.clone()));
                tracing::info!(socket = %path.display(), "admin listening (local socket)");
                Some(path)
            }
            Err(e) => {
                // The gateway runs on without it: `wasmgate status` then
                // says it cannot connect.
                tracing::warn!(socket = %path.display(), error = %e, "cannot create the admin socket; `wasmgate status` will not reach this gateway");
                None
            }
        };
        // The counts behind the page's rates.
        let sampled = state.clone();
        let stop_sampling = stop.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(crate::page::SAMPLE_EVERY);
            loop {
                tokio::select! {
                    () = stop_sampling.cancelled() => return,
                    _ = every.tick() => sampled.rates.sample(sampled.counts()),
                }
            }
        });
        let tcp = match &m.admin.listen {
            Some(addr) => {
                let addr = *addr.get_ref();
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("admin.listen: cannot listen on {addr}: {e}"))?;
                let local = listener.local_addr().map_err(|e| e.to_string())?;
                let app = router(state, token.map(Arc::from));
                let tls = tls_acceptor(m)?;
                let scheme = if tls.is_some() { "https" } else { "http" };
                tasks.spawn(serve(Listener::Tcp(listener, tls), app, stop.clone()));
                tracing::info!(address = %local, scheme, "admin listening");
                Some(local)
            }
            None => None,
        };
        Ok(Self {
            socket,
            stop,
            tasks,
            tcp,
        })
    }

    /// Stops serving and removes the socket file.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        if let Some(path) = self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds `path`, replacing a stale socket file (one no process answers on)
/// but never a live one: two gateways on one `state_dir` are refused.
async fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; remove it",
                path.display()
            ));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "another gateway answers on {}: is a second `wasmgate up` running with this state_dir?",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| e.to_string())?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| e.to_string())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    Ok(listener)
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener, Option<tokio_rustls::TlsAcceptor>),
}

/// The TLS acceptor of `[admin.tls]`, if set (HTTP/1.1 only). Errors name
/// the key and the file.
pub fn tls_acceptor(m: &Manifest) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let Some(tls) = &m.admin.tls else {
        return Ok(None);
    };
    let config = wasmgate_trigger_http::tls::server_config_at(m, tls, "admin.tls", &[b"http/1.1"])
        .map_err(|e| e.to_string())?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(config)))
}

/// Serves `app` on `listener` until `stop`, within the bounds above.
async fn serve(listener: Listener, app: Router, stop: CancellationToken) {
    // HTTP/1.1 only: its head timeout runs from the connection's start, so
    // a client that connects and sends nothing is closed after it.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(64 * 1024);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = accept(&listener) => a,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let stop = stop.clone();
        let tls = match &listener {
            Listener::Tcp(_, tls) => tls.clone(),
            Listener::Unix(_) => None,
        };
        tokio::spawn(async move {
            // The handshake, like the request head, within HEAD_TIMEOUT.
            let stream = match tls {
                None => stream,
                Some(acceptor) => {
                    match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => Box::new(tls) as Box<dyn Stream>,
                        _ => return,
                    }
                }
            };
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
                () = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn accept(listener: &Listener) -> std::io::Result<Box<dyn Stream>> {
    Ok(match listener {
        Listener::Unix(l) => Box::new(l.accept().await?.0),
        Listener::Tcp(l, _) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_check_needs_the_exact_token() {
        let mut h = HeaderMap::new();
        assert!(!bearer_matches(&h, "0123456789abcdef"));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef".parse().unwrap(),
        );
        assert!(bearer_matches(&h, "0123456789abcdef"));
        assert!(!bearer_matches(&h, "0123456789abcdeF"));
        assert!(!bearer_matches(&h, "0123456789abcdef0"));
        h.insert(
            header::AUTHORIZATION,
            "Basic 0123456789abcdef".parse().unwrap(),
        );
        assert!(!bearer_matches(&h, "0123456789abcdef"));
    }
}
