//! The broker connection in either protocol version: MQTT 5 (the default) or
//! MQTT 3.1.1 (`[mqtt] version = 3`), both over rumqttc, behind one event
//! type so the trigger's logic is written once.
//!
//! What 3.1.1 lacks, and what the host does instead:
//! - **No Receive Maximum**: the broker's own in-flight limit (Mosquitto's
//!   `max_inflight_messages`, 20 by default) bounds the unacknowledged
//!   messages; what a broker sends past the triggers' queues is left
//!   unacknowledged and fetched again by renewing the connection (see the
//!   trigger's `resync`).
//! - **No Maximum Packet Size** to tell the broker: a message over
//!   [`MAX_PACKET_SIZE`](crate::MAX_PACKET_SIZE) breaks the connection
//!   and comes back after the reconnect, so set the broker's limit to match
//!   (Mosquitto: `message_size_limit 1048576`).
//! - **No session expiry**: the session is persistent (clean session off)
//!   until the broker discards it.
//! - **No properties**: no message expiry, content type, response topic,
//!   correlation data, user properties or subscription identifiers; messages
//!   are routed by matching their topic against the triggers' filters, and
//!   the properties of guest publishes are not sent.

use crate::publish::Client;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use std::time::Duration;
use wasmgate_runtime::invoke::MqttMessage;

/// Client options for one protocol version.
// One per host, made once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum ClientOptions {
    /// MQTT 5.
    V5(rumqttc::v5::MqttOptions),
    /// MQTT 3.1.1, and the socket options (set on its event loop).
    V4(rumqttc::MqttOptions, rumqttc::NetworkOptions),
}

impl ClientOptions {
    /// Sets the username and password the client connects with.
    pub fn set_credentials(&mut self, username: String, password: String) {
        match self {
            Self::V5(o) => {
                o.set_credentials(username, password);
            }
            Self::V4(o, _) => {
                o.set_credentials(username, password);
            }
        }
    }
}

impl From<rumqttc::v5::MqttOptions> for ClientOptions {
    fn from(o: rumqttc::v5::MqttOptions) -> Self {
        Self::V5(o)
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V5(o) => f.debug_tuple("V5").field(o).finish(),
            Self::V4(o, _) => f.debug_tuple("V4").field(o).finish(),
        }
    }
}

impl ClientOptions {
    /// Whether the broker keeps the session (and its unacknowledged
    /// messages) when the connection ends: always with MQTT 3.1.1 (clean
    /// session off), with MQTT 5 when the session expiry is above zero.
    pub fn session_outlives_connection(&self) -> bool {
        match self {
            ClientOptions::V5(o) => o.session_expiry_interval().is_some_and(|s| s > 0),
            ClientOptions::V4(..) => true,
        }
    }

    /// `host:port` of the broker.
    pub fn broker(&self) -> String {
        let (host, port) = match self {
            Self::V5(o) => o.broker_address(),
            Self::V4(o, _) => o.broker_address(),
        };
        format!("{host}:{port}")
    }

    /// The client and its event loop.
    pub fn connect(&self) -> (Client, EventLoop) {
        match self {
            Self::V5(o) => {
                let (c, e) = rumqttc::v5::AsyncClient::new(o.clone(), o.request_channel_capacity());
                (Client::V5(c), EventLoop::new(Inner::V5(e)))
            }
            Self::V4(o, net) => {
                let (c, mut e) = rumqttc::AsyncClient::new(o.clone(), o.request_channel_capacity());
                e.set_network_options(net.clone());
                (Client::V4(c), EventLoop::new(Inner::V4(e)))
            }
        }
    }
}

/// The event loop of a connection, and the order in which it sent the
/// host's QoS 1/2 publishes (packet ids are reused, so only that order says
/// which of the unacknowledged ones came first).
pub struct EventLoop {
    inner: Inner,
    /// Packet id → send sequence number of the publishes sent.
    sent: std::collections::HashMap<u16, u64>,
    next: u64,
    /// Copies of the QoS 2 publishes left with the session after a
    /// connection error (with their packet ids): if the broker has lost the
    /// session, rumqttc drops them, and they go to the spool instead.
    kept_qos2: Vec<(u16, MqttMessage)>,
}

