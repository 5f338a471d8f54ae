//! The MQTT trigger: one connection to the broker (MQTT 5, or 3.1.1 with
//! `version = 3`, over rumqttc; see [`connection`]) that feeds every
//! `[[trigger.mqtt]]` and carries the host's publishes.
//!
//! - **Connection**: `mqtt://` or `mqtts://` (rustls with the `ring`
//!   provider; a CA file, and a client certificate and key for mutual TLS),
//!   TCP_NODELAY, a persistent session (clean start off, a session expiry) so
//!   the broker keeps unacknowledged messages across restarts of the host or
//!   the broker, and an explicit Receive Maximum: the broker never has more
//!   than that many QoS 1/2 messages unacknowledged with this host, which
//!   bounds the memory the host spends on messages in progress. A broker that
//!   cannot be reached is retried with exponential backoff and jitter (also at
//!   start-up); refused credentials and TLS failures are logged naming the
//!   setting. Subscriptions are made again on every connect.
//! - **One owner of the event loop**: a single task polls rumqttc and never
//!   blocks on handlers. Messages go, in arrival order, to a dispatcher that
//!   starts each trigger's deliveries under that trigger's in-flight bound
//!   (`ordered = true` is a bound of one), so a slow trigger holds back the
//!   dispatch of later messages rather than growing a queue.
//! - **Acknowledgements**: manual. A QoS 1/2 message is acknowledged once
//!   every delivery of it is settled — the handler succeeded, or the message
//!   was rejected or ran out of retries and its dead letter is committed —
//!   and only after every message that arrived before it ([`AckTracker`]).
//!   A delivery that could not be settled (its dead letter could not be
//!   written) is never acknowledged: it is delivered again every
//!   [`UNSETTLED_RETRY`] until it settles, or, if the host stops first, the
//!   broker redelivers it at the next start. Acknowledgements of a
//!   connection that dropped are discarded, never sent on the next one
//!   (packet ids there mean other messages); the broker redelivers those
//!   messages instead (at least once).
//! - **Guest publishes**: the connection is the host's publish sink
//!   ([`Outbox`], see [`MqttTriggers::publish_sink`]) for every component,
//!   whatever trigger ran it. The runtime hands a successful invocation's
//!   publishes (after the ACL check) to it and waits until each is sent, or
//!   on disk in the spool while the broker is unreachable; so an MQTT
//!   message is acknowledged only after what its handler published is. They
//!   keep their QoS, retain flag and MQTT 5 properties. Publishes of failed
//!   attempts are discarded, so a retried handler does not publish twice.
//! - **Message expiry**: a message whose MQTT 5 expiry interval passed while
//!   it waited for its turn is not delivered (counted) and is acknowledged.

mod acks;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod connection;
pub mod outbox;
pub mod publish;
pub mod unacked;

pub use crate::acks::{AckTracker, Backoff, Subscription, route, subscriptions};
pub use crate::connection::ClientOptions;
use crate::connection::{ConnError, Event as ConnEvent, Incoming, log_connection_error};
pub use crate::outbox::Outbox;
use crate::publish::Publisher;
use rumqttc::v5::MqttOptions;
use rumqttc::{NetworkOptions, Transport};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmgate_manifest::Manifest;
use wasmgate_manifest::topic::TopicFilter;
use wasmgate_runtime::invoke::{Event, Invocable, InvocationContext, MqttMessage};
use wasmgate_store::deadletter::DeadLetterStore;
use wasmgate_store::delivery::{RetryPolicy, deliver_until};
use wasmgate_store::spool::Spool;

pub use wasmgate_manifest::BrokerUrl;
pub use wasmgate_runtime::invoke::MAX_PACKET_SIZE;
/// Default keep-alive.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Default session expiry: one day.
pub const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Default Receive Maximum.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 100;
/// Default `max_in_flight` of a trigger.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 16;
/// QoS 0 deliveries (one per trigger a message is routed to) that may wait
/// in the triggers' queues together; past it new messages are dropped
/// (counted): QoS 0 is at most once, and the broker applies no bound to it.
pub const QOS0_BUFFER: usize = 1024;
/// How long a delivery whose dead letter could not be written waits before
/// it is delivered again.
pub const UNSETTLED_RETRY: Duration = Duration::from_secs(5);
/// Reconnect backoff: first delay.
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
/// Reconnect backoff: longest delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// The client options for a manifest's `[mqtt]`: `Ok(None)` without
/// `[mqtt]`; an error naming the setting when a file cannot be read or the
/// broker is `embedded` (which `up` starts and reaches with
/// [`client_options_for`]).
pub fn client_options(m: &Manifest) -> Result<Option<(ClientOptions, u16)>, String> {
    let Some(c) = &m.mqtt else {
        return Ok(None);
    };
    let url = BrokerUrl::parse(c.broker.get_ref())
        .map_err(|e| format!("mqtt.broker: {e}"))?
        .ok_or_else(|| {
            "mqtt.broker: \"embedded\" is started by `up`, not reached by URL".to_string()
        })?;
    client_options_for(m, &url).map(Some)
}

/// The client options of a manifest's `[mqtt]` (which must be present) for
/// the broker at `url` — e.g. an embedded broker's listening address.
pub fn client_options_for(m: &Manifest, url: &BrokerUrl) -> Result<(ClientOptions, u16), String> {
    let defaults = wasmgate_manifest::MqttConfig::default();
    let c = m.mqtt.as_ref().unwrap_or(&defaults);
    let client_id = c
        .client_id
        .as_ref()
        .map_or_else(|| m.gateway.name.clone(), |id| id.get_ref().clone());
    let keep_alive = c
        .keep_alive
        .as_ref()
        .map_or(DEFAULT_KEEP_ALIVE, |k| k.get_ref().0);
    let receive_maximum = c
        .receive_maximum
        .as_ref()
        .map_or(DEFAULT_RECEIVE_MAXIMUM, |r| *r.get_ref() as u16);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    let credentials = c.username.as_ref().map(|user| {
        let password = c
            .password
            .as_ref()
            .map_or(String::new(), |p| p.get_ref().clone());
        (user.clone(), password)
    });
    let transport = if url.tls {
        Some(Transport::tls_with_config(tls_config(m, c)?.into()))
    } else {
        None
    };
    if *c.version.get_ref() == 3 {
        let mut o = rumqttc::MqttOptions::new(client_id, url.host.clone(), url.port);
        o.set_keep_alive(keep_alive)
            .set_clean_session(false)
            .set_max_packet_size(MAX_PACKET_SIZE as usize, MAX_PACKET_SIZE as usize)
            .set_manual_acks(true)
            .set_request_channel_capacity(receive_maximum as usize * 2 + 1024);
        if let Some((user, password)) = credentials {
            o.set_credentials(user, password);
        }
        if let Some(t) = transport {
            o.set_transport(t);
        }
        return Ok((ClientOptions::V4(o, net), receive_maximum));
    }
    let mut o = MqttOptions::new(client_id, url.host.clone(), url.port);
    let expiry = c
        .session_expiry
        .as_ref()
        .map_or(DEFAULT_SESSION_EXPIRY, |e| e.get_ref().0);
    o.set_keep_alive(keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(expiry.as_secs().min(u32::MAX as u64) as u32))
        .set_receive_maximum(Some(receive_maximum))
        .set_max_packet_size(Some(MAX_PACKET_SIZE))
        .set_manual_acks(true)
        .set_connection_timeout(10)
        .set_request_channel_capacity(receive_maximum as usize * 2 + 1024);
    if let Some((user, password)) = credentials {
        o.set_credentials(user, password);
    }
    o.set_network_options(net);
    if let Some(t) = transport {
        o.set_transport(t);
    }
    Ok((ClientOptions::V5(o), receive_maximum))
}

