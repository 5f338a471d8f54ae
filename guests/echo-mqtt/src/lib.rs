//! `echo-mqtt`: replies to every message with the same payload.
//!
//! The reply goes to the message's MQTT 5 response topic (with its
//! correlation data copied), which the component's `allow.mqtt_response`
//! must grant, or else to `<topic>/reply`, which `allow.mqtt_publish` must.

wasmgate_guest::bindings!("mqtt-app");

use exports::wasmgate::edge::mqtt_handler::Guest;
use wasmgate::edge::mqtt_publisher::{PublishError, publish};
use wasmgate::edge::mqtt_types::Message;
use wasmgate::edge::types::{HandlerError, Invocation};

struct Echo;

impl Guest for Echo {
    fn handle_message(ctx: Invocation, msg: Message) -> Result<(), HandlerError> {
        let topic = match &msg.response_topic {
            Some(t) => t.clone(),
            None => format!("{}/reply", msg.topic),
        };
        println!(
            "echo {} bytes from {} to {} (invocation {}, attempt {})",
            msg.payload.len(),
            msg.topic,
            topic,
            ctx.id,
            ctx.attempt
        );
        let reply = Message {
            topic,
            response_topic: None,
            retain: false,
            ..msg
        };
        publish(&reply).map_err(|e| match e {
            PublishError::Denied(m) | PublishError::InvalidTopic(m) => HandlerError::Reject(m),
            PublishError::Unavailable(m) => HandlerError::Retry(m),
        })
    }
}

export!(Echo);