// One per host, made once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Inner {
    V5(rumqttc::v5::EventLoop),
    V4(rumqttc::EventLoop),
}

/// What [`EventLoop::clean`] took out of the dead connection.
#[derive(Debug, Default)]
pub struct Cleaned {
    /// What rumqttc reported of the host's publishes before the connection
    /// dropped that was not polled yet, in order.
    pub tracked: Vec<Track>,
    /// QoS 1/2 publishes the broker had not acknowledged, in the order they
    /// were published (the packet id of those sent): the spool sends them
    /// again. `None` for one larger than the broker accepts: dropped (it
    /// would break every connection).
    pub unacked: Vec<(Option<u16>, Option<MqttMessage>)>,
    /// QoS 2 publishes sent and left with the session, which sends them
    /// again with their packet id.
    pub kept: Vec<u16>,
    /// QoS 0 publishes still queued: dropped (at most once).
    pub dropped_qos0: u64,
    /// Publishes larger than the broker accepts: dropped.
    pub too_large: u64,
}

/// What the connection said of one of the host's QoS 1/2 publishes (see
/// [`crate::unacked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Track {
    /// Sent for the first time, or again by the session, with this packet id.
    Sent(u16),
    /// PUBACK (QoS 1): done.
    Acked(u16),
    /// PUBREC (QoS 2): the broker has it; PUBCOMP ends the exchange. The
    /// packet id may be reused for a new publish before then.
    Received(u16),
    /// PUBCOMP (QoS 2): done.
    Completed(u16),
    /// A PUBACK or PUBREC whose reason code refuses the message (the
    /// reason; `at_pubrec` for a PUBREC).
    Refused {
        /// The packet id.
        pkid: u16,
        /// The reason code.
        reason: String,
        /// A PUBREC (QoS 2): rumqttc keeps counting that exchange as in
        /// flight, so the connection is made again to reset its count.
        at_pubrec: bool,
    },
}

/// The [`Track`] of an MQTT 5 event, if it is one.
fn track5(e: &rumqttc::v5::Event) -> Option<Track> {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event as E;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason};
    Some(match e {
        E::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0 => Track::Sent(*pkid),
        E::Incoming(Packet::PubAck(a)) => {
            if matches!(
                a.reason,
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
            ) {
                Track::Acked(a.pkid)
            } else {
                Track::Refused {
                    pkid: a.pkid,
                    reason: format!("{:?}", a.reason),
                    at_pubrec: false,
                }
            }
        }
        E::Incoming(Packet::PubRec(r)) => {
            if matches!(
                r.reason,
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers
            ) {
                Track::Received(r.pkid)
            } else {
                Track::Refused {
                    pkid: r.pkid,
                    reason: format!("{:?}", r.reason),
                    at_pubrec: true,
                }
            }
        }
        E::Incoming(Packet::PubComp(c)) => Track::Completed(c.pkid),
        _ => return None,
    })
}

/// The [`Track`] of an MQTT 3.1.1 event, if it is one.
fn track4(e: &rumqttc::Event) -> Option<Track> {
    use rumqttc::{Event as E, Outgoing, Packet};
    Some(match e {
        E::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0 => Track::Sent(*pkid),
        E::Incoming(Packet::PubAck(a)) => Track::Acked(a.pkid),
        E::Incoming(Packet::PubRec(r)) => Track::Received(r.pkid),
        E::Incoming(Packet::PubComp(c)) => Track::Completed(c.pkid),
        _ => return None,
    })
}

/// A message from the broker.
#[derive(Debug)]
pub struct Incoming {
    /// Topic name (lossy UTF-8).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Packet id (QoS 1/2).
    pub pkid: u16,
    /// MQTT 5 properties (empty with 3.1.1).
    pub properties: PublishProperties,
}

