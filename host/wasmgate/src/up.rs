//! `wasmgate up`: the composition root ([`Gateway`]) that wires the stores,
//! the runtime's components, the one publish sink and the triggers, runs
//! them, and shuts them down in order: stop taking events, drain in-flight
//! invocations (with a deadline), then the last publishes into the spool.

use crate::admin::AdminState;
use crate::cli::{Fatal, UpArgs, load_manifest};
use crate::metrics::GatewayMetrics;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::Manifest;
use wasmgate_runtime::deployment::{Current, Deployment};
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::Invocable;
use wasmgate_runtime::sink::{NoConnection, PublishSink};
use wasmgate_runtime::trigger::Trigger;
use wasmgate_store::deadletter::{self, Bounds, DeadLetterStore};
use wasmgate_store::keyvalue::KeyValueStore;
use wasmgate_store::queue::EventQueue;
use wasmgate_store::spool::{Spool, SpoolBounds};
use wasmgate_store::timer_state::TimerState;
use wasmgate_trigger_http::HttpStats;
use wasmgate_trigger_mqtt::{ClientOptions, MqttTriggers};
use wasmgate_trigger_timer::clock::Clock;
use wasmgate_trigger_timer::{SchedulerThread, TimerTrigger};

/// Runs `wasmgate up` until SIGINT or SIGTERM.
pub async fn up(args: UpArgs, started: Instant) -> Result<ExitCode, Fatal> {
    // Handlers go in before anything else: a SIGTERM that arrives once
    // `ready` is logged must start a clean shutdown, not kill the process.
    let signals = Signals::install();
    let manifest = load_manifest(&args.file)?;
    // Before anything starts: a bad admin token stops `up` at once.
    crate::admin::read_token(&manifest).map_err(Fatal)?;
    crate::admin::tls_acceptor(&manifest).map_err(Fatal)?;
    if args.build {
        run_builds(&manifest).await?;
    }
    let options = EngineOptions {
        allocator: args.allocator.into(),
        ..EngineOptions::default()
    };
    let deployment = Deployment::load(manifest, options)?;
    for (component, caps) in &deployment.ungranted {
        let imports: Vec<&str> = caps.iter().map(|c| c.interface()).collect();
        tracing::info!(%component, imports = %imports.join(", "), "the component imports capabilities it is not granted: each call is denied");
    }
    let gateway = Gateway::start(Arc::new(deployment), started).await?;
    {
        let current = gateway.deployment.current();
        let m = &current.manifest;
        tracing::info!(
            gateway = %m.gateway.name,
            timers = m.triggers.timer.len(),
            mqtt_triggers = m.triggers.mqtt.len(),
            components = current.components.len(),
            startup_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0),
            "ready"
        );
    }
    signals.run_until_shutdown(&gateway.reloader).await;
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The embedded broker, if `up` runs one, and the options (with the Receive
/// Maximum) of the client connection, if `up` needs one.
type Connection = (Option<EmbeddedBroker>, Option<(ClientOptions, u16)>);

/// A running gateway: a deployment with its stores and triggers.
pub struct Gateway {
    deployment: Arc<Deployment>,
    deployer: Arc<crate::deploy::Deployer>,
    reloader: Arc<crate::reload::Reloader>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// The publish sink stays open until every invocation has finished;
    /// then its last publishes go to the spool (`late` finishes that).
    sink_closed: CancellationToken,
    late: TaskTracker,
    http_drain: Duration,
    timer_state: Arc<TimerState>,
    admin: crate::admin::Admin,
    _embedded_broker: Option<EmbeddedBroker>,
}

/// The stores in `state_dir` that the triggers share.
struct Stores {
    dead_letters: Arc<DeadLetterStore>,
    timer_state: Arc<TimerState>,
    queue: Arc<EventQueue>,
    keyvalue: KeyValueStore,
}

/// What the composition root gives every component, the ones a reload adds
/// included: the one publish sink and the key-value store.
pub(crate) struct HostCapabilities {
    pub(crate) sink: Arc<dyn PublishSink>,
    pub(crate) keyvalue: KeyValueStore,
}

impl HostCapabilities {
    /// The MQTT trigger's sink (or one that refuses every publish, without a
    /// connection) and the store.
    fn new(m: &Manifest, mqtt: Option<&MqttTriggers>, stores: &Stores) -> Self {
        Self {
            sink: match mqtt {
                Some(t) => t.publish_sink(),
                None => {
                    warn_unconnected_publishers(m);
                    Arc::new(NoConnection::default())
                }
            },
            keyvalue: stores.keyvalue.clone(),
        }
    }

    /// Connects `c` to them.
    pub(crate) fn attach(&self, c: &Invocable) {
        c.set_publish_sink(self.sink.clone());
        c.set_keyvalue(Arc::new(self.keyvalue.clone()));
    }
}

impl Stores {
    fn open(m: &Manifest, connected: bool) -> Result<Self, Fatal> {
        let state_dir = m.state_dir();
        let topic = m
            .dead_letters
            .mqtt_topic
            .as_ref()
            .map(|t| t.get_ref().clone());
        if topic.is_some() && !connected {
            tracing::warn!(
                "dead_letters.mqtt_topic is set but there is no [mqtt] connection: dead letters are only stored"
            );
        }
        let dead_letters = DeadLetterStore::open(
            &deadletter::path_in(&state_dir),
            Bounds::from(&m.dead_letters),
        )
        .map_err(Fatal)?
        .with_publish_topic(topic.filter(|_| connected));
        Ok(Self {
            dead_letters: Arc::new(dead_letters),
            timer_state: Arc::new(TimerState::open(&state_dir.join("timers.json")).map_err(Fatal)?),
            queue: Arc::new(
                EventQueue::open(&state_dir.join(wasmgate_store::queue::FILE_NAME))
                    .map_err(Fatal)?,
            ),
            keyvalue: KeyValueStore::open(&KeyValueStore::path_in(&state_dir), m.keyvalue.bounds())
                .map_err(Fatal)?,
        })
    }
}

impl Stores {
    /// Records every change of the buckets `[[trigger.keyvalue]]` listen
    /// to from now on (and of no other bucket).
    async fn record_streams(&self, m: &Manifest) -> Result<(), Fatal> {
        let streamed: std::collections::BTreeSet<String> = m
            .triggers
            .keyvalue
            .iter()
            .map(|t| t.bucket.get_ref().clone())
            .collect();
        self.keyvalue
            .set_streams(streamed.into_iter().collect())
            .await
            .map_err(|e| Fatal(format!("the key-value change streams: {e}")))
    }
}

impl Gateway {
    /// Opens the stores, connects the publish sink and starts every trigger.
    pub async fn start(deployment: Arc<Deployment>, started: Instant) -> Result<Self, Fatal> {
        // The deployed versions come back before any trigger starts.
        let deployer = crate::deploy::Deployer::new(deployment.clone());
        let current = deployment.current();
        let m = &current.manifest;
        let (embedded_broker, connection) = mqtt_connection(m).await?;
        let stores = Stores::open(m, connection.is_some())?;
        // Before anything can write a bucket.
        stores.record_streams(m).await?;
        let (metrics, admin_state) = observe(&deployment, &deployer, &stores, started);
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let sink_closed = CancellationToken::new();
        let late = TaskTracker::new();
        let mqtt = match connection {
            Some((options, receive_maximum)) => Some(mqtt_trigger(
                &deployment,
                options,
                receive_maximum,
                &stores,
                &sink_closed,
                &late,
            )?),
            None => None,
        };
        let capabilities = HostCapabilities::new(m, mqtt.as_ref(), &stores);
        for c in current.components.values() {
            capabilities.attach(c);
        }
        if let Some(t) = &mqtt {
            metrics.set_mqtt(t.stats());
            admin_state.set_mqtt(t.stats());
        }
        let mqtt_control = mqtt.as_ref().map(MqttTriggers::control);
        let (http_drain, http) = start_http(&deployment, &tasks, &shutdown).await?;
        if let Some((stats, _)) = &http {
            metrics.set_http(stats.clone());
        }
        tasks.spawn(wasmgate_store::queue::consume(
            stores.queue.clone(),
            deployment.clone(),
            stores.dead_letters.clone(),
            wasmgate_store::delivery::RetryPolicy::default(),
            shutdown.clone(),
        ));
        if let Some(trigger) = mqtt {
            tasks.spawn(Trigger::run(trigger, tasks.clone(), shutdown.clone()));
        }
        let timers = Timers::start(&current, &stores, &metrics, &tasks, &shutdown).await?;
        start_streams(&current, &stores, &metrics, &tasks, &shutdown);
        let reloader = Arc::new(crate::reload::Reloader::new(
            m.path.clone(),
            deployment.clone(),
            deployer.clone(),
            metrics,
            capabilities,
            (http.map(|(_, routes)| routes), mqtt_control),
            timers,
        ));
        admin_state.set_reloader(reloader.clone());
        let admin = crate::admin::Admin::start(m, admin_state)
            .await
            .map_err(Fatal)?;
        drop(current);
        Ok(Self {
            deployment,
            deployer,
            reloader,
            tasks,
            shutdown,
            sink_closed,
            late,
            http_drain,
            timer_state: stores.timer_state,
            admin,
            _embedded_broker: embedded_broker,
        })
    }

    /// Stops taking events, drains in-flight invocations (up to the drain
    /// timeout), then closes the publish sink and writes the timer state.
    pub async fn shutdown(self) {
        tracing::info!(
            drain_timeout_s = DRAIN_TIMEOUT.as_secs(),
            "shutting down: no new events; draining in-flight invocations"
        );
        self.reloader.stop();
        self.shutdown.cancel();
        self.deployer.stop().await;
        self.tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT.max(self.http_drain), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight invocations did not finish within the drain timeout; abandoning them"
            );
        }
        self.reloader.stop_timers().await;
        self.sink_closed.cancel();
        self.late.close();
        if tokio::time::timeout(LATE_PUBLISH_TIMEOUT, self.late.wait())
            .await
            .is_err()
        {
            tracing::warn!("the last MQTT publishes could not be written to the spool in time");
        }
        if let Err(e) = self.timer_state.flush() {
            tracing::error!(error = %e, "cannot write the timer state");
        }
        self.admin.stop().await;
    }
}

