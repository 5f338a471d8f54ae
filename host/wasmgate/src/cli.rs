//! The `wasmgate` command line: `check`, `invoke` and `up`.
//!
//! Exit codes: 0 success; 1 the invocation ran but did not succeed (`invoke`);
//! 2 bad input (manifest, component, flags, files) or a failed build.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use wasmgate_manifest::limits::{HumanDuration, Size};
use wasmgate_manifest::{Manifest, ManifestError};
use wasmgate_runtime::engine::AllocatorChoice;

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
    /// List, read and write the key-value buckets guests keep state in
    /// (also while the host runs).
    Kv(KvArgs),
    /// Read a password from stdin (its first line) and print its Argon2id
    /// hash for `[[mqtt.embedded.users]] password_hash`.
    HashPassword,
    /// Write the WIT guests are built against (`wasmgate:edge` and its WASI
    /// packages) into a directory, for a bindings generator.
    Wit(WitArgs),
    /// Show a running gateway: components (versions, invocations, in
    /// flight, last error), triggers, MQTT, queue and dead letters.
    Status(StatusArgs),
    /// Deploy a new version of a component to a running gateway: checked,
    /// smoke-tested, swapped in without dropping work, then watched (and
    /// rolled back by itself if it fails too often).
    Deploy(DeployArgs),
    /// Bring back a component's previous version on a running gateway.
    Rollback(RollbackArgs),
    /// Make a running gateway read its manifest again and apply the
    /// difference (components, HTTP rules, MQTT triggers, timers); a
    /// manifest `check` would refuse is refused and the running
    /// configuration stays. SIGHUP does the same.
    Reload(ReloadArgs),
    /// Pause a trigger of a running gateway (`http[0]`, `mqtt[1]`,
    /// `timer[2]`): an HTTP rule answers 503, a timer skips its ticks, an
    /// MQTT trigger leaves its messages unacknowledged until resumed.
    Pause(TriggerArgs),
    /// Resume a paused trigger.
    Resume(TriggerArgs),
    /// Create a guest project: the handler, its build, a manifest, a sample
    /// event, a README and a CI workflow (`new mqtt thermostat --lang python`).
    New(NewArgs),
    /// Write a new Ed25519 signing key (PEM, mode 0600) and its public key
    /// (`KEY.pub`, the line for `[gateway] trusted_keys`).
    Keygen {
        /// The private key's file; the public key goes to this path + `.pub`.
        #[arg(long, default_value = "wasmgate.key")]
        out: PathBuf,
    },
    /// Sign a component: writes `FILE.sig` (Ed25519 over its SHA-256).
    Sign {
        /// The component.
        file: PathBuf,
        /// The private key (`wasmgate keygen`).
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a component's `FILE.sig`: exit 0 if a trusted key signed this
    /// file, 1 if not.
    Verify {
        /// The component.
        file: PathBuf,
        /// A trusted key: `ed25519:BASE64`, or a `.pub` file (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
    },
}

/// How the CLI reaches a running gateway's admin listener.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The manifest of the gateway (its `state_dir` holds the admin socket).
    #[arg(short = 'f', long = "file", default_value = "wasmgate.toml")]
    pub file: PathBuf,
    /// Ask the TCP admin listener at this URL (`http://HOST:PORT`, or
    /// `https://HOST:PORT` with `--ca`) instead of the local socket.
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// The file holding the admin token (with `--admin`).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the admin listener's (with
    /// `--admin https://…`).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// `wasmgate status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Where the gateway is.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Print the JSON the gateway answered.
    #[arg(long)]
    pub json: bool,
}

/// `wasmgate deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The component (its name in the manifest).
    pub name: String,
    /// The new version: a component file; its `FILE.sig`, if there is
    /// one, is sent with it.
    pub component: PathBuf,
    /// Where the gateway is.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Wait for the deploy's watch to end: exit 0 if the version stays,
    /// 1 if it was rolled back.
    #[arg(long)]
    pub wait: bool,
}