/// What the event loop reported.
#[derive(Debug)]
pub enum Event {
    /// CONNACK.
    ConnAck {
        /// The broker still had this client's session.
        session_present: bool,
        /// Publishes the session was to resend (with their packet ids),
        /// lost with it: the spool sends them (first).
        requeue: Vec<(u16, MqttMessage)>,
    },
    /// SUBACK, with the reason of each refused filter.
    SubAck {
        /// Reasons of the refused filters.
        refused: Vec<String>,
    },
    /// A message.
    Publish(Incoming),
    /// What became of one of the host's QoS 1/2 publishes.
    Track(Track),
    /// The broker sent DISCONNECT (MQTT 5).
    BrokerDisconnect(String),
    /// This client's DISCONNECT went out.
    Disconnected,
    /// Anything else.
    Other,
}

/// A connection error, with what to tell the operator.
#[derive(Debug)]
pub struct ConnError {
    /// The error.
    pub message: String,
    /// A hint naming the setting to check, for refusals and TLS failures.
    pub hint: Option<&'static str>,
    /// The broker's largest packet, when a publish exceeded it.
    too_large: Option<usize>,
}

impl ConnError {
    /// The host drops the connection itself, for `message`.
    pub fn local(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            too_large: None,
        }
    }
}

/// A SUBACK event naming the refused filters' reason codes.
fn refused<C: std::fmt::Debug>(codes: &[C], ok: impl Fn(&C) -> bool) -> Event {
    Event::SubAck {
        refused: codes
            .iter()
            .filter(|c| !ok(c))
            .map(|c| format!("{c:?}"))
            .collect(),
    }
}

fn qos_u8_5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos_u8_4(q: rumqttc::QoS) -> u8 {
    q as u8
}

/// Marks every packet id as an incoming QoS 2 message in progress.
/// rumqttc forgets that state on a disconnect (and a new host never had it),
/// and would then refuse the PUBRELs the broker resends for messages
/// PUBREC'd earlier as "unsolicited", dropping every new connection; marked,
/// they are answered with a PUBCOMP (which MQTT asks for in any case).
macro_rules! mark_incoming_qos2 {
    ($e:ident, [$($m:ident)::+], $marker:expr) => {{
        for pkid in 1..=u16::MAX {
            let _ = $e
                .state
                .handle_incoming_packet($($m)::+::Incoming::Publish($marker(pkid)));
            // Each call queues an event; none of them is real.
            $e.state.events.clear();
        }
        $e.state.events.shrink_to(128);
    }};
}

/// The steps of [`EventLoop::clean`] on one protocol version's event loop
/// (the same for both; only the types differ): let rumqttc move its
/// unacknowledged state into `pending`, then sort `pending` — acks dropped,
/// QoS 0 publishes dropped and counted, publishes larger than the broker
/// accepts dropped and counted, QoS 2 publishes already sent kept after a
/// connection error (and remembered in `$kept`), every other publish taken
/// out for the spool — and mark every packet id as an incoming QoS 2
/// message in progress.
macro_rules! clean_pending {
    ($e:ident, [$($m:ident)::+], $qos:ident, $keep_qos2:ident, $max:ident, $to_message:expr, $marker:expr, $out:ident, $take:ident, $kept:ident) => {{
        $e.clean();
        if let Some(mut p) = $e.state.collision.take() {
            // Never sent: it gets a packet id of its own when it is.
            p.pkid = 0;
            $e.pending.push_front($($m)::+::Request::Publish(p));
        }
        for r in std::mem::take(&mut $e.pending) {
            match r {
                $($m)::+::Request::PubAck(_) | $($m)::+::Request::PubRec(_) => {}
                $($m)::+::Request::Publish(p) if $qos(p.qos) == 0 => $out.dropped_qos0 += 1,
                $($m)::+::Request::Publish(p) if $max.is_some_and(|max| p.size() > max) => {
                    $out.too_large += 1;
                    tracing::error!(topic = %String::from_utf8_lossy(p.topic.as_ref()), bytes = p.size(), max_packet_size = $max, "a publish is larger than the broker accepts; dropped");
                    $take(p.pkid, None);
                }
                $($m)::+::Request::Publish(p) if $keep_qos2 && $qos(p.qos) == 2 && p.pkid != 0 => {
                    $kept.push((p.pkid, $to_message(p.clone())));
                    $e.pending.push_back($($m)::+::Request::Publish(p));
                }
                $($m)::+::Request::Publish(p) => {
                    let pkid = p.pkid;
                    $take(pkid, Some($to_message(p)));
                }
                // A DISCONNECT queued for the dead connection (to renew it,
                // or to stop) must not end the next one.
                $($m)::+::Request::Disconnect { .. } => {}
                other => $e.pending.push_back(other),
            }
        }
        mark_incoming_qos2!($e, [$($m)::+], $marker);
    }};
}

