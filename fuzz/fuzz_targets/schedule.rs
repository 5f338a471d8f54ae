//! Cron expressions, time zones and intervals from manifests: parsing must
//! fail cleanly, and the next fire times must be computed without a panic
//! or a hang.
#![no_main]

use arbitrary::Arbitrary;
use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use wasmgate_trigger_timer::schedule::Schedule;

#[derive(Debug, Arbitrary)]
struct Input {
    cron: String,
    timezone: String,
    every_ms: u64,
    anchor_s: i64,
    from_s: i64,
    span_s: u32,
}

/// Missed ticks counted per call. The host counts up to 100,000 once per
/// catch-up (`MISSED_COUNT_LIMIT`), a cost linear in the count: the fuzzer
/// looks for inputs whose cost is not, so a smaller count keeps each run
/// short.
const COUNT_LIMIT: u64 = 1_000;

fuzz_target!(|input: Input| {
    let from = DateTime::<Utc>::from_timestamp(input.from_s % 8_000_000_000, 0).unwrap_or_default();
    let to = from + chrono::Duration::seconds(i64::from(input.span_s % 86_400));
    let tz = input.timezone.parse().unwrap_or(chrono_tz::UTC);
    if let Ok(s) = Schedule::cron(&input.cron, tz) {
        let _ = s.next_after(from);
        let _ = s.between(from, to, 16, COUNT_LIMIT);
    }
    let anchor = DateTime::<Utc>::from_timestamp(input.anchor_s % 8_000_000_000, 0);
    if let Ok(s) = Schedule::every(Duration::from_millis(input.every_ms), anchor) {
        let _ = s.next_after(from);
        let _ = s.between(from, to, 16, COUNT_LIMIT);
    }
});
