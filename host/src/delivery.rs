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
//! An event whose last attempt failed is logged at error level with its
//! outcome. The durable dead-letter store is not built yet: such an event is
//! dropped after that log line.

use crate::invoke::{Admission, Event, Invocable, InvocationContext, Outcome, Status};
use std::time::Duration;

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
}

impl Default for RetryPolicy {
    /// Three attempts, 1 s then 2 s apart.
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
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
}

/// Whether an outcome is worth another attempt.
pub fn retryable(status: &Status) -> bool {
    !matches!(
        status,
        Status::Ok
            | Status::HandlerError {
                kind: crate::invoke::HandlerErrorKind::Reject,
                ..
            }
    )
}

/// Delivers `event`, retrying per `policy`; returns the last outcome.
pub async fn deliver(
    invocable: &Invocable,
    event: Event,
    mut ctx: InvocationContext,
    policy: &RetryPolicy,
) -> Outcome {
    loop {
        let outcome = invocable
            .invoke(event.clone(), ctx.clone(), Admission::Wait)
            .await;
        if !retryable(&outcome.status) {
            if !outcome.is_ok() {
                tracing::error!(
                    id = %ctx.id,
                    component = %invocable.name,
                    trigger = %ctx.trigger,
                    attempt = ctx.attempt,
                    outcome = outcome.status.name(),
                    "event rejected by the guest; not retried and dropped (no dead-letter store yet)"
                );
            }
            return outcome;
        }
        if ctx.attempt >= policy.attempts {
            tracing::error!(
                id = %ctx.id,
                component = %invocable.name,
                trigger = %ctx.trigger,
                attempts = ctx.attempt,
                outcome = outcome.status.name(),
                "event failed on every attempt; dropped (no dead-letter store yet)"
            );
            return outcome;
        }
        let delay = policy.delay(ctx.attempt);
        tracing::warn!(
            id = %ctx.id,
            component = %invocable.name,
            trigger = %ctx.trigger,
            attempt = ctx.attempt,
            outcome = outcome.status.name(),
            retry_in_ms = delay.as_millis() as u64,
            "attempt failed; retrying"
        );
        tokio::time::sleep(delay).await;
        ctx.attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoke::HandlerErrorKind;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
        };
        let delays: Vec<u128> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
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