fn marker5(pkid: u16) -> rumqttc::v5::mqttbytes::v5::Publish {
    let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
        "",
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        Bytes::new(),
        None,
    );
    p.pkid = pkid;
    p
}

fn marker4(pkid: u16) -> rumqttc::Publish {
    let mut p = rumqttc::Publish::new("", rumqttc::QoS::ExactlyOnce, Vec::new());
    p.pkid = pkid;
    p
}

fn message5(p: rumqttc::v5::mqttbytes::v5::Publish) -> MqttMessage {
    let props = p.properties.unwrap_or_default();
    MqttMessage {
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload.to_vec(),
        qos: qos_u8_5(p.qos),
        retain: p.retain,
        content_type: props.content_type,
        response_topic: props.response_topic,
        correlation_data: props.correlation_data.map(|b| b.to_vec()),
        user_properties: props.user_properties,
    }
}

fn message4(p: rumqttc::Publish) -> MqttMessage {
    MqttMessage {
        topic: p.topic,
        payload: p.payload.to_vec(),
        qos: qos_u8_4(p.qos),
        retain: p.retain,
        ..MqttMessage::default()
    }
}

impl EventLoop {
    fn new(mut inner: Inner) -> Self {
        match &mut inner {
            Inner::V5(e) => mark_incoming_qos2!(e, [rumqttc::v5], marker5),
            Inner::V4(e) => mark_incoming_qos2!(e, [rumqttc], marker4),
        }
        Self {
            inner,
            sent: std::collections::HashMap::new(),
            next: 0,
            kept_qos2: Vec::new(),
        }
    }

    fn record_sent(&mut self, pkid: u16) {
        if pkid != 0 {
            self.next += 1;
            self.sent.insert(pkid, self.next);
        }
    }

    /// The event for `track` (recording the order of sends).
    fn tracked(&mut self, track: Option<Track>) -> Event {
        match track {
            Some(t) => {
                if let Track::Sent(pkid) = t {
                    self.record_sent(pkid);
                }
                Event::Track(t)
            }
            None => Event::Other,
        }
    }

    /// A CONNACK: with the session gone, the QoS 2 publishes left with it
    /// come back for the spool.
    fn connack(&mut self, session_present: bool) -> Event {
        let lost_session = std::mem::take(&mut self.kept_qos2);
        Event::ConnAck {
            session_present,
            requeue: if session_present {
                Vec::new()
            } else {
                lost_session
            },
        }
    }

    /// Outgoing QoS 1/2 publishes the broker has not acknowledged yet.
    pub fn inflight(&self) -> u16 {
        match &self.inner {
            Inner::V5(e) => e.state.inflight(),
            Inner::V4(e) => e.state.inflight(),
        }
    }