fn tls_config(
    m: &Manifest,
    c: &wasmgate_manifest::MqttConfig,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let Some(ca) = &c.ca else {
        return Err("mqtt.ca: an mqtts:// broker needs `ca`, the CA certificate (PEM) that signed the broker's certificate".into());
    };
    let ca_path = m.resolve(ca.get_ref());
    let read_certs = |key: &str, path: &std::path::Path| {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("mqtt.{key}: cannot read {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "mqtt.{key}: {} holds no PEM certificate",
                path.display()
            ));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs("ca", &ca_path)? {
        roots
            .add(cert)
            .map_err(|e| format!("mqtt.ca: {}: {e}", ca_path.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("mqtt: TLS setup: {e}"))?
        .with_root_certificates(roots);
    match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => {
            let cert_path = m.resolve(cert.get_ref());
            let key_path = m.resolve(key.get_ref());
            let chain = read_certs("cert", &cert_path)?;
            let key = PrivateKeyDer::from_pem_file(&key_path)
                .map_err(|e| format!("mqtt.key: cannot read {}: {e}", key_path.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("mqtt.cert / mqtt.key: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// One `[[trigger.mqtt]]`, resolved.
#[derive(Debug, Clone)]
pub struct MqttSpec {
    /// `trigger.mqtt[N]`, for logs.
    pub label: String,
    /// The handling component.
    pub component: Arc<Invocable>,
    /// The topic filter.
    pub filter: TopicFilter,
    /// Subscription QoS.
    pub qos: u8,
    /// Most deliveries at once (1 with `ordered = true`).
    pub max_in_flight: u32,
    /// Retries of a failed delivery.
    pub retry: RetryPolicy,
    /// While paused the trigger starts no delivery: its messages wait,
    /// unacknowledged.
    pub pause: wasmgate_runtime::trigger::Pause,
}

/// The MQTT triggers of a manifest, bound to their components.
pub fn specs(m: &Manifest, components: &BTreeMap<String, Arc<Invocable>>) -> Vec<MqttSpec> {
    m.triggers
        .mqtt
        .iter()
        .enumerate()
        .map(|(i, t)| MqttSpec {
            label: format!("trigger.mqtt[{i}]"),
            component: components[t.component.get_ref()].clone(),
            filter: TopicFilter::parse(t.topic.get_ref()).expect("validated with the manifest"),
            qos: *t.qos.get_ref(),
            max_in_flight: if t.ordered {
                1
            } else {
                t.max_in_flight
                    .as_ref()
                    .map_or(DEFAULT_MAX_IN_FLIGHT, |m| *m.get_ref())
            },
            retry: t
                .retry
                .as_ref()
                .map_or_else(RetryPolicy::default, RetryPolicy::from),
            pause: wasmgate_runtime::trigger::Pause::default(),
        })
        .collect()
}

/// Counters of the MQTT trigger, and the recent acknowledgement order.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Whether the connection is up now (from CONNACK to its loss).
    pub connected: std::sync::atomic::AtomicBool,
    /// Successful connections (CONNACK received).
    pub connects: AtomicU64,
    /// Connections on which every subscription was confirmed (SUBACK).
    pub subscribed: AtomicU64,
    /// Failed connection attempts and dropped connections.
    pub connection_errors: AtomicU64,
    /// Messages received.
    pub received: AtomicU64,
    /// Deliveries whose handler succeeded.
    pub succeeded: AtomicU64,
    /// Deliveries that failed for good (dead-lettered).
    pub failed: AtomicU64,
    /// Deliveries that failed and could not be dead-lettered (each is
    /// delivered again until it settles).
    pub unsettled: AtomicU64,
    /// Deliveries not made because the message's expiry passed while it
    /// waited for the trigger (one per trigger the message was routed to).
    pub expired: AtomicU64,
    /// QoS 0 messages dropped because the QoS 0 buffer was full.
    pub dropped_qos0: AtomicU64,
    /// QoS 1/2 messages left unacknowledged for the broker to send again:
    /// a trigger's queue was full (the broker sent more than the Receive
    /// Maximum allows), or came after such a one on the same connection.
    pub overflow: AtomicU64,
    /// Connections the host ended to get the messages it left
    /// unacknowledged sent again (see [`MqttStats::overflow`]).
    pub resyncs: AtomicU64,
    /// Messages that matched no trigger (acknowledged).
    pub unrouted: AtomicU64,
    /// Acknowledgements handed to the connection.
    pub acks_sent: AtomicU64,
    /// Acknowledgements discarded because their connection had dropped.
    pub acks_discarded: AtomicU64,
    /// Guest publishes sent to the broker (handed to the connection).
    pub published: AtomicU64,
    /// QoS 1/2 publishes the broker refused with an MQTT 5 reason code in
    /// its PUBACK or PUBREC (not authorized, quota exceeded, …): an
    /// invocation's fails the invocation (retried, then dead-lettered).
    pub broker_refused: AtomicU64,
    /// Guest publishes the ACL refused.
    pub publish_denied: AtomicU64,
    /// Guest publishes lost before the spool: an invalid topic, or a QoS 0
    /// publish with the connection's queue full.
    pub publish_failed: AtomicU64,
    /// Publishes written to the spool (the broker unreachable, or older
    /// ones still waiting).
    pub spooled: AtomicU64,
    /// Spooled publishes handed to the connection after a reconnect.
    pub spool_sent: AtomicU64,
    /// Spooled publishes dropped by a full spool (`on_full = "drop_oldest"`).
    pub spool_dropped: AtomicU64,
    /// Publishes a full spool refused (`on_full = "refuse_new"`, or larger
    /// than `max_bytes`).
    pub spool_refused: AtomicU64,
    /// Publishes lost because the spool could not be written (full disk?).
    pub spool_errors: AtomicU64,
    /// Publishes waiting in the spool now.
    pub spool_waiting: AtomicU64,
    order: Mutex<AckOrder>,
}

#[derive(Debug, Default)]
struct AckOrder {
    arrived: VecDeque<u16>,
    acked: VecDeque<u16>,
    settled: VecDeque<u16>,
}

/// Packet ids remembered by [`MqttStats::recent_order`].
pub const RECENT_ORDER: usize = 1024;

fn remember(q: &mut VecDeque<u16>, pkid: u16) {
    if q.len() == RECENT_ORDER {
        q.pop_front();
    }
    q.push_back(pkid);
}

/// The packet ids of the most recent QoS 1/2 messages, in the order they
/// arrived, the order their deliveries settled, and the order their
/// acknowledgements were sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentOrder {
    /// Arrival order.
    pub arrived: Vec<u16>,
    /// Order in which the handlers settled.
    pub settled: Vec<u16>,
    /// Order of the acknowledgements.
    pub acked: Vec<u16>,
}

impl MqttStats {
    /// The recent arrival, settle and acknowledgement orders.
    pub fn recent_order(&self) -> RecentOrder {
        let o = self.order.lock().expect("stats lock");
        RecentOrder {
            arrived: o.arrived.iter().copied().collect(),
            settled: o.settled.iter().copied().collect(),
            acked: o.acked.iter().copied().collect(),
        }
    }
}

/// What an acknowledgement needs: the packet id and QoS of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AckToken {
    pkid: u16,
    qos: u8,
}

/// Acknowledgement state shared by the event-loop owner and the deliveries.
/// Acks are handed to the connection only under this lock, and the owner
/// changes `generation` (dropping everything pending) under it when a
/// connection drops, so no ack of an old connection reaches a new one.
#[derive(Debug, Default)]
struct Acks {
    generation: u64,
    tracker: AckTracker<AckToken>,
    /// Acks due but not yet accepted by the client's request channel (full).
    backlog: VecDeque<AckToken>,
}

struct Shared {
    publisher: Arc<Publisher>,
    acks: Mutex<Acks>,
    stats: Arc<MqttStats>,
    /// The connection's outgoing publishes not yet acknowledged by the
    /// broker (updated by the event-loop owner).
    inflight: std::sync::atomic::AtomicU16,
    /// The broker sent more than the Receive Maximum: no QoS 1/2 message is
    /// taken on this connection any more, and once the ones taken are
    /// acknowledged the host reconnects, so the broker sends the rest again
    /// (in order, as the session's unacknowledged messages).
    resync: AtomicBool,
    /// QoS 1/2 deliveries queued or running, of any connection.
    deliveries: Arc<AtomicUsize>,
    /// Whether the broker keeps the session across connections (a resync
    /// needs it: without it the broker forgets what it had sent).
    session_kept: bool,
}

/// How long a stopping host waits for the broker to acknowledge its
/// publishes before it disconnects (what is still unacknowledged then is
/// spooled for the next start).
pub const PUBLISH_SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

impl Shared {
    /// One delivery of message `seq` of connection `generation` settled.
    fn settle(&self, generation: u64, seq: u64, pkid: u16) {
        let mut acks = self.acks.lock().expect("acks lock");
        remember(
            &mut self.stats.order.lock().expect("stats lock").settled,
            pkid,
        );
        if acks.generation != generation {
            self.stats.acks_discarded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let due = acks.tracker.settle(seq);
        self.release(&mut acks, due);
    }

    /// Hands due acks to the client in order; what the channel does not take
    /// now waits in the backlog (flushed by the event-loop owner).
    fn release(&self, acks: &mut Acks, due: Vec<AckToken>) {
        acks.backlog.extend(due);
        while let Some(token) = acks.backlog.front().copied() {
            if !self.publisher.client().try_ack(token.pkid, token.qos) {
                break;
            }
            acks.backlog.pop_front();
            self.stats.acks_sent.fetch_add(1, Ordering::Relaxed);
            remember(
                &mut self.stats.order.lock().expect("stats lock").acked,
                token.pkid,
            );
        }
    }
}

/// A message as it arrived, its ack registered.
struct Arrival {
    message: MqttMessage,
    /// `(generation, seq, pkid)` of a QoS 1/2 message.
    ack: Option<(u64, u64, u16)>,
    expires: Option<Instant>,
}

/// One message's delivery to one trigger, waiting in the trigger's queue.
struct Job {
    message: MqttMessage,
    /// `(generation, seq, pkid)` of a QoS 1/2 message.
    ack: Option<(u64, u64, u16)>,
    expires: Option<Instant>,
    qos0: bool,
    /// Counts a QoS 1/2 delivery in `Shared::deliveries` until it ends.
    pending: Option<Pending>,
}

/// One QoS 1/2 delivery, queued or running: counted while it lives.
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A delivery's slot in its trigger, and its count: both end with it.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _pending: Option<Pending>,
}

/// Where messages go: the subscriptions, and each trigger's spec and
/// queue. Replaced as a whole by [`MqttControl::reconfigure`]; a message is
/// routed by the table it found.
struct Table {
    subs: Vec<Subscription>,
    specs: Vec<MqttSpec>,
    senders: Vec<mpsc::Sender<Job>>,
}

/// The triggers' workers: waiting for `run`, running, or stopped.
enum Workers {
    Pending(Vec<(MqttSpec, mpsc::Receiver<Job>)>),
    Running(Worker, TaskTracker),
    Closed,
}

/// What the event loop and [`MqttControl`] share.
struct Live {
    table: std::sync::RwLock<Arc<Table>>,
    workers: Mutex<Workers>,
    /// Each queue's capacity.
    capacity: usize,
    /// The next subscription identifier never used on the connection.
    next_id: AtomicUsize,
    /// QoS 0 jobs waiting in all queues (bounded by [`QOS0_BUFFER`]).
    qos0_waiting: Arc<AtomicUsize>,
    client: std::sync::OnceLock<publish::Client>,
    /// One reconfiguration at a time.
    changing: tokio::sync::Mutex<()>,
}

impl Live {
    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The table for `specs`: a trigger that `old` has at the same index
    /// with the same settings keeps its spec and queue (its worker runs on);
    /// the others get a new queue, returned with their spec for a new
    /// worker. A filter `old` subscribed keeps its identifier.
    fn plan(
        &self,
        old: Option<&Table>,
        specs: Vec<MqttSpec>,
    ) -> (Table, Vec<(MqttSpec, mpsc::Receiver<Job>)>) {
        let filters: Vec<(TopicFilter, u8)> =
            specs.iter().map(|s| (s.filter.clone(), s.qos)).collect();
        let mut subs = subscriptions(&filters);
        for sub in &mut subs {
            sub.id = old
                .and_then(|o| o.subs.iter().find(|o| o.filter.raw == sub.filter.raw))
                .map_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed), |o| o.id);
        }
        let mut table = Table {
            subs,
            specs: Vec::new(),
            senders: Vec::new(),
        };
        let mut added = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let kept = old.and_then(|o| {
                let same = o.specs.get(i).is_some_and(|k| k.same_as(&spec));
                same.then(|| (o.specs[i].clone(), o.senders.get(i).cloned()))
            });
            match kept {
                Some((spec, Some(sender))) => {
                    table.specs.push(spec);
                    table.senders.push(sender);
                }
                _ => {
                    let (tx, rx) = mpsc::channel::<Job>(self.capacity);
                    table.specs.push(spec.clone());
                    table.senders.push(tx);
                    added.push((spec, rx));
                }
            }
        }
        (table, added)
    }

    /// No more messages: the queues close once their last jobs are taken,
    /// and no worker starts.
    fn close(&self) {
        let mut workers = self.workers.lock().expect("workers lock");
        *workers = Workers::Closed;
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *table = Arc::new(Table {
            subs: Vec::new(),
            specs: Vec::new(),
            senders: Vec::new(),
        });
    }
}

impl MqttSpec {
    /// Whether `other` is this trigger with the same settings.
    fn same_as(&self, other: &MqttSpec) -> bool {
        self.label == other.label
            && self.filter.raw == other.filter.raw
            && self.qos == other.qos
            && self.max_in_flight == other.max_in_flight
            && self.retry == other.retry
            && Arc::ptr_eq(&self.component, &other.component)
    }
}

/// How long a reconfiguration waits for the client to take its SUBSCRIBE
/// and UNSUBSCRIBE requests.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Changes the MQTT triggers of a running connection (a reload).
#[derive(Clone)]
pub struct MqttControl(Arc<Live>);

impl std::fmt::Debug for MqttControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttControl").finish_non_exhaustive()
    }
}

