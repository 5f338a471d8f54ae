//! How the host's publishes reach the broker, connected or not.
//!
//! Every guest publish — from an MQTT handler, or through the outbox from a
//! timer, an HTTP request or a queued event — and every dead letter sent to
//! `[dead_letters] mqtt_topic` goes through one [`Publisher`]:
//!
//! - **Connected, nothing waiting**: handed straight to the connection. A
//!   QoS 1/2 publish is done when the broker acknowledges it (PUBACK, or
//!   PUBCOMP for QoS 2; see [`crate::unacked`]): only then is its
//!   invocation told, so the input that caused it is acknowledged (a timer
//!   tick recorded, a queued event removed) after the broker has the output.
//!   A PUBACK/PUBREC with an MQTT 5 error reason code (not authorized,
//!   quota exceeded, …) is a refusal: counted, and its invocation fails.
//! - **QoS 1/2 while the broker is unreachable** (or while older messages
//!   still wait, or the connection's request channel is full): written to
//!   the on-disk [`Spool`] in `state_dir`, in order; its invocation is told
//!   once it is on disk. On every reconnect a thread sends what waits,
//!   oldest first, and only then do new publishes go straight to the
//!   connection again, so the broker sees each QoS's publishes in the order
//!   they were made. A spooled message stays on disk until the broker
//!   acknowledges it; on a new connection the drain starts again from the
//!   oldest, so a crash at any point loses none of them (at least once).
//!   When the connection drops, the QoS 1/2 publishes of invocations the
//!   broker had not acknowledged (in send order) and those still queued for
//!   the connection move to the front of the spool and their invocations
//!   are told once they are on disk; QoS 2 publishes already sent stay with
//!   rumqttc's session, which resends them with their packet id (see
//!   [`Cleaned`]). The drain never blocks the spool: while the connection's
//!   queue is full, new messages are still written, so a delivery waits for
//!   the disk or the broker, never for a full queue.
//! - **QoS 0** is at most once and never spooled: handed to the connection,
//!   or dropped and counted when its queue is full or it drops.
//! - **Too large** (over [`MAX_PUBLISH_SIZE`]): refused and counted.
//!
//! A full spool applies its explicit [`OnFull`](wasmgate_store::spool::OnFull)
//! policy; every message it drops or refuses is counted and logged. What is
//! lost if the host process dies: QoS 0 publishes not yet written to the
//! socket, and the publishes of invocations still running (their inputs are
//! not acknowledged, so they run again). A QoS 2 publish the broker answered
//! with PUBREC but not yet PUBCOMP is the broker's; one the host sent again
//! from the spool after a crash may reach subscribers twice (QoS 2 is
//! exactly once within a connection's session, at least once across a crash).

use crate::MqttStats;
use crate::connection::Cleaned;
use crate::connection::Track;
use crate::unacked::{Origin, Outcome, Unacked};
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use wasmgate_runtime::invoke::MqttMessage;
use wasmgate_store::spool::{Spool, Stored};

/// Spooled messages read and sent per round.
const DRAIN_BATCH: usize = 256;
/// How long the drain first waits for room in a full request channel
/// (taking commands meanwhile); doubled while it stays full, up to
/// [`FULL_CHANNEL_MAX_WAIT`].
const FULL_CHANNEL_WAIT: Duration = Duration::from_millis(1);
const FULL_CHANNEL_MAX_WAIT: Duration = Duration::from_millis(50);
pub use wasmgate_runtime::invoke::MAX_PUBLISH_SIZE;

