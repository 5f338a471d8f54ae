//! `wasmgate dlq`: list, show, purge and replay dead letters.

use crate::cli::{DlqArgs, DlqCommand, Fatal, load_manifest};
use std::io::Write as _;
use std::process::ExitCode;
use wasmgate_runtime::component::Cache;
use wasmgate_runtime::deployment::{self, Runtime};
use wasmgate_runtime::engine::EngineOptions;
use wasmgate_runtime::invoke::{Admission, Invocable, InvocationContext};
use wasmgate_store::deadletter::{self, AttemptError, Bounds, DeadLetterStore, Filter};
use wasmgate_store::keyvalue::KeyValueStore;
use wasmgate_store::queue::EventQueue;
/// Runs `wasmgate dlq`.
pub async fn dlq(args: DlqArgs) -> Result<ExitCode, Fatal> {
    let manifest = load_manifest(&args.file)?;
    let store = DeadLetterStore::open(
        &deadletter::path_in(&manifest.state_dir()),
        Bounds::from(&manifest.dead_letters),
    )
    .map_err(Fatal)?;
    match args.command {
        DlqCommand::List {
            component,
            trigger,
            json,
            limit,
            before,
        } => {
            let filter = Filter {
                component: component.as_deref(),
                trigger: trigger.as_deref(),
                with_payloads: json,
            };
            list(&store, &filter, limit as usize, before.as_deref())
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
        } => replay(&manifest, &store, id, component).await,
    }
}

