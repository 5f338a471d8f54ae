//! `counter`: keeps a global counter and prints it on every tick.
//!
//! Each invocation runs in a fresh instance, so it prints `count=1` every time.
//! Anything else means state leaked from one invocation to the next.

wasmgate_guest::bindings!("timer-app");

use exports::wasmgate::edge::timer_handler::{Guest, Tick};
use std::sync::atomic::{AtomicU32, Ordering};
use wasmgate::edge::types::{HandlerError, Invocation};

static COUNT: AtomicU32 = AtomicU32::new(0);

struct Counter;

impl Guest for Counter {
    fn on_tick(_ctx: Invocation, _tick: Tick) -> Result<(), HandlerError> {
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
        println!("count={n}");
        Ok(())
    }
}

export!(Counter);
