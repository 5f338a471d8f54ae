//! The `wasmgate` command line: `check`, `invoke` and `up`.
//!
//! Exit codes: 0 success; 1 the invocation ran but did not succeed (`invoke`);
//! 2 bad input (manifest, component, flags, files) or a failed build.

use crate::component::Cache;
use crate::deadletter::{AttemptError, DeadLetterStore};
use crate::engine::{AllocatorChoice, EngineOptions};
use crate::gateway::{self, Gateway, Runtime};
use crate::invoke::{
    Admission, Event, HttpRequest, Invocable, InvocationContext, MqttMessage, TimerTick,
};
use crate::limits::{HumanDuration, Limits, Size};
use crate::manifest::Manifest;
use crate::queue::EventQueue;
use crate::trigger::clock::Clock;
use crate::trigger::state::TimerState;
use crate::trigger::timer::{SchedulerThread, TimerTrigger};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A WebAssembly component host for edge triggers.
#[derive(Debug, Parser)]
#[command(name = "wasmgate", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a manifest and its components; print each trigger with its component.
    Check(CheckArgs),
    /// Run one invocation of a component and print its outcome as JSON.
    Invoke(Box<InvokeArgs>),
    /// Load a manifest and run its triggers until SIGINT or SIGTERM.
    Up(UpArgs),
    /// List, show, replay and purge dead-lettered events (also while the host runs).
    Dlq(DlqArgs),
}

/// `wasmgate dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    /// The manifest (its state_dir holds the store).
    #[arg(
        short = 'f',
        long = "file",
        default_value = "wasmgate.toml",
        global = true
    )]
    pub file: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// `wasmgate dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    List {
        /// Only this component's.
        #[arg(long)]
        component: Option<String>,
        /// Only this trigger's (e.g. `timer:every 30s`).
        #[arg(long)]
        trigger: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print one dead letter as JSON.
    Show {
        /// Its id (the invocation id).
        id: String,
    },
    /// Deliver dead letters again through the same component and limits; a
    /// record is removed when its replay succeeds.
    Replay {
        /// One record's id.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every record (of `--component`, if given).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// With `--all`: only this component's.
        #[arg(long, requires = "all")]
        component: Option<String>,
    },
    /// Delete dead letters.
    Purge {
        /// Delete every record.
        #[arg(long, conflicts_with_all = ["component", "older_than"])]
        all: bool,
        /// Only this component's.
        #[arg(long)]
        component: Option<String>,
        /// Only records older than this, e.g. `7d`.
        #[arg(long, value_parser = HumanDuration::parse)]
        older_than: Option<HumanDuration>,
    },
}

/// `wasmgate check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The manifest.
    #[arg(short = 'f', long = "file", default_value = "wasmgate.toml")]
    pub file: PathBuf,
    /// Compute each timer's next fire times from this RFC 3339 time instead of now.
    #[arg(long, value_parser = parse_rfc3339)]
    pub now: Option<chrono::DateTime<chrono::Utc>>,
}

fn parse_rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&chrono::Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 time ({e}); write e.g. 2026-01-01T00:00:00Z")
        })
}

/// `wasmgate up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The manifest.
    #[arg(short = 'f', long = "file", default_value = "wasmgate.toml")]
    pub file: PathBuf,
    /// Run each component's `build` command first.
    #[arg(long)]
    pub build: bool,
    /// Instance allocator.
    #[arg(long, value_enum, default_value_t = AllocatorChoice::Auto)]
    pub allocator: AllocatorChoice,
}