/// `wasmgate reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Where the gateway is (it reads the manifest it was started with).
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `wasmgate pause` and `wasmgate resume`.
#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// The trigger, as `status` lists it: `http[0]`, `mqtt[1]`, `timer[2]`.
    pub trigger: String,
    /// Where the gateway is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `wasmgate rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The component (its name in the manifest).
    pub name: String,
    /// Where the gateway is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `wasmgate new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// What triggers the guest.
    #[arg(value_enum)]
    pub kind: crate::new::Kind,
    /// The component's name, also the project's: a lowercase letter, then
    /// lowercase letters, digits, '-' or '_'.
    pub name: String,
    /// The guest's language.
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: crate::new::Lang,
    /// Where to write (default: ./NAME); it must be new or empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `wasmgate wit`.
#[derive(Debug, Args)]
pub struct WitArgs {
    /// Where to write: `edge.wit` and `deps/*/package.wit` go under it.
    #[arg(long, default_value = "wit")]
    pub dir: PathBuf,
    /// Replace files that exist with other contents.
    #[arg(long)]
    pub force: bool,
}

/// `wasmgate kv`.
#[derive(Debug, Args)]
pub struct KvArgs {
    /// The manifest (its state_dir holds the store, its `[keyvalue]` the bounds).
    #[arg(
        short = 'f',
        long = "file",
        default_value = "wasmgate.toml",
        global = true
    )]
    pub file: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: KvCommand,
}

