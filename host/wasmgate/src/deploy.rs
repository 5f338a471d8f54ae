//! Hot deploy and rollback of a running gateway's components.
//!
//! A deploy stores the new version under `state_dir/components/NAME/
//! <sha256>.wasm` (with its `.sig`, if sent), checks it the way `up` checks
//! the manifest's source (signature policy, compile, the handler of every
//! trigger that calls it, `strict_imports`), runs the smoke test
//! (`[component.NAME.deploy] smoke_test`) on it, and swaps it in: new
//! invocations start on it, running ones finish on the version they began
//! on. Then a watch (`deploy.watch`) brings the previous version back by
//! itself once the new one has run `deploy.min_invocations` and more than
//! `deploy.max_failure_ratio` of them failed ([`Status::is_failure`]).
//!
//! `active.json` in the component's directory records the active and the
//! previous version, the digest of the manifest's source they replaced, and
//! the last [`HISTORY`] deploys and rollbacks. At the next start the active
//! version comes back, unless the manifest's source file changed since (an
//! operator who edits the source means it). Only the active and previous
//! versions' files (and precompiled artifacts) are kept.
//!
//! [`Status::is_failure`]: wasmgate_runtime::invoke::Status::is_failure

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_runtime::component::write_durably;
use wasmgate_runtime::deployment::{self, Deployment};
use wasmgate_runtime::invoke::{Admission, Invocable, InvocationContext, Version};
use wasmgate_runtime::signature::signature_path;

/// Deploys and rollbacks kept per component (in memory and in its
/// `active.json`).
pub const HISTORY: usize = 20;
/// The directory under `state_dir` that holds deployed versions.
pub const DIR_NAME: &str = "components";
/// The file, in a component's directory, that records its versions.
const STATE_FILE: &str = "active.json";
/// Largest `active.json` read.
const MAX_STATE_FILE: u64 = 1 << 20;
/// How often a watch looks at the new version's counts.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// What happened to a component's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A new version was swapped in.
    Deploy,
    /// An operator brought the previous version back.
    Rollback,
    /// The watch brought the previous version back.
    AutomaticRollback,
    /// The watch ended and the new version stays.
    WatchPassed,
}

/// One deploy or rollback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub action: Action,
    /// The digest active before (lowercase hex).
    pub from: String,
    /// The digest active after.
    pub to: String,
    /// Why, for a rollback or a watch that ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `active.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    /// Digest of the manifest's source these versions replaced.
    source: String,
    active: String,
    previous: Option<String>,
    history: Vec<HistoryEntry>,
}

/// A watch over a freshly deployed version.
struct Watch {
    /// Which watch this is: a task whose id is no longer the slot's ends.
    id: u64,
    version: Arc<Version>,
    until_ms: u64,
    min_invocations: u32,
    max_failure_ratio: f64,
}

/// One component's deploy state.
struct Slot {
    /// Digest of the manifest's source, as loaded at start.
    source: String,
    previous: Option<Arc<Version>>,
    watch: Option<Watch>,
    next_watch: u64,
    history: VecDeque<HistoryEntry>,
    deploys: u64,
    refused: u64,
    rollbacks: u64,
    automatic_rollbacks: u64,
}

/// Why a deploy or rollback did not happen. [`DeployError::status`] is
/// the admin API's answer code.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// No such component in the manifest.
    #[error(
        "no component {0:?} in the manifest (a deploy replaces a component's code; add new components to the manifest)"
    )]
    Unknown(String),
    /// The new version failed a check or its smoke test.
    #[error("refused: {0}")]
    Refused(String),
    /// There is no previous version to go back to.
    #[error("component {0:?} has no previous version to roll back to")]
    NoPrevious(String),
    /// The request itself was malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The version could not be stored.
    #[error("cannot store the version: {0}")]
    Io(String),
}

impl DeployError {
    /// The HTTP status of the admin API's answer.
    pub fn status(&self) -> u16 {
        match self {
            DeployError::Unknown(_) => 404,
            DeployError::Refused(_) => 422,
            DeployError::NoPrevious(_) => 409,
            DeployError::BadRequest(_) => 400,
            DeployError::Io(_) => 500,
        }
    }
}

