//! The broker connection in either protocol version: MQTT 5 (the default) or
//! MQTT 3.1.1 (`[mqtt] version = 3`), both over rumqttc, behind one event
//! type so the trigger's logic is written once.
//!
//! What 3.1.1 lacks, and what the host does instead:
//! - **No Receive Maximum**: the broker's own in-flight limit (Mosquitto's
//!   `max_inflight_messages`, 20 by default) bounds the unacknowledged
//!   messages; past the dispatch queue the host stops reading the socket,
//!   which is TCP backpressure to the broker.
//! - **No Maximum Packet Size** to tell the broker: a message over
//!   [`MAX_PACKET_SIZE`](super::mqtt::MAX_PACKET_SIZE) breaks the connection
//!   and comes back after the reconnect, so set the broker's limit to match
//!   (Mosquitto: `message_size_limit 1048576`).
//! - **No session expiry**: the session is persistent (clean session off)
//!   until the broker discards it.
//! - **No properties**: no message expiry, content type, response topic,
//!   correlation data, user properties or subscription identifiers; messages
//!   are routed by matching their topic against the triggers' filters, and
//!   the properties of guest publishes are not sent.

use crate::invoke::MqttMessage;
use crate::trigger::publish::Client;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use std::time::Duration;

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
                (Client::V5(c), EventLoop::V5(e))
            }
            Self::V4(o, net) => {
                let (c, mut e) = rumqttc::AsyncClient::new(o.clone(), o.request_channel_capacity());
                e.set_network_options(net.clone());
                (Client::V4(c), EventLoop::V4(e))
            }
        }
    }
}

/// The event loop of a connection.
// One per host, made once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum EventLoop {
    /// MQTT 5.
    V5(rumqttc::v5::EventLoop),
    /// MQTT 3.1.1.
    V4(rumqttc::EventLoop),
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
    },
    /// SUBACK, with the reason of each refused filter.
    SubAck {
        /// Reasons of the refused filters.
        refused: Vec<String>,
    },
    /// A message.
    Publish(Incoming),
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
    /// rumqttc's "unsolicited PUBREL" of packet id N (see [`EventLoop::clean`]).
    unsolicited: Option<u16>,
}

fn qos_u8_5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos_u8_4(q: rumqttc::QoS) -> u8 {
    q as u8
}

impl EventLoop {
    /// The next event (connecting first when needed).
    pub async fn poll(&mut self) -> Result<Event, ConnError> {
        match self {
            Self::V5(e) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event as E;
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                match e.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(c))) => Ok(Event::ConnAck {
                        session_present: c.session_present,
                    }),
                    Ok(E::Incoming(Packet::SubAck(s))) => Ok(Event::SubAck {
                        refused: s
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .map(|c| format!("{c:?}"))
                            .collect(),
                    }),
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
                    Ok(_) => Ok(Event::Other),
                    Err(err) => Err(conn_error_5(err)),
                }
            }
            Self::V4(e) => {
                use rumqttc::{Event as E, Outgoing, Packet, SubscribeReasonCode};
                match e.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(c))) => Ok(Event::ConnAck {
                        session_present: c.session_present,
                    }),
                    Ok(E::Incoming(Packet::SubAck(s))) => Ok(Event::SubAck {
                        refused: s
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .map(|c| format!("{c:?}"))
                            .collect(),
                    }),
                    Ok(E::Incoming(Packet::Publish(p))) => Ok(Event::Publish(Incoming {
                        topic: p.topic,
                        payload: p.payload,
                        qos: qos_u8_4(p.qos),
                        retain: p.retain,
                        pkid: p.pkid,
                        properties: PublishProperties::default(),
                    })),
                    Ok(E::Outgoing(Outgoing::Disconnect)) => Ok(Event::Disconnected),
                    Ok(_) => Ok(Event::Other),
                    Err(err) => Err(conn_error_4(err)),
                }
            }
        }
    }

    /// After the connection dropped (or at shutdown): drops its network state
    /// and the acknowledgements it still held (they would name other
    /// messages on the next connection; the broker redelivers those
    /// messages), and returns the QoS 1/2 publishes the broker had not
    /// acknowledged, taking them out of what rumqttc would resend (the
    /// spool sends them instead).
    pub fn clean(&mut self, error: Option<&ConnError>) -> Vec<MqttMessage> {
        let unsolicited = error.and_then(|e| e.unsolicited);
        let mut unacked = Vec::new();
        match self {
            Self::V5(e) => {
                use rumqttc::v5::Request;
                e.clean();
                e.pending.retain(|r| match r {
                    Request::PubAck(_) | Request::PubRec(_) => false,
                    Request::Publish(p) if p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce => {
                        let props = p.properties.clone().unwrap_or_default();
                        unacked.push(MqttMessage {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            qos: qos_u8_5(p.qos),
                            retain: p.retain,
                            content_type: props.content_type,
                            response_topic: props.response_topic,
                            correlation_data: props.correlation_data.map(|b| b.to_vec()),
                            user_properties: props.user_properties,
                        });
                        false
                    }
                    _ => true,
                });
                // rumqttc forgets incoming QoS 2 state on a disconnect, so
                // the broker's PUBREL for a message this host had PUBREC'd
                // before is "unsolicited" and drops the next connection too.
                // Marking that packet id as an incoming QoS 2 message again
                // makes rumqttc answer the PUBREL with a PUBCOMP next time
                // (the message itself was handled).
                if let Some(pkid) = unsolicited {
                    let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                        "",
                        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
                        Bytes::new(),
                        None,
                    );
                    p.pkid = pkid;
                    let events = e.state.events.len();
                    let _ = e
                        .state
                        .handle_incoming_packet(rumqttc::v5::Incoming::Publish(p));
                    e.state.events.truncate(events);
                }
            }
            Self::V4(e) => {
                use rumqttc::Request;
                e.clean();
                e.pending.retain(|r| match r {
                    Request::PubAck(_) | Request::PubRec(_) => false,
                    Request::Publish(p) if p.qos != rumqttc::QoS::AtMostOnce => {
                        unacked.push(MqttMessage {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            qos: qos_u8_4(p.qos),
                            retain: p.retain,
                            ..MqttMessage::default()
                        });
                        false
                    }
                    _ => true,
                });
                if let Some(pkid) = unsolicited {
                    let mut p = rumqttc::Publish::new("", rumqttc::QoS::ExactlyOnce, Vec::new());
                    p.pkid = pkid;
                    let events = e.state.events.len();
                    let _ = e
                        .state
                        .handle_incoming_packet(rumqttc::Incoming::Publish(p));
                    e.state.events.truncate(events);
                }
            }
        }
        unacked
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
    let unsolicited = match &e {
        C::MqttState(StateError::Unsolicited(pkid)) => Some(*pkid),
        _ => None,
    };
    ConnError {
        message: e.to_string(),
        hint,
        unsolicited,
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
    let unsolicited = match &e {
        C::MqttState(StateError::Unsolicited(pkid)) => Some(*pkid),
        _ => None,
    };
    ConnError {
        message: e.to_string(),
        hint,
        unsolicited,
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
