//! %%name%%: an MQTT thermostat.
//!
//! Devices publish readings such as `{"celsius": 18.5}` to
//! `devices/<id>/temperature`. The handler decides whether the heating should
//! run and publishes the command to `devices/<id>/heating` at QoS 1:
//! `{"on":true,"celsius":18.5,"setpoint":20.5}`. A payload that is not
//! such a reading is rejected (dead-lettered at once, never retried), and so
//! is a command the host refuses to publish (not granted, or past this
//! invocation's publish budget: retrying would not change that).

wit_bindgen::generate!({
    world: "wasmgate:edge/mqtt-app",
    path: "wasmgate-wit",
    generate_all,
});

use exports::wasmgate::edge::mqtt_handler::Guest;
use wasmgate::edge::mqtt_publisher::{PublishError, publish};
use wasmgate::edge::mqtt_types::{Message, Qos};
use wasmgate::edge::types::{HandlerError, Invocation};

const SETPOINT: f64 = 20.5;
const HYSTERESIS: f64 = 0.5;

struct Thermostat;

impl Guest for Thermostat {
    fn handle_message(ctx: Invocation, msg: Message) -> Result<(), HandlerError> {
        let device = match msg.topic.split('/').collect::<Vec<_>>()[..] {
            ["devices", id, "temperature"] => id.to_string(),
            _ => return Err(reject(format!("unexpected topic {}", msg.topic))),
        };
        let reading: serde_json::Value = serde_json::from_slice(&msg.payload)
            .map_err(|e| reject(format!("not a reading: {e}")))?;
        let celsius = reading["celsius"]
            .as_f64()
            .ok_or_else(|| reject("not a reading: no numeric celsius".into()))?;

        let on = celsius < SETPOINT - HYSTERESIS;
        let command = serde_json::json!({"on": on, "celsius": celsius, "setpoint": SETPOINT});
        println!(
            "{} attempt {}: {} {celsius} C -> heating {}",
            ctx.id,
            ctx.attempt,
            msg.topic,
            if on { "on" } else { "off" }
        );
        publish(&Message {
            topic: format!("devices/{device}/heating"),
            payload: command.to_string().into_bytes(),
            qos: Qos::AtLeastOnce,
            retain: false,
            content_type: Some("application/json".into()),
            response_topic: None,
            correlation_data: msg.correlation_data,
            user_properties: Vec::new(),
        })
        .map_err(|e| match e {
            PublishError::Denied(m) | PublishError::InvalidTopic(m) | PublishError::Unavailable(m) => {
                reject(m)
            }
        })
    }
}

fn reject(reason: String) -> HandlerError {
    HandlerError::Reject(reason)
}

export!(Thermostat);
