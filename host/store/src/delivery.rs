//! Delivery of asynchronous events (timer ticks now; MQTT messages and async
//! invokes as their triggers arrive): retries with exponential backoff.
//!
//! Outcomes: `ok` ends the delivery; the guest's `reject` ends it at once
//! (no retry); `retry`, a trap, a limit breach, a timeout or throttling is
//! retried after `backoff × multiplier^(attempt-1)` (capped at `max_backoff`)
//! until `attempts` have been made. The invocation id stays the same across
//! the attempts of one event, so a guest can deduplicate; the guest sees the
//! attempt number in its context.
//!
//! With `jitter` (a fraction in [0, 1]) each delay is shortened by a random
//! part of up to that fraction, so retries of many events do not align.
//! `max_event_age` bounds how long an event may be retried, from its first
//! attempt.
//!
//! An event that is rejected, runs out of attempts, or would be retried past
//! its maximum age goes to the durable dead-letter store
//! ([`crate::deadletter`]) with the condition, the first and last error and
//! the attempts made; `deliver` returns only after that record is committed.

use crate::deadletter::{self, AttemptError, Condition, DeadLetter, DeadLetterStore};
use std::time::Duration;
use wasmgate_manifest::RetryConfig;
use wasmgate_runtime::invoke::{
    Admission, Event, Invocable, InvocationContext, MqttMessage, Outcome, Status,
};

/// How often and how patiently to retry a failed event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first delivery included (≥ 1).
    pub attempts: u32,
    /// Delay before the first retry.
    pub backoff: Duration,
    /// Longest delay between two attempts.
    pub max_backoff: Duration,
    /// Factor by which the delay grows after each retry.
    pub multiplier: f64,
    /// Fraction (0–1) of each delay that is randomly taken off.
    pub jitter: f64,
    /// How long after its first attempt an event may still be retried.
    pub max_event_age: Option<Duration>,
}

impl Default for RetryPolicy {
    /// Three attempts, about 1 s then 2 s apart (10 % jitter), no age limit.
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.1,
            max_event_age: None,
        }
    }
}

impl From<&RetryConfig> for RetryPolicy {
    /// The manifest's `retry = {...}`, defaults filled in.
    fn from(c: &RetryConfig) -> Self {
        let d = RetryPolicy::default();
        Self {
            attempts: c.attempts.as_ref().map_or(d.attempts, |a| *a.get_ref()),
            backoff: c.backoff.as_ref().map_or(d.backoff, |b| b.get_ref().0),
            max_backoff: c
                .max_backoff
                .as_ref()
                .map_or(d.max_backoff, |b| b.get_ref().0),
            multiplier: c.multiplier.as_ref().map_or(d.multiplier, |m| *m.get_ref()),
            jitter: c.jitter.as_ref().map_or(d.jitter, |j| *j.get_ref()),
            max_event_age: c.max_event_age.as_ref().map(|a| a.get_ref().0),
        }
    }
}

impl RetryPolicy {
    /// The delay after attempt `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.backoff.as_secs_f64() * factor;
        if secs.is_finite() && secs < self.max_backoff.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max_backoff
        }
    }

    /// Why an event whose attempt `attempt` ended in `status` is not tried
    /// again (it is dead-lettered), when the next try would come after
    /// `delay` and the event has been tried for `elapsed`; `None`: retry.
    pub fn gives_up(
        &self,
        status: &Status,
        attempt: u32,
        elapsed: Duration,
        delay: Duration,
    ) -> Option<Condition> {
        if !retryable(status) {
            Some(Condition::Rejected)
        } else if attempt >= self.attempts {
            Some(Condition::RetriesExhausted)
        } else if self.max_event_age.is_some_and(|age| elapsed + delay > age) {
            Some(Condition::EventAgeExceeded)
        } else {
            None
        }
    }

    /// [`Self::delay`] with this policy's jitter applied.
    pub fn jittered_delay(&self, attempt: u32) -> Duration {
        let cut = self.jitter.clamp(0.0, 1.0) * fastrand::f64();
        self.delay(attempt).mul_f64(1.0 - cut)
    }
}

/// Whether an outcome is worth another attempt.
pub fn retryable(status: &Status) -> bool {
    !matches!(
        status,
        Status::Ok
            | Status::HandlerError {
                kind: wasmgate_runtime::invoke::HandlerErrorKind::Reject,
                ..
            }
    )
}

/// How a delivery ended.
#[derive(Debug)]
pub struct Delivery {
    /// The last attempt's outcome.
    pub outcome: Outcome,
    /// Whether the event is settled: it succeeded, or its dead letter is
    /// committed (or, without a store, it was dropped on purpose). `false`
    /// means the dead letter could not be written, or the retries were cut
    /// short by [`deliver_until`]'s `stop`: the caller still holds the only
    /// copy of the event and should keep it (e.g. leave it queued).
    pub settled: bool,
}

/// Delivers `event`, retrying per `policy`. A failed event is dead-lettered
/// in `dead_letters` (or, without a store, logged and dropped) before this
/// returns.
pub async fn deliver(
    invocable: &Invocable,
    event: Event,
    ctx: InvocationContext,
    policy: &RetryPolicy,
    dead_letters: Option<&DeadLetterStore>,
) -> Delivery {
    let never = tokio_util::sync::CancellationToken::new();
    deliver_until(invocable, event, ctx, policy, dead_letters, &never).await
}