/// Starts each `[[trigger.keyvalue]]` (their buckets' changes are recorded
/// from the start of `Gateway::start`).
fn start_streams(
    current: &Current,
    stores: &Stores,
    metrics: &GatewayMetrics,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let m = &current.manifest;
    let mut stats = Vec::new();
    let specs = wasmgate_trigger_keyvalue::specs(m);
    for (spec, t) in specs.into_iter().zip(&m.triggers.keyvalue) {
        let component = current.components[t.component.get_ref()].clone();
        let label = spec.label.trim_start_matches("trigger.").to_string();
        let trigger = wasmgate_trigger_keyvalue::KeyValueTrigger::new(
            spec,
            component,
            stores.keyvalue.clone(),
        )
        .with_pause(current.pauses.of_trigger(&label))
        .with_dead_letters(stores.dead_letters.clone());
        stats.push((label, trigger.stats()));
        tasks.spawn(Trigger::run(trigger, tasks.clone(), shutdown.clone()));
    }
    metrics.set_kv_streams(stats);
}

/// The gateway's metrics and the admin listener's state.
fn observe(
    deployment: &Arc<Deployment>,
    deployer: &Arc<crate::deploy::Deployer>,
    stores: &Stores,
    started: Instant,
) -> (Arc<GatewayMetrics>, Arc<AdminState>) {
    let since = std::time::SystemTime::now() - started.elapsed();
    let metrics = Arc::new(GatewayMetrics::new(deployment, since));
    metrics.set_deployer(deployer.clone());
    metrics.set_stores(stores.dead_letters.clone(), stores.queue.clone());
    let admin_state = Arc::new(AdminState::new(
        deployment,
        deployer.clone(),
        metrics.clone(),
        started,
    ));
    admin_state.set_stores(stores.dead_letters.clone(), stores.queue.clone());
    admin_state.set_keyvalue(stores.keyvalue.clone());
    (metrics, admin_state)
}

