//! The timer trigger: runs a component's `on-tick` on a schedule.
//!
//! Each `[[trigger.timer]]` gets its own task, which sleeps until the next
//! fire time (precisely, see [`clock`]), applies the overlap policy,
//! and hands the tick to a delivery task (retries per the trigger's policy).
//! A slow or hostile guest only ever occupies its own delivery task, never the
//! schedule of any timer; a busy guest yields every epoch tick.
//!
//! - **Overlap** (a tick is due while this trigger's previous run still
//!   runs, retries included): `allow` runs it anyway (waiting for the
//!   component's concurrency), `forbid` skips it (counted, logged, and
//!   reported to the next tick as `missed`), `replace` cancels the running
//!   invocation and starts the new one.
//! - **Catch-up** (ticks that were due while the host was down, found from the
//!   persisted last fire time; or, while running, ticks that passed while the
//!   machine slept): `skip` runs none of them, `latest` the most recent one,
//!   `all` each of them in order, at most `max_catch_up`. Ticks older than
//!   `starting_deadline` never run. While running, the current tick always runs.
//! - **Jitter** delays every tick of a timer by a fixed offset in
//!   `[0, jitter)` derived from the gateway name and the timer, so a fleet of
//!   gateways with the same manifest spreads its ticks while each gateway
//!   keeps a regular period.

pub mod clock;
pub mod schedule;

use crate::clock::Clock;
use crate::schedule::{CatchUpPolicy, Schedule, plan_catch_up};
use chrono::{DateTime, Utc};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::Overlap;
use wasmgate_runtime::invoke::{Event, Invocable, InvocationContext, TimerTick};
use wasmgate_store::deadletter::DeadLetterStore;
use wasmgate_store::delivery::{RetryPolicy, deliver};
use wasmgate_store::timer_state::TimerState;

/// Ticks remembered per timer in [`TimerStats::recent`].
pub const RECENT_TICKS: usize = 256;
/// Lateness samples kept per timer in [`TimerStats::take_lateness_us`].
pub const LATENESS_SAMPLES: usize = 100_000;

/// One timer, resolved from the manifest.
#[derive(Debug, Clone)]
pub struct TimerSpec {
    /// Key of its persisted state (component, schedule, time zone, position).
    pub key: String,
    /// `trigger.timer[N]`, for logs.
    pub label: String,
    /// When it fires.
    pub schedule: Schedule,
    /// The schedule as the guest's tick shows it.
    pub schedule_text: String,
    /// Overlap policy.
    pub overlap: Overlap,
    /// Catch-up policy.
    pub catch_up: CatchUpPolicy,
    /// Missed ticks older than this never run.
    pub starting_deadline: Option<Duration>,
    /// Fixed delay added to every tick (from `jitter`).
    pub offset: Duration,
    /// Retries of a failed tick.
    pub retry: RetryPolicy,
}

/// What happened to one tick that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickRecord {
    /// When it was due (jitter offset included).
    pub scheduled: DateTime<Utc>,
    /// When it fired.
    pub fired: DateTime<Utc>,
    /// The `missed` count it carried.
    pub missed: u32,
    /// Its final outcome (`ok`, `retry`, `timeout`, ...), after retries.
    pub outcome: &'static str,
    /// Attempts made.
    pub attempts: u32,
}

/// Counters of one timer.
#[derive(Debug, Default)]
pub struct TimerStats {
    /// Ticks handed to the component.
    pub fired: AtomicU64,
    /// Ticks that ended `ok`.
    pub succeeded: AtomicU64,
    /// Ticks whose last attempt failed.
    pub failed: AtomicU64,
    /// Ticks skipped by `overlap = "forbid"`.
    pub skipped_overlap: AtomicU64,
    /// Runs cancelled by `overlap = "replace"`.
    pub replaced: AtomicU64,
    /// Ticks missed while down or late and not caught up.
    pub missed: AtomicU64,
    /// Deliveries that failed and could not be dead-lettered (each is
    /// delivered again until it settles, and not recorded as done before).
    pub unsettled: AtomicU64,
    recent: Mutex<VecDeque<TickRecord>>,
    lateness_us: Mutex<Vec<u64>>,
    start_lateness_us: Mutex<Vec<u64>>,
    lateness: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
}

