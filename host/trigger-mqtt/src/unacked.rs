//! Which of the host's QoS 1/2 publishes the broker has not acknowledged,
//! and whom to tell when it does.
//!
//! A publish counts as delivered only once the broker has acknowledged it
//! (PUBACK for QoS 1, PUBCOMP for QoS 2): until then an invocation's
//! publish keeps its invocation waiting (so its input is not acknowledged,
//! its timer tick not recorded, its queued event not removed), and a spooled
//! message keeps its row on disk. If the connection drops first, the
//! publishes it took back go to the spool, and their invocations are told
//! once they are on disk there.
//!
//! rumqttc gives a publish its packet id only when it sends it, so the
//! tracker pairs them by order: publishes are handed to the connection's
//! request channel in the order they were [`Unacked::hand`]ed, rumqttc takes
//! them from it in that order (and, after a packet id collision, sends the
//! held one before it takes another), and reports each first send with its
//! packet id ([`Unacked::sent`]). Resends of a publish after a reconnect keep
//! their packet id and are told apart ([`Unacked::keep`]). No I/O here.

use std::collections::{HashMap, VecDeque};
use tokio::sync::oneshot;

/// What becomes of a publish the host made durable: `Ok` once the broker
/// acknowledged it or it is on disk in the spool; `Err(reason)` when the
/// broker refused it (an MQTT 5 reason code) or it could be neither.
pub type Outcome = Result<(), String>;

/// Whom a tracked publish belongs to.
#[derive(Debug)]
pub enum Origin {
    /// An invocation's publish (or a dead letter): told its [`Outcome`].
    Waiter(oneshot::Sender<Outcome>),
    /// A spooled message, by its row's sequence number: the row is removed
    /// once the broker acknowledged it.
    Row(i64),
}

/// A publish the broker has been sent and has not answered yet.
#[derive(Debug)]
struct Sent {
    origin: Origin,
    /// Left with rumqttc's session after a dropped connection: its next send
    /// (the session's resend, same packet id) is not a new publish.
    resend: bool,
}

/// The tracker (see the module docs). One per connection owner.
///
/// Publishes waiting for PUBACK/PUBREC and QoS 2 exchanges past PUBREC are
/// kept apart: rumqttc frees a packet id at PUBREC and may give it to a new
/// publish before the old exchange's PUBCOMP arrives.
#[derive(Debug, Default)]
pub struct Unacked {
    /// Handed to the connection, not yet reported sent, oldest first.
    handed: VecDeque<Origin>,
    /// Sent, by packet id, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    sent: HashMap<u16, Sent>,
    /// QoS 2 exchanges past PUBREC, by packet id, waiting for PUBCOMP.
    received: HashMap<u16, Origin>,
}

impl Unacked {
    /// A QoS 1/2 publish goes into the connection's request channel now.
    /// Call it before handing the publish over, under the lock that orders
    /// hand-overs, so the send it pairs with is never seen first.
    pub fn hand(&mut self, origin: Origin) {
        self.handed.push_back(origin);
    }

    /// The last [`Self::hand`] did not reach the channel (it was full).
    pub fn unhand(&mut self) -> Option<Origin> {
        self.handed.pop_back()
    }

    /// rumqttc sent a QoS 1/2 publish with packet id `pkid`. Returns an
    /// origin the pairing lost track of (a packet id still waiting for its
    /// answer was sent again as new; never expected), to be failed.
    pub fn sent(&mut self, pkid: u16) -> Option<Origin> {
        if let Some(s) = self.sent.get_mut(&pkid)
            && s.resend
        {
            s.resend = false;
            return None;
        }
        let Some(origin) = self.handed.pop_front() else {
            tracing::warn!(
                pkid,
                "a publish was sent that the host did not hand over; not tracked"
            );
            return None;
        };
        let old = self.sent.insert(
            pkid,
            Sent {
                origin,
                resend: false,
            },
        );
        if old.is_some() {
            tracing::error!(
                pkid,
                "a packet id was sent again before its acknowledgement; the older publish is reported lost"
            );
        }
        old.map(|s| s.origin)
    }

    /// PUBACK (QoS 1) for `pkid`, or a PUBACK/PUBREC that refused it: the
    /// exchange ended.
    pub fn acked(&mut self, pkid: u16) -> Option<Origin> {
        self.sent.remove(&pkid).map(|s| s.origin)
    }

    /// PUBREC (QoS 2) for `pkid`: the exchange waits for PUBCOMP, and the
    /// packet id may be reused meanwhile.
    pub fn received(&mut self, pkid: u16) {
        if let Some(s) = self.sent.remove(&pkid) {
            self.received.insert(pkid, s.origin);
        }
    }

    /// PUBCOMP for `pkid`: the QoS 2 exchange ended.
    pub fn completed(&mut self, pkid: u16) -> Option<Origin> {
        self.received.remove(&pkid)
    }