    /// The next event (connecting first when needed).
    pub async fn poll(&mut self) -> Result<Event, ConnError> {
        match &mut self.inner {
            Inner::V5(e) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event as E;
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                match e.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(c))) => Ok(self.connack(c.session_present)),
                    Ok(E::Incoming(Packet::SubAck(s))) => Ok(refused(&s.return_codes, |c| {
                        matches!(c, SubscribeReasonCode::Success(_))
                    })),
                    Ok(E::Incoming(Packet::Publish(p))) => Ok(Event::Publish(Incoming {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: qos_u8_5(p.qos),
                        retain: p.retain,
                        pkid: p.pkid,
                        properties: p.properties.unwrap_or_default(),
                    })),
                    Ok(E::Incoming(Packet::Disconnect(d))) => {
                        Ok(Event::BrokerDisconnect(format!("{:?}", d.reason_code)))
                    }
                    Ok(E::Outgoing(Outgoing::Disconnect)) => Ok(Event::Disconnected),
                    Ok(ev) => Ok(self.tracked(track5(&ev))),
                    Err(err) => Err(conn_error_5(err)),
                }
            }
            Inner::V4(e) => {
                use rumqttc::{Event as E, Outgoing, Packet, SubscribeReasonCode};
                match e.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(c))) => Ok(self.connack(c.session_present)),
                    Ok(E::Incoming(Packet::SubAck(s))) => Ok(refused(&s.return_codes, |c| {
                        matches!(c, SubscribeReasonCode::Success(_))
                    })),
                    Ok(E::Incoming(Packet::Publish(p))) => Ok(Event::Publish(Incoming {
                        topic: p.topic,
                        payload: p.payload,
                        qos: qos_u8_4(p.qos),
                        retain: p.retain,
                        pkid: p.pkid,
                        properties: PublishProperties::default(),
                    })),
                    Ok(E::Outgoing(Outgoing::Disconnect)) => Ok(Event::Disconnected),
                    Ok(ev) => Ok(self.tracked(track4(&ev))),
                    Err(err) => Err(conn_error_4(err)),
                }
            }
        }
    }

    /// After the connection dropped (`error`), or at shutdown (`None`):
    /// - drops the events rumqttc buffered from the dead connection (acking
    ///   its messages on the next connection would name other messages; the
    ///   broker redelivers them) and the acknowledgements still queued;
    /// - takes out the QoS 1/2 publishes the broker has not acknowledged, in
    ///   the order they were sent, then those never sent, for the spool to
    ///   send again — except, after a connection error, QoS 2 publishes
    ///   that already went out: the session resends those with their packet
    ///   id, as QoS 2 requires (a new packet id for them could be taken by
    ///   the broker for a duplicate of the old one);
    /// - drops queued QoS 0 publishes, and publishes larger than the broker
    ///   accepts;
    /// - marks every packet id as an incoming QoS 2 message in progress:
    ///   rumqttc forgets that state on a disconnect, and would then refuse
    ///   the PUBRELs the broker resends for messages this host had PUBREC'd
    ///   as "unsolicited", dropping every new connection; marked, they are
    ///   answered with a PUBCOMP.
    pub fn clean(&mut self, error: Option<&ConnError>) -> Cleaned {
        // Sends rumqttc reported but the trigger has not polled yet; the
        // rest of those events belong to the dead connection.
        let tracked: Vec<Track> = match &mut self.inner {
            Inner::V5(e) => e
                .state
                .events
                .drain(..)
                .filter_map(|ev| track5(&ev))
                .collect(),
            Inner::V4(e) => e
                .state
                .events
                .drain(..)
                .filter_map(|ev| track4(&ev))
                .collect(),
        };
        for t in &tracked {
            if let Track::Sent(pkid) = t {
                self.record_sent(*pkid);
            }
        }
        let max = error.and_then(|e| e.too_large);
        let keep_qos2 = error.is_some();
        let mut out = Cleaned {
            tracked,
            ..Cleaned::default()
        };
        let mut sent: Vec<(u64, u16, Option<MqttMessage>)> = Vec::new();
        let mut unsent: Vec<(Option<u16>, Option<MqttMessage>)> = Vec::new();
        let sent_order = &self.sent;
        let mut take = |pkid: u16, m: Option<MqttMessage>| {
            if pkid == 0 {
                unsent.push((None, m));
            } else {
                // Sent but not seen reported: after those that were.
                let k = sent_order.get(&pkid).copied().unwrap_or(u64::MAX);
                sent.push((k, pkid, m));
            }
        };
        let mut kept = Vec::new();
        match &mut self.inner {
            Inner::V5(e) => clean_pending!(
                e,
                [rumqttc::v5],
                qos_u8_5,
                keep_qos2,
                max,
                message5,
                marker5,
                out,
                take,
                kept
            ),
            Inner::V4(e) => clean_pending!(
                e,
                [rumqttc],
                qos_u8_4,
                keep_qos2,
                max,
                message4,
                marker4,
                out,
                take,
                kept
            ),
        }
        out.kept = kept.iter().map(|(pkid, _)| *pkid).collect();
        self.kept_qos2 = kept;
        sent.sort_by_key(|(k, _, _)| *k);
        out.unacked = sent
            .into_iter()
            .map(|(_, pkid, m)| (Some(pkid), m))
            .chain(unsent)
            .collect();
        out
    }
}

