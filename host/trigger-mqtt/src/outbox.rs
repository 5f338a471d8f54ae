//! The host's publish sink: every successful invocation's publishes, whatever
//! triggered it (MQTT messages, timers, HTTP requests, queued events), and
//! the dead letters published to `[dead_letters] mqtt_topic`, go through this
//! bounded queue, in order, to the connection's
//! [`Publisher`](crate::publish::Publisher), which sends them or, while the
//! broker is unreachable, spools QoS 1/2 ones on disk.
//!
//! [`Outbox::publish`] waits for room when the queue is full (backpressure,
//! nothing dropped), then until the broker has acknowledged each QoS 1/2
//! message (PUBACK/PUBCOMP) or it is on disk in the spool, so an MQTT
//! message is acknowledged, a timer tick recorded or a queued event removed
//! only after its handler's publishes are safe.
//! QoS 0 publishes are done once handed to the connection. Once the connection has stopped (shutdown), a publish is
//! dropped, counted and logged.

use crate::publish::Handed;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
use wasmgate_runtime::invoke::MqttMessage;
use wasmgate_runtime::sink::{Lost, PublishSink, SinkFuture};

/// Publishes the outbox holds; past it publishers wait for room.
pub const OUTBOX_CAPACITY: usize = 10_000;

/// One publish on its way to the connection.
#[derive(Debug)]
pub struct Outgoing {
    /// The message.
    pub message: MqttMessage,
    /// Told what the publisher did with it.
    pub handed: oneshot::Sender<Handed>,
}

/// The way from invocations to the MQTT connection.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    /// Publishes handed to the connection's publisher.
    pub queued: AtomicU64,
    /// Publishes dropped (the connection had stopped).
    pub dropped: AtomicU64,
}

impl Outbox {
    /// An outbox drained by an MQTT connection (see
    /// [`crate::MqttTriggers::publish_sink`]).
    pub fn connected(capacity: usize) -> (Self, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                queued: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    async fn send_all(&self, component: &str, messages: Vec<MqttMessage>) -> Vec<Lost> {
        let mut pending = Vec::with_capacity(messages.len());
        let mut lost = Vec::new();
        for message in messages {
            let (topic, qos) = (message.topic.clone(), message.qos);
            let (handed, rx) = oneshot::channel();
            match self.tx.send(Outgoing { message, handed }).await {
                Ok(()) => {
                    self.queued.fetch_add(1, Ordering::Relaxed);
                    pending.push((topic, qos, rx));
                }
                Err(_) => {
                    let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::error!(component, %topic, dropped, reason = "the MQTT connection has stopped", "a guest publish was dropped");
                    lost.push(Lost {
                        topic,
                        qos,
                        reason: "the MQTT connection has stopped".into(),
                    });
                }
            }
        }
        // Each loss past this point is counted and logged by the publisher;
        // here it is reported per message.
        for (topic, qos, rx) in pending {
            let reason = match rx.await {
                Ok(Handed::Sent) => continue,
                Ok(Handed::Pending(done)) => match done.await {
                    Ok(Ok(())) => continue,
                    Ok(Err(reason)) => reason,
                    Err(_) => "the MQTT connection has stopped".into(),
                },
                Ok(Handed::Dropped) => {
                    "the publisher dropped it (invalid, too large, or a QoS 0 publish with the connection's queue full)".into()
                }
                Err(_) => "the MQTT connection has stopped".into(),
            };
            lost.push(Lost { topic, qos, reason });
        }
        lost
    }
}

impl PublishSink for Outbox {
    fn publish<'a>(&'a self, component: &'a str, messages: Vec<MqttMessage>) -> SinkFuture<'a> {
        Box::pin(self.send_all(component, messages))
    }
}