/// The answer to a deploy.
#[derive(Debug, Serialize)]
pub struct Deployed {
    /// The component.
    pub component: String,
    /// The version now active (`sha256:…`).
    pub digest: String,
    /// The version it replaced; the same as `digest` when unchanged.
    pub previous: String,
    /// True when that version was already active (nothing changed).
    pub unchanged: bool,
    /// The smoke test's outcome (`ok`), when there is one.
    pub smoke_test: Option<String>,
    /// Milliseconds the new version is watched (0: not watched).
    pub watch_ms: u64,
}

/// The answer to a rollback.
#[derive(Debug, Serialize)]
pub struct RolledBack {
    /// The component.
    pub component: String,
    /// The version that was active (`sha256:…`).
    pub from: String,
    /// The version active now.
    pub to: String,
}

/// A component's versions, as `/v1/components/NAME` shows them.
#[derive(Debug, Serialize)]
pub struct Versions {
    /// The active version (`sha256:…`).
    pub active: String,
    /// Who signed it, when verified.
    pub signer: Option<String>,
    /// The version a rollback brings back.
    pub previous: Option<String>,
    /// The manifest's source (`sha256:…`).
    pub source: String,
    /// The running watch, if any.
    pub watch: Option<WatchView>,
    /// The last deploys and rollbacks, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// A running watch.
#[derive(Debug, Serialize)]
pub struct WatchView {
    /// When it ends, in milliseconds since the Unix epoch.
    pub until_ms: u64,
    /// Invocations of the new version so far.
    pub invocations: u64,
    /// Of those, failures.
    pub failures: u64,
    /// The invocations it needs before it judges.
    pub min_invocations: u32,
    /// The ratio past which it rolls back.
    pub max_failure_ratio: f64,
}

/// Counts for the metrics, per component.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Versions swapped in.
    pub deploys: u64,
    /// Versions refused (a check or the smoke test failed).
    pub refused: u64,
    /// Rollbacks an operator asked for.
    pub rollbacks: u64,
    /// Rollbacks a watch made.
    pub automatic_rollbacks: u64,
}

/// The deploys and rollbacks of a running gateway.
pub struct Deployer {
    deployment: Arc<Deployment>,
    dir: PathBuf,
    /// By component; a reload adds and removes them.
    slots: std::sync::RwLock<BTreeMap<String, Arc<Mutex<Slot>>>>,
    /// One deploy or rollback at a time: each reads and writes the
    /// component's files, and compiling takes the CPU.
    busy: tokio::sync::Mutex<()>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Slot {
    /// A component's deploy state before any deploy.
    fn of(c: &Invocable) -> Self {
        Self::empty(c.version().digest.clone())
    }

    /// No deploy yet of a component whose manifest source has `source`.
    fn empty(source: String) -> Self {
        Self {
            source,
            previous: None,
            watch: None,
            next_watch: 0,
            history: VecDeque::new(),
            deploys: 0,
            refused: 0,
            rollbacks: 0,
            automatic_rollbacks: 0,
        }
    }
}

fn sha(digest: &str) -> String {
    format!("sha256:{digest}")
}

impl Deployer {
    /// The deploy state of `deployment`'s components; brings back each
    /// component's deployed version from `state_dir` (see the module).
    pub fn new(deployment: Arc<Deployment>) -> Arc<Self> {
        let current = deployment.current();
        let dir = current.manifest.state_dir().join(DIR_NAME);
        let slots = current
            .components
            .iter()
            .map(|(name, c)| (name.clone(), Arc::new(Mutex::new(Slot::of(c)))))
            .collect();
        let deployer = Arc::new(Self {
            deployment,
            dir,
            slots: std::sync::RwLock::new(slots),
            busy: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        for name in current.components.keys() {
            deployer.restore(name);
        }
        deployer.prune_cache();
        deployer
    }

    /// `name`'s deploy state; one that has none yet (a component a reload
    /// is adding) gets an empty one.
    fn slot(&self, name: &str) -> Arc<Mutex<Slot>> {
        if let Some(slot) = self
            .slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
        {
            return slot.clone();
        }
        let source = self
            .component(name)
            .map(|c| c.version().digest.clone())
            .unwrap_or_default();
        self.slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(Slot::empty(source))))
            .clone()
    }

    fn component(&self, name: &str) -> Result<Arc<Invocable>, DeployError> {
        self.deployment
            .current()
            .components
            .get(name)
            .cloned()
            .ok_or_else(|| DeployError::Unknown(name.to_string()))
    }

