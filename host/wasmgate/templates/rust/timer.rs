//! %%name%%: a heartbeat on a timer.
//!
//! Every tick publishes `{"component": ..., "schedule": ..., "fired_at_ms":
//! ..., "missed": ...}` to `heartbeat/<component>` at QoS 1, so whoever
//! watches the gateway sees it alive (and how many ticks it missed while it
//! was down). A heartbeat the host refuses to publish (not granted, or past
//! the invocation's publish budget) fails the tick without a retry.

wit_bindgen::generate!({
    world: "wasmgate:edge/timer-app",
    path: "wasmgate-wit",
    generate_all,
});

use exports::wasmgate::edge::timer_handler::{Guest, Tick};
use wasmgate::edge::mqtt_publisher::{PublishError, publish};
use wasmgate::edge::mqtt_types::{Message, Qos};
use wasmgate::edge::types::{HandlerError, Invocation};

struct Heartbeat;

impl Guest for Heartbeat {
    fn on_tick(ctx: Invocation, tick: Tick) -> Result<(), HandlerError> {
        let beat = serde_json::json!({
            "component": ctx.component,
            "schedule": tick.schedule,
            "fired_at_ms": tick.fired_at_ms,
            "missed": tick.missed,
        });
        println!("{} ({}): heartbeat, {} missed", ctx.id, tick.schedule, tick.missed);
        publish(&Message {
            topic: format!("heartbeat/{}", ctx.component),
            payload: beat.to_string().into_bytes(),
            qos: Qos::AtLeastOnce,
            retain: false,
            content_type: Some("application/json".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        })
        .map_err(|e| match e {
            PublishError::Denied(m) | PublishError::InvalidTopic(m) | PublishError::Unavailable(m) => {
                HandlerError::Reject(m)
            }
        })
    }
}

export!(Heartbeat);