/// The broker connection's client, MQTT 5 or 3.1.1.
#[derive(Clone, Debug)]
pub enum Client {
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos4(q: u8) -> rumqttc::QoS {
    use rumqttc::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Client {
    /// Hands a publish to the connection's request channel without waiting;
    /// `false` when the channel is full or closed. MQTT 3.1.1 has no
    /// properties: content type, response topic, correlation data and user
    /// properties are not sent there.
    fn try_publish(&self, m: &MqttMessage) -> bool {
        let payload = Bytes::from(m.payload.clone());
        match self {
            Client::V5(c) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    content_type: m.content_type.clone(),
                    response_topic: m.response_topic.clone(),
                    correlation_data: m.correlation_data.clone().map(Bytes::from),
                    user_properties: m.user_properties.clone(),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    m.topic.clone(),
                    qos5(m.qos),
                    m.retain,
                    payload,
                    props,
                )
                .is_ok()
            }
            Client::V4(c) => c
                .try_publish(m.topic.clone(), qos4(m.qos), m.retain, payload)
                .is_ok(),
        }
    }

    /// Hands the acknowledgement of the QoS 1/2 message `pkid` to the
    /// connection; `false` when the channel is full or closed.
    pub fn try_ack(&self, pkid: u16, qos: u8) -> bool {
        match self {
            Client::V5(c) => {
                let mut p =
                    rumqttc::v5::mqttbytes::v5::Publish::new("", qos5(qos), Bytes::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos4(qos), Bytes::new());
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    /// Subscribes to `filter` (with MQTT 5, under subscription identifier
    /// `id`, and retained messages only on a new subscription); `false` when
    /// the connection has stopped.
    pub async fn subscribe(&self, filter: &str, qos: u8, id: usize) -> bool {
        match self {
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule, SubscribeProperties};
                let mut f = Filter::new(filter.to_string(), qos5(qos));
                f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
                let props = SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                };
                c.subscribe_many_with_properties([f], props).await.is_ok()
            }
            Client::V4(c) => c.subscribe(filter, qos4(qos)).await.is_ok(),
        }
    }

    /// Unsubscribes `filter`; false when the client is gone.
    pub async fn unsubscribe(&self, filter: &str) -> bool {
        match self {
            Client::V5(c) => c.unsubscribe(filter).await.is_ok(),
            Client::V4(c) => c.unsubscribe(filter).await.is_ok(),
        }
    }

    /// Queues a DISCONNECT behind what the client holds, without waiting;
    /// false when its queue is full.
    pub fn try_disconnect(&self) -> bool {
        match self {
            Client::V5(c) => c.try_disconnect().is_ok(),
            Client::V4(c) => c.try_disconnect().is_ok(),
        }
    }

    /// Queues a DISCONNECT.
    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.map_err(drop),
            Client::V4(c) => c.disconnect().await.map_err(drop),
        };
    }
}

/// What the connection owner and the spool thread share.
#[derive(Debug)]
struct Link {
    /// A CONNACK was received and the connection has not dropped since.
    connected: bool,
    /// The host is stopping: nothing more is sent, even after a reconnect.
    paused: bool,
    /// Connections dropped so far: a drain stops when it changes, so it
    /// never goes on sending on a new connection before what the dropped
    /// one left unacknowledged is back in the spool.
    drops: u64,
    /// Spooled messages plus those on their way to the spool: while any
    /// wait, new QoS 1/2 publishes queue behind them.
    backlog: u64,
}

enum Cmd {
    /// Spool a message; answer once it is on disk (or lost, counted).
    Spool(MqttMessage, Option<Waiter>),
    /// Unacknowledged publishes of a dropped connection: spool them first,
    /// then answer their waiters.
    Requeue(Vec<(MqttMessage, Option<Waiter>)>),
    /// Spooled messages the broker acknowledged (or refused): remove them.
    Remove(Vec<i64>),
    /// The connection is up: send what waits.
    Wake,
    /// Finish what is queued and stop.
    Stop,
}

/// Told what became of a QoS 1/2 publish (see [`Outcome`]).
type Waiter = oneshot::Sender<Outcome>;

