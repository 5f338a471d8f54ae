//! The key-value trigger: a component's `handle-changes` gets the changes of
//! a bucket (`[[trigger.keyvalue]]`), like a Lambda function on a DynamoDB
//! stream.
//!
//! Each trigger has one task and one batch in flight, so a key's changes
//! reach the handler in commit order. The task reads the changes after its
//! checkpoint (at most `batch_size`; with a `batch_window`, it waits that
//! long for a batch to fill), hands them to the handler, and queues the
//! checkpoint only once the batch is settled: handled, or dead-lettered. The
//! store's one writer commits it behind the handler's own writes, with its
//! next group; the trigger does not wait for that fsync. A crash anywhere
//! before the commit delivers the batch again (at least once).
//!
//! - **Partial failure**: a handler that names the first change that failed
//!   (`batch-error.first-failed`) has the changes before it checkpointed;
//!   the retry starts at it.
//! - **Retries** follow the trigger's policy; a batch that is rejected or
//!   runs out of attempts is dead-lettered whole (what is left of it), as
//!   one record whose id comes from the trigger and the first change (a
//!   crash between the dead letter and the checkpoint rewrites the same
//!   record), and the trigger goes on.
//! - **Gaps**: changes the stream's retention dropped before the trigger
//!   read them are reported in the next batch's `gap`.
//! - New changes wake the task at once when this process committed them;
//!   those of other processes (`wasmgate kv`) are found within
//!   [`POLL_EVERY`].

use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::keyvalue::View;
use wasmgate_runtime::invoke::{Admission, Event, Invocable, InvocationContext, KvBatch};
use wasmgate_store::deadletter::{self, AttemptError, DeadLetterStore};
use wasmgate_store::delivery::RetryPolicy;
use wasmgate_store::keyvalue::KeyValueStore;
use wasmgate_store::keyvalue::stream::{BATCH_BYTES, StreamBatch, StreamRead};

/// How often a trigger looks for changes made by other processes.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// How long a trigger waits before trying again when the store failed (a
/// checkpoint not saved, a dead letter not written).
pub const STORE_RETRY: Duration = Duration::from_secs(1);
/// How often, at most, a checkpoint passing only changes outside the
/// trigger's `key_prefix` is saved (each save is a commit).
pub const SAVE_PASSED_EVERY: Duration = Duration::from_secs(1);
/// Lag samples kept in [`StreamStats::take_lag_us`].
pub const LAG_SAMPLES: usize = 100_000;

/// One trigger, resolved from the manifest.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Its checkpoint's key: component, bucket and key prefix (so a
    /// reordered manifest keeps each trigger's place).
    pub consumer: String,
    /// `trigger.keyvalue[N]`, for logs.
    pub label: String,
    /// The bucket.
    pub bucket: String,
    /// Only keys with this prefix.
    pub key_prefix: Option<String>,
    /// Which values a change carries.
    pub view: View,
    /// Most changes per invocation.
    pub batch_size: usize,
    /// How long to wait for a batch to fill.
    pub batch_window: Duration,
    /// Retries of a failed batch.
    pub retry: RetryPolicy,
}

impl StreamSpec {
    /// The trigger text of its invocations: `keyvalue:BUCKET` or
    /// `keyvalue:BUCKET/PREFIX`.
    pub fn trigger_text(&self) -> String {
        match &self.key_prefix {
            Some(p) => format!("keyvalue:{}/{p}", self.bucket),
            None => format!("keyvalue:{}", self.bucket),
        }
    }
}

/// The triggers of a manifest.
pub fn specs(m: &wasmgate_manifest::Manifest) -> Vec<StreamSpec> {
    m.triggers
        .keyvalue
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let prefix = t.key_prefix.as_ref().map(|p| p.get_ref().clone());
            StreamSpec {
                consumer: format!(
                    "{}|{}|{}",
                    t.component.get_ref(),
                    t.bucket.get_ref(),
                    prefix.as_deref().unwrap_or("")
                ),
                label: format!("trigger.keyvalue[{i}]"),
                bucket: t.bucket.get_ref().clone(),
                key_prefix: prefix,
                view: t.view,
                batch_size: t.batch_size() as usize,
                batch_window: t.batch_window(),
                retry: t
                    .retry
                    .as_ref()
                    .map_or_else(RetryPolicy::default, RetryPolicy::from),
            }
        })
        .collect()
}

