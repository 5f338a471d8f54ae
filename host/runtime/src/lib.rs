//! wasmgate-runtime: the one invocation path every trigger uses.
//!
//! - [`engine`] builds the one wasmtime `Engine`: pooling allocator when the
//!   address space allows it (else on-demand), fuel, and one epoch ticker.
//! - [`component`] compiles a component once (cached on disk, keyed by content
//!   hash and engine configuration), pre-instantiates it and records what it
//!   exports and imports.
//! - [`deployment`] loads a whole manifest: every component, then checks each
//!   trigger against what its component exports and each import against what
//!   the manifest grants.
//! - [`invoke`] runs one invocation: a fresh `Store` and instance (or a warm
//!   one with `reuse`) under the component's limits, and one
//!   [`invoke::Outcome`] whatever happens, for every kind of event — an MQTT
//!   message, a timer tick, a buffered HTTP request or a streaming
//!   `wasi:http` exchange from the HTTP trigger.
//! - [`sink`] is the host capability a guest's publishes go to: one
//!   [`sink::PublishSink`], injected by the composition root, whatever
//!   trigger ran the guest.
//! - [`keyvalue`] is `wasi:keyvalue` for guests: grants and the
//!   per-invocation budget here, the data in a [`keyvalue::KeyValue`] backend
//!   injected like the publish sink.
//! - [`metrics`] counts invocations for Prometheus, on the same path.
//! - [`trigger`] is the trait every event source implements.

pub mod component;
pub mod deployment;
pub mod engine;
pub mod event;
pub mod invoke;
pub mod keyvalue;
pub mod metrics;
pub mod signature;
pub mod sink;
pub mod trigger;

mod bindings;
mod capture;
mod watched_body;
