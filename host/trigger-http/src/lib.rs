//! The HTTP trigger: a listener (plain or TLS, HTTP/1.1 and HTTP/2), the
//! ALB-style [`router`], and the [`bridge`] to `wasi:http` guests.
//!
//! Every response carries `x-wasmgate-invocation-id`. Failures map to
//! statuses without host internals in the body: no rule → 404, body too
//! large → 413, component busy → 503 with `Retry-After`, guest or request
//! timeout → 504, trap or other limit → 500. A bad request or a broken
//! connection ends that connection only; the listener goes on.

pub mod bridge;
pub mod linger;
pub mod router;
pub mod tls;

use bridge::Served;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use router::{Action, RedirectInput, RequestInfo, Router};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::HttpLimits;
use wasmgate_runtime::deployment::Deployment;
use wasmgate_runtime::invoke::{Invocable, InvocationContext, Outcome, Status};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// The header that carries the invocation id on every response.
pub const INVOCATION_ID_HEADER: &str = "x-wasmgate-invocation-id";

/// Prefix of every header the host adds to a request; a client's own
/// headers with it are removed before the request reaches a guest.
pub const HOST_HEADER_PREFIX: &str = "x-wasmgate-";

/// Prefix of the headers that carry `{name}` path parameters to the guest.
pub const PARAM_HEADER_PREFIX: &str = "x-wasmgate-param-";

/// A bound listener, ready to serve.
pub struct HttpServer {
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: Arc<App>,
}

struct App {
    stats: Arc<HttpStats>,
    routes: Arc<HttpRoutes>,
    limits: HttpLimits,
    https: bool,
    port: u16,
}

/// The rules a listener serves, replaceable while it runs (a reload): a
/// request is routed by the rules it found when it arrived.
pub struct HttpRoutes {
    current: std::sync::RwLock<Arc<Routes>>,
    stats: Arc<HttpStats>,
}

/// `[[trigger.http]]` of one manifest, bound to its components.
struct Routes {
    router: Router,
    components: BTreeMap<String, Arc<Invocable>>,
    /// Each rule's pause switch, by rule index (none: never paused).
    pauses: Vec<wasmgate_runtime::trigger::Pause>,
}

impl Routes {
    fn of(
        m: &wasmgate_manifest::Manifest,
        components: &BTreeMap<String, Arc<Invocable>>,
        pauses: &wasmgate_runtime::trigger::Pauses,
    ) -> Result<Self, String> {
        let router = Router::build(m).map_err(|e| e.to_string())?;
        let mut bound = BTreeMap::new();
        for rule in router.rules() {
            if let Action::Forward { targets } = &rule.action {
                for (name, _) in targets {
                    let c = components
                        .get(name)
                        .ok_or_else(|| format!("no component {name:?} for an HTTP rule"))?;
                    bound.entry(name.clone()).or_insert_with(|| c.clone());
                }
            }
        }
        Ok(Self {
            router,
            components: bound,
            pauses: (0..m.triggers.http.len())
                .map(|i| pauses.of_trigger(&format!("http[{i}]")))
                .collect(),
        })
    }
}

impl HttpRoutes {
    fn get(&self) -> Arc<Routes> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves the rules of `current` from now on; requests already routed
    /// finish on the rules they matched. Errors (a manifest whose rules do
    /// not build) leave the running rules.
    pub fn replace(&self, current: &wasmgate_runtime::deployment::Current) -> Result<(), String> {
        let next = Routes::of(&current.manifest, &current.components, &current.pauses)?;
        self.stats.grow(current.manifest.triggers.http.len());
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        Ok(())
    }
}

