//! Where a guest's publishes go: one [`PublishSink`] for every component,
//! set by the composition root, whatever trigger ran the guest.
//!
//! The guest's `publish` call only checks the message against the
//! component's grants (and its size and the invocation's budget) and
//! records it; once the invocation has succeeded,
//! [`crate::invoke::Invocable::invoke`] hands its publishes to the sink, in
//! order, and waits until the sink has them. A failed invocation publishes
//! nothing, so a retried handler does not publish twice. A QoS 1/2 publish
//! the sink could neither send nor spool (a full spool that refuses new
//! messages, a failed disk, a stopped connection) fails the invocation
//! after the fact (a `retry`), so its event is retried and, in the end,
//! dead-lettered rather than its output silently lost. The MQTT trigger provides the sink of a host with an MQTT
//! connection (it sends, or spools to disk while the broker is unreachable);
//! [`NoConnection`] is the sink of a host without one.

use crate::event::MqttMessage;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

/// A future a sink returns: the publishes it lost.
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Vec<Lost>> + Send + 'a>>;

/// A publish a sink could neither hand to the broker connection nor spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Its topic.
    pub topic: String,
    /// Its QoS.
    pub qos: u8,
    /// Why.
    pub reason: String,
}

/// The capability behind `wasmgate:edge/mqtt-publisher`, host side.
pub trait PublishSink: Send + Sync + std::fmt::Debug {
    /// Takes the publishes of one successful invocation of `component`, in
    /// order. Resolves once each is handed to the broker connection, on disk
    /// waiting for it, or lost, with the lost ones (also counted and logged
    /// by the sink).
    fn publish<'a>(&'a self, component: &'a str, messages: Vec<MqttMessage>) -> SinkFuture<'a>;
}

/// The sink of a host without an MQTT connection: every publish is dropped,
/// counted and logged (`up` warns at start about the components that may
/// publish); these are not reported as lost, the configuration chose them.
#[derive(Debug, Default)]
pub struct NoConnection {
    /// Publishes dropped.
    pub dropped: AtomicU64,
}

impl PublishSink for NoConnection {
    fn publish<'a>(&'a self, component: &'a str, messages: Vec<MqttMessage>) -> SinkFuture<'a> {
        for m in &messages {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(component, topic = %m.topic, dropped, reason = "the host has no MQTT connection (add [mqtt])", "a guest publish was dropped");
        }
        Box::pin(std::future::ready(Vec::new()))
    }
}
