//! `tick-timer`: logs every tick it receives, with how late it fired.
//!
//! Two environment variables (set with `env = { ... }` in the manifest) make
//! it misbehave for tests: `TICK_SLEEP_MS` sleeps that long in every tick,
//! `TICK_FAIL` returns `handler-error.retry` with its value as the message,
//! `TICK_REJECT` returns `handler-error.reject` likewise.

wasmgate_guest::bindings!("timer-app");

use exports::wasmgate::edge::timer_handler::{Guest, Tick};
use wasmgate::edge::types::{HandlerError, Invocation};

struct TickTimer;

impl Guest for TickTimer {
    fn on_tick(ctx: Invocation, tick: Tick) -> Result<(), HandlerError> {
        println!(
            "tick schedule={:?} scheduled_at_ms={} late_ms={} missed={} invocation={}",
            tick.schedule,
            tick.scheduled_at_ms,
            tick.fired_at_ms.saturating_sub(tick.scheduled_at_ms),
            tick.missed,
            ctx.id
        );
        if let Some(ms) = std::env::var("TICK_SLEEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if let Ok(message) = std::env::var("TICK_REJECT") {
            return Err(HandlerError::Reject(message));
        }
        match std::env::var("TICK_FAIL") {
            Ok(message) => Err(HandlerError::Retry(message)),
            Err(_) => Ok(()),
        }
    }
}

export!(TickTimer);
