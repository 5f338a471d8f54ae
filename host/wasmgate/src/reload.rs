//! `wasmgate reload` and SIGHUP: the manifest is read again and the
//! difference applied to the running gateway, or the new manifest is refused
//! and nothing changes.
//!
//! - Components added, removed or changed (source, limits, grants, env,
//!   reuse, concurrency). A changed component keeps its identity: every
//!   trigger that calls it runs the new settings (and code, when its source
//!   file changed) from its next invocation on; running invocations finish
//!   on what they started with. A component whose source file did not change
//!   keeps a version deployed with `wasmgate deploy`.
//! - HTTP rules are swapped on the open listener.
//! - Timers that changed (or were added) are re-armed, with their persisted
//!   state; removed ones stop; unchanged ones keep running.
//! - MQTT triggers added, removed or changed on the live session: new
//!   filters subscribed, unused ones unsubscribed, unchanged triggers keep
//!   their queues and deliveries (see `MqttControl::reconfigure`).
//!
//! Checked first, like `check` and `up`: the manifest, every component it
//! names, the handler of every trigger, grants and signatures. What a
//! reload cannot change on a running gateway — `[gateway]`, `[http]` (the
//! listener), `[mqtt]` (the connection), `[dead_letters]`, `[admin]`, HTTP
//! rules for a gateway that has no listener and MQTT triggers for one that
//! has no connection — is refused, naming the key: restart for those.

use crate::deploy::Deployer;
use crate::metrics::GatewayMetrics;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use wasmgate_manifest::{Manifest, value_at};
use wasmgate_runtime::deployment::{self, Current, Deployment};
use wasmgate_runtime::invoke::Invocable;
use wasmgate_trigger_http::HttpRoutes;
use wasmgate_trigger_mqtt::MqttControl;

/// Sections a reload refuses to change, with why.
const FIXED: &[(&str, &str)] = &[
    (
        "gateway",
        "the gateway's identity, state directory and keys",
    ),
    ("http", "the HTTP listener"),
    ("mqtt", "the MQTT connection"),
    ("dead_letters", "the dead-letter store"),
    ("admin", "the admin listener"),
    ("keyvalue", "the key-value store's bounds"),
];

/// What a reload changed.
#[derive(Debug, Default, Serialize)]
pub struct Reloaded {
    /// Components added.
    pub added: Vec<String>,
    /// Components removed.
    pub removed: Vec<String>,
    /// Components whose settings or source changed.
    pub changed: Vec<String>,
    /// Triggers added, removed or changed (`http[0]`, `timer[1]`).
    pub triggers: Vec<String>,
}

impl Reloaded {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.triggers.is_empty()
    }
}

/// Runs a gateway's reloads, one at a time (and never with a deploy or a
/// rollback).
pub struct Reloader {
    path: PathBuf,
    deployment: Arc<Deployment>,
    deployer: Arc<Deployer>,
    metrics: Arc<GatewayMetrics>,
    capabilities: crate::up::HostCapabilities,
    http: Option<Arc<HttpRoutes>>,
    mqtt: Option<MqttControl>,
    timers: tokio::sync::Mutex<crate::up::Timers>,
    stopping: std::sync::atomic::AtomicBool,
}

/// The components a new manifest runs with, the running ones to
/// reconfigure, and the names that need a new deploy state.
type TakenIn = (
    BTreeMap<String, Arc<Invocable>>,
    Vec<(Arc<Invocable>, Staged)>,
    BTreeSet<String>,
);

/// A component of the new manifest, checked, not yet applied.
struct Staged {
    invocable: Invocable,
    /// Its source file changed: the new code runs (else the running one).
    source_changed: bool,
}