impl MqttControl {
    /// Makes `specs` the triggers: a trigger whose settings did not change
    /// keeps its queue and deliveries; a new or changed one gets a new
    /// worker (a changed one's old worker finishes the messages it was
    /// given). New filters are subscribed on the live session after the
    /// table that routes them is in place, and filters no longer used are
    /// unsubscribed after it: until then their messages match no trigger
    /// (logged, acknowledged).
    pub async fn reconfigure(&self, specs: Vec<MqttSpec>) -> Result<(), String> {
        let live = &self.0;
        let _one = live.changing.lock().await;
        let old = live.table();
        let (table, added) = live.plan(Some(&old), specs);
        let table = Arc::new(table);
        {
            let mut workers = live.workers.lock().expect("workers lock");
            match &mut *workers {
                Workers::Closed => return Err("the MQTT connection has stopped".into()),
                Workers::Pending(waiting) => waiting.extend(added),
                Workers::Running(w, tracker) => {
                    for (spec, queue) in added {
                        tracker.spawn(trigger_worker(queue, spec, w.clone()));
                    }
                }
            }
            *live
                .table
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = table.clone();
        }
        let Some(client) = live.client.get().cloned() else {
            // Not connected yet: the first CONNACK subscribes the table.
            return Ok(());
        };
        let subscribe: Vec<Subscription> = table
            .subs
            .iter()
            .filter(|s| {
                !old.subs
                    .iter()
                    .any(|o| o.filter.raw == s.filter.raw && o.qos == s.qos && o.id == s.id)
            })
            .cloned()
            .collect();
        let unsubscribe: Vec<String> = old
            .subs
            .iter()
            .filter(|o| !table.subs.iter().any(|s| s.filter.raw == o.filter.raw))
            .map(|o| o.filter.raw.clone())
            .collect();
        // In order, one reconfiguration at a time. The client's queue may
        // be full while the broker is unreachable: then the next CONNACK
        // subscribes the table, and a filter left subscribed only brings
        // messages that match no trigger (acknowledged, logged).
        let requests = async {
            for s in subscribe {
                if !client.subscribe(&s.filter.raw, s.qos, s.id).await {
                    return;
                }
            }
            for filter in unsubscribe {
                if !client.unsubscribe(&filter).await {
                    return;
                }
            }
        };
        if tokio::time::timeout(SUBSCRIBE_TIMEOUT, requests)
            .await
            .is_err()
        {
            tracing::warn!(
                "the MQTT client did not take the (un)subscriptions in time; the next connection subscribes the new filters"
            );
        }
        Ok(())
    }
}