/// The broker connection `up` needs, if any: the embedded broker (when the
/// manifest asks for it) and the client options to reach a broker. Without
/// `[mqtt]` the broker defaults to "embedded" too; it starts when MQTT
/// triggers need it or `[mqtt]` asks for it. Components that may publish, and
/// a dead-letter topic, need the connection too, when there is an `[mqtt]`.
async fn mqtt_connection(m: &Manifest) -> Result<Connection, Fatal> {
    let mqtt_config = m.mqtt.clone().unwrap_or_default();
    let wants_embedded =
        mqtt_config.is_embedded() && (m.mqtt.is_some() || !m.triggers.mqtt.is_empty());
    let publishers = m
        .components
        .values()
        .any(|c| c.allow.mqtt_publish.as_ref().is_some_and(|v| !v.is_empty()));
    let needs_connection = !m.triggers.mqtt.is_empty()
        || ((publishers || m.dead_letters.mqtt_topic.is_some()) && m.mqtt.is_some());
    if wants_embedded {
        start_embedded_broker(m, &mqtt_config, needs_connection).await
    } else if needs_connection {
        let options = wasmgate_trigger_mqtt::client_options(m)
            .map_err(|e| Fatal(format!("{}: {e}", m.path.display())))?;
        Ok((None, options))
    } else {
        Ok((None, None))
    }
}