/// `wasmgate invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// A component name from the manifest, or a path to a `.wasm` component.
    pub target: String,
    /// The manifest (when TARGET is a component name).
    #[arg(short = 'f', long = "file", default_value = "wasmgate.toml")]
    pub file: PathBuf,

    /// Deliver an MQTT message on this topic to `handle-message`.
    #[arg(long, value_name = "TOPIC", conflicts_with_all = ["timer", "http_path"], help_heading = "Event")]
    pub mqtt_topic: Option<String>,
    /// Deliver a timer tick to `on-tick`.
    #[arg(long, conflicts_with = "http_path", help_heading = "Event")]
    pub timer: bool,
    /// Send an HTTP request for this path (and query) to `wasi:http/incoming-handler`.
    #[arg(long, value_name = "PATH", help_heading = "Event")]
    pub http_path: Option<String>,

    /// MQTT payload (text).
    #[arg(long, conflicts_with = "payload_file", help_heading = "MQTT")]
    pub payload: Option<String>,
    /// MQTT payload read from a file (binary is fine).
    #[arg(long, value_name = "FILE", help_heading = "MQTT")]
    pub payload_file: Option<PathBuf>,
    /// MQTT QoS (0, 1 or 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2), help_heading = "MQTT")]
    pub qos: u8,
    /// Set the retain flag.
    #[arg(long, help_heading = "MQTT")]
    pub retain: bool,
    /// MQTT 5 content type.
    #[arg(long, help_heading = "MQTT")]
    pub content_type: Option<String>,
    /// MQTT 5 response topic (the guest may always publish to it).
    #[arg(long, help_heading = "MQTT")]
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data (text).
    #[arg(long, help_heading = "MQTT")]
    pub correlation_data: Option<String>,
    /// MQTT 5 user property, `KEY=VALUE`; repeatable.
    #[arg(long = "user-property", value_name = "KEY=VALUE", value_parser = parse_key_value, help_heading = "MQTT")]
    pub user_properties: Vec<(String, String)>,

    /// Schedule text the tick carries.
    #[arg(long, default_value = "invoke", help_heading = "Timer")]
    pub schedule: String,
    /// Missed-tick count the tick carries.
    #[arg(long, default_value_t = 0, help_heading = "Timer")]
    pub missed: u32,

    /// HTTP method.
    #[arg(long, default_value = "GET", help_heading = "HTTP")]
    pub method: String,
    /// HTTP header, `NAME: VALUE`; repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header, help_heading = "HTTP")]
    pub headers: Vec<(String, String)>,
    /// HTTP request body (text).
    #[arg(long, conflicts_with = "body_file", help_heading = "HTTP")]
    pub body: Option<String>,
    /// HTTP request body read from a file.
    #[arg(long, value_name = "FILE", help_heading = "HTTP")]
    pub body_file: Option<PathBuf>,
    /// HTTP authority (host).
    #[arg(long, default_value = "localhost", help_heading = "HTTP")]
    pub host: String,

    /// Fuel budget (overrides the manifest).
    #[arg(long, help_heading = "Limits")]
    pub fuel: Option<u64>,
    /// Memory cap, e.g. `16MiB` (overrides the manifest).
    #[arg(long, value_parser = Size::parse, help_heading = "Limits")]
    pub memory: Option<Size>,
    /// Timeout, e.g. `2s` (overrides the manifest).
    #[arg(long, value_parser = HumanDuration::parse, help_heading = "Limits")]
    pub timeout: Option<HumanDuration>,
    /// For a bare `.wasm`: a topic filter it may publish to; repeatable.
    #[arg(long, value_name = "FILTER", help_heading = "Grants (bare .wasm)")]
    pub allow_publish: Vec<String>,
    /// For a bare `.wasm`: a host it may send HTTP requests to; repeatable.
    #[arg(long, value_name = "HOST", help_heading = "Grants (bare .wasm)")]
    pub allow_outbound_http: Vec<String>,

    /// Queue the event durably for a running `wasmgate up` to deliver (with
    /// retries and dead letters) instead of running it now. Needs a manifest component.
    #[arg(long = "async", conflicts_with_all = ["fuel", "memory", "timeout", "attempt"])]
    pub queue: bool,
    /// Invocation id (default: a fresh one).
    #[arg(long, conflicts_with = "queue")]
    pub id: Option<String>,
    /// Attempt number the guest sees.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: u32,
    /// Directory of precompiled components for a bare `.wasm` (default:
    /// `$WASMGATE_CACHE_DIR`, `$XDG_CACHE_HOME/wasmgate` or `~/.cache/wasmgate`).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Instance allocator.
    #[arg(long, value_enum, default_value_t = AllocatorChoice::Auto)]
    pub allocator: AllocatorChoice,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not `NAME: VALUE`"))
}