/// Every `[[trigger.mqtt]]` of a host on one broker connection.
pub struct MqttTriggers {
    options: ClientOptions,
    receive_maximum: u16,
    live: Arc<Live>,
    dead_letters: Option<Arc<DeadLetterStore>>,
    spool: Option<Spool>,
    stats: Arc<MqttStats>,
    outbox: Arc<Outbox>,
    outbox_rx: Option<mpsc::Receiver<outbox::Outgoing>>,
    outbox_until: Option<(CancellationToken, TaskTracker)>,
}

impl std::fmt::Debug for MqttTriggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTriggers")
            .field("broker", &self.options.broker())
            .field("specs", &self.live.table().specs)
            .finish_non_exhaustive()
    }
}

impl wasmgate_runtime::trigger::Trigger for MqttTriggers {
    const TYPE: &'static str = "mqtt";

    /// [`MqttTriggers::run`].
    fn run(
        self,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send {
        MqttTriggers::run(self, tasks, shutdown)
    }
}

impl MqttTriggers {
    /// Binds the triggers to a connection with `options` (from
    /// [`client_options`]). The connection is the publish sink of the
    /// components its triggers run unless they already have one (the
    /// composition root gives every component [`Self::publish_sink`]).
    pub fn new(
        options: impl Into<ClientOptions>,
        receive_maximum: u16,
        specs: Vec<MqttSpec>,
    ) -> Self {
        let (outbox, outbox_rx) = Outbox::connected(outbox::OUTBOX_CAPACITY);
        let outbox = Arc::new(outbox);
        for spec in &specs {
            spec.component.set_publish_sink(outbox.clone());
        }
        // One queue per trigger, so a slow trigger's backlog never holds
        // back another's messages. Each holds every QoS 1/2 message the
        // broker may have unacknowledged (its Receive Maximum) plus the
        // shared QoS 0 buffer: for a broker that keeps to the Receive
        // Maximum, putting a message in never waits.
        let mut live = Live {
            table: std::sync::RwLock::new(Arc::new(Table {
                subs: Vec::new(),
                specs: Vec::new(),
                senders: Vec::new(),
            })),
            workers: Mutex::new(Workers::Pending(Vec::new())),
            capacity: receive_maximum as usize + QOS0_BUFFER,
            next_id: AtomicUsize::new(1),
            qos0_waiting: Arc::new(AtomicUsize::new(0)),
            client: std::sync::OnceLock::new(),
            changing: tokio::sync::Mutex::new(()),
        };
        let (table, added) = live.plan(None, specs);
        live.table = std::sync::RwLock::new(Arc::new(table));
        live.workers = Mutex::new(Workers::Pending(added));
        Self {
            options: options.into(),
            receive_maximum,
            live: Arc::new(live),
            dead_letters: None,
            spool: None,
            stats: Arc::default(),
            outbox,
            outbox_rx: Some(outbox_rx),
            outbox_until: None,
        }
    }

