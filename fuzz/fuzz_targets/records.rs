//! Stored dead-letter and queue records (JSON in the state files, which a
//! full disk, a crash or a hand may have damaged): decoding fails cleanly,
//! never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmgate_store::deadletter::{DeadLetter, StoredEvent};

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<StoredEvent>(data) {
        let _ = event.to_event();
    }
    if let Ok(record) = serde_json::from_slice::<DeadLetter>(data) {
        let _ = record.event.to_event();
    }
});