/// Counters of one trigger.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Batches handled (`ok`).
    pub batches: AtomicU64,
    /// Changes handled (partial successes included).
    pub changes: AtomicU64,
    /// Attempts that failed.
    pub failures: AtomicU64,
    /// Changes dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Changes lost to retention before this trigger read them.
    pub lost: AtomicU64,
    /// The checkpoint: every change up to it is settled.
    pub checkpoint: AtomicU64,
    /// The bucket's last sequence number, as last read.
    pub head: AtomicU64,
    lag_us: Mutex<VecDeque<u64>>,
}

impl StreamStats {
    /// Takes the lag samples (µs from a change's commit to the start of
    /// the first attempt of the batch that carries it; one per batch, its
    /// first change).
    pub fn take_lag_us(&self) -> Vec<u64> {
        std::mem::take(&mut *self.lag_us.lock().expect("stats lock")).into()
    }

    fn lagged(&self, us: u64) {
        let mut samples = self.lag_us.lock().expect("stats lock");
        if samples.len() == LAG_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(us);
    }
}

/// A trigger bound to its component and the store.
pub struct KeyValueTrigger {
    spec: StreamSpec,
    component: Arc<Invocable>,
    store: KeyValueStore,
    dead_letters: Option<Arc<DeadLetterStore>>,
    stats: Arc<StreamStats>,
    pause: wasmgate_runtime::trigger::Pause,
    trigger: String,
}

impl KeyValueTrigger {
    /// Binds a trigger to its component and store.
    pub fn new(spec: StreamSpec, component: Arc<Invocable>, store: KeyValueStore) -> Self {
        let trigger = spec.trigger_text();
        Self {
            spec,
            component,
            store,
            dead_letters: None,
            stats: Arc::default(),
            pause: wasmgate_runtime::trigger::Pause::default(),
            trigger,
        }
    }

    /// Dead-letters the batches that fail for good in `store`.
    pub fn with_dead_letters(mut self, store: Arc<DeadLetterStore>) -> Self {
        self.dead_letters = Some(store);
        self
    }