    /// The publish sink this connection reads (see [`crate::outbox`]): give
    /// it to every component that may publish. It is read until the MQTT
    /// deliveries are done, unless [`Self::outbox_open_until`].
    pub fn publish_sink(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// Reads the outbox until `closed` is cancelled — after the connection
    /// stopped, into the spool — then stops the spool, in a task on `late`:
    /// for a host whose timers and HTTP requests finish after the MQTT
    /// trigger (`up` cancels `closed` once they have).
    pub fn outbox_open_until(mut self, closed: CancellationToken, late: TaskTracker) -> Self {
        self.outbox_until = Some((closed, late));
        self
    }

    /// Dead-letters messages that fail for good in `store`.
    pub fn with_dead_letters(mut self, store: Arc<DeadLetterStore>) -> Self {
        self.dead_letters = Some(store);
        self
    }

    /// Spools QoS 1/2 publishes in `spool` while the broker is unreachable
    /// (without one, an in-memory spool with the default bounds is used).
    pub fn with_spool(mut self, spool: Spool) -> Self {
        self.spool = Some(spool);
        self
    }

    /// Changes its triggers while it runs (see [`MqttControl::reconfigure`]).
    pub fn control(&self) -> MqttControl {
        MqttControl(self.live.clone())
    }

    /// Its counters (shared: readable while it runs).
    pub fn stats(&self) -> Arc<MqttStats> {
        self.stats.clone()
    }

    /// Connects (retrying), subscribes and delivers until `shutdown` is
    /// cancelled; then takes no new messages, lets the deliveries in progress
    /// settle and sends their acknowledgements, spools what the broker has
    /// not acknowledged of the host's publishes, and disconnects. Deliveries
    /// are spawned on `tasks`.
    #[expect(
        clippy::too_many_lines,
        reason = "the event loop's one owner: every event of the connection is handled in one match, in the order the loop sees them, around state only this loop may touch"
    )]
    pub async fn run(mut self, tasks: TaskTracker, shutdown: CancellationToken) {
        let (client, mut eventloop) = self.options.connect();
        let spool = match self.spool.take() {
            Some(s) => s,
            None => Spool::open_in_memory(wasmgate_store::spool::SpoolBounds::default())
                .expect("an in-memory spool opens"),
        };
        let publisher = Publisher::start(client.clone(), spool, self.stats.clone());
        let shared = Arc::new(Shared {
            publisher: publisher.clone(),
            acks: Mutex::default(),
            stats: self.stats.clone(),
            inflight: Default::default(),
            resync: AtomicBool::new(false),
            deliveries: Arc::default(),
            session_kept: self.options.session_outlives_connection(),
        });
        let dispatched = CancellationToken::new();
        let outbox = self.drain_outbox_until_done(&publisher, &dispatched);
        let _ = self.live.client.set(client.clone());
        let loop_ended = CancellationToken::new();
        tasks.spawn(dispatch(
            self.live.clone(),
            loop_ended.clone(),
            shared.clone(),
            self.dead_letters.clone(),
            tasks.clone(),
            shutdown.clone(),
            dispatched.clone(),
        ));
        spawn_disconnect(&tasks, shared.clone(), dispatched.clone());
        let broker = self.options.broker();
        let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX, 0.5);
        let mut subacks_expected = 0usize;
        // A resync watcher runs for this connection (see `Shared::resync`).
        let mut watching = false;
        // The connection was ended to renew it.
        let mut renewing = false;
        loop {
            match eventloop.poll().await {
                Ok(ConnEvent::ConnAck {
                    session_present,
                    requeue,
                }) => {
                    backoff.reset();
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    self.stats.connected.store(true, Ordering::Relaxed);
                    shared.resync.store(false, Ordering::Relaxed);
                    watching = false;
                    if std::mem::take(&mut renewing) && !session_present {
                        tracing::warn!(%broker, "the broker did not keep the session across the renewed connection: the messages left unacknowledged are gone with it");
                    }
                    tracing::info!(%broker, session_present, "MQTT connected");
                    publisher.connected(session_present, requeue);
                    let table = self.live.table();
                    subacks_expected = table.subs.len();
                    subscribe_all(client.clone(), table);
                }
                Ok(ConnEvent::SubAck { refused }) => {
                    for reason in &refused {
                        tracing::error!(%broker, %reason, "the broker refused a subscription (check the topic filters and the broker's ACL)");
                    }
                    subacks_expected = subacks_expected.saturating_sub(1);
                    if subacks_expected == 0 {
                        self.stats.subscribed.fetch_add(1, Ordering::Relaxed);
                        let table = self.live.table();
                        let filters: Vec<&str> =
                            table.subs.iter().map(|s| s.filter.raw.as_str()).collect();
                        tracing::info!(%broker, subscriptions = %filters.join(", "), "MQTT subscribed");
                    }
                }
                Ok(ConnEvent::Publish(p)) => {
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    if shutdown.is_cancelled() {
                        // Not taken: without an ack the broker redelivers it.
                        continue;
                    }
                    // Never waits: the loop must keep polling the
                    // connection (pings, acks) whatever the handlers do.
                    self.take(&shared, &self.live.table(), p);
                    if !watching && shared.resync.load(Ordering::Relaxed) {
                        watching = true;
                        spawn_resync(shared.clone(), shutdown.clone(), dispatched.clone());
                    }
                }
                Ok(ConnEvent::BrokerDisconnect(reason)) => {
                    tracing::warn!(%broker, %reason, "the broker closed the MQTT session");
                }
                Ok(ConnEvent::Disconnected)
                    if !shutdown.is_cancelled() && !dispatched.is_cancelled() =>
                {
                    // Only a resync asks for a DISCONNECT while running: its
                    // acks went out ahead of it, and the next poll connects
                    // again at once, on the same session.
                    self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%broker, left_unacknowledged = self.stats.overflow.load(Ordering::Relaxed), "MQTT reconnecting for the messages left unacknowledged");
                    let renew = ConnError::local("the connection is renewed");
                    shared.connection_lost(|| eventloop.clean(Some(&renew)));
                    renewing = true;
                    continue;
                }
                Ok(ConnEvent::Disconnected) => {
                    tracing::info!(%broker, "MQTT disconnected");
                    break;
                }
                Ok(ConnEvent::Track(t)) => {
                    let refused_pubrec = matches!(
                        t,
                        connection::Track::Refused {
                            at_pubrec: true,
                            ..
                        }
                    );
                    publisher.track(t);
                    if refused_pubrec {
                        // rumqttc keeps counting a refused QoS 2 exchange
                        // as in flight; enough of them would stop every
                        // publish. A new connection resets the count.
                        let e = ConnError::local(
                            "the broker refused a QoS 2 publish at PUBREC; reconnecting to reset the in-flight count",
                        );
                        self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                        shared.connection_lost(|| eventloop.clean(Some(&e)));
                        tracing::warn!(%broker, "{}", e.message);
                    }
                }
                Ok(ConnEvent::Other) => {}
                Err(e) => {
                    self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                    shared.connection_lost(|| eventloop.clean(Some(&e)));
                    if dispatched.is_cancelled() || shutdown.is_cancelled() {
                        break;
                    }
                    let delay = backoff.next_delay();
                    log_connection_error(&broker, &e, delay);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            shared
                .inflight
                .store(eventloop.inflight(), Ordering::Relaxed);
            let mut acks = shared.acks.lock().expect("acks lock");
            if !acks.backlog.is_empty() {
                shared.release(&mut acks, Vec::new());
            }
        }
        self.live.close();
        self.stats.connected.store(false, Ordering::Relaxed);
        loop_ended.cancel();
        // What the broker has not acknowledged of the host's publishes waits
        // in the spool for the next start. Paused first, so the QoS 2
        // exchanges past PUBREC end here even if the loop ended while
        // disconnected.
        publisher.pause();
        publisher.disconnected(|| eventloop.clean(None));
        // Without the event loop, nothing more can be handed to it.
        drop(eventloop);
        shared.acks.lock().expect("acks lock").backlog.clear();
        dispatched.cancelled().await;
        // The outbox's last publishes go to the spool; then the spool
        // thread writes what it was given and stops.
        if let Some(outbox) = outbox {
            let _ = outbox.await;
            publisher.stop().await;
        }
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tracing::info!(
            received = n(&s.received),
            succeeded = n(&s.succeeded),
            failed = n(&s.failed),
            acks_sent = n(&s.acks_sent),
            overflow = n(&s.overflow),
            published = n(&s.published),
            broker_refused = n(&s.broker_refused),
            spooled = n(&s.spooled),
            spool_sent = n(&s.spool_sent),
            connects = n(&s.connects),
            connection_errors = n(&s.connection_errors),
            "MQTT connection stopped"
        );
    }

