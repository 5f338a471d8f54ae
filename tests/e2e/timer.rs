//! The timer trigger with the real `tick-timer` guest, on tokio's paused clock
//! (a virtual wall clock follows it, so no test waits in real time).

use crate::util::invocable;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::Overlap;
use wasmgate_manifest::limits::Limits;
use wasmgate_runtime::invoke::Invocable;
use wasmgate_store::deadletter::{Bounds, Condition, DeadLetterStore, StoredEvent};
use wasmgate_store::delivery::RetryPolicy;
use wasmgate_store::timer_state::TimerState;
use wasmgate_test_artifacts::TICK_TIMER;
use wasmgate_trigger_timer::clock::Clock;
use wasmgate_trigger_timer::schedule::{CatchUpPolicy, Schedule};
use wasmgate_trigger_timer::{TimerSpec, TimerStats, TimerTrigger};

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

fn tick_timer(env: &[(&str, &str)]) -> Arc<Invocable> {
    let inv = invocable(
        TICK_TIMER,
        Limits {
            timeout: Duration::from_secs(30),
            ..Limits::default()
        },
        &[],
    )
    .with_env(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Arc::new(inv)
}

fn spec(every_ms: u64, overlap: Overlap, catch_up: CatchUpPolicy) -> TimerSpec {
    TimerSpec {
        key: "test".into(),
        label: "trigger.timer[0]".into(),
        schedule: Schedule::every(Duration::from_millis(every_ms), None).unwrap(),
        schedule_text: format!("every {every_ms}ms"),
        overlap,
        catch_up,
        starting_deadline: None,
        offset: Duration::ZERO,
        retry: RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        },
    }
}

/// Runs a timer on the virtual clock starting at `start` for `run_for`, then
/// stops it and waits for its deliveries.
async fn run_timer(
    spec: TimerSpec,
    component: Arc<Invocable>,
    state: Arc<TimerState>,
    start: DateTime<Utc>,
    run_for: Duration,
) -> Arc<TimerStats> {
    let trigger = TimerTrigger::new(spec, component, state, Clock::virtual_at(start));
    let stats = trigger.stats();
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    tasks.spawn(trigger.run(tasks.clone(), shutdown.clone()));
    tokio::time::sleep(run_for).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    stats
}

