//! `kv-audit`: handles the change stream of a bucket (`[[trigger.keyvalue]]`)
//! and writes what it saw to another bucket, `audit` (or `$AUDIT_BUCKET`):
//!
//! | key            | value                                                      |
//! |----------------|------------------------------------------------------------|
//! | `seen/SEQ`     | `set KEY new=V old=V by=COMPONENT via=TRIGGER` (`-` for none, `operator`) |
//! | `count/SEQ`    | how many times change SEQ was handled                      |
//! | `last/KEY`     | the sequence number of KEY's last change handled           |
//! | `disorder`     | changes of a key that came after a later one of that key   |
//! | `value/KEY`    | with `AUDIT_CHECK_OLD`: KEY's value after its last change  |
//! | `mismatch`     | with `AUDIT_CHECK_OLD`: changes whose old value was not the value after the key's previous change (a change missing or out of order; a change delivered again counts too; needs `view = "new_and_old"`) |
//! | `gap`          | the last gap: `FIRST-LAST lost=N`                          |
//! | `batches`      | batches handled                                            |
//! | `largest`      | the largest batch handled                                  |
//!
//! With `AUDIT_COUNT_ONLY` set it only adds each batch's size to `changes`
//! (one operation per batch: the lag benchmark's handler).
//!
//! A changed value of `fail-once` fails its batch at that change on the
//! first attempt (`first-failed`, retry), `reject` rejects it (the rest of
//! the batch is dead-lettered); the changes before it count as handled.

wasmgate_guest::bindings!("kv-stream-app");

use exports::wasmgate::edge::kv_stream_handler::{BatchError, Change, Gap, Guest, Operation};
use wasi::keyvalue::{atomics, store};
use wasmgate::edge::types::{HandlerError, Invocation};

struct Audit;

fn retry(e: store::Error) -> BatchError {
    BatchError {
        first_failed: None,
        error: HandlerError::Retry(format!("key-value: {e:?}")),
    }
}

fn text(v: &Option<Vec<u8>>) -> String {
    v.as_ref()
        .map_or_else(|| "-".into(), |b| String::from_utf8_lossy(b).into_owned())
}

impl Guest for Audit {
    fn handle_changes(
        ctx: Invocation,
        gap: Option<Gap>,
        changes: Vec<Change>,
    ) -> Result<(), BatchError> {
        let name = std::env::var("AUDIT_BUCKET").unwrap_or_else(|_| "audit".into());
        let audit = store::open(&name).map_err(retry)?;
        if std::env::var_os("AUDIT_COUNT_ONLY").is_some() {
            atomics::increment(&audit, "changes", changes.len() as u64).map_err(retry)?;
            return Ok(());
        }
        if let Some(g) = gap {
            let v = format!("{}-{} lost={}", g.first_sequence, g.last_sequence, g.lost);
            audit.set("gap", v.as_bytes()).map_err(retry)?;
        }
        for c in &changes {
            let value = c.new_value.as_deref();
            let fail = |error: HandlerError| BatchError {
                first_failed: Some(c.sequence),
                error,
            };
            if value == Some(b"fail-once".as_slice()) && ctx.attempt == 1 {
                return Err(fail(HandlerError::Retry("fail-once".into())));
            }
            if value == Some(b"reject".as_slice()) {
                return Err(fail(HandlerError::Reject("rejected".into())));
            }
            let last_key = format!("last/{}", c.key);
            let last = audit
                .get(&last_key)
                .map_err(retry)?
                .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            if c.sequence < last {
                atomics::increment(&audit, "disorder", 1).map_err(retry)?;
            } else {
                audit
                    .set(&last_key, c.sequence.to_string().as_bytes())
                    .map_err(retry)?;
            }
            let op = match c.operation {
                Operation::Set => "set",
                Operation::Delete => "delete",
            };
            if std::env::var_os("AUDIT_CHECK_OLD").is_some() {
                check_old(&audit, c).map_err(retry)?;
            }
            let (by, via) = c.writer.as_ref().map_or_else(
                || ("operator".to_string(), "-".to_string()),
                |w| (w.component.clone(), w.trigger.clone()),
            );
            let line = format!(
                "{op} {} new={} old={} by={by} via={via}",
                c.key,
                text(&c.new_value),
                text(&c.old_value)
            );
            audit
                .set(&format!("seen/{:010}", c.sequence), line.as_bytes())
                .map_err(retry)?;
            atomics::increment(&audit, &format!("count/{:010}", c.sequence), 1).map_err(retry)?;
        }
        atomics::increment(&audit, "batches", 1).map_err(retry)?;
        let largest = audit
            .get("largest")
            .map_err(retry)?
            .and_then(|v| String::from_utf8(v).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        if changes.len() > largest {
            audit
                .set("largest", changes.len().to_string().as_bytes())
                .map_err(retry)?;
        }
        Ok(())
    }
}

/// Compares the change's old value with the value its key's previous
/// change left, and keeps the new one.
fn check_old(audit: &store::Bucket, c: &Change) -> Result<(), store::Error> {
    let key = format!("value/{}", c.key);
    if audit.get(&key)? != c.old_value {
        atomics::increment(audit, "mismatch", 1)?;
    }
    match &c.new_value {
        Some(v) => audit.set(&key, v),
        None => audit.delete(&key),
    }
}

export!(Audit);
