//! Guest publishes from invocations that no MQTT message triggered (timers,
//! HTTP requests, queued events): once such an invocation succeeded, its
//! publishes (already checked against the component's `allow.mqtt_publish`)
//! go through this bounded in-memory outbox, in order, to the connection's
//! [`Publisher`](crate::trigger::publish::Publisher), which sends them or,
//! while the broker is unreachable, spools QoS 1/2 ones on disk.
//!
//! MQTT-triggered invocations hand theirs to the publisher directly, before
//! the message they handled is acknowledged. Without an MQTT connection, or
//! when the outbox is full (the publisher cannot keep up), a publish is
//! dropped, counted and logged as an error.

use crate::invoke::MqttMessage;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// Publishes the outbox holds before it drops new ones.
pub const OUTBOX_CAPACITY: usize = 10_000;

/// The way from non-MQTT invocations to the MQTT connection.
#[derive(Debug)]
pub struct Outbox {
    tx: Option<mpsc::Sender<MqttMessage>>,
    dead_letter_topic: Option<String>,
    /// Publishes handed to the connection's sender.
    pub queued: AtomicU64,
    /// Publishes dropped (no connection, or the outbox full).
    pub dropped: AtomicU64,
}

impl Outbox {
    /// An outbox drained by an MQTT connection (see
    /// [`crate::trigger::mqtt::MqttTriggers::with_outbox`]).
    pub fn connected(capacity: usize) -> (Self, mpsc::Receiver<MqttMessage>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx: Some(tx),
                dead_letter_topic: None,
                queued: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// An outbox with no connection behind it: every publish is dropped and
    /// counted.
    pub fn disconnected() -> Self {
        Self {
            tx: None,
            dead_letter_topic: None,
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Also publishes every committed dead letter (as JSON, QoS 1) to
    /// `topic` (`[dead_letters] mqtt_topic`).
    pub fn with_dead_letter_topic(mut self, topic: Option<String>) -> Self {
        self.dead_letter_topic = topic;
        self
    }

    /// Publishes a dead letter just committed to the store, if a dead-letter
    /// topic is set.
    pub fn dead_letter(&self, record: &crate::deadletter::DeadLetter) {
        let Some(topic) = &self.dead_letter_topic else {
            return;
        };
        let payload = serde_json::to_vec(record).expect("dead letters serialize");
        let message = MqttMessage {
            topic: topic.clone(),
            payload,
            qos: 1,
            content_type: Some("application/json".into()),
            ..MqttMessage::default()
        };
        self.send(&record.component, std::slice::from_ref(&message));
    }

    /// Queues the publishes of one successful invocation of `component`.
    pub fn send(&self, component: &str, messages: &[MqttMessage]) {
        for m in messages {
            let sent = match &self.tx {
                Some(tx) => tx.try_send(m.clone()).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => "the outbox is full",
                    mpsc::error::TrySendError::Closed(_) => "the MQTT connection has stopped",
                }),
                None => Err("the host has no MQTT connection (add [mqtt])"),
            };
            match sent {
                Ok(()) => {
                    self.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(reason) => {
                    let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::error!(component, topic = %m.topic, dropped, reason, "a guest publish was dropped");
                }
            }
        }
    }
}