impl Reloader {
    /// The reloads of a started gateway, reading `path`.
    pub(crate) fn new(
        path: PathBuf,
        deployment: Arc<Deployment>,
        deployer: Arc<Deployer>,
        metrics: Arc<GatewayMetrics>,
        capabilities: crate::up::HostCapabilities,
        (http, mqtt): (Option<Arc<HttpRoutes>>, Option<MqttControl>),
        timers: crate::up::Timers,
    ) -> Self {
        Self {
            path,
            deployment,
            deployer,
            metrics,
            capabilities,
            http,
            mqtt,
            timers: tokio::sync::Mutex::new(timers),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Stops the timers (at shutdown).
    pub(crate) async fn stop_timers(&self) {
        self.stop();
        self.timers.lock().await.stop();
    }

    /// Reads the manifest again and applies it; an error says why it was
    /// refused, and then nothing changed.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        let _busy = self.deployer.exclusive().await;
        let mut timers = self.timers.lock().await;
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the gateway is stopping".into());
        }
        let path = self.path.clone();
        let next = tokio::task::spawn_blocking(move || crate::cli::load_manifest(&path))
            .await
            .map_err(|e| format!("the reload failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let current = self.deployment.current();
        let (old, new) = (current.manifest.written(), next.written());
        refuse_fixed(&old, &new, &next, self.http.is_some(), self.mqtt.is_some())?;
        let staged = {
            let d = self.deployment.clone();
            let running = current.components.clone();
            let next = next.clone();
            let sources = self.deployer.sources();
            tokio::task::spawn_blocking(move || stage(&d, &running, &sources, &next))
                .await
                .map_err(|e| format!("the reload failed: {e}"))??
        };
        // Nothing changes until here; from here on every step is taken.
        let mut done = Reloaded::default();
        let (components, reconfigure, fresh) = self.take_in(&current, staged, &mut done);
        done.removed = current
            .components
            .keys()
            .filter(|n| !components.contains_key(*n))
            .cloned()
            .collect();
        done.triggers = changed_triggers(&old, &new, &current.manifest, &next);
        let pauses = wasmgate_runtime::trigger::Pauses::carried(&next, &current.pauses);
        // A removed trigger's switch goes with it: were it paused, what
        // still waits on it (an MQTT worker's last messages) goes on.
        current.pauses.resume_all_but(&pauses);
        let next = Current {
            pauses,
            manifest: next,
            components,
        };
        for (c, s) in &reconfigure {
            c.reconfigure(&s.invocable, !s.source_changed);
        }
        let mut errors = Vec::new();
        if let Some(http) = &self.http
            && let Err(e) = http.replace(&next)
        {
            errors.push(format!("HTTP rules: {e}"));
        }
        self.metrics
            .invocations
            .set_triggers(crate::metrics::trigger_labels(&next.manifest));
        let specs = mqtt_specs(&next);
        self.deployment.replace(next);
        self.deployer.reloaded(&fresh);
        if let Some(mqtt) = &self.mqtt
            && let Err(e) = mqtt.reconfigure(specs).await
        {
            errors.push(format!("MQTT triggers: {e}"));
        }
        if let Err(e) = timers.apply(&self.deployment.current()).await {
            errors.push(format!("timers: {e}"));
        }
        if errors.is_empty() {
            Ok(done)
        } else {
            Err(format!(
                "the new manifest runs, but not all of it: {} (a reload applies the rest)",
                errors.join("; ")
            ))
        }
    }

    /// Sorts the staged components: the map the new manifest runs with,
    /// the running ones to reconfigure, and those that need a new deploy
    /// state (added, or their source file changed).
    fn take_in(
        &self,
        current: &Current,
        staged: BTreeMap<String, Option<Staged>>,
        done: &mut Reloaded,
    ) -> TakenIn {
        let mut components = BTreeMap::new();
        let mut reconfigure = Vec::new();
        let mut fresh = BTreeSet::new();
        for (name, s) in staged {
            match (current.components.get(&name), s) {
                (Some(c), None) => {
                    components.insert(name, c.clone());
                }
                (Some(c), Some(s)) => {
                    if s.source_changed {
                        fresh.insert(name.clone());
                    }
                    done.changed.push(name.clone());
                    components.insert(name, c.clone());
                    reconfigure.push((c.clone(), s));
                }
                (None, s) => {
                    let s = s.expect("a new component is staged");
                    self.capabilities.attach(&s.invocable);
                    s.invocable.set_metrics(self.metrics.invocations.clone());
                    fresh.insert(name.clone());
                    done.added.push(name.clone());
                    components.insert(name, Arc::new(s.invocable));
                }
            }
        }
        (components, reconfigure, fresh)
    }

    /// Refuses reloads from now on (the gateway is stopping).
    pub(crate) fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The MQTT triggers of `current`, with their pause switches.
fn mqtt_specs(current: &Current) -> Vec<wasmgate_trigger_mqtt::MqttSpec> {
    let mut specs = wasmgate_trigger_mqtt::specs(&current.manifest, &current.components);
    for s in &mut specs {
        s.pause = current
            .pauses
            .of_trigger(s.label.trim_start_matches("trigger."));
    }
    specs
}

/// Refuses a change to what only a restart can change.
fn refuse_fixed(
    old: &wasmgate_manifest::Written,
    new: &wasmgate_manifest::Written,
    next: &Manifest,
    has_listener: bool,
    has_connection: bool,
) -> Result<(), String> {
    for (key, what) in FIXED {
        if value_at(old, &[key]) != value_at(new, &[key]) {
            return Err(format!(
                "{}: [{key}] changed: a reload cannot change {what}; restart the gateway to apply it (nothing was changed)",
                next.path.display()
            ));
        }
    }
    if value_at(old, &["trigger", "keyvalue"]) != value_at(new, &["trigger", "keyvalue"]) {
        return Err(format!(
            "{}: [[trigger.keyvalue]] changed: a reload cannot change the key-value triggers (their buckets' change streams); restart the gateway to apply it (nothing was changed)",
            next.path.display()
        ));
    }
    if !has_listener && !next.triggers.http.is_empty() {
        return Err(format!(
            "{}: trigger.http: the running gateway has no HTTP listener; restart the gateway to start one (nothing was changed)",
            next.path.display()
        ));
    }
    if !has_connection && !next.triggers.mqtt.is_empty() {
        return Err(format!(
            "{}: trigger.mqtt: the running gateway has no MQTT connection; restart the gateway to connect (nothing was changed)",
            next.path.display()
        ));
    }
    Ok(())
}

/// Each component of `next`: `None` when it is running and unchanged (the
/// same manifest entry and source file), else checked and built. Errors
/// are `check`'s.
fn stage(
    d: &Deployment,
    running: &BTreeMap<String, Arc<Invocable>>,
    sources: &BTreeMap<String, String>,
    next: &Manifest,
) -> Result<BTreeMap<String, Option<Staged>>, String> {
    let old = d.current().manifest.written();
    let new = next.written();
    let mut out = BTreeMap::new();
    for name in next.components.keys() {
        let key = ["component", name.as_str()];
        let source_digest = file_digest(next, name);
        let source_changed = sources.get(name) != source_digest.as_ref();
        let same = value_at(&old, &key) == value_at(&new, &key);
        if running.contains_key(name) && same && !source_changed {
            out.insert(name.clone(), None);
            continue;
        }
        let compiled =
            deployment::load_component(next, &d.runtime, name).map_err(|e| e.to_string())?;
        let invocable = deployment::invocable(next, &d.runtime, name, compiled);
        out.insert(
            name.clone(),
            Some(Staged {
                invocable,
                source_changed: source_changed || !running.contains_key(name),
            }),
        );
    }
    // Every trigger's handler, in the code each component will run.
    for (key, component, handler) in deployment::uses(next) {
        let name = component.get_ref();
        let version = match (&out[name], running.get(name)) {
            (Some(s), Some(r)) if !s.source_changed => r.version(),
            (Some(s), _) => s.invocable.version(),
            (None, Some(r)) => r.version(),
            (None, None) => unreachable!("an unchanged component is running"),
        };
        if !version.exports(handler) {
            return Err(next
                .invalid(
                    component.span(),
                    &format!("{key}.component"),
                    format!(
                        "component {name:?} (sha256:{}, the version it runs) does not export the {} handler this trigger calls",
                        version.digest,
                        handler.interface()
                    ),
                )
                .to_string());
        }
    }
    Ok(out)
}

/// The SHA-256 of a component's source file, if it can be read.
fn file_digest(m: &Manifest, name: &str) -> Option<String> {
    let path = m.resolve(m.components[name].source.get_ref());
    let bytes = std::fs::read(path).ok()?;
    Some(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &bytes,
    )))
}

/// The triggers that differ between `old` and `new` (as written), by label.
fn changed_triggers(
    old: &wasmgate_manifest::Written,
    new: &wasmgate_manifest::Written,
    old_manifest: &Manifest,
    next: &Manifest,
) -> Vec<String> {
    let (old_t, next_t) = (&old_manifest.triggers, &next.triggers);
    let mut out = Vec::new();
    for (kind, n_old, n_next) in [
        ("http", old_t.http.len(), next_t.http.len()),
        ("mqtt", old_t.mqtt.len(), next_t.mqtt.len()),
        ("timer", old_t.timer.len(), next_t.timer.len()),
    ] {
        for i in 0..n_old.max(n_next) {
            let index = i.to_string();
            let path = ["trigger", kind, index.as_str()];
            if value_at(old, &path) != value_at(new, &path) {
                out.push(format!("{kind}[{i}]"));
            }
        }
    }
    out
}

/// Logs a reload's result.
pub fn log(result: &Result<Reloaded, String>) {
    match result {
        Ok(r) if r.is_empty() => tracing::info!("reloaded: nothing changed"),
        Ok(r) => tracing::info!(
            added = ?r.added,
            removed = ?r.removed,
            changed = ?r.changed,
            triggers = ?r.triggers,
            "reloaded"
        ),
        Err(e) => tracing::error!(error = %e, "reload refused; the running configuration stays"),
    }
}