/// `dlq list`: one page, as a table or JSON.
fn list(
    store: &DeadLetterStore,
    filter: &Filter<'_>,
    limit: usize,
    before: Option<&str>,
) -> Result<ExitCode, Fatal> {
    let cursor = match before {
        Some(id) => Some(store.cursor_of(id).map_err(Fatal)?.ok_or_else(|| {
            Fatal(format!(
                "--before: no dead letter with id {id:?} in {}",
                store.path().display()
            ))
        })?),
        None => None,
    };
    let page = store.list_page(filter, cursor, limit).map_err(Fatal)?;
    let records = &page.records;
    let mut out = std::io::stdout().lock();
    if filter.with_payloads {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(records).expect("records serialize")
        );
        if page.next.is_some()
            && let Some(last) = records.last()
        {
            eprintln!("more: wasmgate dlq list --json --before {}", last.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let _ = writeln!(
        out,
        "{:<36}  {:<24}  {:<16}  {:<20}  {:<18}  {:>8}  LAST ERROR",
        "ID", "DEAD AT (UTC)", "COMPONENT", "TRIGGER", "CONDITION", "ATTEMPTS"
    );
    for r in records {
        let at = chrono::DateTime::from_timestamp_millis(r.dead_at_ms as i64)
            .map_or_else(String::new, |t| {
                t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
            });
        let condition = serde_json::to_value(r.condition).expect("condition serializes");
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
    match (page.next.is_some(), records.last()) {
        (true, Some(last)) => {
            let _ = writeln!(
                out,
                "{} dead letter(s) shown from {}; more: wasmgate dlq list --before {}",
                records.len(),
                store.path().display(),
                last.id
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "{} dead letter(s) in {}",
                records.len(),
                store.path().display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dlq replay`: runs each record's event again; a success removes the
/// record, a failure keeps it with one more attempt. `--all` goes through
/// the store a page at a time.
async fn replay(
    manifest: &wasmgate_manifest::Manifest,
    store: &DeadLetterStore,
    id: Option<String>,
    component: Option<String>,
) -> Result<ExitCode, Fatal> {
    let cache = Cache::new(Some(manifest.state_dir().join("precompiled")));
    // A replay has the effects the gateway's would: on its buckets too.
    let keyvalue = KeyValueStore::open(
        &KeyValueStore::path_in(&manifest.state_dir()),
        manifest.keyvalue.bounds(),
    )
    .map_err(Fatal)?;
    let mut replayer = Replayer {
        manifest,
        store,
        keyvalue,
        runtime: Runtime::new(EngineOptions::default(), cache)?,
        invocables: std::collections::BTreeMap::new(),
        queue: None,
        one: id.is_some(),
        ok: 0,
        failed: 0,
        queued: 0,
    };
    match &id {
        Some(id) => {
            let record = store.get(id).map_err(Fatal)?.ok_or_else(|| {
                Fatal(format!(
                    "no dead letter with id {id:?} in {}",
                    store.path().display()
                ))
            })?;
            replayer.replay(record).await?;
        }
        None => {
            let filter = Filter {
                component: component.as_deref(),
                trigger: None,
                with_payloads: true,
            };
            let mut cursor = None;
            loop {
                let page = store
                    .list_page(&filter, cursor, REPLAY_PAGE)
                    .map_err(Fatal)?;
                for record in page.records {
                    replayer.replay(record).await?;
                }
                cursor = page.next;
                if cursor.is_none() {
                    break;
                }
            }
        }
    }
    let (ok, failed, queued) = (replayer.ok, replayer.failed, replayer.queued);
    println!(
        "replayed {} dead letter(s): {ok} ok, {failed} failed, {queued} queued for the host",
        ok + failed + queued
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Records `dlq replay --all` holds in memory at once.
const REPLAY_PAGE: usize = 100;

/// Replays records one by one, loading each component once.
struct Replayer<'a> {
    manifest: &'a wasmgate_manifest::Manifest,
    store: &'a DeadLetterStore,
    keyvalue: KeyValueStore,
    runtime: Runtime,
    invocables: std::collections::BTreeMap<String, Invocable>,
    /// The event queue, opened for the first record that goes there.
    queue: Option<EventQueue>,
    /// Replaying one record by id: a missing component is an error.
    one: bool,
    ok: u64,
    failed: u64,
    queued: u64,
}

/// Whether `component` may publish MQTT messages through a connection of
/// the manifest: only a running host can send those.
fn may_publish(manifest: &wasmgate_manifest::Manifest, component: &str) -> bool {
    let connected = manifest.mqtt.is_some() || !manifest.triggers.mqtt.is_empty();
    connected
        && manifest
            .components
            .get(component)
            .is_some_and(|c| c.allow.grants_mqtt())
}

impl Replayer<'_> {
    /// A record whose component may publish goes to the durable event
    /// queue, under its id, for the running host (or the next one) to
    /// deliver with its outbox, retries and dead letters: replayed here, its
    /// publishes would have nowhere to go.
    fn hand_to_host(&mut self, record: deadletter::DeadLetter) -> Result<(), Fatal> {
        let queue = match &mut self.queue {
            Some(q) => q,
            None => self.queue.insert(
                EventQueue::open(
                    &self
                        .manifest
                        .state_dir()
                        .join(wasmgate_store::queue::FILE_NAME),
                )
                .map_err(Fatal)?,
            ),
        };
        queue
            .enqueue_as(&record.id, &record.component, &record.event)
            .map_err(Fatal)?;
        self.store.delete(&record.id).map_err(Fatal)?;
        println!(
            "{}: queued for the host: component {:?} may publish MQTT messages, which only a running `wasmgate up` sends; removed",
            record.id, record.component
        );
        self.queued += 1;
        Ok(())
    }

    async fn replay(&mut self, mut record: deadletter::DeadLetter) -> Result<(), Fatal> {
        let (manifest, store) = (self.manifest, self.store);
        if !manifest.components.contains_key(&record.component) {
            let msg = format!(
                "dead letter {} belongs to component {:?}, which {} no longer defines; kept",
                record.id,
                record.component,
                manifest.path.display()
            );
            if self.one {
                return Err(Fatal(msg));
            }
            eprintln!("error: {msg}");
            self.failed += 1;
            return Ok(());
        }
        if may_publish(manifest, &record.component) {
            return self.hand_to_host(record);
        }
        if !self.invocables.contains_key(&record.component) {
            let compiled = deployment::load_component(manifest, &self.runtime, &record.component)?;
            let invocable =
                deployment::invocable(manifest, &self.runtime, &record.component, compiled);
            invocable.set_keyvalue(std::sync::Arc::new(self.keyvalue.clone()));
            self.invocables.insert(record.component.clone(), invocable);
        }
        let invocable = &self.invocables[&record.component];
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
            self.ok += 1;
        } else {
            record.attempts += 1;
            record.last_error = AttemptError::from_outcome(&outcome);
            store.put(record.clone()).await.map_err(Fatal)?;
            println!(
                "{}: replayed, {}: {}; kept",
                record.id, record.last_error.outcome, record.last_error.message
            );
            self.failed += 1;
        }
        Ok(())
    }
}
