//! What an invocation is for: the events triggers produce, as the host sees
//! them (and as dead letters and the queue store them).

use crate::bindings::{Message, Qos};
use serde::Serialize;

/// Largest MQTT packet the host sends or accepts (the Maximum Packet Size it
/// tells the broker): 1 MiB. The broker does not send larger messages to
/// this client (MQTT 5 §3.1.2.11.4), so the memory for messages in progress
/// is at most about `receive_maximum` × 1 MiB.
pub const MAX_PACKET_SIZE: u32 = 1024 * 1024;

/// The largest message (topic, payload and properties, see
/// [`MqttMessage::size`]) a guest may publish: 1 KiB under
/// [`MAX_PACKET_SIZE`], room for the packet's fixed and variable header.
pub const MAX_PUBLISH_SIZE: u64 = MAX_PACKET_SIZE as u64 - 1024;

/// How many bytes of an HTTP response body `invoke` collects.
pub const HTTP_BODY_CAPTURE_BYTES: usize = 1024 * 1024;

/// An MQTT message, as the host sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MqttMessage {
    /// Topic name.
    pub topic: String,
    /// Payload bytes.
    #[serde(serialize_with = "serialize_payload")]
    pub payload: Vec<u8>,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 content type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// MQTT 5 response topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_opt_payload"
    )]
    pub correlation_data: Option<Vec<u8>>,
    /// MQTT 5 user properties.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

/// Payloads print as text when they are UTF-8, else as `hex:...`.
fn payload_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("hex:{}", hex::encode(bytes)),
    }
}

fn serialize_payload<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&payload_text(bytes))
}

fn serialize_opt_payload<S: serde::Serializer>(
    bytes: &Option<Vec<u8>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(b) => s.serialize_str(&payload_text(b)),
        None => s.serialize_none(),
    }
}

impl From<Message> for MqttMessage {
    fn from(m: Message) -> Self {
        Self {
            topic: m.topic,
            payload: m.payload,
            qos: match m.qos {
                Qos::AtMostOnce => 0,
                Qos::AtLeastOnce => 1,
                Qos::ExactlyOnce => 2,
            },
            retain: m.retain,
            content_type: m.content_type,
            response_topic: m.response_topic,
            correlation_data: m.correlation_data,
            user_properties: m.user_properties,
        }
    }
}

impl From<&MqttMessage> for Message {
    fn from(m: &MqttMessage) -> Self {
        Self {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: match m.qos {
                0 => Qos::AtMostOnce,
                1 => Qos::AtLeastOnce,
                _ => Qos::ExactlyOnce,
            },
            retain: m.retain,
            content_type: m.content_type.clone(),
            response_topic: m.response_topic.clone(),
            correlation_data: m.correlation_data.clone(),
            user_properties: m.user_properties.clone(),
        }
    }
}

/// A timer tick.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TimerTick {
    /// The schedule text.
    pub schedule: String,
    /// When it was due, ms since the Unix epoch.
    pub scheduled_at_ms: u64,
    /// When it started, ms since the Unix epoch.
    pub fired_at_ms: u64,
    /// Ticks skipped since the previous one that ran.
    pub missed: u32,
}

/// What a key-value change did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvOperation {
    /// Set (created, overwritten, incremented).
    Set,
    /// Deleted.
    Delete,
}

/// The invocation that wrote a change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KvWriter {
    /// Its invocation id.
    pub invocation: String,
    /// Its component.
    pub component: String,
    /// Its trigger.
    pub trigger: String,
}

/// One committed change of a bucket, as a `[[trigger.keyvalue]]` gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvChange {
    /// The key.
    pub key: String,
    /// Set or delete.
    pub operation: KvOperation,
    /// Its place in the bucket's stream (1, 2, …).
    pub sequence: u64,
    /// When it was committed, ms since the Unix epoch.
    pub committed_at_ms: u64,
    /// The value after a set (per the trigger's view).
    #[serde(serialize_with = "serialize_opt_payload")]
    pub new_value: Option<Vec<u8>>,
    /// The value before (per the trigger's view).
    #[serde(serialize_with = "serialize_opt_payload")]
    pub old_value: Option<Vec<u8>>,
    /// Who wrote it (none: an operator).
    pub writer: Option<KvWriter>,
}