/// [`deliver`], giving up the wait before a retry once `stop` is cancelled:
/// the delivery then ends unsettled (the caller keeps the event, e.g. an
/// MQTT message stays unacknowledged for the broker to redeliver).
pub async fn deliver_until(
    invocable: &Invocable,
    event: Event,
    mut ctx: InvocationContext,
    policy: &RetryPolicy,
    dead_letters: Option<&DeadLetterStore>,
    stop: &tokio_util::sync::CancellationToken,
) -> Delivery {
    let started = tokio::time::Instant::now();
    let first_attempt_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut first_error: Option<AttemptError> = None;
    loop {
        let outcome = invocable
            .invoke(event.clone(), ctx.clone(), Admission::Wait)
            .await;
        if outcome.is_ok() {
            return Delivery {
                outcome,
                settled: true,
            };
        }
        let error = AttemptError::from_outcome(&outcome);
        let first = first_error.get_or_insert_with(|| error.clone()).clone();
        let delay = policy.jittered_delay(ctx.attempt);
        if let Some(condition) =
            policy.gives_up(&outcome.status, ctx.attempt, started.elapsed(), delay)
        {
            let record = deadletter::record(&event, &outcome, condition, first, first_attempt_ms);
            let settled = dead_letter(invocable, record, dead_letters).await;
            return Delivery { outcome, settled };
        }
        tracing::warn!(
            id = %ctx.id,
            component = %invocable.name,
            trigger = %ctx.trigger,
            attempt = ctx.attempt,
            outcome = outcome.status.name(),
            retry_in_ms = delay.as_millis() as u64,
            "attempt failed; retrying"
        );
        tokio::select! {
            _ = stop.cancelled() => {
                return Delivery {
                    outcome,
                    settled: false,
                };
            }
            _ = tokio::time::sleep(delay) => {}
        }
        ctx.attempt += 1;
    }
}

/// Writes `record` to `store` (and publishes it, with a dead-letter
/// topic); `false` when it could not be written. Without a store the event
/// is logged and dropped (`true`).
pub async fn dead_letter(
    invocable: &Invocable,
    record: DeadLetter,
    store: Option<&DeadLetterStore>,
) -> bool {
    let (id, trigger, condition, attempts) = (
        record.id.clone(),
        record.trigger.clone(),
        record.condition,
        record.attempts,
    );
    let outcome = record.last_error.outcome.clone();
    match store {
        Some(store) => match store.put(record.clone()).await {
            Ok(()) => {
                // Only once committed: a published dead letter is in the store.
                publish_dead_letter(invocable, store, &record).await;
                tracing::error!(
                    %id, component = %invocable.name, %trigger, ?condition, attempts, %outcome,
                    "event dead-lettered"
                );
                true
            }
            Err(e) => {
                let write_failures = store
                    .stats()
                    .write_failures
                    .load(std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    %id, component = %invocable.name, %trigger, ?condition, attempts, %outcome, error = %e,
                    write_failures,
                    "event failed and could not be dead-lettered"
                );
                false
            }
        },
        None => {
            tracing::error!(
                %id, component = %invocable.name, %trigger, ?condition, attempts, %outcome,
                "event failed; no dead-letter store, dropped"
            );
            true
        }
    }
}

/// Publishes a committed dead letter to `[dead_letters] mqtt_topic`, if
/// set, through the component's publish sink (as the host, not the guest:
/// the component's ACL does not apply).
async fn publish_dead_letter(invocable: &Invocable, store: &DeadLetterStore, record: &DeadLetter) {
    let (Some(topic), Some(sink)) = (store.publish_topic(), invocable.publish_sink()) else {
        return;
    };
    let message = MqttMessage {
        topic: topic.to_string(),
        payload: serde_json::to_vec(record).expect("dead letters serialize"),
        qos: 1,
        content_type: Some("application/json".into()),
        ..MqttMessage::default()
    };
    sink.publish(&record.component, vec![message]).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_runtime::invoke::HandlerErrorKind;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.5,
            max_event_age: None,
        };
        let delays: Vec<u128> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
        for _ in 0..100 {
            let d = p.jittered_delay(2);
            assert!(
                d <= Duration::from_millis(400) && d >= Duration::from_millis(200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn what_is_retried() {
        let handler = |kind| Status::HandlerError {
            kind,
            message: String::new(),
        };
        for (status, want) in [
            (Status::Ok, false),
            (handler(HandlerErrorKind::Reject), false),
            (handler(HandlerErrorKind::Retry), true),
            (
                Status::Trap {
                    message: String::new(),
                },
                true,
            ),
            (Status::FuelExhausted { fuel_limit: 1 }, true),
            (Status::MemoryLimit { memory_limit: 1 }, true),
            (Status::Timeout { timeout_ms: 1 }, true),
            (Status::Throttled { concurrency: 1 }, true),
        ] {
            assert_eq!(retryable(&status), want, "{status:?}");
        }
    }
}
