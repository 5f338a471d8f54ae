//! Schedules: when a timer fires. Pure logic, no I/O and no clock of its own.
//!
//! - `cron`: 5 fields (minute first) or 6 (seconds first), evaluated in the
//!   trigger's IANA time zone. Daylight-saving rules (those of the croner crate,
//!   after Vixie cron):
//!   - a fixed time that does not exist (spring forward, e.g. 02:30 on the
//!     night clocks jump from 02:00 to 03:00) runs once, right after the gap
//!     (03:00);
//!   - a fixed time that exists twice (fall back) runs once, at its first
//!     occurrence;
//!   - wildcard and step fields (`*/15`) follow real time: slots inside a gap
//!     do not exist, and slots in a repeated hour run in both passes, because
//!     they are different instants.
//! - `every`: a fixed interval, anchored at `start_at` (default: the Unix
//!   epoch, so `every = "30s"` fires at :00 and :30 of each minute on every
//!   host, and a restart does not shift the ticks).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::time::Duration;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron expression in a time zone.
    Cron {
        /// The parsed expression.
        cron: Box<croner::Cron>,
        /// Its time zone.
        tz: Tz,
    },
    /// A fixed interval.
    Every {
        /// The interval (never zero).
        interval: Duration,
        /// The anchor: fire times are `anchor + k × interval`.
        anchor: DateTime<Utc>,
    },
}

impl Schedule {
    /// Parses a cron expression (5 or 6 fields) for a time zone.
    pub fn cron(expr: &str, tz: Tz) -> Result<Self, String> {
        let parser = croner::parser::CronParser::builder()
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser
            .parse(expr)
            .map_err(|e| format!("{expr:?} is not a cron expression: {e}"))?;
        // One that never fires (31 February, no weekday left) is refused
        // here: later, every lookup would search to croner's limit, the
        // year 5000.
        if !wasmgate_manifest::cron_fires_at_all(&cron) {
            return Err(format!("{expr:?} never fires: no date matches it"));
        }
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            tz,
        })
    }

    /// A fixed interval anchored at `anchor` (the Unix epoch if `None`).
    pub fn every(interval: Duration, anchor: Option<DateTime<Utc>>) -> Result<Self, String> {
        if interval.is_zero() {
            return Err("the interval must be greater than zero".into());
        }
        Ok(Schedule::Every {
            interval,
            anchor: anchor.unwrap_or(DateTime::UNIX_EPOCH),
        })
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { cron, tz } => cron
                .find_next_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Schedule::Every { interval, anchor } => {
                let step = interval.as_nanos() as i128;
                let since = (t - *anchor)
                    .num_nanoseconds()
                    .map(i128::from)
                    .unwrap_or(i128::MAX / 2);
                // The smallest k with anchor + k*step > t.
                let k = if since < 0 { 0 } else { since / step + 1 };
                let offset = i64::try_from(k * step).ok()?;
                Some(*anchor + chrono::Duration::nanoseconds(offset))
            }
        }
    }

    /// Up to `limit` fire times in `(after, until]`, oldest first, and how many
    /// there are in all (counted up to `count_limit`).
    pub fn between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
        count_limit: u64,
    ) -> (Vec<DateTime<Utc>>, u64) {
        if let Schedule::Every { interval, anchor } = self
            && let Some(found) = every_between(*interval, *anchor, after, until, limit, count_limit)
        {
            return found;
        }
        let mut times = Vec::new();
        let mut count = 0;
        let mut cursor = after;
        while count < count_limit {
            let Some(next) = self.next_after(cursor) else {
                break;
            };
            if next > until {
                break;
            }
            count += 1;
            times.push(next);
            if times.len() > limit {
                // Keep the most recent `limit`.
                times.remove(0);
            }
            cursor = next;
        }
        (times, count)
    }
}