/// A failure reported to the user with exit code 2.
#[derive(Debug)]
struct Fatal(String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

/// Parses the command line, runs it, and returns the exit code.
pub fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Up(_) => "info",
        _ => "warn",
    };
    init_tracing(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Check(args) => check(args),
            Command::Invoke(args) => invoke(*args).await,
            Command::Up(args) => up(args, started).await,
            Command::Dlq(args) => dlq(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(Fatal(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASMGATE_LOG")
        // The embedded broker's own log is quiet unless asked for.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "{default_level},rmqtt=warn,rmqtt_net=warn,rmqtt_codec=warn"
            ))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (e.g. the log reader went away) must not turn each
        // log line into a panic: tracing reports its own write errors with
        // `eprintln!`, which panics when stderr is closed.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn check(args: CheckArgs) -> Result<ExitCode, Fatal> {
    let manifest = Manifest::load(&args.file)?;
    let gateway = Gateway::load(manifest, EngineOptions::default())?;
    let m = &gateway.manifest;
    println!(
        "manifest {} (gateway {:?})",
        m.path.display(),
        m.gateway.name
    );
    if let Some(mqtt) = &m.mqtt {
        let spool = mqtt.spool.bounds();
        println!(
            "mqtt {} (MQTT {}), spool {} messages / {}, when full {}",
            mqtt.broker.get_ref(),
            if *mqtt.version.get_ref() == 3 {
                "3.1.1"
            } else {
                "5"
            },
            spool.max_messages,
            Size(spool.max_bytes),
            spool.on_full
        );
    }
    for (name, config) in &m.components {
        let limits = gateway.components[name].limits;
        let (exports, imports) = &gateway.compiled[name];
        println!(
            "component {name}: {} [fuel {}, memory {}, timeout {}, concurrency {}]",
            m.resolve(config.source.get_ref()).display(),
            limits.fuel,
            Size(limits.memory),
            humantime::format_duration(limits.timeout),
            limits.concurrency
        );
        println!(
            "  exports: {}",
            if exports.is_empty() {
                "-".into()
            } else {
                exports.join(", ")
            }
        );
        println!(
            "  imports: {}",
            if imports.is_empty() {
                "-".into()
            } else {
                imports.join(", ")
            }
        );
    }
    let t = &m.triggers;
    for (i, x) in t.http.iter().enumerate() {
        let path = x
            .path
            .as_ref()
            .map_or("/*".to_string(), |p| p.get_ref().values().join(","));
        let methods: Vec<&str> = x.methods.iter().map(|m| m.get_ref().as_str()).collect();
        let methods = if methods.is_empty() {
            "ANY".to_string()
        } else {
            methods.join(",")
        };
        println!(
            "trigger.http[{i}] priority {} {methods} {path} -> {}",
            x.priority.get_ref(),
            x.action_text()
        );
    }
    if let Ok(router) = crate::trigger::http::router::Router::build(m) {
        for warning in router.warnings() {
            println!("warning: {warning}");
        }
    }
    for (i, x) in t.mqtt.iter().enumerate() {
        println!(
            "trigger.mqtt[{i}] {} qos {} -> {}",
            x.topic.get_ref(),
            x.qos.get_ref(),
            x.component.get_ref()
        );
    }
    let now = args.now.unwrap_or_else(chrono::Utc::now);
    for ((i, x), spec) in t
        .timer
        .iter()
        .enumerate()
        .zip(crate::trigger::timer::specs(m))
    {
        let tz: chrono_tz::Tz = x
            .timezone
            .as_ref()
            .and_then(|z| z.get_ref().parse().ok())
            .unwrap_or(chrono_tz::UTC);
        println!(
            "trigger.timer[{i}] {} ({tz}) -> {}",
            x.schedule_text(),
            x.component.get_ref()
        );
        let offset = chrono::Duration::from_std(spec.offset).unwrap_or_default();
        let mut cursor = now - offset;
        let mut next = Vec::new();
        for _ in 0..5 {
            let Some(t) = spec.schedule.next_after(cursor) else {
                break;
            };
            next.push(
                (t + offset)
                    .with_timezone(&tz)
                    .format("%Y-%m-%d %H:%M:%S%.3f %Z")
                    .to_string(),
            );
            cursor = t;
        }
        let next = if next.is_empty() {
            "never".to_string()
        } else {
            next.join(", ")
        };
        println!("  next: {next}");
    }
    println!(
        "ok: {} component(s), {} trigger(s)",
        m.components.len(),
        t.http.len() + t.mqtt.len() + t.timer.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn is_wasm_path(target: &str) -> bool {
    target.ends_with(".wasm") || target.contains('/') || Path::new(target).is_file()
}

async fn invoke(args: InvokeArgs) -> Result<ExitCode, Fatal> {
    let options = EngineOptions {
        allocator: args.allocator,
        ..EngineOptions::default()
    };
    // Build the event first: a missing payload file fails before any compiling.
    let event = build_event(&args)?;
    if args.queue {
        return enqueue(&args, &event, options);
    }
    let invocable = if is_wasm_path(&args.target) {
        let path = PathBuf::from(&args.target);
        let cache = match &args.cache_dir {
            Some(dir) => Cache::new(Some(dir.clone())),
            None => Cache::user_default(),
        };
        let runtime = Runtime::new(options, cache)?;
        let compiled = runtime.compile(&path)?;
        let mut limits = Limits::default();
        apply_limit_flags(&args, &mut limits)?;
        let mut acl = Vec::new();
        for f in &args.allow_publish {
            acl.push(
                crate::topic::TopicFilter::parse(f)
                    .map_err(|e| Fatal(format!("--allow-publish: {e}")))?,
            );
        }
        let name = path
            .file_stem()
            .map_or("component".into(), |s| s.to_string_lossy().into_owned());
        compiled
            .require_handler(&name, event.handler())
            .map_err(Fatal)?;
        (
            Invocable::new(
                name,
                compiled.pre,
                limits,
                acl,
                args.allow_outbound_http.clone(),
                runtime.engine(),
            ),
            runtime,
        )
    } else {
        let (manifest, runtime, compiled) = load_target(&args, &event, options)?;
        let mut invocable = gateway::invocable(&manifest, &runtime, &args.target, compiled);
        let mut limits = invocable.limits;
        apply_limit_flags(&args, &mut limits)?;
        invocable.limits = limits;
        (invocable, runtime)
    };
    let (invocable, _runtime) = invocable;
    let mut ctx = InvocationContext::new("invoke");
    if let Some(id) = &args.id {
        ctx.id = id.clone();
    }
    ctx.attempt = args.attempt;
    let outcome = invocable.invoke(event, ctx, Admission::Wait).await;
    let json = serde_json::to_string_pretty(&outcome).expect("outcome serializes");
    // A closed stdout (e.g. `| head`) must not turn into a panic.
    let _ = writeln!(std::io::stdout().lock(), "{json}");
    Ok(if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn apply_limit_flags(args: &InvokeArgs, limits: &mut Limits) -> Result<(), Fatal> {
    if let Some(f) = args.fuel {
        limits.fuel = f;
    }
    if let Some(m) = args.memory {
        limits.memory = m.0;
    }
    if let Some(t) = args.timeout {
        limits.timeout = t.0;
    }
    limits.validate().map_err(|e| Fatal(format!("limits: {e}")))
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, Fatal> {
    std::fs::read(path).map_err(|e| Fatal(format!("{flag} {}: {e}", path.display())))
}

fn build_event(args: &InvokeArgs) -> Result<Event, Fatal> {
    if let Some(topic) = &args.mqtt_topic {
        crate::topic::validate_name(topic).map_err(|e| Fatal(format!("--mqtt-topic: {e}")))?;
        let payload = match (&args.payload, &args.payload_file) {
            (Some(p), _) => p.clone().into_bytes(),
            (None, Some(path)) => read_file("--payload-file", path)?,
            (None, None) => Vec::new(),
        };
        return Ok(Event::Mqtt(MqttMessage {
            topic: topic.clone(),
            payload,
            qos: args.qos,
            retain: args.retain,
            content_type: args.content_type.clone(),
            response_topic: args.response_topic.clone(),
            correlation_data: args.correlation_data.clone().map(String::into_bytes),
            user_properties: args.user_properties.clone(),
        }));
    }
    if args.timer {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        return Ok(Event::Timer(TimerTick {
            schedule: args.schedule.clone(),
            scheduled_at_ms: now,
            fired_at_ms: now,
            missed: args.missed,
        }));
    }
    if let Some(path) = &args.http_path {
        if !path.starts_with('/') {
            return Err(Fatal(format!("--http-path {path:?} must start with '/'")));
        }
        let body = match (&args.body, &args.body_file) {
            (Some(b), _) => b.clone().into_bytes(),
            (None, Some(p)) => read_file("--body-file", p)?,
            (None, None) => Vec::new(),
        };
        // Validate method, host, path and headers here, so a bad flag is a
        // usage error (exit 2), not a failed invocation.
        let mut check = hyper::Request::builder()
            .method(args.method.as_str())
            .uri(format!("http://{}{path}", args.host));
        for (name, value) in &args.headers {
            check = check.header(name.as_str(), value.as_str());
        }
        check
            .body(())
            .map_err(|e| Fatal(format!("--method/--host/--http-path/--header: {e}")))?;
        return Ok(Event::Http(HttpRequest {
            method: args.method.clone(),
            path: path.clone(),
            authority: args.host.clone(),
            headers: args.headers.clone(),
            body,
        }));
    }
    Err(Fatal(
        "say which event to deliver: --mqtt-topic TOPIC [--payload ...], --timer, or --http-path PATH".into(),
    ))
}

async fn up(args: UpArgs, started: Instant) -> Result<ExitCode, Fatal> {
    let manifest = Manifest::load(&args.file)?;
    if args.build {
        run_builds(&manifest).await?;
    }
    let options = EngineOptions {
        allocator: args.allocator,
        ..EngineOptions::default()
    };
    let gateway = Gateway::load(manifest, options)?;
    let m = &gateway.manifest;
    // Without `[mqtt]` the broker defaults to "embedded" too; it starts when
    // MQTT triggers need it or `[mqtt]` asks for it.
    let mqtt_config = m.mqtt.clone().unwrap_or_default();
    let wants_embedded =
        mqtt_config.is_embedded() && (m.mqtt.is_some() || !m.triggers.mqtt.is_empty());
    // Components that may publish need the connection too (their publishes
    // go through the outbox), when there is an `[mqtt]` to connect to.
    let publishers: Vec<&String> = m
        .components
        .iter()
        .filter(|(_, c)| c.allow.mqtt_publish.as_ref().is_some_and(|v| !v.is_empty()))
        .map(|(name, _)| name)
        .collect();
    let dead_letter_topic = m
        .dead_letters
        .mqtt_topic
        .as_ref()
        .map(|t| t.get_ref().clone());
    let needs_connection = !m.triggers.mqtt.is_empty()
        || ((!publishers.is_empty() || dead_letter_topic.is_some()) && m.mqtt.is_some());
    let (_embedded_broker, mqtt) = if wants_embedded {
        start_embedded_broker(m, &mqtt_config, needs_connection).await?
    } else if needs_connection {
        let options = crate::trigger::mqtt::client_options(m)
            .map_err(|e| Fatal(format!("{}: {e}", m.path.display())))?;
        (None, options)
    } else {
        (None, None)
    };
    let (outbox, outbox_rx) = if mqtt.is_some() {
        let (outbox, rx) = crate::outbox::Outbox::connected(crate::outbox::OUTBOX_CAPACITY);
        (
            Arc::new(outbox.with_dead_letter_topic(dead_letter_topic)),
            Some(rx),
        )
    } else {
        if !publishers.is_empty() {
            tracing::warn!(components = ?publishers, "these components may publish MQTT messages but there is no [mqtt] connection: their publishes are dropped (counted and logged)");
        }
        if dead_letter_topic.is_some() {
            tracing::warn!(
                "dead_letters.mqtt_topic is set but there is no [mqtt] connection: dead letters are only stored"
            );
        }
        (Arc::new(crate::outbox::Outbox::disconnected()), None)
    };
    for c in gateway.components.values() {
        c.set_outbox(outbox.clone());
    }
    let dead_letters = Arc::new(
        DeadLetterStore::open(&m.dead_letter_path(), m.dead_letters.bounds()).map_err(Fatal)?,
    );
    let timer_state =
        Arc::new(TimerState::open(&m.state_dir().join("timers.json")).map_err(Fatal)?);
    let queue =
        Arc::new(EventQueue::open(&m.state_dir().join(crate::queue::FILE_NAME)).map_err(Fatal)?);
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    // The outbox (timer, HTTP and queued invocations' publishes) stays open
    // until every such invocation has finished; then its last publishes go
    // to the spool (`late` finishes that).
    let outbox_closed = CancellationToken::new();
    let late = TaskTracker::new();
    let http = crate::trigger::http::HttpServer::bind(&gateway)
        .await
        .map_err(Fatal)?;
    let mut http_drain = std::time::Duration::ZERO;
    if let Some(server) = http {
        let addr = server
            .local_addr()
            .map_err(|e| Fatal(format!("http.listen: {e}")))?;
        http_drain = m.http.clone().unwrap_or_default().limits().drain_timeout;
        tracing::info!(
            address = %addr,
            scheme = if server.is_tls() { "https" } else { "http" },
            rules = m.triggers.http.len(),
            "http listening"
        );
        tasks.spawn(server.run(shutdown.clone()));
    }
    tasks.spawn(crate::queue::consume(
        queue,
        gateway.components.clone(),
        dead_letters.clone(),
        crate::delivery::RetryPolicy::default(),
        shutdown.clone(),
    ));
    if let Some((options, receive_maximum)) = mqtt {
        let specs = crate::trigger::mqtt::specs(m, &gateway.components);
        for s in &specs {
            tracing::info!(trigger = %s.label, component = %s.component.name, topic = %s.filter.raw, qos = s.qos, max_in_flight = s.max_in_flight, "MQTT trigger armed");
        }
        let spool = crate::spool::Spool::open(
            &m.state_dir().join(crate::spool::FILE_NAME),
            mqtt_config.spool.bounds(),
        )
        .map_err(Fatal)?;
        let mut trigger = crate::trigger::mqtt::MqttTriggers::new(options, receive_maximum, specs)
            .with_dead_letters(dead_letters.clone())
            .with_spool(spool);
        if let Some(rx) = outbox_rx {
            trigger = trigger
                .with_outbox(rx)
                .outbox_open_until(outbox_closed.clone(), late.clone());
        }
        tasks.spawn(trigger.run(tasks.clone(), shutdown.clone()));
    }
    let scheduler = start_timers(
        &gateway,
        timer_state.clone(),
        dead_letters.clone(),
        &tasks,
        &shutdown,
    )?;
    tracing::info!(
        gateway = %m.gateway.name,
        timers = m.triggers.timer.len(),
        mqtt_triggers = m.triggers.mqtt.len(),
        components = gateway.components.len(),
        startup_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0),
        "ready"
    );
    shutdown_signal().await;
    tracing::info!(
        drain_timeout_s = DRAIN_TIMEOUT.as_secs(),
        "shutting down: no new events; draining in-flight invocations"
    );
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT.max(http_drain), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight invocations did not finish within the drain timeout; abandoning them"
        );
    }
    drop(scheduler);
    outbox_closed.cancel();
    late.close();
    if tokio::time::timeout(LATE_PUBLISH_TIMEOUT, late.wait())
        .await
        .is_err()
    {
        tracing::warn!("the last MQTT publishes could not be written to the spool in time");
    }
    if let Err(e) = timer_state.flush() {
        tracing::error!(error = %e, "cannot write the timer state");
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "embedded-broker")]
type EmbeddedBroker = crate::broker::EmbeddedBroker;
#[cfg(not(feature = "embedded-broker"))]
type EmbeddedBroker = ();

/// Starts the embedded broker and, when there are MQTT triggers, the client
/// options to reach it.
#[cfg(feature = "embedded-broker")]
async fn start_embedded_broker(
    m: &Manifest,
    config: &crate::manifest::MqttConfig,
    needs_client: bool,
) -> Result<
    (
        Option<EmbeddedBroker>,
        Option<(crate::trigger::mqtt::ClientOptions, u16)>,
    ),
    Fatal,
> {
    let mut options = crate::broker::EmbeddedOptions::default();
    if let Some(e) = &config.embedded {
        let e = e.get_ref();
        if let Some(listen) = e.listen {
            options.listen = listen;
        }
        if let Some(q) = &e.max_queued {
            options.max_queued = *q.get_ref() as usize;
        }
    }
    let broker = crate::broker::EmbeddedBroker::start(options)
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
        let url = crate::trigger::mqtt::BrokerUrl {
            tls: false,
            host,
            port: addr.port(),
        };
        Some(
            crate::trigger::mqtt::client_options_for(m, &url)
                .map_err(|e| Fatal(format!("{}: {e}", m.path.display())))?,
        )
    };
    Ok((Some(broker), client))
}

#[cfg(not(feature = "embedded-broker"))]
async fn start_embedded_broker(
    m: &Manifest,
    _config: &crate::manifest::MqttConfig,
    _needs_client: bool,
) -> Result<
    (
        Option<EmbeddedBroker>,
        Option<(crate::trigger::mqtt::ClientOptions, u16)>,
    ),
    Fatal,
> {
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

/// Starts every timer of the gateway and the task that persists their state.
fn start_timers(
    gateway: &Gateway,
    state: Arc<TimerState>,
    dead_letters: Arc<DeadLetterStore>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Option<SchedulerThread>, Fatal> {
    let m = &gateway.manifest;
    if m.triggers.timer.is_empty() {
        return Ok(None);
    }
    let scheduler = SchedulerThread::start()
        .map_err(|e| Fatal(format!("cannot start the timer thread: {e}")))?;
    let deliveries = tokio::runtime::Handle::current();
    let clock =
        Clock::system().map_err(|e| Fatal(format!("cannot start the timer thread: {e}")))?;
    for (spec, t) in crate::trigger::timer::specs(m)
        .into_iter()
        .zip(&m.triggers.timer)
    {
        let component = gateway.components[t.component.get_ref()].clone();
        tracing::info!(trigger = %spec.label, component = %component.name, schedule = %spec.schedule_text, "timer armed");
        let trigger = TimerTrigger::new(spec, component, state.clone(), clock.clone())
            .with_delivery_runtime(deliveries.clone())
            .with_dead_letters(dead_letters.clone());
        tasks.spawn_on(
            trigger.run(tasks.clone(), shutdown.clone()),
            scheduler.handle(),
        );
    }
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
    Ok(Some(scheduler))
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

/// Waits for SIGINT or SIGTERM. A second signal while shutting down exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn dlq(args: DlqArgs) -> Result<ExitCode, Fatal> {
    let manifest = Manifest::load(&args.file)?;
    let store = DeadLetterStore::open(&manifest.dead_letter_path(), manifest.dead_letters.bounds())
        .map_err(Fatal)?;
    match args.command {
        DlqCommand::List {
            component,
            trigger,
            json,
        } => {
            let records = store
                .list(component.as_deref(), trigger.as_deref())
                .map_err(Fatal)?;
            let mut out = std::io::stdout().lock();
            if json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&records).expect("records serialize")
                );
            } else {
                let _ = writeln!(
                    out,
                    "{:<36}  {:<24}  {:<16}  {:<20}  {:<18}  {:>8}  LAST ERROR",
                    "ID", "DEAD AT (UTC)", "COMPONENT", "TRIGGER", "CONDITION", "ATTEMPTS"
                );
                for r in &records {
                    let at = chrono::DateTime::from_timestamp_millis(r.dead_at_ms as i64)
                        .map_or_else(String::new, |t| {
                            t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
                        });
                    let condition =
                        serde_json::to_value(r.condition).expect("condition serializes");
                    let _ = writeln!(
                        out,
                        "{:<36}  {:<24}  {:<16}  {:<20}  {:<18}  {:>8}  {}: {}",
                        r.id,
                        at,
                        r.component,
                        r.trigger,
                        condition.as_str().unwrap_or_default(),
                        r.attempts,
                        r.last_error.outcome,
                        r.last_error.message
                    );
                }
                let _ = writeln!(
                    out,
                    "{} dead letter(s) in {}",
                    records.len(),
                    store.path().display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { id } => match store.get(&id).map_err(Fatal)? {
            Some(r) => {
                let _ = writeln!(
                    std::io::stdout().lock(),
                    "{}",
                    serde_json::to_string_pretty(&r).expect("record serializes")
                );
                Ok(ExitCode::SUCCESS)
            }
            None => Err(Fatal(format!(
                "no dead letter with id {id:?} in {}",
                store.path().display()
            ))),
        },
        DlqCommand::Purge {
            all,
            component,
            older_than,
        } => {
            if !all && component.is_none() && older_than.is_none() {
                return Err(Fatal(
                    "say what to purge: --all, --component C and/or --older-than DURATION".into(),
                ));
            }
            let n = store
                .purge(
                    component.as_deref(),
                    older_than.map(|d| d.0.as_millis() as u64),
                )
                .map_err(Fatal)?;
            println!("purged {n} dead letter(s)");
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay {
            id,
            all: _,
            component,
        } => {
            let records = match &id {
                Some(id) => vec![store.get(id).map_err(Fatal)?.ok_or_else(|| {
                    Fatal(format!(
                        "no dead letter with id {id:?} in {}",
                        store.path().display()
                    ))
                })?],
                None => store.list(component.as_deref(), None).map_err(Fatal)?,
            };
            let cache = Cache::new(Some(manifest.state_dir().join("precompiled")));
            let runtime = Runtime::new(EngineOptions::default(), cache)?;
            let mut invocables: std::collections::BTreeMap<String, Invocable> =
                std::collections::BTreeMap::new();
            let (mut ok, mut failed) = (0, 0);
            for mut record in records {
                if !manifest.components.contains_key(&record.component) {
                    let msg = format!(
                        "dead letter {} belongs to component {:?}, which {} no longer defines; kept",
                        record.id,
                        record.component,
                        manifest.path.display()
                    );
                    if id.is_some() {
                        return Err(Fatal(msg));
                    }
                    eprintln!("error: {msg}");
                    failed += 1;
                    continue;
                }
                if !invocables.contains_key(&record.component) {
                    let compiled = gateway::load_component(&manifest, &runtime, &record.component)?;
                    invocables.insert(
                        record.component.clone(),
                        gateway::invocable(&manifest, &runtime, &record.component, compiled),
                    );
                }
                let invocable = &invocables[&record.component];
                let event = record
                    .event
                    .to_event()
                    .map_err(|e| Fatal(format!("dead letter {}: {e}", record.id)))?;
                let ctx = InvocationContext {
                    id: record.id.clone(),
                    trigger: record.trigger.clone(),
                    attempt: record.attempts + 1,
                };
                let outcome = invocable.invoke(event, ctx, Admission::Wait).await;
                if outcome.is_ok() {
                    store.delete(&record.id).map_err(Fatal)?;
                    println!("{}: replayed, ok; removed", record.id);
                    ok += 1;
                } else {
                    record.attempts += 1;
                    record.last_error = AttemptError::from_outcome(&outcome);
                    store.put(record.clone()).await.map_err(Fatal)?;
                    println!(
                        "{}: replayed, {}: {}; kept",
                        record.id, record.last_error.outcome, record.last_error.message
                    );
                    failed += 1;
                }
            }
            println!(
                "replayed {} dead letter(s): {ok} ok, {failed} failed",
                ok + failed
            );
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Loads the manifest component `invoke` names and checks that it handles `event`.
fn load_target(
    args: &InvokeArgs,
    event: &Event,
    options: EngineOptions,
) -> Result<(Manifest, Runtime, crate::component::Compiled), Fatal> {
    let manifest = Manifest::load(&args.file)?;
    if !manifest.components.contains_key(&args.target) {
        let known: Vec<&str> = manifest.components.keys().map(String::as_str).collect();
        return Err(Fatal(format!(
            "{}: no component named {:?} (known: {}); to run a file, give its path ending in .wasm",
            manifest.path.display(),
            args.target,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    let cache = Cache::new(Some(manifest.state_dir().join("precompiled")));
    let runtime = Runtime::new(options, cache)?;
    let compiled = gateway::load_component(&manifest, &runtime, &args.target)?;
    compiled
        .require_handler(&args.target, event.handler())
        .map_err(Fatal)?;
    Ok((manifest, runtime, compiled))
}

/// `wasmgate invoke --async`: checks the component, then queues the event.
fn enqueue(args: &InvokeArgs, event: &Event, options: EngineOptions) -> Result<ExitCode, Fatal> {
    if is_wasm_path(&args.target) {
        return Err(Fatal(
            "--async queues events for the components of a manifest; give a component name (and -f)".into(),
        ));
    }
    let (manifest, _runtime, _compiled) = load_target(args, event, options)?;
    let queue =
        EventQueue::open(&manifest.state_dir().join(crate::queue::FILE_NAME)).map_err(Fatal)?;
    let id = queue
        .enqueue(&args.target, &crate::deadletter::StoredEvent::from(event))
        .map_err(Fatal)?;
    let json =
        serde_json::json!({ "status": "queued", "invocation_id": id, "component": args.target });
    let _ = writeln!(std::io::stdout().lock(), "{json}");
    Ok(ExitCode::SUCCESS)
}