impl KvChange {
    /// Bytes it holds (key and values), for batch and memory bounds.
    pub fn size(&self) -> u64 {
        (self.key.len()
            + self.new_value.as_ref().map_or(0, Vec::len)
            + self.old_value.as_ref().map_or(0, Vec::len)) as u64
    }
}

/// Changes a trigger will never see (dropped by the stream's retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvGap {
    /// First sequence number lost.
    pub first_sequence: u64,
    /// Last sequence number lost.
    pub last_sequence: u64,
    /// Changes of the bucket lost.
    pub lost: u64,
}

/// A batch of changes of one bucket, in commit order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvBatch {
    /// The bucket.
    pub bucket: String,
    /// Changes lost before these, if any.
    pub gap: Option<KvGap>,
    /// The changes.
    pub changes: Vec<KvChange>,
}

/// The WIT form of a batch: its gap and its changes.
pub(crate) fn wit_batch(
    batch: KvBatch,
) -> (Option<crate::bindings::Gap>, Vec<crate::bindings::Change>) {
    use crate::bindings::{Change, Gap, Operation, Writer};
    let gap = batch.gap.map(|g| Gap {
        first_sequence: g.first_sequence,
        last_sequence: g.last_sequence,
        lost: g.lost,
    });
    let changes = batch
        .changes
        .into_iter()
        .map(|c| Change {
            bucket: batch.bucket.clone(),
            key: c.key,
            operation: match c.operation {
                KvOperation::Set => Operation::Set,
                KvOperation::Delete => Operation::Delete,
            },
            sequence: c.sequence,
            committed_at_ms: c.committed_at_ms,
            new_value: c.new_value,
            old_value: c.old_value,
            writer: c.writer.map(|w| Writer {
                invocation: w.invocation,
                component: w.component,
                trigger: w.trigger,
            }),
        })
        .collect();
    (gap, changes)
}

/// An HTTP request for `invoke` (the response is collected in full).
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path and query, e.g. `/api/x?y=1`.
    pub path: String,
    /// Host (authority).
    pub authority: String,
    /// Header names and values.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// An HTTP response collected by `invoke`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header names and values.
    pub headers: Vec<(String, String)>,
    /// Body (text, or `hex:...` when not UTF-8), at most [`HTTP_BODY_CAPTURE_BYTES`].
    #[serde(serialize_with = "serialize_payload")]
    pub body: Vec<u8>,
}

/// What an invocation is for.
#[derive(Debug, Clone)]
pub enum Event {
    /// An MQTT message for `handle-message`.
    Mqtt(MqttMessage),
    /// A tick for `on-tick`.
    Timer(TimerTick),
    /// An HTTP request for `wasi:http/incoming-handler`.
    Http(HttpRequest),
    /// Changes of a bucket for `kv-stream-handler.handle-changes`.
    KeyValue(KvBatch),
}

impl Event {
    /// The handler the event needs.
    pub fn handler(&self) -> crate::component::Handler {
        match self {
            Event::Mqtt(_) => crate::component::Handler::Mqtt,
            Event::Timer(_) => crate::component::Handler::Timer,
            Event::Http(_) => crate::component::Handler::Http,
            Event::KeyValue(_) => crate::component::Handler::KeyValue,
        }
    }
}

impl MqttMessage {
    /// The bytes a message counts against size limits (the spool's
    /// `max_bytes`, [`MAX_PUBLISH_SIZE`]): topic, payload, correlation data,
    /// content type, response topic and user properties.
    pub fn size(&self) -> u64 {
        let props: usize = self
            .user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        (self.topic.len()
            + self.payload.len()
            + self.correlation_data.as_ref().map_or(0, Vec::len)
            + self.content_type.as_ref().map_or(0, String::len)
            + self.response_topic.as_ref().map_or(0, String::len)
            + props) as u64
    }
}