impl HttpServer {
    /// Binds the listener of `[http]` when the deployment has HTTP rules or
    /// an `[http]` section; `None` when it has neither. Errors name the key.
    pub async fn bind(deployment: &Deployment) -> Result<Option<Self>, String> {
        let current = deployment.current();
        let m = &current.manifest;
        if m.http.is_none() && m.triggers.http.is_empty() {
            return Ok(None);
        }
        let config = m.http.clone().unwrap_or_default();
        let routes = Routes::of(m, &current.components, &current.pauses)?;
        let acceptor = match &config.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(
                tls::server_config(m, tls).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let stats = Arc::new(HttpStats::new(m.triggers.http.len()));
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("http.listen: cannot listen on {}: {e}", config.listen))?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        Ok(Some(Self {
            listener,
            app: Arc::new(App {
                routes: Arc::new(HttpRoutes {
                    current: std::sync::RwLock::new(Arc::new(routes)),
                    stats: stats.clone(),
                }),
                stats,
                limits: config.limits(),
                https: acceptor.is_some(),
                port,
            }),
            acceptor,
        }))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether the listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Its responses, counted by rule and status class.
    pub fn stats(&self) -> Arc<HttpStats> {
        self.app.stats.clone()
    }

    /// Its rules, to replace them while it runs.
    pub fn routes(&self) -> Arc<HttpRoutes> {
        self.app.routes.clone()
    }

    /// Serves until `shutdown`; then stops accepting and gives open
    /// connections up to the drain timeout to finish their requests.
    pub async fn run(self, shutdown: CancellationToken) {
        let limits = self.app.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .keep_alive_interval(Some(H2_PING_INTERVAL))
            .keep_alive_timeout(H2_PING_TIMEOUT);
        let builder = Arc::new(builder);
        let connections_open = TaskTracker::new();
        // Cancelled when the drain timeout has passed: connections still
        // open then are dropped.
        let force = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("never closed"),
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, retry.
                        tracing::warn!(error = %e, "http: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                app: self.app.clone(),
                builder: builder.clone(),
                peer,
                shutdown: shutdown.clone(),
                force: force.clone(),
            };
            let acceptor = self.acceptor.clone();
            connections_open.spawn(async move {
                conn.serve(stream, acceptor).await;
                drop(permit);
            });
        }
        drop(self.listener);
        connections_open.close();
        tracing::info!(
            connections = connections_open.len(),
            drain_timeout_ms = limits.drain_timeout.as_millis() as u64,
            "http: stopped accepting; draining open connections"
        );
        if tokio::time::timeout(limits.drain_timeout, connections_open.wait())
            .await
            .is_err()
        {
            tracing::warn!("http: requests still in flight after the drain timeout; closing");
            force.cancel();
            connections_open.wait().await;
        }
    }
}

/// Interval of the HTTP/2 keep-alive pings.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// An HTTP/2 connection whose ping goes unanswered this long is closed.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// One accepted connection and what serving it needs.
struct Conn {
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    force: CancellationToken,
}

impl Conn {
    /// Serves the connection (after the TLS handshake, if any) until it
    /// ends, sits idle past `idle_timeout`, or the listener shuts down.
    async fn serve(self, stream: tokio::net::TcpStream, acceptor: Option<TlsAcceptor>) {
        let peer = self.peer;
        let stream = linger::Lingering::new(stream);
        let result = match acceptor {
            None => self.serve_http(stream).await,
            Some(acceptor) => {
                let timeout = self.app.limits.header_timeout;
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.serve_http(tls).await,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %peer, error = %e, "http: TLS handshake failed");
                        Ok(())
                    }
                    Err(_) => {
                        tracing::info!(peer = %peer, "http: TLS handshake timed out");
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::info!(peer = %peer, error = %e, "http: connection ended with an error");
        }
    }

    async fn serve_http<I>(self, io: I) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let limits = self.app.limits;
        let activity = Arc::new(Activity::new());
        let service = {
            let (app, peer, activity) = (self.app.clone(), self.peer, activity.clone());
            hyper::service::service_fn(move |req| {
                let app = app.clone();
                let busy = activity.begin();
                async move {
                    let response = app.handle(req, peer).await;
                    // The request counts as in flight until its response
                    // body has been sent (or dropped).
                    Ok::<_, Infallible>(response.map(|body| {
                        body.map_frame(move |frame| {
                            let _ = &busy;
                            frame
                        })
                        .boxed_unsync()
                    }))
                }
            })
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => return result,
                () = self.force.cancelled() => return Ok(()),
                () = self.shutdown.cancelled(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = activity.idle_for(limits.idle_timeout), if !closing => {
                    tracing::debug!(peer = %self.peer, "http: closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    activity.touch();
                }
                // A client that does not take part in the graceful close
                // (an HTTP/2 client that never answers GOAWAY's ping) is
                // dropped once it has been idle that long again.
                () = activity.idle_for(limits.idle_timeout), if closing => return Ok(()),
            }
        }
    }
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<tokio::time::Instant>,
}