/// [`Schedule::between`] for an interval, by arithmetic instead of a walk
/// (`None` when the span does not fit in i64 nanoseconds: walk then).
fn every_between(
    interval: Duration,
    anchor: DateTime<Utc>,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: usize,
    count_limit: u64,
) -> Option<(Vec<DateTime<Utc>>, u64)> {
    if until <= after {
        return Some((Vec::new(), 0));
    }
    let step = interval.as_nanos() as i128;
    let since = |t: DateTime<Utc>| (t - anchor).num_nanoseconds().map(i128::from);
    let (a, u) = (since(after)?, since(until)?);
    // The first k with anchor + k·step > after, the last with ≤ until.
    let first = if a < 0 { 0 } else { a / step + 1 };
    if u < 0 {
        return Some((Vec::new(), 0));
    }
    let last = u / step;
    if last < first {
        return Some((Vec::new(), 0));
    }
    let count = ((last - first + 1) as u64).min(count_limit);
    let from = first.max(last - limit as i128 + 1);
    let times = (from..=last)
        .map(|k| anchor + chrono::Duration::nanoseconds((k * step) as i64))
        .collect();
    Some((times, count))
}

/// What to do with ticks that were due while the host was down or late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUpPolicy {
    /// Run none of them.
    Skip,
    /// Run only the most recent.
    Latest,
    /// Run each, up to a cap (the most recent ones).
    All {
        /// Most ticks to run.
        max: u32,
    },
}

/// The ticks to run after missing some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    /// Fire times to run now, oldest first.
    pub run: Vec<DateTime<Utc>>,
    /// Missed ticks that will not run.
    pub skipped: u64,
}

/// Most missed ticks counted after a long downtime (beyond it, the count is a floor).
pub const MISSED_COUNT_LIMIT: u64 = 100_000;