fn warn_unconnected_publishers(m: &Manifest) {
    let publishers: Vec<&String> = m
        .components
        .iter()
        .filter(|(_, c)| c.allow.mqtt_publish.as_ref().is_some_and(|v| !v.is_empty()))
        .map(|(name, _)| name)
        .collect();
    if !publishers.is_empty() {
        tracing::warn!(components = ?publishers, "these components may publish MQTT messages but there is no [mqtt] connection: their publishes are dropped (counted and logged)");
    }
}

/// The MQTT triggers on one connection; its outbox is the publish sink.
fn mqtt_trigger(
    deployment: &Deployment,
    options: ClientOptions,
    receive_maximum: u16,
    stores: &Stores,
    sink_closed: &CancellationToken,
    late: &TaskTracker,
) -> Result<MqttTriggers, Fatal> {
    let current = deployment.current();
    let m = &current.manifest;
    let mut specs = wasmgate_trigger_mqtt::specs(m, &current.components);
    for s in &mut specs {
        s.pause = current
            .pauses
            .of_trigger(s.label.trim_start_matches("trigger."));
        tracing::info!(trigger = %s.label, component = %s.component.name, topic = %s.filter.raw, qos = s.qos, max_in_flight = s.max_in_flight, "MQTT trigger armed");
    }
    let spool_bounds = SpoolBounds::from(&m.mqtt.clone().unwrap_or_default().spool);
    let spool = Spool::open(
        &m.state_dir().join(wasmgate_store::spool::FILE_NAME),
        spool_bounds,
    )
    .map_err(Fatal)?;
    Ok(MqttTriggers::new(options, receive_maximum, specs)
        .with_dead_letters(stores.dead_letters.clone())
        .with_spool(spool)
        .outbox_open_until(sink_closed.clone(), late.clone()))
}

/// The HTTP listener's response counts and its rules.
type Http = (Arc<HttpStats>, Arc<wasmgate_trigger_http::HttpRoutes>);