const HINT_CREDENTIALS: &str =
    "the broker refused the credentials: check mqtt.username and mqtt.password";
const HINT_CLIENT_ID: &str = "the broker refused the client id: check mqtt.client_id";
const HINT_TLS: &str =
    "TLS with the broker failed: check mqtt.broker (host name), mqtt.ca, mqtt.cert and mqtt.key";

fn conn_error_5(e: rumqttc::v5::ConnectionError) -> ConnError {
    use rumqttc::v5::ConnectionError as C;
    use rumqttc::v5::StateError;
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as R;
    let hint = match &e {
        C::ConnectionRefused(code) => Some(match code {
            R::BadUserNamePassword | R::NotAuthorized => HINT_CREDENTIALS,
            R::ClientIdentifierNotValid | R::BadClientId => HINT_CLIENT_ID,
            R::UnsupportedProtocolVersion | R::RefusedProtocolVersion => {
                "the broker does not speak MQTT 5: set mqtt.version = 3"
            }
            _ => "the broker refused the connection",
        }),
        C::Tls(_) => Some(HINT_TLS),
        _ => None,
    };
    let too_large = match &e {
        C::MqttState(StateError::OutgoingPacketTooLarge { max, .. }) => Some(*max as usize),
        C::MqttState(StateError::Deserialization(
            rumqttc::v5::mqttbytes::Error::OutgoingPacketTooLarge { max, .. },
        )) => Some(*max as usize),
        _ => None,
    };
    ConnError {
        message: e.to_string(),
        hint,
        too_large,
    }
}

fn conn_error_4(e: rumqttc::ConnectionError) -> ConnError {
    use rumqttc::ConnectReturnCode as R;
    use rumqttc::{ConnectionError as C, StateError};
    let hint = match &e {
        C::ConnectionRefused(code) => Some(match code {
            R::BadUserNamePassword | R::NotAuthorized => HINT_CREDENTIALS,
            R::BadClientId => HINT_CLIENT_ID,
            R::RefusedProtocolVersion => "the broker does not accept MQTT 3.1.1 (mqtt.version)",
            _ => "the broker refused the connection",
        }),
        C::Tls(_) => Some(HINT_TLS),
        _ => None,
    };
    let too_large = match &e {
        C::MqttState(StateError::Deserialization(rumqttc::Error::OutgoingPacketTooLarge {
            max,
            ..
        })) => Some(*max),
        _ => None,
    };
    ConnError {
        message: e.to_string(),
        hint,
        too_large,
    }
}

/// Logs a connection error and the delay before the next attempt.
pub fn log_connection_error(broker: &str, e: &ConnError, delay: Duration) {
    let retry_in_ms = delay.as_millis() as u64;
    match e.hint {
        Some(hint) => tracing::error!(%broker, error = %e.message, retry_in_ms, "{hint}"),
        None => {
            tracing::warn!(%broker, error = %e.message, retry_in_ms, "MQTT broker unreachable or connection lost; reconnecting")
        }
    }
}