    /// Takes no batch while `pause` is on (changes wait in the stream).
    pub fn with_pause(mut self, pause: wasmgate_runtime::trigger::Pause) -> Self {
        self.pause = pause;
        self
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<StreamStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown`; a batch in progress is finished or, between
    /// retries, left for the next start.
    pub async fn run(self, shutdown: CancellationToken) {
        let _ = self.consume(shutdown).await;
        // The writer runs its queue in order: once this answers, the last
        // queued checkpoint is committed.
        let _ = self.store.stream_usage().await;
    }

    /// [`Self::run`]; `None` once `shutdown` has ended it.
    async fn consume(&self, shutdown: CancellationToken) -> Option<()> {
        let mut checkpoint = self
            .until_stored(&shutdown, || {
                self.store
                    .stream_position(&self.spec.consumer, &self.spec.bucket)
            })
            .await?;
        let (mut saved, mut saved_at) = (checkpoint, tokio::time::Instant::now());
        self.stats.checkpoint.store(checkpoint, Ordering::Relaxed);
        tracing::info!(trigger = %self.spec.label, component = %self.component.name, bucket = %self.spec.bucket, checkpoint, "key-value trigger started");
        let mut changed = self.store.changed();
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            if self.pause.is_paused() {
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = self.pause.resumed() => continue,
                }
            }
            changed.mark_unchanged();
            let mut batch = self
                .read(
                    checkpoint,
                    self.spec.batch_size,
                    (BATCH_BYTES, true),
                    &shutdown,
                )
                .await?;
            if batch.changes.is_empty() && batch.gap.is_none() {
                if batch.through > checkpoint {
                    // Only changes outside the key prefix: nothing to
                    // handle. The checkpoint passes them, saved at most
                    // every SAVE_PASSED_EVERY or once idle (lost in a
                    // crash, they are only looked at again).
                    checkpoint = batch.through;
                    self.stats.checkpoint.store(checkpoint, Ordering::Relaxed);
                    if saved_at.elapsed() >= SAVE_PASSED_EVERY {
                        saved = self.save(checkpoint, &shutdown).await?;
                        saved_at = tokio::time::Instant::now();
                    }
                    continue;
                }
                if checkpoint > saved && saved_at.elapsed() >= SAVE_PASSED_EVERY {
                    saved = self.save(checkpoint, &shutdown).await?;
                    saved_at = tokio::time::Instant::now();
                }
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    _ = changed.changed() => {}
                    () = tokio::time::sleep(POLL_EVERY) => {}
                }
                continue;
            }
            self.fill(&mut batch, &mut changed, &shutdown).await?;
            checkpoint = self.deliver(batch, &shutdown).await?;
            saved = checkpoint;
            saved_at = tokio::time::Instant::now();
        }
    }

    /// With a `batch_window`: waits up to it for more changes, reading
    /// only those after the batch, until the batch is full (`None`:
    /// shutdown first).
    async fn fill(
        &self,
        batch: &mut StreamBatch,
        changed: &mut tokio::sync::watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> Option<()> {
        let size = self.spec.batch_size;
        if self.spec.batch_window.is_zero() {
            return Some(());
        }
        let until = tokio::time::Instant::now() + self.spec.batch_window;
        while !batch.full && batch.changes.len() < size {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(until) => break,
                _ = changed.changed() => {}
            }
            let bytes: u64 = batch.changes.iter().map(|c| c.size()).sum();
            let room = BATCH_BYTES.saturating_sub(bytes);
            if room == 0 {
                break;
            }
            let more = self
                .read(
                    batch.through,
                    size - batch.changes.len(),
                    (room, false),
                    shutdown,
                )
                .await?;
            if more.gap.is_some() {
                // Retention dropped changes after the batch meanwhile: go
                // with what there is; the next read tells the gap.
                break;
            }
            batch.changes.extend(more.changes);
            batch.through = more.through;
            batch.full = more.full;
        }
        Some(())
    }

    /// Repeats a store call until it succeeds (`None`: shutdown first).
    async fn until_stored<T, F: Future<Output = Result<T, String>>>(
        &self,
        shutdown: &CancellationToken,
        call: impl Fn() -> F,
    ) -> Option<T> {
        loop {
            match call().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::error!(trigger = %self.spec.label, error = %e, retry_in_s = STORE_RETRY.as_secs(), "key-value trigger: the store failed");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(STORE_RETRY) => {}
            }
        }
    }

    /// Reads at most `max_changes` after `after`, and at most `bytes.0`
    /// bytes (past it with one change if `bytes.1` and there is no other).
    async fn read(
        &self,
        after: u64,
        max_changes: usize,
        bytes: (u64, bool),
        shutdown: &CancellationToken,
    ) -> Option<StreamBatch> {
        let batch = self
            .until_stored(shutdown, || {
                self.store.read_stream(StreamRead {
                    bucket: self.spec.bucket.clone(),
                    after,
                    prefix: self.spec.key_prefix.clone(),
                    view: self.spec.view,
                    max_changes,
                    max_bytes: bytes.0,
                    at_least_one: bytes.1,
                })
            })
            .await?;
        self.stats.head.store(batch.last, Ordering::Relaxed);
        Some(batch)
    }

    /// Saves the checkpoint; returns it. The save is queued to the store's
    /// one writer, behind the handler's own writes, and commits with its
    /// next group: the trigger goes on without waiting for that fsync (a
    /// crash before it only delivers the batch again). A failed save is
    /// logged; the next one replaces it.
    async fn save(&self, seq: u64, shutdown: &CancellationToken) -> Option<u64> {
        let saved = self
            .until_stored(shutdown, || {
                self.store
                    .queue_checkpoint(&self.spec.consumer, &self.spec.bucket, seq)
            })
            .await?;
        let label = self.spec.label.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = saved.await {
                tracing::error!(trigger = %label, checkpoint = seq, error = %e, "key-value trigger: a checkpoint was not saved (a crash now would deliver its changes again)");
            }
        });
        self.stats.checkpoint.store(seq, Ordering::Relaxed);
        Some(seq)
    }

    /// Delivers a batch until it is settled; returns the new checkpoint
    /// (`None`: shutdown while it was not).
    async fn deliver(&self, mut batch: StreamBatch, shutdown: &CancellationToken) -> Option<u64> {
        let through = batch.through;
        let head = batch.changes.first().map_or(through, |c| c.sequence);
        self.observe(&batch);
        let mut ctx = InvocationContext {
            id: invocation_id(&self.spec.consumer, head),
            trigger: self.trigger.clone(),
            attempt: 1,
        };
        let started = tokio::time::Instant::now();
        let first_attempt_ms = wasmgate_store::sqlite::now_ms();
        let mut first_error: Option<AttemptError> = None;
        loop {
            let outcome = self
                .component
                .invoke(self.event(&batch), ctx.clone(), Admission::Wait)
                .await;
            if outcome.is_ok() {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .changes
                    .fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
                return self.save(through, shutdown).await;
            }
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            if let Some(failed) = outcome.first_failed
                && self.handled_before(&mut batch, failed, shutdown).await?
            {
                // What is left is the batch a restart would deliver: its id.
                ctx.id = invocation_id(&self.spec.consumer, batch.changes[0].sequence);
            }
            let error = AttemptError::from_outcome(&outcome);
            let first = first_error.get_or_insert_with(|| error.clone()).clone();
            let delay = self.spec.retry.jittered_delay(ctx.attempt);
            if let Some(condition) =
                self.spec
                    .retry
                    .gives_up(&outcome.status, ctx.attempt, started.elapsed(), delay)
            {
                let event = self.event(&batch);
                let mut record =
                    deadletter::record(&event, &outcome, condition, first, first_attempt_ms);
                // The id of what is left (a partial failure changes it).
                record.id.clone_from(&ctx.id);
                self.dead_letter(record, batch.changes.len(), shutdown)
                    .await?;
                return self.save(through, shutdown).await;
            }
            tracing::warn!(
                id = %ctx.id,
                trigger = %self.spec.label,
                component = %self.component.name,
                attempt = ctx.attempt,
                outcome = outcome.status.name(),
                first_failed = outcome.first_failed,
                retry_in_ms = delay.as_millis() as u64,
                "key-value batch failed; retrying"
            );
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            ctx.attempt += 1;
        }
    }

    /// Counts a batch's gap and the lag of its first change.
    fn observe(&self, batch: &StreamBatch) {
        if let Some(gap) = batch.gap {
            self.stats.lost.fetch_add(gap.lost, Ordering::Relaxed);
            tracing::warn!(trigger = %self.spec.label, first = gap.first_sequence, last = gap.last_sequence, lost = gap.lost, "key-value trigger: changes were dropped by the stream's retention before it read them (the handler is told)");
        }
        if let Some(committed) = batch.first_committed_us {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros() as u64;
            self.stats.lagged(now.saturating_sub(committed));
        }
    }

    fn event(&self, batch: &StreamBatch) -> Event {
        Event::KeyValue(KvBatch {
            bucket: self.spec.bucket.clone(),
            gap: batch.gap,
            changes: batch.changes.clone(),
        })
    }

    /// Partial failure: the changes before `failed` are handled; they are
    /// checkpointed and leave the batch. Whether any did (`None`: shutdown
    /// first).
    async fn handled_before(
        &self,
        batch: &mut StreamBatch,
        failed: u64,
        shutdown: &CancellationToken,
    ) -> Option<bool> {
        let done = batch
            .changes
            .iter()
            .take_while(|c| c.sequence < failed)
            .count();
        // A number outside the batch (or its first) means all of it failed.
        if done > 0 && done < batch.changes.len() {
            let upto = batch.changes[done].sequence - 1;
            self.save(upto, shutdown).await?;
            batch.changes.drain(..done);
            batch.gap = None;
            self.stats.changes.fetch_add(done as u64, Ordering::Relaxed);
            return Some(true);
        }
        Some(false)
    }

    /// Writes the dead letter of `changes` changes, again every
    /// [`STORE_RETRY`] until it is written (`None`: shutdown first).
    async fn dead_letter(
        &self,
        record: deadletter::DeadLetter,
        changes: usize,
        shutdown: &CancellationToken,
    ) -> Option<()> {
        while !wasmgate_store::delivery::dead_letter(
            &self.component,
            record.clone(),
            self.dead_letters.as_deref(),
        )
        .await
        {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(STORE_RETRY) => {}
            }
        }
        self.stats
            .dead_lettered
            .fetch_add(changes as u64, Ordering::Relaxed);
        Some(())
    }
}

/// The invocation id of the batch that starts at `head`: the same after a
/// restart, so a batch delivered again, and its dead letter, keep it.
pub fn invocation_id(consumer: &str, head: u64) -> String {
    let digest = Sha256::digest(consumer.as_bytes());
    format!("kv-{}-{head}", hex::encode(&digest[..8]))
}

impl wasmgate_runtime::trigger::Trigger for KeyValueTrigger {
    const TYPE: &'static str = "keyvalue";

    /// [`KeyValueTrigger::run`].
    fn run(
        self,
        _tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send {
        KeyValueTrigger::run(self, shutdown)
    }
}