/// Binds and starts the HTTP listener, if the manifest has one; returns how
/// long its connections may take to drain, its response counts and rules.
async fn start_http(
    deployment: &Deployment,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(Duration, Option<Http>), Fatal> {
    let Some(server) = wasmgate_trigger_http::HttpServer::bind(deployment)
        .await
        .map_err(Fatal)?
    else {
        return Ok((Duration::ZERO, None));
    };
    let stats = server.stats();
    let routes = server.routes();
    let current = deployment.current();
    let m = &current.manifest;
    let addr = server
        .local_addr()
        .map_err(|e| Fatal(format!("http.listen: {e}")))?;
    tracing::info!(
        address = %addr,
        scheme = if server.is_tls() { "https" } else { "http" },
        rules = m.triggers.http.len(),
        "http listening"
    );
    tasks.spawn(Trigger::run(server, tasks.clone(), shutdown.clone()));
    Ok((
        m.http.clone().unwrap_or_default().limits().drain_timeout,
        Some((stats, routes)),
    ))
}

#[cfg(feature = "embedded-broker")]
type EmbeddedBroker = wasmgate_trigger_mqtt::broker::EmbeddedBroker;
#[cfg(not(feature = "embedded-broker"))]
type EmbeddedBroker = ();

/// Starts the embedded broker and, when there are MQTT triggers, the client
/// options to reach it.
#[cfg(feature = "embedded-broker")]
async fn start_embedded_broker(
    m: &Manifest,
    config: &wasmgate_manifest::MqttConfig,
    needs_client: bool,
) -> Result<Connection, Fatal> {
    let options = embedded_options(m, config);
    let broker = wasmgate_trigger_mqtt::broker::EmbeddedBroker::start(options)
        .await
        .map_err(|e| Fatal(format!("{}: {e}", m.path.display())))?;
    let client = if !needs_client {
        None
    } else {
        let addr = broker.local_addr();
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let url = wasmgate_trigger_mqtt::BrokerUrl {
            tls: false,
            host,
            port: addr.port(),
        };
        let (mut options, receive_maximum) = wasmgate_trigger_mqtt::client_options_for(m, &url)
            .map_err(|e| Fatal(format!("{}: {e}", m.path.display())))?;
        let (username, password) = broker.gateway_credentials();
        options.set_credentials(username, password);
        Some((options, receive_maximum))
    };
    Ok((Some(broker), client))
}

/// The embedded broker's settings from `[mqtt.embedded]`, defaults filled in.
#[cfg(feature = "embedded-broker")]
fn embedded_options(
    m: &Manifest,
    config: &wasmgate_manifest::MqttConfig,
) -> wasmgate_trigger_mqtt::broker::EmbeddedOptions {
    use wasmgate_manifest::topic::TopicFilter;
    use wasmgate_trigger_mqtt::broker::{BrokerUser, EmbeddedOptions};
    let mut options = EmbeddedOptions {
        gateway_client_id: config
            .client_id
            .as_ref()
            .map_or_else(|| m.gateway.name.clone(), |id| id.get_ref().clone()),
        ..EmbeddedOptions::default()
    };
    let Some(e) = &config.embedded else {
        return options;
    };
    let e = e.get_ref();
    if let Some(listen) = e.listen {
        options.listen = listen;
    }
    if let Some(q) = &e.max_queued {
        options.max_queued = *q.get_ref() as usize;
    }
    if let Some(n) = &e.max_sessions {
        options.max_sessions = *n.get_ref() as usize;
    }
    if let Some(x) = &e.max_session_expiry {
        options.max_session_expiry = x.get_ref().0;
    }
    options.allow_anonymous = e.anonymous_allowed();
    // Checked at load, so parsing cannot fail here.
    let filters = |fs: Vec<&String>| {
        fs.into_iter()
            .filter_map(|f| TopicFilter::parse(f).ok())
            .collect()
    };
    options.users = e
        .users
        .iter()
        .map(|u| {
            let u = u.get_ref();
            BrokerUser {
                username: u.username.get_ref().clone(),
                password_hash: u.password_hash.get_ref().clone(),
                publish: filters(u.publish.iter().map(|f| f.get_ref()).collect()),
                subscribe: filters(u.subscribe.iter().map(|f| f.get_ref()).collect()),
            }
        })
        .collect();
    options
}

#[cfg(not(feature = "embedded-broker"))]
async fn start_embedded_broker(
    m: &Manifest,
    _config: &wasmgate_manifest::MqttConfig,
    _needs_client: bool,
) -> Result<Connection, Fatal> {
    Err(Fatal(format!(
        "{}: mqtt.broker = \"embedded\": this build has no embedded broker (cargo feature `embedded-broker`); set broker = \"mqtt://host:1883\"",
        m.path.display()
    )))
}

/// How long `up` waits for in-flight invocations after SIGINT/SIGTERM.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long `up`, once everything else has stopped, waits for the last
/// MQTT publishes to be written to the spool.
pub const LATE_PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The running timers, each with its own stop switch, so that a reload
/// re-arms only those that changed.
pub(crate) struct Timers {
    state: Arc<TimerState>,
    dead_letters: Arc<DeadLetterStore>,
    metrics: Arc<GatewayMetrics>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Started with the first timer.
    scheduler: Option<SchedulerThread>,
    /// By index in `[[trigger.timer]]`.
    running: BTreeMap<usize, Armed>,
}

/// A running timer: the manifest entry it runs as written, its stop
/// switch, and its task, which ends once its last delivery has.
struct Armed {
    written: Option<wasmgate_manifest::Written>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Timers {
    /// Arms every timer of `current` and starts the task that writes their
    /// state.
    async fn start(
        current: &Current,
        stores: &Stores,
        metrics: &Arc<GatewayMetrics>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Self, Fatal> {
        let mut timers = Timers {
            state: stores.timer_state.clone(),
            dead_letters: stores.dead_letters.clone(),
            metrics: metrics.clone(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            scheduler: None,
            running: BTreeMap::new(),
        };
        timers.apply(current).await.map_err(Fatal)?;
        spawn_timer_state_writer(stores.timer_state.clone(), tasks, shutdown);
        Ok(timers)
    }

    /// Makes the running timers those of `current`: a timer running as
    /// `current` writes it runs on; one written otherwise is stopped, its
    /// delivery in progress allowed to end (so the new one, catching up
    /// from the persisted state like at a start, never runs a tick twice at
    /// once), then armed anew; one `current` no longer has is stopped.
    pub(crate) async fn apply(&mut self, current: &Current) -> Result<(), String> {
        let m = &current.manifest;
        let written = m.written();
        let specs = wasmgate_trigger_timer::specs(m);
        let removed: Vec<usize> = self
            .running
            .keys()
            .copied()
            .filter(|i| *i >= specs.len())
            .collect();
        for i in removed {
            if let Some(armed) = self.running.remove(&i) {
                tracing::info!(trigger = %format!("trigger.timer[{i}]"), "timer stopped (reload)");
                armed.stop.cancel();
            }
        }
        for (i, (spec, t)) in specs.into_iter().zip(&m.triggers.timer).enumerate() {
            let index = i.to_string();
            let entry =
                wasmgate_manifest::value_at(&written, &["trigger", "timer", &index]).cloned();
            if self.running.get(&i).is_some_and(|a| a.written == entry) {
                continue;
            }
            if let Some(armed) = self.running.remove(&i) {
                armed.stop.cancel();
                let _ = armed.done.await;
            }
            if self.scheduler.is_none() {
                self.scheduler = Some(
                    SchedulerThread::start()
                        .map_err(|e| format!("cannot start the timer thread: {e}"))?,
                );
            }
            let clock =
                Clock::system().map_err(|e| format!("cannot start the timer thread: {e}"))?;
            let component = current.components[t.component.get_ref()].clone();
            tracing::info!(trigger = %spec.label, component = %component.name, schedule = %spec.schedule_text, "timer armed");
            let label = spec.label.trim_start_matches("trigger.").to_string();
            let trigger = TimerTrigger::new(spec, component, self.state.clone(), clock)
                .with_pause(current.pauses.of_trigger(&label))
                .with_lateness_histogram(self.metrics.timer_histogram(&label))
                .with_delivery_runtime(tokio::runtime::Handle::current())
                .with_dead_letters(self.dead_letters.clone());
            let stop = self.shutdown.child_token();
            let scheduler = self.scheduler.as_ref().expect("started above");
            // Its deliveries on a tracker of its own: its task ends with them.
            let deliveries = TaskTracker::new();
            let run = Trigger::run(trigger, deliveries.clone(), stop.clone());
            let done = self.tasks.spawn_on(
                async move {
                    run.await;
                    deliveries.close();
                    deliveries.wait().await;
                },
                scheduler.handle(),
            );
            self.running.insert(
                i,
                Armed {
                    written: entry,
                    stop,
                    done,
                },
            );
        }
        Ok(())
    }

    /// Stops the timer thread (its timers have stopped: at shutdown).
    pub(crate) fn stop(&mut self) {
        for (_, armed) in std::mem::take(&mut self.running) {
            armed.stop.cancel();
        }
        self.scheduler = None;
    }
}

/// Writes the timers' state every second until `shutdown`.
fn spawn_timer_state_writer(
    state: Arc<TimerState>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            // The write ends in an fsync, which can stall on slow storage:
            // keep it off the workers that run guests.
            let s = state.clone();
            match tokio::task::spawn_blocking(move || s.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot write the timer state; catch-up after a restart may repeat ticks"),
                Err(e) => tracing::error!(error = %e, "the timer-state writer failed"),
            }
        }
    });
}

/// Runs each distinct `build` command once, in the manifest's directory.
async fn run_builds(manifest: &Manifest) -> Result<(), Fatal> {
    let mut done: Vec<&str> = Vec::new();
    for (name, config) in &manifest.components {
        let Some(cmd) = config.build.as_deref() else {
            continue;
        };
        if done.contains(&cmd) {
            continue;
        }
        done.push(cmd);
        if cmd.contains("wasm32-wasip2") {
            ensure_wasm_target(&manifest.base_dir, name).await?;
        }
        tracing::info!(component = %name, command = %cmd, "building");
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(&manifest.base_dir)
            .stdout(std::process::Stdio::inherit())
            .status()
            .await
            .map_err(|e| Fatal(format!("component.{name}.build: cannot run `{cmd}`: {e}")))?;
        if !status.success() {
            return Err(Fatal(format!(
                "component.{name}.build: `{cmd}` failed ({status})"
            )));
        }
    }
    Ok(())
}

/// Installs the wasm32-wasip2 target for the toolchain a build in `dir`
/// would use, when it is missing (a toolchain installed without it, or
/// `RUSTUP_AUTO_INSTALL=0`, which leaves `rust-toolchain.toml`'s `targets`
/// unapplied), and says so in one line.
async fn ensure_wasm_target(dir: &std::path::Path, component: &str) -> Result<(), Fatal> {
    let sysroot = tokio::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(dir)
        .output()
        .await;
    let Ok(sysroot) = sysroot else {
        // No rustc: the build command's own error says more.
        return Ok(());
    };
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if sysroot.is_empty()
        || std::path::Path::new(&sysroot)
            .join("lib/rustlib/wasm32-wasip2")
            .exists()
    {
        return Ok(());
    }
    tracing::info!(component, toolchain = %sysroot, "the wasm32-wasip2 target is missing; installing it with `rustup target add wasm32-wasip2`");
    let status = tokio::process::Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .current_dir(dir)
        .status()
        .await
        .map_err(|e| {
            Fatal(format!(
                "component.{component}.build needs the wasm32-wasip2 target, which is not installed, and rustup cannot be run ({e}): install the target for the Rust toolchain at {sysroot} (with rustup: `rustup target add wasm32-wasip2`)"
            ))
        })?;
    if !status.success() {
        return Err(Fatal(format!(
            "component.{component}.build: `rustup target add wasm32-wasip2` failed ({status})"
        )));
    }
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP, caught from the start of `up`.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            hup: signal(SignalKind::hangup()).expect("SIGHUP handler"),
        }
    }

    /// Reloads the manifest at each SIGHUP until SIGINT or SIGTERM.
    async fn run_until_shutdown(mut self, reloader: &crate::reload::Reloader) {
        loop {
            tokio::select! {
                _ = self.int.recv() => break,
                _ = self.term.recv() => break,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the manifest");
                    crate::reload::log(&reloader.reload().await);
                }
            }
        }
        tokio::spawn(async move {
            self.next().await;
            eprintln!("second signal: exiting now");
            std::process::exit(130);
        });
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}