/// Plans the catch-up for ticks due in `(last, now]`. Ticks older than
/// `now - starting_deadline` are never run.
pub fn plan_catch_up(
    schedule: &Schedule,
    last: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: CatchUpPolicy,
    starting_deadline: Option<Duration>,
) -> CatchUp {
    let keep = match policy {
        CatchUpPolicy::Skip => 0,
        CatchUpPolicy::Latest => 1,
        CatchUpPolicy::All { max } => max as usize,
    };
    let (mut recent, total) = schedule.between(last, now, keep, MISSED_COUNT_LIMIT);
    // A deadline too large to subtract means no limit.
    if let Some(oldest) = starting_deadline
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .and_then(|d| now.checked_sub_signed(d))
    {
        recent.retain(|t| *t >= oldest);
    }
    if keep == 0 {
        recent.clear();
    }
    CatchUp {
        skipped: total - recent.len() as u64,
        run: recent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn local(t: DateTime<Utc>, tz: Tz) -> String {
        t.with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    }

    fn next_n(s: &Schedule, from: &str, n: usize, tz: Tz) -> Vec<String> {
        let mut t = utc(from);
        let mut out = Vec::new();
        for _ in 0..n {
            t = s.next_after(t).unwrap();
            out.push(local(t, tz));
        }
        out
    }

    /// Found by the `schedule` fuzz target: an expression that parses but
    /// matches no date made every lookup search to the year 5000.
    #[test]
    fn an_expression_that_never_fires_is_refused() {
        for never in [
            "0 0 31 2 *",
            "0 0 30 2 *",
            "1\n 11\n 11\n 1 \n+",
            ",,,,\n* * * 1\n* ",
        ] {
            let err = Schedule::cron(never, chrono_tz::UTC).unwrap_err();
            assert!(err.contains("never fires"), "{never:?}: {err}");
        }
        // Rare is fine: 29 February, and 29 February on a Monday (with
        // croner's day-of-month AND day-of-week: every 28 years or so).
        assert!(Schedule::cron("0 0 29 2 MON", chrono_tz::UTC).is_ok());
        assert!(Schedule::cron("0 0 31 12 SUN", chrono_tz::UTC).is_ok());
        let leap = Schedule::cron("0 0 29 2 *", chrono_tz::UTC).unwrap();
        assert_eq!(
            leap.next_after(utc("2026-01-01T00:00:00Z")),
            Some(utc("2028-02-29T00:00:00Z"))
        );
    }

    #[test]
    fn cron_with_five_and_six_fields() {
        let utc_tz = chrono_tz::UTC;
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "*/15 * * * *",
                "2026-01-01T00:07:00Z",
                &["2026-01-01 00:15:00 UTC", "2026-01-01 00:30:00 UTC"],
            ),
            (
                "0 9 * * MON",
                "2026-01-01T00:00:00Z",
                &["2026-01-05 09:00:00 UTC", "2026-01-12 09:00:00 UTC"],
            ),
            (
                "*/20 * * * * *",
                "2026-01-01T00:00:00Z",
                &["2026-01-01 00:00:20 UTC", "2026-01-01 00:00:40 UTC"],
            ),
            (
                "30 0 12 1 * *",
                "2026-01-01T12:00:30Z",
                &["2026-02-01 12:00:30 UTC", "2026-03-01 12:00:30 UTC"],
            ),
        ];
        for (expr, from, want) in cases {
            let s = Schedule::cron(expr, utc_tz).unwrap();
            assert_eq!(next_n(&s, from, want.len(), utc_tz), *want, "{expr}");
        }
        for bad in ["61 * * * *", "* * *", "* * * * * * *", "0 0 30 2 *x", ""] {
            assert!(Schedule::cron(bad, utc_tz).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn intervals_are_anchored() {
        let s = Schedule::every(Duration::from_secs(30), None).unwrap();
        assert_eq!(
            s.next_after(utc("2026-01-01T00:00:10Z")),
            Some(utc("2026-01-01T00:00:30Z"))
        );
        assert_eq!(
            s.next_after(utc("2026-01-01T00:00:30Z")),
            Some(utc("2026-01-01T00:01:00Z"))
        );
        let anchored = Schedule::every(
            Duration::from_millis(100),
            Some(utc("2026-01-01T00:00:00.050Z")),
        )
        .unwrap();
        assert_eq!(
            anchored.next_after(utc("2026-01-01T00:00:00.120Z")),
            Some(utc("2026-01-01T00:00:00.150Z"))
        );
        assert_eq!(
            anchored.next_after(utc("2025-12-31T00:00:00Z")),
            Some(utc("2026-01-01T00:00:00.050Z"))
        );
        assert!(Schedule::every(Duration::ZERO, None).is_err());
    }

    #[test]
    fn spring_forward_runs_a_skipped_fixed_time_once_right_after_the_gap() {
        // Europe/Berlin 2026-03-29: 02:00 CET → 03:00 CEST. New York 2026-03-08: 02:00 EST → 03:00 EDT.
        for (tz, from, want) in [
            (
                chrono_tz::Europe::Berlin,
                "2026-03-27T12:00:00Z",
                [
                    "2026-03-28 02:30:00 CET",
                    "2026-03-29 03:00:00 CEST",
                    "2026-03-30 02:30:00 CEST",
                ],
            ),
            (
                chrono_tz::America::New_York,
                "2026-03-06T12:00:00Z",
                [
                    "2026-03-07 02:30:00 EST",
                    "2026-03-08 03:00:00 EDT",
                    "2026-03-09 02:30:00 EDT",
                ],
            ),
        ] {
            let s = Schedule::cron("30 2 * * *", tz).unwrap();
            assert_eq!(next_n(&s, from, 3, tz), want, "{tz}");
        }
    }

    #[test]
    fn fall_back_runs_a_repeated_fixed_time_once() {
        // Europe/Berlin 2026-10-25: 03:00 CEST → 02:00 CET. New York 2026-11-01: 02:00 EDT → 01:00 EST.
        for (tz, expr, from, want) in [
            (
                chrono_tz::Europe::Berlin,
                "30 2 * * *",
                "2026-10-23T12:00:00Z",
                [
                    "2026-10-24 02:30:00 CEST",
                    "2026-10-25 02:30:00 CEST",
                    "2026-10-26 02:30:00 CET",
                ],
            ),
            (
                chrono_tz::America::New_York,
                "30 1 * * *",
                "2026-10-30T12:00:00Z",
                [
                    "2026-10-31 01:30:00 EDT",
                    "2026-11-01 01:30:00 EDT",
                    "2026-11-02 01:30:00 EST",
                ],
            ),
        ] {
            let s = Schedule::cron(expr, tz).unwrap();
            assert_eq!(next_n(&s, from, 3, tz), want, "{tz}");
        }
    }

    #[test]
    fn wildcard_schedules_follow_real_time_across_dst() {
        let berlin = chrono_tz::Europe::Berlin;
        let s = Schedule::cron("0 */30 * * * *", berlin).unwrap();
        // Spring forward: 01:30 CET is followed by 03:00 CEST, 30 real minutes later.
        assert_eq!(
            next_n(&s, "2026-03-29T00:15:00Z", 2, berlin),
            ["2026-03-29 01:30:00 CET", "2026-03-29 03:00:00 CEST"]
        );
        // Fall back: the repeated hour runs in both passes.
        assert_eq!(
            next_n(&s, "2026-10-24T23:45:00Z", 5, berlin),
            [
                "2026-10-25 02:00:00 CEST",
                "2026-10-25 02:30:00 CEST",
                "2026-10-25 02:00:00 CET",
                "2026-10-25 02:30:00 CET",
                "2026-10-25 03:00:00 CET"
            ]
        );
    }

    #[test]
    fn interval_counts_match_a_walk() {
        let s = Schedule::every(
            Duration::from_millis(700),
            Some(utc("2026-01-01T00:00:00.300Z")),
        )
        .unwrap();
        let cron_like = |after: &str, until: &str, limit| {
            // The walk over next_after, for comparison.
            let (mut t, end) = (utc(after), utc(until));
            let mut all = Vec::new();
            while let Some(n) = s.next_after(t).filter(|n| *n <= end) {
                all.push(n);
                t = n;
            }
            let n = all.len() as u64;
            (all.split_off(all.len().saturating_sub(limit)), n)
        };
        for (after, until, limit) in [
            ("2026-01-01T00:00:00Z", "2026-01-01T00:00:10Z", 3),
            ("2026-01-01T00:00:01Z", "2026-01-01T00:00:01.5Z", 5),
            ("2026-01-01T00:00:00.300Z", "2026-01-01T00:00:01.000Z", 1),
            ("2025-12-31T23:59:59Z", "2026-01-01T00:00:02Z", 10),
            ("2026-01-01T00:00:05Z", "2026-01-01T00:00:01Z", 2),
        ] {
            assert_eq!(
                s.between(utc(after), utc(until), limit, MISSED_COUNT_LIMIT),
                cron_like(after, until, limit),
                "{after}..{until}"
            );
        }
    }

    #[test]
    fn catch_up_policies() {
        let s = Schedule::every(Duration::from_secs(60), None).unwrap();
        let last = utc("2026-01-01T00:00:00Z");
        let now = utc("2026-01-01T00:10:30Z"); // ticks 00:01 .. 00:10 were missed
        let t = |m: u32| Utc.with_ymd_and_hms(2026, 1, 1, 0, m, 0).unwrap();
        let plan = |policy, deadline| plan_catch_up(&s, last, now, policy, deadline);
        assert_eq!(
            plan(CatchUpPolicy::Skip, None),
            CatchUp {
                run: vec![],
                skipped: 10
            }
        );
        assert_eq!(
            plan(CatchUpPolicy::Latest, None),
            CatchUp {
                run: vec![t(10)],
                skipped: 9
            }
        );
        assert_eq!(
            plan(CatchUpPolicy::All { max: 3 }, None),
            CatchUp {
                run: vec![t(8), t(9), t(10)],
                skipped: 7
            }
        );
        assert_eq!(
            plan(
                CatchUpPolicy::All { max: 100 },
                Some(Duration::from_secs(140))
            ),
            CatchUp {
                run: vec![t(9), t(10)],
                skipped: 8
            }
        );
        assert_eq!(
            plan(CatchUpPolicy::Latest, Some(Duration::from_secs(10))),
            CatchUp {
                run: vec![],
                skipped: 10
            }
        );
        // Nothing missed.
        assert_eq!(
            plan_catch_up(&s, now, now, CatchUpPolicy::All { max: 5 }, None),
            CatchUp {
                run: vec![],
                skipped: 0
            }
        );
    }
}
