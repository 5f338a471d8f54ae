//! `wasmgate check`: validate a manifest, compile its components, print what it binds.

use crate::cli::{CheckArgs, Fatal, load_manifest};
use std::process::ExitCode;
use wasmgate_manifest::keyvalue::KeyValueBounds;
use wasmgate_manifest::limits::Size;
use wasmgate_runtime::deployment::Deployment;
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_store::keyvalue::{BucketUsage, KeyValueStore};
use wasmgate_store::spool::SpoolBounds;
/// `a, b, c`, or `-` for none.
fn list_text(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// A granted bucket: what it holds of its bounds.
fn bucket_text(bounds: &KeyValueBounds, usage: &[BucketUsage], name: &str) -> String {
    let b = bounds.bucket(name);
    let (keys, bytes) = usage
        .iter()
        .find(|u| u.name == name)
        .map_or((0, 0), |u| (u.keys, u.bytes));
    format!(
        "{name} ({keys} of {} keys, {} of {})",
        b.max_keys,
        Size(bytes),
        Size(b.max_bytes)
    )
}

/// Runs `wasmgate check`.
pub fn check(args: CheckArgs) -> Result<ExitCode, Fatal> {
    let manifest = load_manifest(&args.file)?;
    let gateway = Deployment::load(
        manifest,
        EngineOptions {
            allocator: args.allocator.into(),
            ..EngineOptions::default()
        },
    )?;
    let current = gateway.current();
    let m = &current.manifest;
    println!(
        "manifest {} (gateway {:?})",
        m.path.display(),
        m.gateway.name
    );
    if let Some(mqtt) = &m.mqtt {
        let spool = SpoolBounds::from(&mqtt.spool);
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
    let bounds = m.keyvalue.bounds();
    let usage = wasmgate_store::keyvalue::read_usage(&KeyValueStore::path_in(&m.state_dir()))
        .map_err(Fatal)?;
    for (name, config) in &m.components {
        let limits = current.components[name].limits();
        let (exports, imports) = &gateway.compiled[name];
        println!(
            "component {name}: {} [fuel {}, memory {}, timeout {}, concurrency {}, publishes {} / {}]",
            m.resolve(config.source.get_ref()).display(),
            limits.fuel,
            Size(limits.memory),
            humantime::format_duration(limits.timeout),
            limits.concurrency,
            limits.publishes,
            Size(limits.publish_bytes),
        );
        println!("  exports: {}", list_text(exports));
        println!("  imports: {}", list_text(imports));
        if let Some(buckets) = &config.allow.keyvalue {
            let text: Vec<String> = buckets
                .iter()
                .map(|b| bucket_text(&bounds, &usage, b.get_ref()))
                .collect();
            println!("  keyvalue: {}", text.join(", "));
        }
        if let Some(signer) = gateway.signers.get(name) {
            println!("  signed by: {signer}");
        }
        for cap in gateway.ungranted.get(name).into_iter().flatten() {
            println!(
                "  note: imports {} without a grant: each call is denied (grant it with allow.{}, or refuse the component at load with strict_imports = true)",
                cap.interface(),
                cap.allow_key()
            );
        }
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
    if let Ok(router) = wasmgate_trigger_http::router::Router::build(m) {
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
        .zip(wasmgate_trigger_timer::specs(m))
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
    for (i, x) in t.keyvalue.iter().enumerate() {
        let b = m.keyvalue.bounds().bucket(x.bucket.get_ref()).stream;
        println!(
            "trigger.keyvalue[{i}] {}{} batch {} -> {} (stream keeps {} changes, {}, {})",
            x.bucket.get_ref(),
            x.key_prefix
                .as_ref()
                .map_or(String::new(), |p| format!(" prefix {:?}", p.get_ref())),
            x.batch_size(),
            x.component.get_ref(),
            b.max_changes,
            Size(b.max_bytes),
            humantime::format_duration(b.max_age),
        );
    }
    println!(
        "ok: {} component(s), {} trigger(s)",
        m.components.len(),
        t.http.len() + t.mqtt.len() + t.timer.len() + t.keyvalue.len()
    );
    Ok(ExitCode::SUCCESS)
}
