//! `publish-timer`: on every tick, publishes `tick <scheduled_at_ms>` (QoS 1)
//! to the topic in its `PUBLISH_TOPIC` environment variable (default
//! `ticks`). Shows that a timer guest's publishes reach the broker.

wasmgate_guest::bindings!("timer-app");

use exports::wasmgate::edge::timer_handler::{Guest, Tick};
use wasmgate::edge::mqtt_publisher::{PublishError, publish};
use wasmgate::edge::mqtt_types::{Message, Qos};
use wasmgate::edge::types::{HandlerError, Invocation};

struct PublishTimer;

impl Guest for PublishTimer {
    fn on_tick(_ctx: Invocation, tick: Tick) -> Result<(), HandlerError> {
        let topic = std::env::var("PUBLISH_TOPIC").unwrap_or_else(|_| "ticks".into());
        let message = Message {
            topic,
            payload: format!("tick {}", tick.scheduled_at_ms).into_bytes(),
            qos: Qos::AtLeastOnce,
            retain: false,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        publish(&message).map_err(|e| match e {
            PublishError::Denied(m) | PublishError::InvalidTopic(m) => HandlerError::Reject(m),
            PublishError::Unavailable(m) => HandlerError::Retry(m),
        })
    }
}

export!(PublishTimer);