/// Marks a request in flight until dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn touch(&self) {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tokio::time::Instant::now();
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = *self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tokio::time::sleep_until(last + timeout).await;
            let last = *self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if self.in_flight.load(Ordering::Acquire) == 0 && last.elapsed() >= timeout {
                return;
            }
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // Busy: check again a full timeout later.
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// Responses by rule and status class (1xx to 5xx), for metrics.
#[derive(Debug)]
pub struct HttpStats {
    /// `[[trigger.http]]` rules in manifest order (as many as the most
    /// rules a manifest of this listener had).
    rules: std::sync::RwLock<Vec<[std::sync::atomic::AtomicU64; 5]>>,
    /// Requests no rule took (bad Host, no match).
    unmatched: [std::sync::atomic::AtomicU64; 5],
}

/// The status classes, in [`HttpStats::snapshot`]'s order.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl HttpStats {
    fn new(rules: usize) -> Self {
        let s = Self {
            rules: std::sync::RwLock::default(),
            unmatched: Default::default(),
        };
        s.grow(rules);
        s
    }

    /// Makes room for `rules` rules (a reload); rows are never removed.
    fn grow(&self, rules: usize) {
        let mut rows = self
            .rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while rows.len() < rules {
            rows.push(Default::default());
        }
    }

    fn count(&self, rule: Option<usize>, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        let rows = self
            .rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match rule.and_then(|r| rows.get(r)) {
            Some(row) => row[class].fetch_add(1, Ordering::Relaxed),
            None => self.unmatched[class].fetch_add(1, Ordering::Relaxed),
        };
    }

    /// `(rule, class, responses)` for every rule and class: the rule is
    /// its index in `[[trigger.http]]`, `None` for requests no rule took.
    pub fn snapshot(&self) -> Vec<(Option<usize>, &'static str, u64)> {
        let rows = self
            .rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        let all = rows
            .iter()
            .enumerate()
            .map(|(i, row)| (Some(i), row))
            .chain(std::iter::once((None, &self.unmatched)));
        for (rule, row) in all {
            for (class, n) in STATUS_CLASSES.iter().zip(row) {
                out.push((rule, *class, n.load(Ordering::Relaxed)));
            }
        }
        out
    }
}

/// Largest request head (request line and headers) accepted, in bytes.
/// Beyond it HTTP/1.1 clients get 431 and HTTP/2 streams are refused.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

type Body = HyperOutgoingBody;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn simple(status: StatusCode, id: &str, message: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{message}\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    set_id(h, id);
    r
}

fn set_id(headers: &mut hyper::HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(HeaderName::from_static(INVOCATION_ID_HEADER), v);
    }
}