/// `wasmgate kv` subcommands.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Each bucket that holds something: its keys and bytes, and its bounds.
    Buckets {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every key of a bucket, one per line, oldest first.
    List {
        /// The bucket.
        bucket: String,
    },
    /// Write a key's value to stdout, as it is (exit 1 if there is none).
    Get {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// Set a key to VALUE, or to stdin without one.
    Set {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The value (default: read stdin).
        value: Option<String>,
    },
    /// Delete a key (a missing key is not an error).
    Delete {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
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
    /// List dead letters, newest first, a page at a time.
    List {
        /// Only this component's.
        #[arg(long)]
        component: Option<String>,
        /// Only this trigger's (e.g. `timer:every 30s`).
        #[arg(long)]
        trigger: Option<String>,
        /// Print JSON (payloads and bodies included) instead of a table.
        #[arg(long)]
        json: bool,
        /// Most records to print.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
        /// Start after this record (the last id of the previous page).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
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
    /// Instance allocator (as `up` would use it).
    #[arg(long, value_enum, default_value_t = AllocatorArg::Auto)]
    pub allocator: AllocatorArg,
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
    #[arg(long, value_enum, default_value_t = AllocatorArg::Auto)]
    pub allocator: AllocatorArg,
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
    #[arg(long, value_name = "TOPIC", conflicts_with_all = ["timer", "http_path", "event"], help_heading = "Event")]
    pub mqtt_topic: Option<String>,
    /// Deliver the event in this JSON file: the shape `wasmgate dlq show`
    /// prints (its `event` object, or the whole record), e.g.
    /// `{"kind": "mqtt", "topic": "t", "payload_hex": "3231", "qos": 1, "retain": false, ...}`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["timer", "http_path"], help_heading = "Event")]
    pub event: Option<PathBuf>,
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
    /// MQTT 5 response topic (the guest may reply on it when a filter of
    /// `allow.mqtt_response`, or `--allow-response` for a bare `.wasm`, matches it).
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
    /// For a bare `.wasm`: a topic filter a response topic must match for
    /// the guest to reply on it; repeatable.
    #[arg(long, value_name = "FILTER", help_heading = "Grants (bare .wasm)")]
    pub allow_response: Vec<String>,
    /// For a bare `.wasm`: a host it may send HTTP requests to; repeatable.
    #[arg(long, value_name = "HOST", help_heading = "Grants (bare .wasm)")]
    pub allow_outbound_http: Vec<String>,
    /// For a bare `.wasm`: a key-value bucket it may open; repeatable.
    #[arg(long, value_name = "BUCKET", help_heading = "Grants (bare .wasm)")]
    pub allow_keyvalue: Vec<String>,
    /// Where the guest's key-value buckets live: `temp`, an empty store
    /// removed afterwards; `state`, the manifest's
    /// `state_dir/keyvalue.sqlite` (shared safely with a running gateway).
    #[arg(long, value_enum, default_value = "temp")]
    pub keyvalue: KeyValueChoice,

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
    #[arg(long, value_enum, default_value_t = AllocatorArg::Auto)]
    pub allocator: AllocatorArg,
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

/// `wasmgate invoke --keyvalue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyValueChoice {
    /// An empty store in a temporary directory, removed afterwards.
    Temp,
    /// The manifest's store (`state_dir/keyvalue.sqlite`).
    State,
}

/// Which instance allocator to use (`--allocator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AllocatorArg {
    /// Pooling if the address space allows it, else on-demand.
    #[default]
    Auto,
    /// Pooling, or fail.
    Pooling,
    /// On-demand (mmap per instance).
    OnDemand,
}

impl From<AllocatorArg> for AllocatorChoice {
    fn from(a: AllocatorArg) -> Self {
        match a {
            AllocatorArg::Auto => AllocatorChoice::Auto,
            AllocatorArg::Pooling => AllocatorChoice::Pooling,
            AllocatorArg::OnDemand => AllocatorChoice::OnDemand,
        }
    }
}

/// A failure reported to the user with exit code 2.
#[derive(Debug)]
pub struct Fatal(pub String);

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
            Command::Check(args) => crate::check::check(args),
            Command::Invoke(args) => crate::invoke::invoke(*args).await,
            Command::Up(args) => crate::up::up(args, started).await,
            Command::Dlq(args) => crate::dlq::dlq(args).await,
            Command::Kv(args) => crate::kv::kv(args).await,
            Command::Status(args) => crate::status::status(args).await,
            Command::Deploy(args) => crate::status::deploy(args).await,
            Command::Rollback(args) => crate::status::rollback(args).await,
            Command::Reload(args) => crate::status::reload(args).await,
            Command::Pause(args) => crate::status::set_paused(args, true).await,
            Command::Resume(args) => crate::status::set_paused(args, false).await,
            Command::HashPassword => hash_password(),
            Command::Wit(args) => crate::wit::write(&args.dir, args.force),
            Command::Keygen { out } => crate::sign::keygen(&out),
            Command::Sign { file, key } => crate::sign::sign(&file, &key),
            Command::Verify { file, keys } => crate::sign::verify(&file, &keys),
            Command::New(args) => {
                crate::new::new(args.kind, args.lang, &args.name, args.dir.as_deref())
            }
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

/// Loads and validates `path`: the manifest's own checks, then the HTTP
/// rules, which the HTTP trigger's router compiles (so a bad rule fails
/// every command, as a manifest error naming the rule).
pub fn load_manifest(path: &Path) -> Result<Manifest, ManifestError> {
    let manifest = Manifest::load(path)?;
    wasmgate_trigger_http::router::Router::build(&manifest)?;
    Ok(manifest)
}

/// `wasmgate hash-password`.
#[cfg(feature = "embedded-broker")]
fn hash_password() -> Result<ExitCode, Fatal> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Fatal(format!("cannot read the password from stdin: {e}")))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(Fatal(
            "no password on stdin (write it as the first line, e.g. `wasmgate hash-password < file`)"
                .into(),
        ));
    }
    let hash = wasmgate_trigger_mqtt::broker::hash_password(password).map_err(Fatal)?;
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}

/// `wasmgate hash-password` without the embedded broker.
#[cfg(not(feature = "embedded-broker"))]
fn hash_password() -> Result<ExitCode, Fatal> {
    Err(Fatal(
        "this build has no embedded broker (cargo feature `embedded-broker`)".into(),
    ))
}