    /// The digest of each component's manifest source, as last loaded.
    pub(crate) fn sources(&self) -> BTreeMap<String, String> {
        self.slots()
            .into_iter()
            .map(|(name, slot)| {
                let source = lock(&slot).source.clone();
                (name, source)
            })
            .collect()
    }

    /// Holds off deploys and rollbacks while a reload runs.
    pub(crate) async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.busy.lock().await
    }

    /// Takes in the components of a reloaded manifest (call it once the
    /// deployment has them, holding [`Self::exclusive`]). `fresh` are those
    /// added and those whose source file changed: they get a new deploy
    /// state, and a deployed version comes back as at a start (a component
    /// whose source changed runs it, and its deploy record is cleared). A
    /// removed component's watch ends; its history stays listed.
    pub(crate) fn reloaded(&self, fresh: &BTreeSet<String>) {
        let current = self.deployment.current();
        {
            let mut slots = self
                .slots
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (name, slot) in slots.iter() {
                if !current.components.contains_key(name) {
                    lock(slot).watch = None;
                }
            }
            for name in fresh {
                if let Some(c) = current.components.get(name) {
                    slots.insert(name.clone(), Arc::new(Mutex::new(Slot::of(c))));
                }
            }
        }
        for name in fresh {
            self.restore(name);
        }
    }

    fn version_path(&self, name: &str, digest: &str) -> PathBuf {
        self.dir.join(name).join(format!("{digest}.wasm"))
    }

    /// Reads, checks and compiles a stored version.
    fn load_stored(&self, name: &str, digest: &str) -> Result<Version, String> {
        let path = self.version_path(name, digest);
        let bytes = wasmgate_runtime::component::read(&path).map_err(|e| e.to_string())?;
        let d = &self.deployment;
        let compiled =
            deployment::load_version(&d.current().manifest, &d.runtime, name, &path, &bytes)?;
        if compiled.digest != digest {
            return Err(format!(
                "{} holds sha256:{}, not the version its name says",
                path.display(),
                compiled.digest
            ));
        }
        Ok(self
            .component(name)
            .map_err(|e| e.to_string())?
            .version_of(compiled))
    }

    /// Brings back the version `active.json` names, at start.
    fn restore(&self, name: &str) {
        let file = self.dir.join(name).join(STATE_FILE);
        let persisted: Persisted = match read_state(&file) {
            Ok(Some(p)) => p,
            Ok(None) => {
                // What a crash during a first deploy may have left.
                self.prune_files(name, &self.kept(name));
                return;
            }
            Err(e) => {
                tracing::warn!(component = name, file = %file.display(), error = %e, "ignoring an unreadable deploy state; running the manifest's source");
                return;
            }
        };
        let Ok(invocable) = self.component(name) else {
            return;
        };
        let source = invocable.version();
        if persisted.source != source.digest {
            tracing::info!(
                component = name,
                source = %sha(&source.digest),
                deployed = %sha(&persisted.active),
                "the manifest's source changed since the last deploy: running it, not the deployed version"
            );
            let _ = std::fs::remove_file(&file);
            self.prune_files(name, &BTreeSet::new());
            return;
        }
        let active = if persisted.active == source.digest {
            source.clone()
        } else {
            match self.load_stored(name, &persisted.active) {
                Ok(v) => Arc::new(v),
                Err(e) => {
                    tracing::error!(component = name, version = %sha(&persisted.active), error = %e, "cannot load the deployed version; running the manifest's source");
                    return;
                }
            }
        };
        let previous = match &persisted.previous {
            Some(p) if *p == source.digest => Some(source.clone()),
            Some(p) if *p == active.digest => Some(active.clone()),
            Some(p) => match self.load_stored(name, p) {
                Ok(v) => Some(Arc::new(v)),
                Err(e) => {
                    tracing::warn!(component = name, version = %sha(p), error = %e, "cannot load the previous version: no rollback until the next deploy");
                    None
                }
            },
            None => None,
        };
        invocable.swap(active.clone());
        {
            let cell = self.slot(name);
            let mut slot = lock(&cell);
            slot.previous = previous;
            slot.history = persisted.history.into_iter().collect();
        }
        self.prune_files(name, &self.kept(name));
        tracing::info!(component = name, version = %sha(&active.digest), "running the deployed version");
    }