/// What [`Publisher::publish`] did with a message.
#[derive(Debug)]
pub enum Handed {
    /// A QoS 0 publish, handed to the connection.
    Sent,
    /// A QoS 1/2 publish, handed to the connection or on its way to the
    /// spool; the receiver answers once the broker acknowledged it or it is
    /// on disk ([`Outcome`]).
    Pending(oneshot::Receiver<Outcome>),
    /// Lost (counted and logged).
    Dropped,
}

/// The one way the host's publishes reach the broker (see the module docs).
#[derive(Debug)]
pub struct Publisher {
    client: Client,
    link: Mutex<Link>,
    /// The QoS 1/2 publishes handed to the connection and not yet
    /// acknowledged. Taken after `link` when both are.
    unacked: Mutex<Unacked>,
    cmds: Mutex<std_mpsc::Sender<Cmd>>,
    stats: Arc<MqttStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Publisher {
    /// Starts the spool thread over `spool` (what an earlier run left there
    /// is sent first, once connected).
    pub fn start(client: Client, spool: Spool, stats: Arc<MqttStats>) -> Arc<Self> {
        let (tx, rx) = std_mpsc::channel();
        stats.spool_waiting.store(spool.len(), Ordering::Relaxed);
        if !spool.is_empty() {
            tracing::info!(
                messages = spool.len(),
                bytes = spool.bytes(),
                "MQTT publishes spooled by an earlier run will be sent once connected"
            );
        }
        let publisher = Arc::new(Self {
            client,
            link: Mutex::new(Link {
                connected: false,
                paused: false,
                drops: 0,
                backlog: spool.len(),
            }),
            unacked: Mutex::default(),
            cmds: Mutex::new(tx),
            stats,
            thread: Mutex::new(None),
        });
        let p = publisher.clone();
        let thread = std::thread::Builder::new()
            .name("mqtt-spool".into())
            .spawn(move || p.spool_loop(spool, rx))
            .expect("spawn the spool thread");
        *publisher.thread.lock().expect("thread lock") = Some(thread);
        publisher
    }

    /// The connection's client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().expect("link lock")
    }

