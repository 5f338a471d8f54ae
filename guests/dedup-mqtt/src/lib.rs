//! `dedup-mqtt`: counts messages per topic in the `dedup` bucket, once per
//! event even when the event is delivered again.
//!
//! The invocation id stays the same across retries of one event, so the
//! handler records `seen/ID` with its effect and skips an event it has
//! seen. The effect (the count) and the record are one `set-many`, which
//! wasmgate applies all or nothing: no crash between them can count twice.
//!
//! The count is read, then written: run it with `limits.concurrency = 1`
//! (messages of one topic one at a time), or two messages at once could
//! count as one.
//!
//! A payload of `fail-after-effect` makes the first attempt fail after its
//! effect (as a crash would), so the retry shows the deduplication.

wasmgate_guest::bindings!("mqtt-app");

use exports::wasmgate::edge::mqtt_handler::Guest;
use wasi::keyvalue::{batch, store};
use wasmgate::edge::mqtt_types::Message;
use wasmgate::edge::types::{HandlerError, Invocation};

struct Dedup;

fn retry(e: store::Error) -> HandlerError {
    HandlerError::Retry(format!("key-value: {e:?}"))
}

impl Guest for Dedup {
    fn handle_message(ctx: Invocation, msg: Message) -> Result<(), HandlerError> {
        let bucket = store::open("dedup").map_err(retry)?;
        let seen = format!("seen/{}", ctx.id);
        if bucket.exists(&seen).map_err(retry)? {
            println!("duplicate {} (attempt {})", ctx.id, ctx.attempt);
            return Ok(());
        }
        let key = format!("count/{}", msg.topic);
        let count = match bucket.get(&key).map_err(retry)? {
            Some(v) => String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0),
            None => 0,
        };
        let next = (count + 1).to_string();
        batch::set_many(
            &bucket,
            &[(key, next.clone().into_bytes()), (seen, b"1".to_vec())],
        )
        .map_err(retry)?;
        println!("counted {} on {}: {next}", ctx.id, msg.topic);
        if msg.payload == b"fail-after-effect" && ctx.attempt == 1 {
            return Err(HandlerError::Retry("failing after the effect, once".into()));
        }
        Ok(())
    }
}

export!(Dedup);