impl App {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let id = uuid::Uuid::now_v7().to_string();
        let deadline = self.limits.request_timeout;
        let rule = std::sync::OnceLock::new();
        let response = match tokio::time::timeout(
            deadline,
            self.clone().route(req, peer, &id, &rule),
        )
        .await
        {
            Ok(response) => response,
            Err(_) => {
                tracing::info!(id = %id, timeout_ms = deadline.as_millis() as u64, "http: request timed out");
                simple(StatusCode::GATEWAY_TIMEOUT, &id, "504 Gateway Timeout")
            }
        };
        self.stats.count(rule.get().copied(), response.status());
        response
    }

    #[expect(
        clippy::too_many_lines,
        reason = "the request's routing decision and each action it can take, in one match"
    )]
    async fn route(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        id: &str,
        rule: &std::sync::OnceLock<usize>,
    ) -> Response<Body> {
        let host_header = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        if req
            .headers()
            .get(hyper::header::HOST)
            .is_some_and(|h| h.to_str().is_err())
        {
            return simple(
                StatusCode::BAD_REQUEST,
                id,
                "400 Bad Request: the Host header is not ASCII",
            );
        }
        if !valid_authority(&host_header) {
            return simple(
                StatusCode::BAD_REQUEST,
                id,
                "400 Bad Request: the Host is not a host name or address with an optional port",
            );
        }
        let host = strip_port(&host_header).to_ascii_lowercase();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let info = RequestInfo {
            method: req.method().as_str(),
            host: &host,
            path: &path,
            query: &query,
            headers: req.headers(),
            source: peer.ip(),
        };
        let routes = self.routes.get();
        let Some(matched) = routes.router.route(&info) else {
            return simple(
                StatusCode::NOT_FOUND,
                id,
                "404 Not Found: no rule matches this request",
            );
        };
        let params: Vec<(String, String)> = matched
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let rule_index = matched.rule.index;
        let _ = rule.set(rule_index);
        if routes.pauses.get(rule_index).is_some_and(|p| p.is_paused()) {
            let mut r = simple(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                "503 Service Unavailable: this rule is paused",
            );
            r.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("5"));
            return r;
        }
        match &matched.rule.action {
            Action::Fixed {
                status,
                content_type,
                body,
            } => {
                let mut r = simple(StatusCode::OK, id, "");
                *r.body_mut() = full(body.clone());
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                if let Ok(v) = HeaderValue::from_str(content_type) {
                    r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                }
                r
            }
            Action::Redirect { status, location } => {
                let target = location.render(&RedirectInput {
                    protocol: if self.https { "https" } else { "http" },
                    host: &host,
                    port: self.port,
                    path: &path,
                    query: &query,
                });
                let mut r = simple(StatusCode::FOUND, id, "");
                *r.body_mut() = full(Bytes::new());
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
                match HeaderValue::from_str(&target) {
                    Ok(v) => {
                        r.headers_mut().insert(hyper::header::LOCATION, v);
                        r
                    }
                    Err(_) => simple(
                        StatusCode::BAD_REQUEST,
                        id,
                        "400 Bad Request: cannot build the redirect target",
                    ),
                }
            }
            action @ Action::Forward { .. } => {
                let roll = fastrand::u32(..action.total_weight().max(1));
                let name = action
                    .pick(roll)
                    .expect("forward actions have targets")
                    .to_string();
                let component = routes.components[&name].clone();
                self.forward(req, peer, id, &host_header, params, rule_index, component)
                    .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[expect(
        clippy::too_many_lines,
        reason = "one request's forward path (body limit, headers, invocation, response mapping) in order"
    )]
    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        id: &str,
        authority: &str,
        params: Vec<(String, String)>,
        rule_index: usize,
        component: Arc<Invocable>,
    ) -> Response<Body> {
        let max_body = self.limits.max_body;
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return simple(StatusCode::PAYLOAD_TOO_LARGE, id, "413 Payload Too Large");
        }
        let (mut parts, body) = req.into_parts();
        let scheme = if self.https {
            Scheme::Https
        } else {
            Scheme::Http
        };
        let authority = if authority.is_empty() {
            format!("localhost:{}", self.port)
        } else {
            authority.to_string()
        };
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = format!(
            "{}://{authority}{path_and_query}",
            if self.https { "https" } else { "http" }
        );
        parts.uri = match uri.parse() {
            Ok(u) => u,
            Err(_) => {
                return simple(
                    StatusCode::BAD_REQUEST,
                    id,
                    "400 Bad Request: invalid authority",
                );
            }
        };
        let h = &mut parts.headers;
        let peer_ip = peer.ip().to_canonical().to_string();
        let forwarded_for = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {peer_ip}"),
            None => peer_ip,
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            h.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        h.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(if self.https { "https" } else { "http" }),
        );
        if let Ok(v) = HeaderValue::from_str(&self.port.to_string()) {
            h.insert(HeaderName::from_static("x-forwarded-port"), v);
        }
        // The host's own headers: none of the client's may pass for one.
        let spoofed: Vec<HeaderName> = h
            .keys()
            .filter(|n| n.as_str().starts_with(HOST_HEADER_PREFIX))
            .cloned()
            .collect();
        for name in spoofed {
            h.remove(name);
        }
        set_id(h, id);
        for (name, value) in &params {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(format!("{PARAM_HEADER_PREFIX}{name}").as_bytes()),
                HeaderValue::from_str(value),
            ) {
                h.insert(n, v);
            }
        }
        let too_large = Arc::new(AtomicBool::new(false));
        let flag = too_large.clone();
        let body = Limited::new(body, max_body as usize).map_err(move |e| {
            if e.is::<http_body_util::LengthLimitError>() {
                flag.store(true, Ordering::Relaxed);
                wasmtime_wasi_http::Error::from(ErrorCode::HttpRequestBodySize(Some(max_body)))
            } else {
                wasmtime_wasi_http::Error::from(ErrorCode::HttpRequestDenied)
            }
        });
        let req = Request::from_parts(parts, body);
        let mut ctx = InvocationContext::new(format!("http[{rule_index}]"));
        ctx.id = id.to_string();
        match bridge::serve(&component, req, scheme, ctx).await {
            Served::Response(mut response) => {
                if too_large.load(Ordering::Relaxed) {
                    return simple(StatusCode::PAYLOAD_TOO_LARGE, id, "413 Payload Too Large");
                }
                set_id(response.headers_mut(), id);
                response
            }
            Served::Failed(outcome) => {
                if too_large.load(Ordering::Relaxed) {
                    return simple(StatusCode::PAYLOAD_TOO_LARGE, id, "413 Payload Too Large");
                }
                failure_response(&outcome, id)
            }
        }
    }
}

