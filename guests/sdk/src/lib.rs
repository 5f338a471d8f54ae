//! Write wasmgate guest components in a few lines.
//!
//! `bindings!("WORLD")` generates, in your crate, the Rust bindings of one world
//! of the `wasmgate:edge` WIT package (`wit/edge.wit`): the handler trait you
//! implement, the types it takes, the host functions you may call, and an
//! `export!` macro that registers your type as the component's handler.
//!
//! | world       | you implement                                          | you may call                 |
//! |-------------|--------------------------------------------------------|------------------------------|
//! | `mqtt-app`  | `exports::wasmgate::edge::mqtt_handler::Guest`         | `wasmgate::edge::mqtt_publisher::publish` |
//! | `timer-app` | `exports::wasmgate::edge::timer_handler::Guest`        | `wasmgate::edge::mqtt_publisher::publish` |
//! | `kv-stream-app` | `exports::wasmgate::edge::kv_stream_handler::Guest` | `publish`, `wasi::keyvalue::*` |
//! | `http-app`  | `exports::wasi::http::incoming_handler::Guest`         | `wasi::http::*`, `publish`   |
//! | `event-app` | both MQTT and timer handlers                           |                              |
//! | `edge-app`  | all three                                              |                              |
//!
//! An MQTT handler that replies on the response topic:
//!
//! ```ignore
//! wasmgate_guest::bindings!("mqtt-app");
//!
//! use exports::wasmgate::edge::mqtt_handler::Guest;
//! use wasmgate::edge::mqtt_publisher::publish;
//! use wasmgate::edge::mqtt_types::Message;
//! use wasmgate::edge::types::{HandlerError, Invocation};
//!
//! struct Echo;
//!
//! impl Guest for Echo {
//!     fn handle_message(_ctx: Invocation, msg: Message) -> Result<(), HandlerError> {
//!         let Some(topic) = msg.response_topic.clone() else {
//!             return Err(HandlerError::Reject("no response topic".into()));
//!         };
//!         publish(&Message { topic, response_topic: None, ..msg })
//!             .map_err(|e| HandlerError::Retry(format!("{e:?}")))
//!     }
//! }
//!
//! export!(Echo);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the `.wasm`
//! in `target/wasm32-wasip2/release/` is the component. (`cargo component
//! build --release` works too and puts it in `target/wasm32-wasip1/release/`.)
//!
//! Anything written to stdout or stderr is captured by the host for that
//! invocation (bounded in size) and shown by `wasmgate invoke` and in the logs.

pub use wasmgate_guest_macro::bindings;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;