    fn unacked(&self) -> MutexGuard<'_, Unacked> {
        self.unacked.lock().expect("unacked lock")
    }

    fn command(&self, cmd: Cmd) {
        // The thread only stops on `Stop`, after the last user: a command
        // after that is lost, and counted.
        if let Err(e) = self.cmds.lock().expect("cmds lock").send(cmd) {
            let lost = match e.0 {
                Cmd::Spool(m, w) => {
                    answer(w, Err(STOPPED.into()));
                    drop(m);
                    1
                }
                Cmd::Requeue(ms) => {
                    let n = ms.len() as u64;
                    for (_, w) in ms {
                        answer(w, Err(STOPPED.into()));
                    }
                    n
                }
                _ => 0,
            };
            if lost > 0 {
                self.stats.spool_errors.fetch_add(lost, Ordering::Relaxed);
                tracing::error!(
                    messages = lost,
                    "publishes after the MQTT connection stopped are lost"
                );
            }
        }
    }

    /// Publishes `m` (see the module docs for the paths it can take).
    pub fn publish(&self, m: MqttMessage) -> Handed {
        if wasmgate_manifest::topic::validate_name(&m.topic).is_err() {
            self.stats.publish_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(topic = %m.topic, "not a valid topic name; publish dropped");
            return Handed::Dropped;
        }
        let size = m.size();
        if size > MAX_PUBLISH_SIZE {
            self.stats.publish_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(topic = %m.topic, size, max = MAX_PUBLISH_SIZE, "a publish is larger than the host sends; dropped");
            return Handed::Dropped;
        }
        let link = self.link();
        if m.qos == 0 {
            drop(link);
            if self.client.try_publish(&m) {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                return Handed::Sent;
            }
            self.stats.publish_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %m.topic, "a QoS 0 publish was dropped: the connection's queue is full");
            return Handed::Dropped;
        }
        let (tx, rx) = oneshot::channel();
        if link.connected && link.backlog == 0 {
            let mut unacked = self.unacked();
            unacked.hand(Origin::Waiter(tx));
            if self.client.try_publish(&m) {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                return Handed::Pending(rx);
            }
            drop(unacked.unhand());
            return self.spool(link, m);
        }
        drop(rx);
        self.spool(link, m)
    }

    /// Sends `m` to the spool thread, under the link lock (`link`), so the
    /// order of spooled messages is the order of the calls.
    fn spool(&self, mut link: MutexGuard<'_, Link>, m: MqttMessage) -> Handed {
        link.backlog += 1;
        let (tx, rx) = oneshot::channel();
        self.command(Cmd::Spool(m, Some(tx)));
        Handed::Pending(rx)
    }

    /// Publishes `m` and waits until the broker acknowledged it or it is on
    /// disk; `false` when it was lost (counted and logged).
    pub async fn publish_durably(&self, m: MqttMessage) -> bool {
        match self.publish(m) {
            Handed::Sent => true,
            Handed::Pending(rx) => matches!(rx.await, Ok(Ok(()))),
            Handed::Dropped => false,
        }
    }

    /// The connection is up (CONNACK). Without the session
    /// (`session_present` false), the QoS 2 exchanges the broker answered
    /// with PUBREC end, and the publishes the session was to resend
    /// (`requeue`) are spooled first; then what waits is sent.
    pub fn connected(&self, session_present: bool, requeue: Vec<(u16, MqttMessage)>) {
        let mut link = self.link();
        if !session_present {
            let mut unacked = self.unacked();
            for origin in unacked.end_received() {
                self.settle(origin, Ok(()));
            }
            let mut back = Vec::new();
            for (pkid, m) in requeue {
                match unacked.take_sent(pkid) {
                    // Still in the spool: the drain sends it again.
                    Some(Origin::Row(_)) => {}
                    Some(Origin::Waiter(w)) => back.push((m, Some(w))),
                    None => back.push((m, None)),
                }
            }
            drop(unacked);
            if !back.is_empty() {
                tracing::warn!(
                    messages = back.len(),
                    "the broker lost this host's session: QoS 2 publishes it held are sent again"
                );
                link.backlog += back.len() as u64;
                self.command(Cmd::Requeue(back));
            }
        }
        link.connected = !link.paused;
        self.command(Cmd::Wake);
    }

    /// What the connection said of a QoS 1/2 publish: pairs a send with its
    /// publish, and ends an exchange — the publish's invocation is told, a
    /// spooled message's row removed.
    pub fn track(&self, t: Track) {
        let mut unacked = self.unacked();
        self.track_locked(&mut unacked, t);
    }

    fn track_locked(&self, unacked: &mut Unacked, t: Track) {
        match t {
            Track::Sent(pkid) => {
                if let Some(lost) = unacked.sent(pkid) {
                    self.settle(lost, Err("the host lost track of it".into()));
                }
            }
            Track::Received(pkid) => unacked.received(pkid),
            Track::Acked(pkid) => {
                if let Some(origin) = unacked.acked(pkid) {
                    self.settle(origin, Ok(()));
                }
            }
            Track::Completed(pkid) => {
                if let Some(origin) = unacked.completed(pkid) {
                    self.settle(origin, Ok(()));
                }
            }
            Track::Refused { pkid, reason, .. } => {
                let Some(origin) = unacked.acked(pkid) else {
                    return;
                };
                let total = self.stats.broker_refused.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(pkid, %reason, total, "the broker refused a publish (its reason code); it is not sent again");
                self.settle(origin, Err(format!("the broker refused it ({reason})")));
            }
        }
    }

    /// Ends a tracked publish: tells its invocation, or removes its row.
    fn settle(&self, origin: Origin, outcome: Outcome) {
        match origin {
            Origin::Waiter(w) => {
                let _ = w.send(outcome);
            }
            Origin::Row(seq) => self.command(Cmd::Remove(vec![seq])),
        }
    }

    /// Stops sending (the host is stopping): what waits stays in the spool,
    /// and new QoS 1/2 publishes go there too.
    pub fn pause(&self) {
        let mut link = self.link();
        link.paused = true;
        link.connected = false;
    }

    /// The connection dropped. `clean` runs under the lock that every
    /// hand-over to the connection takes, so nothing reaches the connection
    /// after it; the QoS 1/2 publishes the broker has not acknowledged that
    /// it returns go to the front of the spool, and what it dropped is
    /// counted.
    pub fn disconnected(&self, clean: impl FnOnce() -> Cleaned) {
        let mut link = self.link();
        link.connected = false;
        link.drops += 1;
        let Cleaned {
            tracked,
            unacked: back,
            kept,
            dropped_qos0,
            too_large,
        } = clean();
        let unacked = self.take_back(tracked, back, &kept, !link.paused);
        let lost = dropped_qos0 + too_large;
        if lost > 0 {
            self.stats.publish_failed.fetch_add(lost, Ordering::Relaxed);
            if dropped_qos0 > 0 {
                tracing::warn!(
                    messages = dropped_qos0,
                    "QoS 0 publishes queued for the dropped connection were dropped (at most once)"
                );
            }
        }
        if !unacked.is_empty() {
            link.backlog += unacked.len() as u64;
            tracing::info!(
                messages = unacked.len(),
                "publishes not acknowledged by the broker are spooled and sent again after the reconnect"
            );
            self.command(Cmd::Requeue(unacked));
        }
    }

    /// Pairs what a dropped connection gave back with the tracked publishes
    /// (see [`Self::disconnected`]): returns those to spool, with their
    /// invocations' waiters. Spooled messages among them stay where they
    /// are (the drain sends them again); one too large for the broker is
    /// refused (its row removed). With `reconnecting` false (the host
    /// stops), the QoS 2 exchanges past PUBREC end too.
    fn take_back(
        &self,
        tracked: Vec<Track>,
        back: Vec<(Option<u16>, Option<MqttMessage>)>,
        kept: &[u16],
        reconnecting: bool,
    ) -> Vec<(MqttMessage, Option<Waiter>)> {
        let mut unacked = self.unacked();
        for t in tracked {
            self.track_locked(&mut unacked, t);
        }
        let mut out = Vec::new();
        for (pkid, m) in back {
            let origin = match pkid {
                Some(pkid) => unacked.take_sent(pkid),
                None => unacked.take_unsent(),
            };
            match (m, origin) {
                (Some(_), Some(Origin::Row(_))) => {}
                (Some(m), Some(Origin::Waiter(w))) => out.push((m, Some(w))),
                (Some(m), None) => out.push((m, None)),
                (None, Some(origin)) => {
                    self.settle(origin, Err("larger than the broker accepts".into()));
                }
                (None, None) => {}
            }
        }
        for pkid in kept {
            unacked.keep(*pkid);
        }
        let strays = unacked.take_handed();
        if !strays.is_empty() {
            tracing::error!(
                publishes = strays.len(),
                "publishes handed to the dropped connection were not given back; their invocations are retried"
            );
        }
        for origin in strays {
            if let Origin::Waiter(w) = origin {
                let _ = w.send(Err("the connection dropped before it was sent".into()));
            }
        }
        if !reconnecting {
            for origin in unacked.end_received() {
                self.settle(origin, Ok(()));
            }
        }
        out
    }

    /// Writes what is queued for the spool and stops its thread.
    pub async fn stop(&self) {
        self.command(Cmd::Stop);
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    fn spool_loop(&self, mut spool: Spool, rx: std_mpsc::Receiver<Cmd>) {
        let mut stopping = false;
        let mut channel_full = false;
        let mut wait = FULL_CHANNEL_WAIT;
        let mut drain = Drain::default();
        loop {
            // Read before the commands: a drop after this is seen by the
            // drain only after the next round's commands (acks that came
            // before the drop remove their rows first).
            let drops = self.link().drops;
            // Caught up only on the connection it caught up on: after a
            // drop the drain starts again from the oldest row.
            let caught_up = drain.caught_up && drain.drops == drops;
            let can_drain = !caught_up && !spool.is_empty() && self.link().connected;
            let mut cmds = Vec::new();
            let first = if stopping {
                None
            } else if can_drain && channel_full {
                // Wait for room, but keep writing what comes meanwhile: a
                // delivery waiting for its publish to be on disk must not
                // wait for the connection.
                match rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                        stopping = true;
                        None
                    }
                }
            } else if can_drain {
                None
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => {
                        stopping = true;
                        None
                    }
                }
            };
            cmds.extend(first);
            cmds.extend(rx.try_iter());
            if stopping && cmds.is_empty() {
                break;
            }
            if self.apply(&mut spool, cmds, &mut stopping) {
                drain.caught_up = false;
            }
            channel_full = !stopping && self.drain(&mut spool, &mut drain, drops);
            // While the connection's queue stays full, look again less and
            // less often (each look reads a batch from disk).
            wait = if channel_full {
                (wait * 2).min(FULL_CHANNEL_MAX_WAIT)
            } else {
                FULL_CHANNEL_WAIT
            };
            self.stats
                .spool_waiting
                .store(spool.len(), Ordering::Relaxed);
        }
        if !spool.is_empty() {
            tracing::info!(
                messages = spool.len(),
                "MQTT publishes stay spooled for the next start"
            );
        }
    }

    /// Applies a batch of commands to the spool, consecutive messages in one
    /// transaction. Returns whether messages were written.
    fn apply(&self, spool: &mut Spool, cmds: Vec<Cmd>, stopping: &mut bool) -> bool {
        let mut batch: Vec<MqttMessage> = Vec::new();
        // One per message of `batch`.
        let mut waiters: Vec<Option<Waiter>> = Vec::new();
        let mut removed: Vec<i64> = Vec::new();
        let mut wrote = false;
        for cmd in cmds {
            match cmd {
                Cmd::Spool(m, w) => {
                    batch.push(m);
                    waiters.push(w);
                }
                Cmd::Requeue(ms) => {
                    wrote |= self.write(spool, &mut batch, &mut waiters, false);
                    let (mut ms, mut ws): (Vec<_>, Vec<_>) = ms.into_iter().unzip();
                    wrote |= self.write(spool, &mut ms, &mut ws, true);
                }
                Cmd::Remove(seqs) => removed.extend(seqs),
                Cmd::Wake => {}
                Cmd::Stop => *stopping = true,
            }
        }
        wrote |= self.write(spool, &mut batch, &mut waiters, false);
        if !removed.is_empty() {
            match spool.remove(&removed) {
                Ok(n) => self.link().backlog -= n,
                // Sent again after the next drop or start (at least once).
                Err(e) => {
                    tracing::error!(error = %e, "cannot remove acknowledged publishes from the MQTT publish spool; they will be sent again");
                }
            }
        }
        wrote
    }

    /// Writes `batch` (at the front with `front`), answers each of
    /// `waiters` (one per message) and returns whether any was written.
    fn write(
        &self,
        spool: &mut Spool,
        batch: &mut Vec<MqttMessage>,
        waiters: &mut Vec<Option<Waiter>>,
        front: bool,
    ) -> bool {
        if batch.is_empty() {
            return false;
        }
        let n = batch.len() as u64;
        let result = if front {
            spool.prepend(batch)
        } else {
            spool.append(batch)
        };
        let stats = &self.stats;
        let refused_at: Vec<usize>;
        let (lost, reason) = match result {
            Ok(Stored {
                stored,
                dropped_oldest,
                refused,
                refused_at: at,
            }) => {
                refused_at = at;
                stats.spooled.fetch_add(stored, Ordering::Relaxed);
                if dropped_oldest > 0 {
                    let total = stats
                        .spool_dropped
                        .fetch_add(dropped_oldest, Ordering::Relaxed)
                        + dropped_oldest;
                    tracing::warn!(
                        dropped = dropped_oldest,
                        total,
                        "the MQTT publish spool is full: the oldest spooled publishes were dropped (on_full = \"drop_oldest\")"
                    );
                }
                if refused > 0 {
                    let total = stats.spool_refused.fetch_add(refused, Ordering::Relaxed) + refused;
                    tracing::warn!(
                        refused,
                        total,
                        "the MQTT publish spool is full (or a message is larger than max_bytes): new publishes were refused"
                    );
                }
                (
                    dropped_oldest + refused,
                    "the spool did not take it (full with on_full = \"refuse_new\", or larger than its max_bytes)".to_string(),
                )
            }
            Err(e) => {
                let total = stats.spool_errors.fetch_add(n, Ordering::Relaxed) + n;
                tracing::error!(error = %e, messages = n, total, "cannot write to the MQTT publish spool (full disk?): these publishes are lost");
                refused_at = (0..batch.len()).collect();
                (n, format!("the spool could not write it ({e})"))
            }
        };
        self.link().backlog -= lost;
        batch.clear();
        // Each waiter hears of its own message only: "on disk", or why not.
        // Older messages `drop_oldest` made room for are the spool's
        // documented policy (counted and logged above).
        for (i, w) in waiters.drain(..).enumerate() {
            let outcome = if refused_at.binary_search(&i).is_ok() {
                Err(reason.clone())
            } else {
                Ok(())
            };
            answer(w, outcome);
        }
        n > lost
    }

    /// Sends one batch of what waits, oldest first, while the connection
    /// it started on (the `drops`-th) is up. A message stays in the spool
    /// until the broker acknowledges it ([`Self::track`]); on a new
    /// connection the drain starts again from the oldest, skipping those
    /// still in flight. Returns `true` when it stopped on a full request
    /// channel.
    fn drain(&self, spool: &mut Spool, drain: &mut Drain, drops: u64) -> bool {
        {
            let link = self.link();
            if spool.is_empty() || !link.connected || link.drops != drops {
                return false;
            }
        }
        if drain.drops != drops {
            *drain = Drain {
                drops,
                ..Drain::default()
            };
        }
        let rows = match spool.peek_after(drain.after, DRAIN_BATCH) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the MQTT publish spool; retrying");
                std::thread::sleep(Duration::from_secs(1));
                return false;
            }
        };
        if rows.is_empty() {
            drain.caught_up = true;
            return false;
        }
        for (seq, m) in rows {
            let link = self.link();
            if !link.connected || link.drops != drops {
                break;
            }
            let mut unacked = self.unacked();
            if unacked.has_row(seq) {
                // Still in flight from an earlier connection (a QoS 2
                // publish the session resends).
                drain.after = seq;
                continue;
            }
            unacked.hand(Origin::Row(seq));
            if !self.client.try_publish(&m) {
                unacked.unhand();
                return true;
            }
            drain.after = seq;
            self.stats.spool_sent.fetch_add(1, Ordering::Relaxed);
            self.stats.published.fetch_add(1, Ordering::Relaxed);
        }
        false
    }
}

/// Where the drain is: on which connection, and the last row it handed over.
#[derive(Debug)]
struct Drain {
    drops: u64,
    after: i64,
    /// Every row was handed over on this connection; set back when rows
    /// are written.
    caught_up: bool,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            drops: u64::MAX,
            after: i64::MIN,
            caught_up: false,
        }
    }
}

/// Why a publish handed to a stopped host is lost.
const STOPPED: &str = "the MQTT connection has stopped";

fn answer(w: Option<Waiter>, outcome: Outcome) {
    if let Some(w) = w {
        let _ = w.send(outcome);
    }
}
