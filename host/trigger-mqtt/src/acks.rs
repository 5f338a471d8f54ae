//! Pure logic of the MQTT trigger: which triggers a message goes to, the
//! in-order acknowledgement tracker, and the reconnect backoff.
//!
//! MQTT 5 §4.6 requires a client to acknowledge QoS 1 and QoS 2 messages in
//! the order it received them. Handlers run concurrently and finish in any
//! order, so [`AckTracker`] holds each message's acknowledgement until every
//! earlier message is settled too, then releases the run of ready ones.

use std::collections::VecDeque;
use std::time::Duration;
use wasmgate_manifest::topic::TopicFilter;

/// One subscription made on the broker: a distinct topic filter, the QoS
/// asked for, and the triggers that share it.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// The filter (with any `$share/GROUP/` prefix).
    pub filter: TopicFilter,
    /// The highest QoS any of its triggers asked for.
    pub qos: u8,
    /// Indices of the triggers bound to this filter.
    pub triggers: Vec<usize>,
    /// Its MQTT 5 subscription identifier (never 0). A reload keeps a
    /// filter's identifier and gives a new filter one never used on the
    /// connection, so a message sent for a subscription that is gone is
    /// never taken for another's.
    pub id: usize,
}

impl Subscription {
    /// The MQTT 5 subscription identifier of subscription `index` (1-based:
    /// 0 is not a valid identifier).
    pub fn identifier(index: usize) -> usize {
        index + 1
    }
}

/// Groups trigger filters into subscriptions: triggers with the same filter
/// share one (a second SUBSCRIBE to the same filter would replace the first).
pub fn subscriptions(filters: &[(TopicFilter, u8)]) -> Vec<Subscription> {
    let mut subs: Vec<Subscription> = Vec::new();
    for (i, (filter, qos)) in filters.iter().enumerate() {
        match subs.iter_mut().find(|s| s.filter.raw == filter.raw) {
            Some(s) => {
                s.qos = s.qos.max(*qos);
                s.triggers.push(i);
            }
            None => subs.push(Subscription {
                filter: filter.clone(),
                qos: *qos,
                triggers: vec![i],
                id: Subscription::identifier(subs.len()),
            }),
        }
    }
    subs
}

