//! `tick-timer`: logs every tick it receives, with how late it fired.

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
        Ok(())
    }
}

export!(TickTimer);