    /// Reads the outbox until the MQTT deliveries are done (they publish
    /// through it, and so may their dead letters): `Some(task)` then stops
    /// the spool in `run`; with [`Self::outbox_open_until`] a task on `late`
    /// reads it until `closed` and stops the spool itself (`None`).
    fn drain_outbox_until_done(
        &mut self,
        publisher: &Arc<Publisher>,
        dispatched: &CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let outbox_rx = self.outbox_rx.take().expect("run takes the outbox once");
        match self.outbox_until.take() {
            Some((closed, late)) => {
                let publisher = publisher.clone();
                late.spawn(async move {
                    drain_outbox(outbox_rx, publisher.clone(), closed).await;
                    publisher.stop().await;
                });
                None
            }
            None => Some(tokio::spawn(drain_outbox(
                outbox_rx,
                publisher.clone(),
                dispatched.clone(),
            ))),
        }
    }

    /// Puts a message in the queue of each trigger it is routed to, without
    /// waiting. A QoS 0 message past the shared QoS 0 buffer is dropped
    /// (counted); a QoS 1/2 message that finds a queue full (only a broker
    /// that sends more than the Receive Maximum unacknowledged can cause
    /// it) is left unacknowledged and counted, and so is every later QoS
    /// 1/2 message on the connection: `Shared::resync` renews the
    /// connection for them once the ones taken are handled.
    fn take(&self, shared: &Shared, table: &Table, p: Incoming) {
        let qos0_waiting = &self.live.qos0_waiting;
        let qos0 = p.qos == 0;
        if !qos0 && shared.resync.load(Ordering::Relaxed) {
            // Left for the next connection, behind the ones it skipped.
            self.stats.overflow.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let routes = route(
            &table.subs,
            &p.topic,
            &p.properties.subscription_identifiers,
        );
        if qos0 && qos0_waiting.load(Ordering::Relaxed) + routes.len() > QOS0_BUFFER {
            self.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut permits = Vec::with_capacity(routes.len());
        for &r in &routes {
            match table.senders[r].try_reserve() {
                Ok(permit) => permits.push(permit),
                Err(_) if qos0 => {
                    self.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    self.stats.overflow.fetch_add(1, Ordering::Relaxed);
                    if !shared.session_kept {
                        if self.stats.overflow.load(Ordering::Relaxed) == 1 {
                            tracing::error!(topic = %p.topic, receive_maximum = self.receive_maximum, "the broker sent more unacknowledged messages than the Receive Maximum allows; with session_expiry = 0 the host cannot have them sent again: they stay unacknowledged (set a session expiry, or upgrade the broker)");
                        }
                    } else if !shared.resync.swap(true, Ordering::Relaxed) {
                        if self.stats.resyncs.load(Ordering::Relaxed) == 0 {
                            tracing::warn!(topic = %p.topic, receive_maximum = self.receive_maximum, "the broker sent more unacknowledged messages than the Receive Maximum allows (Mosquitto before 2.0.13 does when it has a backlog for the host); what does not fit stays unacknowledged, and once the messages taken are handled the host reconnects so the broker sends the rest again");
                        } else {
                            tracing::debug!(topic = %p.topic, receive_maximum = self.receive_maximum, "the broker sent more than the Receive Maximum again");
                        }
                    }
                    return;
                }
            }
        }
        if qos0 {
            qos0_waiting.fetch_add(routes.len(), Ordering::Relaxed);
        }
        let arrival = self.arrival(shared, routes, p);
        for permit in permits {
            permit.send(Job {
                message: arrival.message.clone(),
                ack: arrival.ack,
                expires: arrival.expires,
                qos0,
                pending: (!qos0).then(|| Pending::new(&shared.deliveries)),
            });
        }
    }

    fn arrival(&self, shared: &Shared, routes: Vec<usize>, p: Incoming) -> Arrival {
        let props = p.properties;
        if routes.is_empty() {
            self.stats.unrouted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %p.topic, "a message matched no trigger (a subscription left in the session by an earlier manifest?); acknowledged");
        }
        let ack = if p.qos == 0 {
            None
        } else {
            let mut acks = shared.acks.lock().expect("acks lock");
            remember(
                &mut self.stats.order.lock().expect("stats lock").arrived,
                p.pkid,
            );
            let token = AckToken {
                pkid: p.pkid,
                qos: p.qos,
            };
            let seq = acks.tracker.arrive(token, routes.len() as u32);
            if routes.is_empty() {
                let due = acks.tracker.settle_ready();
                shared.release(&mut acks, due);
            }
            Some((acks.generation, seq, p.pkid))
        };
        let expires = props
            .message_expiry_interval
            .map(|s| Instant::now() + Duration::from_secs(s as u64));
        Arrival {
            message: MqttMessage {
                topic: p.topic,
                payload: p.payload.to_vec(),
                qos: p.qos,
                retain: p.retain,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data.map(|b| b.to_vec()),
                user_properties: props.user_properties,
            },
            ack,
            expires,
        }
    }
}

/// After a broker sent more than the Receive Maximum (`Shared::resync`):
/// once every QoS 1/2 delivery has ended, its ack is handed to the client,
/// and the host's own publishes are acknowledged (or
/// [`PUBLISH_SETTLE_TIMEOUT`] passed), queues a DISCONNECT behind the acks.
/// The run loop then connects again on the same session, and the broker
/// sends what was left unacknowledged. Ends without one if the connection
/// drops first (the reconnect does the same) or the host stops.
fn spawn_resync(shared: Arc<Shared>, shutdown: CancellationToken, dispatched: CancellationToken) {
    let generation = shared.acks.lock().expect("acks lock").generation;
    tokio::spawn(async move {
        let mut handled_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = dispatched.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            // Under the lock: no connection can be lost (and a new one
            // begin) between the checks and the DISCONNECT.
            let acks = shared.acks.lock().expect("acks lock");
            if acks.generation != generation {
                return;
            }
            let handled = shared.deliveries.load(Ordering::Relaxed) == 0
                && acks.tracker.is_empty()
                && acks.backlog.is_empty();
            if !handled {
                handled_at = None;
                continue;
            }
            let since = *handled_at.get_or_insert_with(Instant::now);
            let publishing = shared.inflight.load(Ordering::Relaxed) > 0;
            if publishing && since.elapsed() < PUBLISH_SETTLE_TIMEOUT {
                continue;
            }
            if shared.publisher.client().try_disconnect() {
                return;
            }
        }
    });
}

