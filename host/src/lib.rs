//! wasmgate: a WebAssembly component host for edge triggers.
//!
//! A tour of the modules, in the order an event meets them:
//!
//! - [`manifest`] reads `wasmgate.toml` and validates everything that can be
//!   checked without compiling code: unknown keys, sizes, durations, limits,
//!   topic filters, cron expressions, trigger → component references.
//! - [`limits`] holds the per-invocation limits (fuel, memory, timeout,
//!   concurrency) with their defaults and bounds.
//! - [`engine`] builds the one wasmtime `Engine`: pooling allocator when the
//!   address space allows it (else on-demand), fuel, and one epoch ticker.
//! - [`component`] compiles a component once (cached on disk, keyed by content
//!   hash and engine configuration), pre-instantiates it and records what it
//!   exports and imports.
//! - [`gateway`] loads a whole manifest: every component, then checks each
//!   trigger against what its component exports and each import against what
//!   the manifest grants.
//! - [`invoke`] runs one invocation: a fresh `Store` and instance under the
//!   component's limits, and one [`invoke::Outcome`] whatever happens.
//! - [`delivery`] retries failed asynchronous events with backoff, and hands
//!   those that fail for good to [`deadletter`], the durable dead-letter store
//!   behind `wasmgate dlq`; [`queue`] is the durable queue behind
//!   `wasmgate invoke --async`.
//! - [`trigger`] holds the event sources: the HTTP trigger (listener, TLS,
//!   the pure ALB-style router, the wasi:http bridge with instance reuse),
//!   the MQTT trigger (one broker connection, in-order acks after
//!   settlement, guest publishes) and the timer trigger (cron and intervals,
//!   time zones, overlap and catch-up policies).
//! - `broker` (feature `embedded-broker`, on by default) is the embedded MQTT
//!   broker for `[mqtt] broker = "embedded"`.
//! - [`topic`] is MQTT topic-filter validation and matching (pure logic).
//! - [`cli`] is the `wasmgate` command line.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod cli;
pub mod component;
pub mod deadletter;
pub mod delivery;
pub mod engine;
pub mod gateway;
pub mod invoke;
pub mod limits;
pub mod manifest;
pub mod outbox;
pub mod queue;
pub mod spool;
pub mod topic;
pub mod trigger;

mod bindings;
mod capture;
