//! `wasmgate invoke`: run one event through a component and print the outcome.

use crate::cli::{Fatal, InvokeArgs, KeyValueChoice, load_manifest};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};
use wasmgate_manifest::Manifest;
use wasmgate_manifest::keyvalue::KeyValueBounds;
use wasmgate_manifest::limits::Limits;
use wasmgate_runtime::component::{Cache, Compiled};
use wasmgate_runtime::deployment::{self, Runtime};
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::{
    Admission, Event, HttpRequest, Invocable, InvocationContext, MqttMessage, TimerTick,
};
use wasmgate_store::keyvalue::KeyValueStore;
use wasmgate_store::queue::EventQueue;
fn is_wasm_path(target: &str) -> bool {
    target.ends_with(".wasm") || target.contains('/') || Path::new(target).is_file()
}

/// Runs `wasmgate invoke`.
pub async fn invoke(args: InvokeArgs) -> Result<ExitCode, Fatal> {
    let options = EngineOptions {
        allocator: args.allocator.into(),
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
        let filters = |flag: &str, values: &[String]| {
            values
                .iter()
                .map(|f| {
                    wasmgate_manifest::topic::TopicFilter::parse(f)
                        .map_err(|e| Fatal(format!("{flag}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let acl = filters("--allow-publish", &args.allow_publish)?;
        let response_acl = filters("--allow-response", &args.allow_response)?;
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
            )
            .with_response_acl(response_acl)
            .with_keyvalue(buckets(&args.allow_keyvalue)?),
            runtime,
        )
    } else {
        let (manifest, runtime, compiled) = load_target(&args, &event, options)?;
        let invocable = deployment::invocable(&manifest, &runtime, &args.target, compiled);
        let mut limits = invocable.limits();
        apply_limit_flags(&args, &mut limits)?;
        let invocable = invocable.with_limits(limits);
        (invocable, runtime)
    };
    // Declared first, dropped last: the temporary store outlives the guest.
    let (keyvalue, _temp) = keyvalue_store(&args)?;
    let (invocable, _runtime) = invocable;
    invocable.set_keyvalue(std::sync::Arc::new(keyvalue));
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

/// `--allow-keyvalue`, checked like the manifest's `allow.keyvalue`.
fn buckets(names: &[String]) -> Result<Vec<String>, Fatal> {
    for name in names {
        wasmgate_manifest::keyvalue::validate_bucket_name(name)
            .map_err(|e| Fatal(format!("--allow-keyvalue: {e}")))?;
    }
    Ok(names.to_vec())
}

/// The store `--keyvalue` chooses, and the temporary directory that holds
/// it (removed when dropped).
fn keyvalue_store(args: &InvokeArgs) -> Result<(KeyValueStore, Option<tempfile::TempDir>), Fatal> {
    match args.keyvalue {
        KeyValueChoice::Temp => {
            let dir = tempfile::tempdir()
                .map_err(|e| Fatal(format!("a temporary key-value store: {e}")))?;
            let store = KeyValueStore::open(&KeyValueStore::path_in(dir.path()), bounds(args)?)
                .map_err(Fatal)?;
            Ok((store, Some(dir)))
        }
        KeyValueChoice::State => {
            if is_wasm_path(&args.target) {
                return Err(Fatal(
                    "--keyvalue state needs a component of a manifest (its state_dir); a bare .wasm runs on a temporary store".into(),
                ));
            }
            let m = load_manifest(&args.file)?;
            let store =
                KeyValueStore::open(&KeyValueStore::path_in(&m.state_dir()), m.keyvalue.bounds())
                    .map_err(Fatal)?;
            Ok((store, None))
        }
    }
}

/// The bounds of a temporary store: the manifest's for a component of
/// one, the defaults for a bare `.wasm`.
fn bounds(args: &InvokeArgs) -> Result<KeyValueBounds, Fatal> {
    if is_wasm_path(&args.target) {
        Ok(KeyValueBounds::default())
    } else {
        Ok(load_manifest(&args.file)?.keyvalue.bounds())
    }
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

/// The largest `--event` file read (a stored event's payload is hex, twice
/// its size).
const MAX_EVENT_FILE: u64 = 64 * 1024 * 1024;

/// The event of `--event FILE`: a stored event as `dlq show` prints it
/// (the `event` object, or the whole record), checked like the flags.
pub(crate) fn event_from_file(path: &Path) -> Result<Event, Fatal> {
    let flag = format!("--event {}", path.display());
    let size = std::fs::metadata(path)
        .map_err(|e| Fatal(format!("{flag}: {e}")))?
        .len();
    if size > MAX_EVENT_FILE {
        return Err(Fatal(format!(
            "{flag}: {size} bytes, more than the {MAX_EVENT_FILE} an event file may have"
        )));
    }
    let bytes = read_file("--event", path)?;
    let mut value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Fatal(format!("{flag}: not JSON: {e}")))?;
    if let Some(event) = value.get_mut("event") {
        value = event.take();
    }
    let stored: wasmgate_store::deadletter::StoredEvent =
        serde_json::from_value(value).map_err(|e| {
            Fatal(format!(
                "{flag}: not an event as `wasmgate dlq show` prints it ({e}); \
                 kind is one of mqtt, timer, http, keyvalue"
            ))
        })?;
    let event = stored
        .to_event()
        .map_err(|e| Fatal(format!("{flag}: {e}")))?;
    match &event {
        Event::Mqtt(m) => {
            wasmgate_manifest::topic::validate_name(&m.topic)
                .map_err(|e| Fatal(format!("{flag}: topic: {e}")))?;
            if m.qos > 2 {
                return Err(Fatal(format!("{flag}: qos {} is not 0, 1 or 2", m.qos)));
            }
        }
        Event::Http(r) => check_http(&r.method, &r.authority, &r.path, &r.headers)
            .map_err(|e| Fatal(format!("{flag}: {e}")))?,
        Event::Timer(_) => {}
        Event::KeyValue(b) => {
            wasmgate_manifest::keyvalue::validate_bucket_name(&b.bucket)
                .map_err(|e| Fatal(format!("{flag}: bucket: {e}")))?;
            let max = wasmgate_manifest::keyvalue::KeyValueTrigger::MAX_BATCH_SIZE as usize;
            if b.changes.len() > max {
                return Err(Fatal(format!(
                    "{flag}: {} changes; a batch has at most {max}",
                    b.changes.len()
                )));
            }
        }
    }
    Ok(event)
}

/// Whether an HTTP request with these parts can be made (a bad one is a
/// usage error, exit 2, not a failed invocation).
fn check_http(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    let mut check = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{host}{path}"));
    for (name, value) in headers {
        check = check.header(name.as_str(), value.as_str());
    }
    check.body(()).map(drop).map_err(|e| e.to_string())
}

fn build_event(args: &InvokeArgs) -> Result<Event, Fatal> {
    if let Some(path) = &args.event {
        return event_from_file(path);
    }
    if let Some(topic) = &args.mqtt_topic {
        wasmgate_manifest::topic::validate_name(topic)
            .map_err(|e| Fatal(format!("--mqtt-topic: {e}")))?;
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
        check_http(&args.method, &args.host, path, &args.headers)
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
        "say which event to deliver: --mqtt-topic TOPIC [--payload ...], --timer, --http-path PATH, or --event FILE".into(),
    ))
}

/// Loads the manifest component `invoke` names and checks that it handles `event`.
fn load_target(
    args: &InvokeArgs,
    event: &Event,
    options: EngineOptions,
) -> Result<(Manifest, Runtime, Compiled), Fatal> {
    let manifest = load_manifest(&args.file)?;
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
    let compiled = deployment::load_component(&manifest, &runtime, &args.target)?;
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
    let queue = EventQueue::open(&manifest.state_dir().join(wasmgate_store::queue::FILE_NAME))
        .map_err(Fatal)?;
    let id = queue
        .enqueue(
            &args.target,
            &wasmgate_store::deadletter::StoredEvent::from(event),
        )
        .map_err(Fatal)?;
    let json =
        serde_json::json!({ "status": "queued", "invocation_id": id, "component": args.target });
    let _ = writeln!(std::io::stdout().lock(), "{json}");
    Ok(ExitCode::SUCCESS)
}