#[tokio::test(start_paused = true)]
async fn an_interval_fires_on_schedule_with_the_tick_it_promises() {
    let stats = run_timer(
        spec(100, Overlap::Forbid, CatchUpPolicy::Latest),
        tick_timer(&[]),
        Arc::new(TimerState::in_memory()),
        t0() + ms(30),
        Duration::from_millis(1_050),
    )
    .await;
    let recent = stats.recent();
    assert_eq!(recent.len(), 10, "{recent:?}");
    for (i, r) in recent.iter().enumerate() {
        assert_eq!(r.scheduled, t0() + ms(100 * (i as i64 + 1)));
        assert_eq!(r.outcome, "ok");
        assert_eq!(r.missed, 0);
        assert!(r.fired >= r.scheduled);
    }
    assert_eq!(stats.fired.load(Ordering::Relaxed), 10);
    assert_eq!(stats.skipped_overlap.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn overlap_forbid_skips_ticks_while_the_previous_run_runs() {
    // Ticks every 100 ms, each run takes 250 ms: ticks at 100, 400, 700, 1000
    // run; 200, 300, 500, 600, 800, 900 are skipped.
    let stats = run_timer(
        spec(100, Overlap::Forbid, CatchUpPolicy::Latest),
        tick_timer(&[("TICK_SLEEP_MS", "250")]),
        Arc::new(TimerState::in_memory()),
        t0(),
        Duration::from_millis(1_050),
    )
    .await;
    let recent = stats.recent();
    let scheduled: Vec<i64> = recent
        .iter()
        .map(|r| (r.scheduled - t0()).num_milliseconds())
        .collect();
    assert_eq!(scheduled, [100, 400, 700, 1000]);
    let missed: Vec<u32> = recent.iter().map(|r| r.missed).collect();
    assert_eq!(
        missed,
        [0, 2, 2, 2],
        "each run reports the ticks skipped before it"
    );
    assert!(recent.iter().all(|r| r.outcome == "ok"));
    assert_eq!(stats.skipped_overlap.load(Ordering::Relaxed), 6);
}

#[tokio::test(start_paused = true)]
async fn overlap_replace_cancels_the_running_invocation() {
    let stats = run_timer(
        spec(100, Overlap::Replace, CatchUpPolicy::Latest),
        tick_timer(&[("TICK_SLEEP_MS", "250")]),
        Arc::new(TimerState::in_memory()),
        t0(),
        // Not a multiple of the period: a tick due at the very instant the
        // test stops would race with the stop.
        Duration::from_millis(1_250),
    )
    .await;
    // Every tick replaced its predecessor; only the last (1000 ms) finished,
    // since nothing replaced it before the timer stopped.
    let recent = stats.recent();
    let scheduled: Vec<i64> = recent
        .iter()
        .map(|r| (r.scheduled - t0()).num_milliseconds())
        .collect();
    assert_eq!(scheduled, [1200], "{recent:?}");
    assert_eq!(stats.replaced.load(Ordering::Relaxed), 11);
    assert_eq!(stats.fired.load(Ordering::Relaxed), 12);
}

#[tokio::test(start_paused = true)]
async fn overlap_allow_runs_concurrently() {
    let stats = run_timer(
        spec(100, Overlap::Allow, CatchUpPolicy::Latest),
        tick_timer(&[("TICK_SLEEP_MS", "250")]),
        Arc::new(TimerState::in_memory()),
        t0(),
        Duration::from_millis(1_050),
    )
    .await;
    assert_eq!(stats.recent().len(), 10);
    assert!(
        stats
            .recent()
            .iter()
            .all(|r| r.outcome == "ok" && r.missed == 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_tick_is_retried_with_backoff() {
    let mut s = spec(1_000, Overlap::Forbid, CatchUpPolicy::Latest);
    s.retry = RetryPolicy {
        attempts: 3,
        backoff: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    let stats = run_timer(
        s,
        tick_timer(&[("TICK_FAIL", "sensor offline")]),
        Arc::new(TimerState::in_memory()),
        t0(),
        Duration::from_millis(1_500),
    )
    .await;
    let recent = stats.recent();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].outcome, "retry");
    assert_eq!(recent[0].attempts, 3);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 1);
}

/// Runs 100 ms ticks for 350 ms, "restarts" 1 s later with the persisted
/// state, and returns what the second run did first.
async fn restart_with(policy: CatchUpPolicy, deadline: Option<Duration>) -> (Vec<(i64, u32)>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timers.json");
    let state = Arc::new(TimerState::open(&path).unwrap());
    let first = run_timer(
        spec(100, Overlap::Allow, policy),
        tick_timer(&[]),
        state.clone(),
        t0() + ms(10),
        Duration::from_millis(350),
    )
    .await;
    assert_eq!(first.recent().len(), 3);
    state.flush().unwrap();
    drop(state);

    // Down from 360 ms to 1350 ms: ticks 400..1300 (10) were missed.
    let state = Arc::new(TimerState::open(&path).unwrap());
    let mut s = spec(100, Overlap::Allow, policy);
    s.starting_deadline = deadline;
    let second = run_timer(
        s,
        tick_timer(&[]),
        state,
        t0() + ms(1_350),
        Duration::from_millis(20),
    )
    .await;
    let ran = second
        .recent()
        .iter()
        .map(|r| ((r.scheduled - t0()).num_milliseconds(), r.missed))
        .collect();
    (ran, second.missed.load(Ordering::Relaxed))
}

#[tokio::test(start_paused = true)]
async fn catch_up_after_a_restart_follows_the_policy() {
    assert_eq!(restart_with(CatchUpPolicy::Skip, None).await, (vec![], 10));
    assert_eq!(
        restart_with(CatchUpPolicy::Latest, None).await,
        (vec![(1300, 9)], 9)
    );
    assert_eq!(
        restart_with(CatchUpPolicy::All { max: 3 }, None).await,
        (vec![(1100, 7), (1200, 0), (1300, 0)], 7)
    );
    assert_eq!(
        restart_with(
            CatchUpPolicy::All { max: 100 },
            Some(Duration::from_millis(220))
        )
        .await,
        (vec![(1200, 8), (1300, 0)], 8)
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_guest_does_not_delay_another_timer() {
    let slow = TimerTrigger::new(
        spec(100, Overlap::Allow, CatchUpPolicy::Latest),
        tick_timer(&[("TICK_SLEEP_MS", "10000")]),
        Arc::new(TimerState::in_memory()),
        Clock::virtual_at(t0()),
    );
    let mut fast_spec = spec(100, Overlap::Forbid, CatchUpPolicy::Latest);
    fast_spec.key = "fast".into();
    let fast = TimerTrigger::new(
        fast_spec,
        tick_timer(&[]),
        Arc::new(TimerState::in_memory()),
        Clock::virtual_at(t0()),
    );
    let fast_stats = fast.stats();
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    tasks.spawn(slow.run(tasks.clone(), shutdown.clone()));
    tasks.spawn(fast.run(tasks.clone(), shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    shutdown.cancel();
    // The fast timer ran every tick on time while ten slow runs were in flight.
    let recent = fast_stats.recent();
    assert_eq!(recent.len(), 10, "{recent:?}");
    assert!(
        recent
            .iter()
            .all(|r| r.outcome == "ok" && r.fired == r.scheduled)
    );
    tasks.close();
    tasks.wait().await;
}

/// Runs a failing timer once (tick at 1 s) with a dead-letter store and
/// returns the store.
async fn dead_letter_of(
    env: &[(&str, &str)],
    retry: RetryPolicy,
) -> (tempfile::TempDir, DeadLetterStore) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(DeadLetterStore::open(&dir.path().join("dl.sqlite"), Bounds::default()).unwrap());
    let mut s = spec(1_000, Overlap::Forbid, CatchUpPolicy::Latest);
    s.retry = retry;
    let trigger = TimerTrigger::new(
        s,
        tick_timer(env),
        Arc::new(TimerState::in_memory()),
        Clock::virtual_at(t0()),
    )
    .with_dead_letters(store.clone());
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    tasks.spawn(trigger.run(tasks.clone(), shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    let store = Arc::into_inner(store).expect("the trigger is gone");
    (dir, store)
}

fn policy(attempts: u32, backoff_ms: u64, max_event_age_ms: Option<u64>) -> RetryPolicy {
    RetryPolicy {
        attempts,
        backoff: Duration::from_millis(backoff_ms),
        jitter: 0.0,
        max_event_age: max_event_age_ms.map(Duration::from_millis),
        ..RetryPolicy::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_tick_that_fails_every_attempt_is_dead_lettered_with_its_history() {
    let (_dir, store) =
        dead_letter_of(&[("TICK_FAIL", "sensor offline")], policy(3, 100, None)).await;
    let all = store.list(None, None).unwrap();
    assert_eq!(all.len(), 1);
    let d = &all[0];
    assert_eq!(d.condition, Condition::RetriesExhausted);
    assert_eq!(d.attempts, 3);
    assert_eq!(d.component, "tick_timer");
    assert_eq!(d.trigger, "timer:every 1000ms");
    assert_eq!(d.first_error.outcome, "retry");
    assert_eq!(d.first_error.message, "sensor offline");
    assert_eq!(d.last_error.message, "sensor offline");
    assert!(d.dead_at_ms >= d.first_attempt_ms);
    assert_eq!(
        d.event,
        StoredEvent::Timer {
            schedule: "every 1000ms".into(),
            scheduled_at_ms: (t0() + ms(1_000)).timestamp_millis() as u64,
            fired_at_ms: (t0() + ms(1_000)).timestamp_millis() as u64,
            missed: 0,
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejected_tick_is_dead_lettered_without_retries() {
    let (_dir, store) =
        dead_letter_of(&[("TICK_REJECT", "bad config")], policy(5, 100, None)).await;
    let all = store.list(None, None).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].condition, Condition::Rejected);
    assert_eq!(all[0].attempts, 1);
    assert_eq!(all[0].last_error.outcome, "reject");
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_maximum_event_age() {
    // Attempt 1 at 0 ms, retry after 100 ms; the next retry would come 200 ms
    // later, past the 250 ms age limit: dead-lettered after attempt 2.
    let (_dir, store) = dead_letter_of(&[("TICK_FAIL", "x")], policy(10, 100, Some(250))).await;
    let all = store.list(None, None).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].condition, Condition::EventAgeExceeded);
    assert_eq!(all[0].attempts, 2);
}

/// A tick whose dead letter cannot be written (the state disk is full) is
/// not recorded as done: it is delivered again every 5 s until its dead
/// letter is written, and only then recorded (a host that stops first
/// leaves it for catch-up at the next start). Real time: the store's
/// writer thread does not follow tokio's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_cannot_be_dead_lettered_is_not_recorded_as_done() {
    use crate::util::{Tmpfs, is_root};
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(dir.path(), "1m");
    let store =
        Arc::new(DeadLetterStore::open(&dir.path().join("dl.sqlite"), Bounds::default()).unwrap());
    let filler = disk.fill("filler");
    let state = Arc::new(TimerState::in_memory());
    let trigger = TimerTrigger::new(
        spec(1_000, Overlap::Forbid, CatchUpPolicy::Latest),
        tick_timer(&[("TICK_FAIL", "sensor offline")]),
        state.clone(),
        Clock::virtual_at(t0()),
    )
    .with_dead_letters(store.clone());
    let stats = trigger.stats();
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    tasks.spawn(trigger.run(tasks.clone(), shutdown.clone()));
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the dead letter failed", &|| {
        stats.unsettled.load(Ordering::Relaxed) >= 1
    });
    assert_eq!(state.last("test"), None, "an unsettled tick was recorded");
    assert!(store.stats().write_failures.load(Ordering::Relaxed) >= 1);
    std::fs::remove_file(filler).unwrap();
    wait("the tick settled", &|| state.last("test").is_some());
    assert_eq!(store.list(None, None).unwrap().len(), 1);
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
}
