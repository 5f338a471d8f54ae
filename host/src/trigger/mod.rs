//! Triggers: the event sources that invoke components.
//!
//! Each trigger keeps its pure logic (schedules, and later the HTTP router
//! and MQTT topic matching) apart from its I/O. Triggers run until a
//! `CancellationToken` is cancelled and spawn their deliveries on a shared
//! `TaskTracker`, so `wasmgate up` can stop accepting work and then drain.
//!
//! Built: [`timer`], [`http`] and [`mqtt`] (its pure logic in [`acks`]).

pub mod acks;
pub mod clock;
pub mod connection;
pub mod http;
pub mod mqtt;
pub mod publish;
pub mod schedule;
pub mod state;
pub mod timer;