    /// Deploys `bytes` (and its detached signature, if sent) as the new
    /// version of `name`. One deploy or rollback runs at a time; the work
    /// runs to its end even when the caller goes away, and `hold` (the
    /// upload's permit) is kept until then, so at most one upload's bytes
    /// wait in memory.
    pub async fn deploy<H: Send + 'static>(
        self: &Arc<Self>,
        name: &str,
        bytes: bytes::Bytes,
        signature: Option<Vec<u8>>,
        hold: H,
    ) -> Result<Deployed, DeployError> {
        self.component(name)?;
        let this = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let _hold = hold;
            let _busy = this.busy.lock().await;
            this.deploy_now(&name, bytes, signature).await
        })
        .await
        .map_err(|e| DeployError::Io(format!("the deploy task failed: {e}")))?
    }

    async fn deploy_now(
        self: &Arc<Self>,
        name: &str,
        bytes: bytes::Bytes,
        signature: Option<Vec<u8>>,
    ) -> Result<Deployed, DeployError> {
        let invocable = self.component(name)?.clone();
        let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
        if invocable.version().digest == digest {
            return Ok(Deployed {
                component: name.to_string(),
                digest: sha(&digest),
                previous: sha(&digest),
                unchanged: true,
                smoke_test: None,
                watch_ms: 0,
            });
        }
        let (compiled, smoke_test) = self.admit(name, &digest, bytes, signature).await?;
        let version = Arc::new(invocable.version_of(compiled));
        let current = self.deployment.current();
        let config = &current.manifest.components[name].deploy;
        let watch = config.watch();
        let (old, before, watch_id) = {
            let cell = self.slot(name);
            let mut slot = lock(&cell);
            let old = invocable.swap(version.clone());
            slot.deploys += 1;
            let before = slot.previous.replace(old.clone());
            slot.next_watch += 1;
            let id = slot.next_watch;
            slot.watch = (!watch.is_zero()).then(|| Watch {
                id,
                version: version.clone(),
                until_ms: now_ms() + watch.as_millis() as u64,
                min_invocations: config.min_invocations(),
                max_failure_ratio: config.max_failure_ratio(),
            });
            push(
                &mut slot.history,
                HistoryEntry {
                    at_ms: now_ms(),
                    action: Action::Deploy,
                    from: old.digest.clone(),
                    to: digest.clone(),
                    reason: None,
                },
            );
            (old, before, id)
        };
        if let Err(e) = self.persist(name) {
            // Not recorded, not done: the old version comes back.
            let cell = self.slot(name);
            let mut slot = lock(&cell);
            invocable.swap(old);
            slot.previous = before;
            slot.watch = None;
            slot.history.pop_back();
            slot.deploys -= 1;
            slot.refused += 1;
            return Err(e);
        }
        tracing::info!(
            component = name,
            from = %sha(&old.digest),
            to = %sha(&digest),
            watch_ms = watch.as_millis() as u64,
            "deployed"
        );
        if !watch.is_zero() {
            let this = self.clone();
            let name = name.to_string();
            self.tasks
                .spawn(async move { this.watch(&name, watch_id, version, watch).await });
        }
        Ok(Deployed {
            component: name.to_string(),
            digest: sha(&digest),
            previous: sha(&old.digest),
            unchanged: false,
            smoke_test,
            watch_ms: watch.as_millis() as u64,
        })
    }

    /// Checks an upload and runs its smoke test under a staging name (the
    /// files of a kept version, the previous one deployed again, say,
    /// change only once it passed), then installs it under its digest. A
    /// refusal leaves no file or artifact behind.
    async fn admit(
        &self,
        name: &str,
        digest: &str,
        bytes: bytes::Bytes,
        signature: Option<Vec<u8>>,
    ) -> Result<(wasmgate_runtime::component::Compiled, Option<String>), DeployError> {
        let staged = self
            .dir
            .join(name)
            .join(format!(".incoming-{}.wasm", uuid::Uuid::now_v7()));
        let checked = match self.store_and_check(name, &staged, bytes, signature).await {
            Ok(compiled) => match self.smoke_test(name, &compiled).await {
                Ok(outcome) => self
                    .install(name, &staged, digest)
                    .map(|()| (compiled, outcome)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &checked {
            lock(&self.slot(name)).refused += 1;
            self.prune_files(name, &self.kept(name));
            self.prune_cache();
            tracing::warn!(component = name, version = %sha(digest), error = %e, "deploy refused");
        }
        checked
    }

    /// Writes the upload's files under the staging name `staged`, then
    /// checks and compiles it (off the async workers).
    async fn store_and_check(
        &self,
        name: &str,
        staged: &Path,
        bytes: bytes::Bytes,
        signature: Option<Vec<u8>>,
    ) -> Result<wasmgate_runtime::component::Compiled, DeployError> {
        let dir = self.dir.join(name);
        let staged = staged.to_path_buf();
        let d = self.deployment.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            create_dir_durably(&dir)
                .map_err(|e| DeployError::Io(format!("{}: {e}", dir.display())))?;
            if let Some(sig) = &signature {
                let sig_path = signature_path(&staged);
                write_durably(&dir, &sig_path, sig)
                    .map_err(|e| DeployError::Io(format!("{}: {e}", sig_path.display())))?;
            }
            write_durably(&dir, &staged, &bytes)
                .map_err(|e| DeployError::Io(format!("{}: {e}", staged.display())))?;
            deployment::load_version(&d.current().manifest, &d.runtime, &name, &staged, &bytes)
                .map_err(DeployError::Refused)
        })
        .await
        .map_err(|e| DeployError::Io(format!("the check failed: {e}")))?
    }

    /// Renames a checked upload to its version's names (`<digest>.wasm`,
    /// and its `.sig`, or none).
    fn install(&self, name: &str, staged: &Path, digest: &str) -> Result<(), DeployError> {
        let path = self.version_path(name, digest);
        let io = |p: &Path, e: std::io::Error| DeployError::Io(format!("{}: {e}", p.display()));
        let (staged_sig, sig) = (signature_path(staged), signature_path(&path));
        if staged_sig.exists() {
            std::fs::rename(&staged_sig, &sig).map_err(|e| io(&sig, e))?;
        } else if let Err(e) = std::fs::remove_file(&sig)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(io(&sig, e));
        }
        std::fs::rename(staged, &path).map_err(|e| io(&path, e))?;
        let dir = self.dir.join(name);
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&dir, e))
    }

    /// Runs the smoke test, if the component has one, on a version not yet
    /// swapped in: its publishes are not sent, its key-value operations go
    /// to an empty temporary store. `Some("ok")` when it passed.
    async fn smoke_test(
        &self,
        name: &str,
        compiled: &wasmgate_runtime::component::Compiled,
    ) -> Result<Option<String>, DeployError> {
        let current = self.deployment.current();
        let m = &current.manifest;
        let Some(test) = &m.components[name].deploy.smoke_test else {
            return Ok(None);
        };
        let path = m.resolve(test.get_ref());
        let event = crate::invoke::event_from_file(&path).map_err(|e| {
            DeployError::Refused(format!("component.{name}.deploy.smoke_test: {}", e.0))
        })?;
        let trial = deployment::invocable(m, &self.deployment.runtime, name, compiled.clone());
        // Its key-value writes go to an empty temporary store, as its
        // publishes go nowhere: a trial has no effects.
        let scratch = tempfile::tempdir()
            .map_err(|e| DeployError::Refused(format!("a smoke test's key-value store: {e}")))?;
        let keyvalue = wasmgate_store::keyvalue::KeyValueStore::open(
            &wasmgate_store::keyvalue::KeyValueStore::path_in(scratch.path()),
            m.keyvalue.bounds(),
        )
        .map_err(DeployError::Refused)?;
        trial.set_keyvalue(Arc::new(keyvalue));
        let outcome = trial
            .invoke_quiet(event, InvocationContext::new("deploy"), Admission::Wait)
            .await;
        if outcome.is_ok() {
            return Ok(Some("ok".into()));
        }
        let detail = serde_json::to_value(&outcome.status)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .map_or_else(String::new, |m| format!(": {m}"));
        Err(DeployError::Refused(format!(
            "the smoke test ({}) failed: {}{detail}",
            test.get_ref().display(),
            outcome.status.name()
        )))
    }

    /// Brings back the previous version of `name` (an operator's request).
    pub async fn rollback(&self, name: &str) -> Result<RolledBack, DeployError> {
        self.component(name)?;
        let _busy = self.busy.lock().await;
        self.roll_back(name, Action::Rollback, None)
    }

    /// Swaps the previous version back in; the one it replaces becomes the
    /// previous one.
    fn roll_back(
        &self,
        name: &str,
        action: Action,
        reason: Option<String>,
    ) -> Result<RolledBack, DeployError> {
        let invocable = self.component(name)?;
        let (from, to) = {
            let cell = self.slot(name);
            let mut slot = lock(&cell);
            let Some(previous) = slot.previous.clone() else {
                return Err(DeployError::NoPrevious(name.to_string()));
            };
            // A reload since may have given the component a trigger whose
            // handler the previous version lacks.
            let current = self.deployment.current();
            for (key, component, handler) in deployment::uses(&current.manifest) {
                if component.get_ref() == name && !previous.exports(handler) {
                    return Err(DeployError::Refused(format!(
                        "the previous version (sha256:{}) does not export {}, which {key} calls",
                        previous.digest,
                        handler.interface()
                    )));
                }
            }
            slot.previous = None;
            let to = previous.digest.clone();
            let old = invocable.swap(invocable.rebase(&previous));
            slot.previous = Some(old.clone());
            slot.watch = None;
            match action {
                Action::AutomaticRollback => slot.automatic_rollbacks += 1,
                _ => slot.rollbacks += 1,
            }
            push(
                &mut slot.history,
                HistoryEntry {
                    at_ms: now_ms(),
                    action,
                    from: old.digest.clone(),
                    to: to.clone(),
                    reason: reason.clone(),
                },
            );
            (old.digest.clone(), to)
        };
        // A rollback stands even when it cannot be recorded (a full disk,
        // say): `persist` then removes the stale record.
        let _ = self.persist(name);
        tracing::warn!(
            component = name,
            from = %sha(&from),
            to = %sha(&to),
            automatic = action == Action::AutomaticRollback,
            reason = reason.as_deref().unwrap_or("asked for"),
            "rolled back"
        );
        Ok(RolledBack {
            component: name.to_string(),
            from: sha(&from),
            to: sha(&to),
        })
    }

    /// Watches `version` for `length`: rolls it back once it has run
    /// enough invocations and too many failed; ends early when another
    /// deploy or a rollback replaced it, or the gateway stops.
    async fn watch(self: Arc<Self>, name: &str, id: u64, version: Arc<Version>, length: Duration) {
        let (min, ratio) = match self.deployment.current().manifest.components.get(name) {
            Some(c) => (c.deploy.min_invocations(), c.deploy.max_failure_ratio()),
            None => return,
        };
        let until = tokio::time::Instant::now() + length;
        let mut every = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let _busy = tokio::select! {
                () = self.stop.cancelled() => return,
                busy = self.busy.lock() => busy,
            };
            // Ended when a deploy or rollback replaced this watch (even if
            // two rollbacks made its version active again).
            if lock(&self.slot(name))
                .watch
                .as_ref()
                .is_none_or(|w| w.id != id)
            {
                return;
            }
            let (n, failed) = (version.invocations(), version.failures());
            if n >= u64::from(min) && failed as f64 > ratio * n as f64 {
                let reason = format!(
                    "{failed} of its first {n} invocations failed (more than deploy.max_failure_ratio = {ratio})"
                );
                let _ = self.roll_back(name, Action::AutomaticRollback, Some(reason));
                return;
            }
            if tokio::time::Instant::now() >= until {
                {
                    let cell = self.slot(name);
                    let mut slot = lock(&cell);
                    slot.watch = None;
                    let entry = HistoryEntry {
                        at_ms: now_ms(),
                        action: Action::WatchPassed,
                        from: version.digest.clone(),
                        to: version.digest.clone(),
                        reason: Some(format!("{failed} of {n} invocations failed")),
                    };
                    push(&mut slot.history, entry);
                }
                let _ = self.persist(name);
                tracing::info!(component = name, version = %sha(&version.digest), invocations = n, failures = failed, "deploy watch passed: the version stays");
                return;
            }
        }
    }

    /// The digests whose files `name` keeps: active and previous.
    fn kept(&self, name: &str) -> BTreeSet<String> {
        let active = self
            .component(name)
            .map(|c| c.version().digest.clone())
            .unwrap_or_default();
        let cell = self.slot(name);
        let slot = lock(&cell);
        std::iter::once(active)
            .chain(slot.previous.as_ref().map(|p| p.digest.clone()))
            .collect()
    }

    /// Writes `active.json`, then removes the files and precompiled
    /// artifacts of versions no longer kept. When it cannot be written the
    /// old record is removed (it names what no longer runs), nothing is
    /// pruned, and the next start runs the manifest's source.
    fn persist(&self, name: &str) -> Result<(), DeployError> {
        let persisted = {
            let cell = self.slot(name);
            let slot = lock(&cell);
            Persisted {
                source: slot.source.clone(),
                active: self
                    .component(name)
                    .map(|c| c.version().digest.clone())
                    .unwrap_or_default(),
                previous: slot.previous.as_ref().map(|p| p.digest.clone()),
                history: slot.history.iter().cloned().collect(),
            }
        };
        let dir = self.dir.join(name);
        let file = dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&persisted).expect("serializes");
        if let Err(e) = create_dir_durably(&dir).and_then(|()| write_durably(&dir, &file, &json)) {
            let _ = std::fs::remove_file(&file);
            tracing::error!(component = name, file = %file.display(), error = %e, "cannot record the active version: the next start runs the manifest's source");
            return Err(DeployError::Io(format!("{}: {e}", file.display())));
        }
        self.prune_files(name, &self.kept(name));
        self.prune_cache();
        Ok(())
    }

    /// Removes `name`'s version files but those of `keep`.
    fn prune_files(&self, name: &str, keep: &BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.dir.join(name)) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            let digest = file
                .strip_suffix(".wasm.sig")
                .or_else(|| file.strip_suffix(".wasm"));
            // Staged uploads and temporary files a crash left behind go too.
            if file.starts_with(".tmp-") || digest.is_some_and(|d| !keep.contains(d)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes precompiled artifacts of versions no component keeps.
    fn prune_cache(&self) {
        let mut keep = BTreeSet::new();
        for (name, _) in self.slots() {
            let name = &name;
            keep.extend(self.kept(name));
            keep.insert(lock(&self.slot(name)).source.clone());
        }
        self.deployment.runtime.cache().retain(&keep);
    }

    /// `name`'s versions, watch and history.
    pub fn versions(&self, name: &str) -> Option<Versions> {
        let invocable = self.component(name).ok()?;
        // Swaps happen under this lock: the active version and the slot
        // are read as one.
        let cell = self.slot(name);
        let slot = lock(&cell);
        let active = invocable.version();
        Some(Versions {
            active: sha(&active.digest),
            signer: active.signer.clone(),
            previous: slot.previous.as_ref().map(|p| sha(&p.digest)),
            source: sha(&slot.source),
            watch: slot.watch.as_ref().map(|w| WatchView {
                until_ms: w.until_ms,
                invocations: w.version.invocations(),
                failures: w.version.failures(),
                min_invocations: w.min_invocations,
                max_failure_ratio: w.max_failure_ratio,
            }),
            history: slot.history.iter().cloned().collect(),
        })
    }

    fn slots(&self) -> Vec<(String, Arc<Mutex<Slot>>)> {
        self.slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }

    /// The last `n` deploys and rollbacks of every component, newest last.
    pub fn recent(&self, n: usize) -> Vec<(String, HistoryEntry)> {
        let slots = self.slots();
        let mut all: Vec<(String, HistoryEntry)> = slots
            .iter()
            .flat_map(|(name, slot)| {
                let s = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.history
                    .iter()
                    .map(|e| (name.clone(), e.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|(_, e)| e.at_ms);
        let skip = all.len().saturating_sub(n);
        all.split_off(skip)
    }

    /// Deploy and rollback counts per component, for the metrics.
    pub fn counts(&self) -> Vec<(String, Counts)> {
        self.slots()
            .iter()
            .map(|(name, slot)| {
                let s = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let counts = Counts {
                    deploys: s.deploys,
                    refused: s.refused,
                    rollbacks: s.rollbacks,
                    automatic_rollbacks: s.automatic_rollbacks,
                };
                (name.clone(), counts)
            })
            .collect()
    }

    /// Ends the watches (at shutdown).
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

/// Creates `dir` (and its parents) and fsyncs its parent, so the entry
/// survives a power cut.
fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn push(history: &mut VecDeque<HistoryEntry>, entry: HistoryEntry) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(entry);
}

/// Reads `active.json`, if there is one.
fn read_state(file: &Path) -> Result<Option<Persisted>, String> {
    use std::io::Read;
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut text = Vec::new();
    f.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_STATE_FILE {
        return Err(format!("larger than {MAX_STATE_FILE} bytes"));
    }
    let mut p: Persisted = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    let hex64 = |d: &str| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex64(&p.source) || !hex64(&p.active) || p.previous.as_deref().is_some_and(|d| !hex64(d)) {
        return Err("a digest is not 64 hex digits".into());
    }
    let extra = p.history.len().saturating_sub(HISTORY);
    p.history.drain(..extra);
    Ok(Some(p))
}