    /// The connection dropped and rumqttc gave back the publish sent with
    /// `pkid` (no PUBACK/PUBREC yet), for the spool.
    pub fn take_sent(&mut self, pkid: u16) -> Option<Origin> {
        self.sent.remove(&pkid).map(|s| s.origin)
    }

    /// The connection dropped and rumqttc gave back the oldest publish it
    /// had not sent yet, for the spool.
    pub fn take_unsent(&mut self) -> Option<Origin> {
        self.handed.pop_front()
    }

    /// The connection dropped and the QoS 2 publish sent with `pkid` stays
    /// with rumqttc's session, which sends it again with that packet id.
    pub fn keep(&mut self, pkid: u16) {
        if let Some(s) = self.sent.get_mut(&pkid) {
            s.resend = true;
        }
    }

    /// Publishes handed over but neither sent nor given back: none, unless
    /// the pairing went wrong. Taken out, so they are not paired with later
    /// sends.
    pub fn take_handed(&mut self) -> Vec<Origin> {
        self.handed.drain(..).collect()
    }

    /// The broker lost the session (or the host is stopping): the QoS 2
    /// exchanges past PUBREC end here. The broker took those messages when
    /// it answered PUBREC.
    pub fn end_received(&mut self) -> Vec<Origin> {
        self.received.drain().map(|(_, o)| o).collect()
    }

    /// Whether the spooled message `seq` is handed or sent and its exchange
    /// has not ended.
    pub fn has_row(&self, seq: i64) -> bool {
        let is = |o: &Origin| matches!(o, Origin::Row(s) if *s == seq);
        self.handed.iter().any(is)
            || self.sent.values().any(|s| is(&s.origin))
            || self.received.values().any(is)
    }

    /// Publishes tracked (handed or sent, not acknowledged).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.handed.len() + self.sent.len() + self.received.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(o: Option<Origin>) -> i64 {
        match o {
            Some(Origin::Row(seq)) => seq,
            other => panic!("expected a row, got {other:?}"),
        }
    }

    #[test]
    fn sends_pair_with_hand_overs_in_order() {
        let mut u = Unacked::default();
        for seq in 1..=3 {
            u.hand(Origin::Row(seq));
        }
        assert!(u.sent(7).is_none());
        assert!(u.sent(8).is_none());
        assert_eq!(row(u.acked(8)), 2);
        assert_eq!(row(u.acked(7)), 1);
        assert!(u.acked(7).is_none(), "an ack ends the exchange once");
        assert!(u.sent(7).is_none());
        assert_eq!(row(u.acked(7)), 3);
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn a_hand_over_that_failed_is_taken_back() {
        let mut u = Unacked::default();
        u.hand(Origin::Row(1));
        u.hand(Origin::Row(2));
        assert_eq!(row(u.unhand()), 2);
        u.sent(1);
        assert_eq!(row(u.acked(1)), 1);
    }

    #[test]
    fn a_resend_with_the_same_packet_id_is_not_a_new_publish() {
        let mut u = Unacked::default();
        u.hand(Origin::Row(1));
        u.hand(Origin::Row(2));
        u.sent(5);
        u.received(5);
        u.hand(Origin::Row(3));
        u.sent(6);
        // The connection drops: 5 (past PUBREC) stays, 6 is kept for its
        // resend, nothing else is given back.
        u.keep(6);
        assert!(u.sent(6).is_none());
        assert_eq!(row(u.acked(6)), 2);
        u.sent(9);
        assert_eq!(row(u.acked(9)), 3);
        assert_eq!(row(u.end_received().pop()), 1);
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn a_packet_id_reused_after_pubrec_pairs_with_the_new_publish() {
        let mut u = Unacked::default();
        u.hand(Origin::Row(1));
        u.hand(Origin::Row(2));
        u.sent(1);
        u.received(1);
        // rumqttc gives packet id 1 to the next publish before PUBCOMP(1).
        assert!(u.sent(1).is_none());
        assert!(u.has_row(1) && u.has_row(2));
        assert_eq!(row(u.completed(1)), 1, "PUBCOMP ends the QoS 2 exchange");
        assert_eq!(row(u.acked(1)), 2, "PUBACK ends the new one");
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn a_drop_gives_back_sent_then_unsent() {
        let mut u = Unacked::default();
        for seq in 1..=4 {
            u.hand(Origin::Row(seq));
        }
        u.sent(1);
        u.sent(2);
        assert_eq!(row(u.take_sent(2)), 2);
        assert_eq!(row(u.take_sent(1)), 1);
        assert_eq!(row(u.take_unsent()), 3);
        assert_eq!(u.take_handed().len(), 1);
        assert_eq!(u.len(), 0);
    }
}