impl TimerStats {
    /// The most recent finished ticks, oldest first.
    pub fn recent(&self) -> Vec<TickRecord> {
        self.recent
            .lock()
            .expect("stats lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Takes the lateness samples (fire time − due time, µs) recorded so far:
    /// when the timer woke and dispatched the tick.
    pub fn take_lateness_us(&self) -> Vec<u64> {
        std::mem::take(&mut *self.lateness_us.lock().expect("stats lock"))
    }

    /// Takes the samples of when the tick's delivery started (µs after due):
    /// the dispatch lateness plus any wait for a free worker thread.
    pub fn take_start_lateness_us(&self) -> Vec<u64> {
        std::mem::take(&mut *self.start_lateness_us.lock().expect("stats lock"))
    }

    fn finished(&self, record: TickRecord) {
        if record.outcome == "ok" {
            self.succeeded.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let mut recent = self.recent.lock().expect("stats lock");
        if recent.len() == RECENT_TICKS {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    fn late_by(&self, us: u64) {
        if let Some(h) = self.lateness.get() {
            h.observe(us as f64 / 1e6);
        }
        let mut samples = self.lateness_us.lock().expect("stats lock");
        if samples.len() < LATENESS_SAMPLES {
            samples.push(us);
        }
    }

    fn started_late_by(&self, us: u64) {
        let mut samples = self.start_lateness_us.lock().expect("stats lock");
        if samples.len() < LATENESS_SAMPLES {
            samples.push(us);
        }
    }
}

/// A timer bound to its component.
pub struct TimerTrigger {
    spec: TimerSpec,
    component: Arc<Invocable>,
    state: Arc<TimerState>,
    clock: Clock,
    stats: Arc<TimerStats>,
    deliveries: Option<tokio::runtime::Handle>,
    dead_letters: Option<Arc<DeadLetterStore>>,
    /// Cancelled on shutdown: an unsettled tick stops being delivered again.
    shutdown: CancellationToken,
    /// While paused, due ticks are skipped (counted as missed).
    pause: wasmgate_runtime::trigger::Pause,
}

/// How long a tick whose dead letter could not be written waits before it
/// is delivered again.
pub const UNSETTLED_RETRY: Duration = Duration::from_secs(5);

impl TimerTrigger {
    /// Binds a timer to its component, state and clock.
    pub fn new(
        spec: TimerSpec,
        component: Arc<Invocable>,
        state: Arc<TimerState>,
        clock: Clock,
    ) -> Self {
        Self {
            spec,
            component,
            state,
            clock,
            stats: Arc::default(),
            deliveries: None,
            dead_letters: None,
            shutdown: CancellationToken::new(),
            pause: wasmgate_runtime::trigger::Pause::default(),
        }
    }

    /// Skips the ticks that are due while `pause` is on.
    pub fn with_pause(mut self, pause: wasmgate_runtime::trigger::Pause) -> Self {
        self.pause = pause;
        self
    }

    /// Dead-letters ticks that fail for good in `store`.
    pub fn with_dead_letters(mut self, store: Arc<DeadLetterStore>) -> Self {
        self.dead_letters = Some(store);
        self
    }

    /// Runs deliveries on `runtime` instead of the runtime that runs the
    /// timer loop. With the loops on a [`SchedulerThread`], invocations then
    /// never delay the dispatch of a tick.
    pub fn with_delivery_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.deliveries = Some(runtime);
        self
    }

    /// Records each tick's lateness (seconds past its due time) in
    /// `histogram` too (the first set stays).
    pub fn with_lateness_histogram(
        self,
        histogram: prometheus_client::metrics::histogram::Histogram,
    ) -> Self {
        let _ = self.stats.lateness.set(histogram);
        self
    }

    /// Its counters (shared: they stay readable while it runs).
    pub fn stats(&self) -> Arc<TimerStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` is cancelled. Deliveries are spawned on `tasks`,
    /// so the caller can drain them.
    pub async fn run(mut self, tasks: TaskTracker, shutdown: CancellationToken) {
        self.shutdown = shutdown.clone();
        let spec = &self.spec;
        let offset = chrono::Duration::from_std(spec.offset).unwrap_or_default();
        let mut running: Vec<JoinHandle<()>> = Vec::new();
        let mut missed: u64 = 0;
        let now = self.clock.now();
        let mut cursor = self.catch_up(now, &mut missed, &mut running, &tasks);

        loop {
            let Some(next) = spec.schedule.next_after(cursor) else {
                tracing::info!(trigger = %spec.label, "the schedule has no further fire times");
                break;
            };
            let due = next + offset;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.clock.sleep_until(due) => {}
            }
            let fired = self.clock.now();
            // Normally exactly `next` is due; after a suspend or a stall, more.
            let keep = match spec.catch_up {
                CatchUpPolicy::All { max } => max.max(1) as usize,
                _ => 1,
            };
            let (due_times, count) = spec.schedule.between(
                cursor,
                fired - offset,
                keep,
                crate::schedule::MISSED_COUNT_LIMIT,
            );
            let Some(&current) = due_times.last() else {
                continue;
            };
            // Older ticks (missed while stalled or suspended) past the
            // starting deadline never run; the current one always does.
            let mut due_times = due_times;
            if let Some(deadline) = spec.starting_deadline
                && let Some(oldest) = chrono::Duration::from_std(deadline)
                    .ok()
                    .and_then(|d| (fired - offset).checked_sub_signed(d))
            {
                due_times.retain(|t| *t >= oldest || *t == current);
            }
            let late_skipped = count - due_times.len() as u64;
            if late_skipped > 0 {
                tracing::warn!(trigger = %spec.label, skipped = late_skipped, "ticks passed while the host was stalled or suspended");
                missed += late_skipped;
                self.stats.missed.fetch_add(late_skipped, Ordering::Relaxed);
            }
            let on_time = current + offset;
            self.stats
                .late_by((fired - on_time).num_microseconds().unwrap_or(0).max(0) as u64);
            cursor = current;
            if self.skipped_while_paused(due_times.len()) {
                continue;
            }
            let ticks = due_times.iter().map(|t| *t + offset).collect();
            self.fire(ticks, &mut missed, &mut running, &tasks, fired);
        }
    }

    /// Runs (or skips, by the catch-up policy) the ticks that were due
    /// while the host was down; returns the schedule's cursor.
    fn catch_up(
        &self,
        now: DateTime<Utc>,
        missed: &mut u64,
        running: &mut Vec<JoinHandle<()>>,
        tasks: &TaskTracker,
    ) -> DateTime<Utc> {
        let spec = &self.spec;
        let offset = chrono::Duration::from_std(spec.offset).unwrap_or_default();
        let mut cursor = now - offset;
        if let Some(last) = self.state.last(&spec.key) {
            let plan = plan_catch_up(
                &spec.schedule,
                last,
                cursor,
                spec.catch_up,
                spec.starting_deadline,
            );
            if plan.skipped > 0 || !plan.run.is_empty() {
                tracing::info!(
                    trigger = %spec.label,
                    component = %self.component.name,
                    last_fired = %last,
                    catching_up = plan.run.len(),
                    skipped = plan.skipped,
                    "ticks were due while the host was down"
                );
            }
            *missed += plan.skipped;
            self.stats.missed.fetch_add(plan.skipped, Ordering::Relaxed);
            if let Some(newest) = plan.run.last() {
                cursor = cursor.max(*newest);
                let ticks = plan.run.iter().map(|t| *t + offset).collect();
                self.fire(ticks, missed, running, tasks, now);
            }
        }
        cursor
    }

    /// While paused: counts `n` due ticks as missed, without running them.
    fn skipped_while_paused(&self, n: usize) -> bool {
        if !self.pause.is_paused() {
            return false;
        }
        tracing::debug!(trigger = %self.spec.label, skipped = n, "the trigger is paused: tick skipped");
        self.stats.missed.fetch_add(n as u64, Ordering::Relaxed);
        true
    }

    /// Starts one delivery task for `ticks` (oldest first, run in order),
    /// unless the overlap policy says otherwise.
    #[expect(
        clippy::too_many_lines,
        reason = "one tick: overlap policy, delivery task, settlement and state, in the order they happen"
    )]
    fn fire(
        &self,
        ticks: Vec<DateTime<Utc>>,
        missed: &mut u64,
        running: &mut Vec<JoinHandle<()>>,
        tasks: &TaskTracker,
        fired: DateTime<Utc>,
    ) {
        let spec = &self.spec;
        running.retain(|h| !h.is_finished());
        if !running.is_empty() {
            match spec.overlap {
                Overlap::Forbid => {
                    let n = ticks.len() as u64;
                    *missed += n;
                    self.stats.skipped_overlap.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(
                        trigger = %spec.label,
                        component = %self.component.name,
                        scheduled = %ticks.last().expect("at least one tick"),
                        "previous run still running; tick skipped (overlap = \"forbid\")"
                    );
                    return;
                }
                Overlap::Replace => {
                    for handle in running.drain(..) {
                        handle.abort();
                        self.stats.replaced.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(
                        trigger = %spec.label,
                        component = %self.component.name,
                        "previous run cancelled (overlap = \"replace\")"
                    );
                }
                Overlap::Allow => {}
            }
        }
        let first_missed = u32::try_from(*missed).unwrap_or(u32::MAX);
        *missed = 0;
        self.stats
            .fired
            .fetch_add(ticks.len() as u64, Ordering::Relaxed);
        let component = self.component.clone();
        let stats = self.stats.clone();
        let clock = self.clock.clone();
        let schedule = spec.schedule_text.clone();
        let retry = spec.retry;
        let dead_letters = self.dead_letters.clone();
        let state = self.state.clone();
        let key = spec.key.clone();
        let offset = chrono::Duration::from_std(spec.offset).unwrap_or_default();
        let trigger = format!("timer:{}", spec.schedule_text);
        let stop = self.shutdown.clone();
        let delivery = async move {
            for (i, scheduled) in ticks.into_iter().enumerate() {
                let fired_at = if i == 0 { fired } else { clock.now() };
                if i == 0 {
                    let started = clock.now();
                    stats.started_late_by(
                        (started - scheduled).num_microseconds().unwrap_or(0).max(0) as u64,
                    );
                }
                let tick_missed = if i == 0 { first_missed } else { 0 };
                let event = Event::Timer(TimerTick {
                    schedule: schedule.clone(),
                    scheduled_at_ms: scheduled.timestamp_millis().max(0) as u64,
                    fired_at_ms: fired_at.timestamp_millis().max(0) as u64,
                    missed: tick_missed,
                });
                let Some(outcome) = deliver_settled(
                    &component,
                    event,
                    &trigger,
                    &retry,
                    dead_letters.as_deref(),
                    &stats,
                    &stop,
                )
                .await
                else {
                    // The host stops with the tick unsettled: it stays
                    // unrecorded, and catch-up runs it again at the next
                    // start; so are the later ones of this run.
                    return;
                };
                // Recorded only now that the tick is settled: after a crash
                // during its delivery, catch-up runs it again (at least once).
                state.record(&key, scheduled - offset);
                stats.finished(TickRecord {
                    scheduled,
                    fired: fired_at,
                    missed: tick_missed,
                    outcome: outcome.status.name(),
                    attempts: outcome.attempt,
                });
            }
        };
        running.push(match &self.deliveries {
            Some(runtime) => tasks.spawn_on(delivery, runtime),
            None => tasks.spawn(delivery),
        });
    }
}

/// Delivers one tick until it settles: a delivery whose dead letter could
/// not be written (a full disk) is made again every [`UNSETTLED_RETRY`].
/// `None` when `stop` ends the wait with the tick still unsettled.
async fn deliver_settled(
    component: &Invocable,
    event: Event,
    trigger: &str,
    retry: &RetryPolicy,
    dead_letters: Option<&DeadLetterStore>,
    stats: &TimerStats,
    stop: &CancellationToken,
) -> Option<wasmgate_runtime::invoke::Outcome> {
    loop {
        let d = deliver(
            component,
            event.clone(),
            InvocationContext::new(trigger.to_string()),
            retry,
            dead_letters,
        )
        .await;
        if d.settled {
            return Some(d.outcome);
        }
        stats.unsettled.fetch_add(1, Ordering::Relaxed);
        tracing::error!(component = %component.name, trigger, retry_in_s = UNSETTLED_RETRY.as_secs(), "the tick failed and could not be dead-lettered; it is not recorded as done and is delivered again");
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(UNSETTLED_RETRY) => {}
        }
    }
}

/// A thread with its own single-threaded tokio runtime for the timer loops.
///
/// Guest invocations run on the main runtime's workers; if the loops shared
/// those workers, a tick due while workers run invocations (e.g. 100 timers due
/// at the same instant) would wait behind them before it is even dispatched.
/// The thread stops when this is dropped.
pub struct SchedulerThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SchedulerThread {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("wasmgate-timers".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Spawn timer loops here.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for SchedulerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for SchedulerThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerThread").finish_non_exhaustive()
    }
}

/// A fixed offset in `[0, jitter)` for one timer of one gateway: the first
/// 8 bytes of the SHA-256 of the gateway name and the timer key, so every
/// build and version of the host gives a gateway the same offsets.
pub fn jitter_offset(gateway: &str, key: &str, jitter: Duration) -> Duration {
    use sha2::{Digest, Sha256};
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    let mut h = Sha256::new();
    h.update(gateway.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    Duration::from_nanos(n % jitter.as_nanos().min(u64::MAX as u128) as u64)
}

/// Default cap of `catch_up = "all"`.
pub const DEFAULT_MAX_CATCH_UP: u32 = 10;

/// The timers of a manifest, resolved (the manifest was validated, so every
/// schedule parses).
pub fn specs(manifest: &wasmgate_manifest::Manifest) -> Vec<TimerSpec> {
    use wasmgate_manifest::CatchUp;
    manifest
        .triggers
        .timer
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let tz: chrono_tz::Tz = t
                .timezone
                .as_ref()
                .and_then(|z| z.get_ref().parse().ok())
                .unwrap_or(chrono_tz::UTC);
            let schedule = match (&t.cron, &t.every) {
                (Some(cron), _) => Schedule::cron(cron.get_ref(), tz),
                (None, Some(every)) => Schedule::every(
                    every.get_ref().0,
                    t.start_at
                        .as_ref()
                        .and_then(|s| DateTime::parse_from_rfc3339(s.get_ref()).ok())
                        .map(|d| d.with_timezone(&Utc)),
                ),
                (None, None) => Err("no schedule".into()),
            }
            .expect("validated with the manifest");
            let schedule_text = t.schedule_text();
            let key = format!("timer[{i}] {} {schedule_text} {tz}", t.component.get_ref());
            let retry = t
                .retry
                .as_ref()
                .map_or_else(RetryPolicy::default, RetryPolicy::from);
            TimerSpec {
                offset: jitter_offset(
                    &manifest.gateway.name,
                    &key,
                    t.jitter.map_or(Duration::ZERO, |j| j.0),
                ),
                key,
                label: format!("trigger.timer[{i}]"),
                schedule,
                schedule_text,
                overlap: t.overlap,
                catch_up: match t.catch_up {
                    CatchUp::Skip => CatchUpPolicy::Skip,
                    CatchUp::Latest => CatchUpPolicy::Latest,
                    CatchUp::All => CatchUpPolicy::All {
                        max: t
                            .max_catch_up
                            .as_ref()
                            .map_or(DEFAULT_MAX_CATCH_UP, |m| *m.get_ref()),
                    },
                },
                starting_deadline: t.starting_deadline.as_ref().map(|d| d.get_ref().0),
                retry,
            }
        })
        .collect()
}

impl wasmgate_runtime::trigger::Trigger for TimerTrigger {
    const TYPE: &'static str = "timer";

    /// [`TimerTrigger::run`].
    fn run(
        self,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send {
        TimerTrigger::run(self, tasks, shutdown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_fixed_per_gateway_and_within_bounds() {
        let j = Duration::from_secs(10);
        let a = jitter_offset("gw-1", "t", j);
        assert_eq!(a, jitter_offset("gw-1", "t", j));
        assert!(a < j);
        let spread: std::collections::BTreeSet<u128> = (0..50)
            .map(|i| jitter_offset(&format!("gw-{i}"), "t", j).as_millis())
            .collect();
        assert!(spread.len() > 40, "offsets spread over the window");
        assert_eq!(jitter_offset("gw", "t", Duration::ZERO), Duration::ZERO);
        // Pinned: a gateway's offsets must not move between host versions.
        assert_eq!(
            jitter_offset("gw-1", "t", j),
            Duration::from_nanos(4_598_804_038)
        );
    }
}