/// The triggers a message goes to. The broker names the subscriptions a
/// message was sent for by their identifiers; when it names none (a broker
/// without identifiers), every trigger whose filter matches the topic gets it.
/// Identifiers this host did not make (a subscription left in a persistent
/// session by an earlier manifest) are ignored.
pub fn route(subs: &[Subscription], topic: &str, identifiers: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    if identifiers.is_empty() {
        for s in subs {
            if s.filter.matches(topic) {
                out.extend(&s.triggers);
            }
        }
    } else {
        for id in identifiers {
            if let Some(s) = subs.iter().find(|s| s.id == *id) {
                out.extend(&s.triggers);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Holds acknowledgements until they may go out in arrival order.
///
/// Each message that needs an acknowledgement [`arrives`](Self::arrive) with
/// the number of deliveries that must settle first (one per trigger it goes
/// to). [`settle`](Self::settle) returns the acknowledgements that are now
/// due: those of the oldest messages whose deliveries have all settled.
#[derive(Debug)]
pub struct AckTracker<T> {
    first_seq: u64,
    entries: VecDeque<Entry<T>>,
}

#[derive(Debug)]
struct Entry<T> {
    ack: T,
    remaining: u32,
}

impl<T> Default for AckTracker<T> {
    fn default() -> Self {
        Self {
            first_seq: 0,
            entries: VecDeque::new(),
        }
    }
}

impl<T> AckTracker<T> {
    /// Records a message in arrival order; returns its sequence number.
    /// With `deliveries == 0` it is settled at once (see [`Self::settle_ready`]).
    pub fn arrive(&mut self, ack: T, deliveries: u32) -> u64 {
        let seq = self.first_seq + self.entries.len() as u64;
        self.entries.push_back(Entry {
            ack,
            remaining: deliveries,
        });
        seq
    }

    /// One delivery of message `seq` settled; returns the acknowledgements now
    /// due, oldest first. Unknown or already released sequence numbers are
    /// ignored.
    pub fn settle(&mut self, seq: u64) -> Vec<T> {
        if let Some(i) = seq.checked_sub(self.first_seq)
            && let Some(e) = self.entries.get_mut(i as usize)
        {
            e.remaining = e.remaining.saturating_sub(1);
        }
        self.settle_ready()
    }

    /// The acknowledgements due now, oldest first.
    pub fn settle_ready(&mut self) -> Vec<T> {
        let mut due = Vec::new();
        while self.entries.front().is_some_and(|e| e.remaining == 0) {
            let e = self.entries.pop_front().expect("front exists");
            self.first_seq += 1;
            due.push(e.ack);
        }
        due
    }

    /// Messages received and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every message received has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets every pending acknowledgement (the connection is gone: the
    /// broker redelivers those messages, and acks of the old connection must
    /// never reach the new one, where packet ids mean other messages).
    pub fn clear(&mut self) {
        self.first_seq += self.entries.len() as u64;
        self.entries.clear();
    }
}

/// Reconnect delays: exponential from `initial` up to `max`, each shortened
/// by a random part of up to `jitter` so a fleet does not reconnect in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration, jitter: f64) -> Self {
        Self {
            initial,
            max,
            jitter: jitter.clamp(0.0, 1.0),
            failures: 0,
        }
    }

    /// The delay before the next attempt, before jitter.
    pub fn base(&self) -> Duration {
        let factor = 2f64.powi(self.failures.min(30) as i32);
        let d = self.initial.as_secs_f64() * factor;
        if d < self.max.as_secs_f64() {
            Duration::from_secs_f64(d)
        } else {
            self.max
        }
    }

    /// Records a failure and returns the (jittered) delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.base();
        self.failures = self.failures.saturating_add(1);
        d.mul_f64(1.0 - self.jitter * fastrand::f64())
    }

    /// A connection succeeded: start again from `initial`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn acks_go_out_in_arrival_order() {
        // (step, settle seq, acks due afterwards)
        let mut t = AckTracker::default();
        for (ack, deliveries) in [("a", 1), ("b", 1), ("c", 2), ("d", 1), ("e", 0)] {
            t.arrive(ack, deliveries);
        }
        for (settle, want) in [
            (1, vec![]),         // b done, a still running
            (3, vec![]),         // d done
            (0, vec!["a", "b"]), // a done: a and b go
            (2, vec![]),         // c has a second delivery
            (2, vec!["c", "d", "e"]),
            (2, vec![]), // already released
            (9, vec![]), // unknown
        ] {
            assert_eq!(t.settle(settle), want, "settle {settle}");
        }
        assert!(t.is_empty());
        assert_eq!(t.arrive("f", 1), 5, "sequence numbers continue");
    }

    #[test]
    fn clearing_forgets_old_acks() {
        let mut t = AckTracker::default();
        let a = t.arrive(1, 1);
        t.arrive(2, 1);
        t.clear();
        assert!(t.settle(a).is_empty(), "an ack from before the clear");
        let c = t.arrive(3, 1);
        assert_eq!(c, 2);
        assert_eq!(t.settle(c), vec![3]);
    }

    #[test]
    fn a_message_with_no_trigger_is_acked_in_its_turn() {
        let mut t = AckTracker::default();
        let a = t.arrive("a", 1);
        t.arrive("b", 0);
        assert!(t.settle_ready().is_empty(), "b waits for a");
        assert_eq!(t.settle(a), vec!["a", "b"]);
    }

    #[test]
    fn messages_are_routed_by_identifier_or_by_topic() {
        let subs = subscriptions(&[
            (f("a/+"), 1),
            (f("a/#"), 0),
            (f("a/+"), 2),
            (f("$share/g/b/#"), 1),
        ]);
        assert_eq!(subs.len(), 3);
        assert_eq!(subs[0].triggers, [0, 2]);
        assert_eq!(subs[0].qos, 2);
        for (topic, ids, want) in [
            ("a/x", vec![], vec![0, 1, 2]),
            ("a/x", vec![1], vec![0, 2]),
            ("a/x", vec![2], vec![1]),
            ("a/x", vec![1, 2], vec![0, 1, 2]),
            ("a/x/y", vec![], vec![1]),
            ("b/z", vec![], vec![3]),
            ("b/z", vec![3], vec![3]),
            ("c", vec![], vec![]),
            ("a/x", vec![7], vec![]), // a subscription from an older manifest
            ("a/x", vec![0], vec![]),
        ] {
            assert_eq!(route(&subs, topic, &ids), want, "{topic} {ids:?}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.0);
        let delays: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        let mut j = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.5);
        for _ in 0..50 {
            let d = j.next_delay();
            j.reset();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
    }
}