/// The response for an invocation that produced none. The body names the
/// status only: the outcome's details go to the log, not to the client.
fn failure_response(outcome: &Outcome, id: &str) -> Response<Body> {
    match outcome.status {
        Status::Throttled { .. } => {
            let mut r = simple(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                "503 Service Unavailable: the component is at its concurrency limit",
            );
            r.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Status::Timeout { .. } => simple(StatusCode::GATEWAY_TIMEOUT, id, "504 Gateway Timeout"),
        _ => simple(
            StatusCode::INTERNAL_SERVER_ERROR,
            id,
            "500 Internal Server Error",
        ),
    }
}

/// Is `authority` a Host header we can route on and put in a redirect: a
/// DNS name, an IPv4 address or a bracketed IPv6 address, with an optional
/// port? (No user info, no path, no spaces.) Empty is allowed: an HTTP/1.0
/// request may have no Host.
fn valid_authority(authority: &str) -> bool {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("v6", Some(port)),
                None => return false,
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let host_ok = host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    host_ok && port_ok && !(host.is_empty() && port.is_some())
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

impl wasmgate_runtime::trigger::Trigger for HttpServer {
    const TYPE: &'static str = "http";

    /// [`HttpServer::run`]: connections are the server's own to drain.
    fn run(
        self,
        _tasks: tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send {
        HttpServer::run(self, shutdown)
    }
}

#[cfg(test)]
mod tests {
    use super::{strip_port, valid_authority};

    #[test]
    fn hosts_are_validated() {
        for ok in [
            "",
            "example.com",
            "example.com:8080",
            "a-b.c_d.example",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "localhost",
        ] {
            assert!(valid_authority(ok), "{ok:?} should be valid");
        }
        for bad in [
            "a@evil",
            "user:pw@evil.example",
            "evil.example/path",
            "a b",
            "example.com:",
            "example.com:99999",
            "example.com:80:80",
            ":80",
            "[::1",
            "[not-v6]:80",
            "[::1]x",
            "example.com\\x",
        ] {
            assert!(!valid_authority(bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port(""), "");
    }
}