/// Once the dispatcher is done, every due ack is handed over and the
/// broker acknowledged the host's publishes (or PUBLISH_SETTLE_TIMEOUT
/// passed), a DISCONNECT (queued behind the acks) ends the session cleanly.
fn spawn_disconnect(tasks: &TaskTracker, shared: Arc<Shared>, dispatched: CancellationToken) {
    tasks.spawn(async move {
        dispatched.cancelled().await;
        // What still waits in the spool stays there for the next
        // start; only what is on the wire is waited for.
        shared.publisher.pause();
        let give_up = tokio::time::Instant::now() + PUBLISH_SETTLE_TIMEOUT;
        loop {
            let acks_out = shared.acks.lock().expect("acks lock").backlog.is_empty();
            let settled = shared.inflight.load(Ordering::Relaxed) == 0;
            if (acks_out && settled) || tokio::time::Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shared.publisher.client().disconnect().await;
    });
}

/// Subscribes to every filter, in a task (the event loop must keep polling
/// for the SUBACKs).
fn subscribe_all(client: publish::Client, table: Arc<Table>) {
    tokio::spawn(async move {
        for s in &table.subs {
            if !client.subscribe(&s.filter.raw, s.qos, s.id).await {
                break;
            }
        }
    });
}

impl Shared {
    /// The connection dropped: its unsent acks are discarded (their packet
    /// ids mean other messages on the next connection; the broker
    /// redelivers those messages), and the publisher learns what the broker
    /// had not acknowledged (`clean`).
    fn connection_lost(&self, clean: impl FnOnce() -> connection::Cleaned) {
        // Under the lock: no delivery can hand over an ack between here and
        // the new generation.
        self.stats.connected.store(false, Ordering::Relaxed);
        let mut acks = self.acks.lock().expect("acks lock");
        acks.generation += 1;
        let dropped = acks.tracker.len() as u64;
        acks.tracker.clear();
        acks.backlog.clear();
        self.stats
            .acks_discarded
            .fetch_add(dropped, Ordering::Relaxed);
        self.publisher.disconnected(clean);
        self.inflight.store(0, Ordering::Relaxed);
    }
}

/// Hands the outbox's publishes to the publisher in order until `done`;
/// then hands over what is already queued and stops. Each sender learns
/// what became of its message without holding up the next one.
async fn drain_outbox(
    mut outbox: mpsc::Receiver<outbox::Outgoing>,
    publisher: Arc<Publisher>,
    done: CancellationToken,
) {
    loop {
        let m = tokio::select! {
            biased;
            m = outbox.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = done.cancelled() => {
                outbox.close();
                match outbox.try_recv() {
                    Ok(m) => m,
                    Err(_) => return,
                }
            }
        };
        // Lost publishes are counted and logged by the publisher.
        let _ = m.handed.send(publisher.publish(m.message));
    }
}

/// Delivers one message to one trigger (retries and dead letter included),
/// redelivering it while its dead letter cannot be written; once settled,
/// hands its ack over (sent in arrival order). `permit` is the trigger's
/// in-flight slot, held until then.
async fn deliver_message(
    spec: MqttSpec,
    shared: Arc<Shared>,
    dead_letters: Option<Arc<DeadLetterStore>>,
    message: MqttMessage,
    ack: Option<(u64, u64, u16)>,
    shutdown: CancellationToken,
    slot: Slot,
) {
    let trigger = format!("mqtt:{}", spec.filter.raw);
    let stats = &shared.stats;
    let d = loop {
        // A retry's wait ends on shutdown: the message then
        // stays unacknowledged and the broker redelivers it.
        let d = deliver_until(
            &spec.component,
            Event::Mqtt(message.clone()),
            InvocationContext::new(trigger.clone()),
            &spec.retry,
            dead_letters.as_deref(),
            &shutdown,
        )
        .await;
        if d.settled || shutdown.is_cancelled() {
            break d;
        }
        // The dead letter could not be written (a full disk?).
        // Acking would lose the message and not acking holds back
        // every later ack, so deliver it again until it settles;
        // on shutdown it stays unacknowledged and the broker
        // redelivers it at the next start.
        stats.unsettled.fetch_add(1, Ordering::Relaxed);
        tracing::error!(component = %spec.component.name, trigger = %spec.label, retry_in_s = UNSETTLED_RETRY.as_secs(), "the message failed and could not be dead-lettered; it stays unacknowledged and is delivered again");
        tokio::select! {
            _ = shutdown.cancelled() => break d,
            _ = tokio::time::sleep(UNSETTLED_RETRY) => {}
        }
    };
    stats
        .publish_denied
        .fetch_add(d.outcome.publish_denied, Ordering::Relaxed);
    if d.outcome.is_ok() {
        // The invocation handed its publishes to the sink, and
        // they are sent or spooled: the ack may go.
        stats.succeeded.fetch_add(1, Ordering::Relaxed);
    } else if d.settled {
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    if !d.settled {
        drop(slot);
        return;
    }
    if let Some((generation, seq, pkid)) = ack {
        shared.settle(generation, seq, pkid);
    }
    drop(slot);
}

/// Runs one worker per trigger, each taking its queue in order and starting
/// deliveries under the trigger's in-flight bound. On shutdown the workers
/// stop taking messages (those left are not acknowledged, so the broker
/// redelivers them) and it waits for the deliveries they started.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    live: Arc<Live>,
    loop_ended: CancellationToken,
    shared: Arc<Shared>,
    dead_letters: Option<Arc<DeadLetterStore>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    done: CancellationToken,
) {
    let inflight = TaskTracker::new();
    let workers = TaskTracker::new();
    let worker = Worker {
        qos0_waiting: live.qos0_waiting.clone(),
        shared,
        dead_letters,
        tasks,
        inflight: inflight.clone(),
        shutdown: shutdown.clone(),
    };
    {
        let mut state = live.workers.lock().expect("workers lock");
        if let Workers::Pending(waiting) = &mut *state {
            for (spec, queue) in waiting.drain(..) {
                workers.spawn(trigger_worker(queue, spec, worker.clone()));
            }
            *state = Workers::Running(worker.clone(), workers.clone());
        }
    }
    // Done once the event loop has ended (its queues then close, and the
    // workers finish them) or on shutdown; with no triggers there are no
    // workers to wait for.
    tokio::select! {
        () = loop_ended.cancelled() => {}
        () = shutdown.cancelled() => {}
    }
    workers.close();
    workers.wait().await;
    inflight.close();
    inflight.wait().await;
    done.cancel();
}

/// What a trigger's worker shares with the others.
#[derive(Clone)]
struct Worker {
    qos0_waiting: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    dead_letters: Option<Arc<DeadLetterStore>>,
    tasks: TaskTracker,
    inflight: TaskTracker,
    shutdown: CancellationToken,
}

/// Takes one trigger's queue in order: waits for one of its in-flight slots,
/// then starts the delivery.
async fn trigger_worker(mut queue: mpsc::Receiver<Job>, spec: MqttSpec, w: Worker) {
    let slots = Arc::new(Semaphore::new(spec.max_in_flight as usize));
    loop {
        let job = tokio::select! {
            biased;
            _ = w.shutdown.cancelled() => break,
            j = queue.recv() => match j {
                Some(j) => j,
                None => break,
            },
        };
        if spec.pause.is_paused() {
            tracing::info!(trigger = %spec.label, "the trigger is paused: its messages wait unacknowledged");
            tokio::select! {
                biased;
                _ = w.shutdown.cancelled() => break,
                () = spec.pause.resumed() => {}
            }
        }
        let permit = tokio::select! {
            biased;
            _ = w.shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closes"),
        };
        if job.qos0 {
            w.qos0_waiting.fetch_sub(1, Ordering::Relaxed);
        }
        // Checked once the message's turn has come: the wait for a slot is
        // where it ages.
        if job.expires.is_some_and(|t| Instant::now() >= t) {
            w.shared.stats.expired.fetch_add(1, Ordering::Relaxed);
            tracing::info!(trigger = %spec.label, topic = %job.message.topic, "message expired before delivery; not delivered");
            if let Some((generation, seq, pkid)) = job.ack {
                w.shared.settle(generation, seq, pkid);
            }
            continue;
        }
        tracing::debug!(trigger = %spec.label, topic = %job.message.topic, "MQTT delivery started");
        let delivery = deliver_message(
            spec.clone(),
            w.shared.clone(),
            w.dead_letters.clone(),
            job.message,
            job.ack,
            w.shutdown.clone(),
            Slot {
                _permit: permit,
                _pending: job.pending,
            },
        );
        w.inflight.spawn(w.tasks.track_future(delivery));
    }
}
