//! wasmgate: a WebAssembly component host for edge triggers — the binary's
//! library: the command line and the composition root.
//!
//! The host is a few crates whose dependencies point one way (checked by
//! `tests/e2e/layout.rs`); a tour, in the order an event meets them:
//!
//! - `wasmgate-manifest` reads `wasmgate.toml` and validates everything that
//!   can be checked without compiling code (pure: no runtime, no I/O beyond
//!   reading the file): keys, sizes, durations, limits, topic filters, cron
//!   expressions, broker URLs, references between sections.
//! - `wasmgate-runtime` is the one invocation path: the engine, the component
//!   cache, the deployment (components compiled and checked against their
//!   triggers and grants), `Invocable::invoke` (a fresh or warm instance under
//!   the limits, one outcome), the publish-sink capability and the `Trigger`
//!   trait.
//! - `wasmgate-store` holds the durable state in `state_dir` (dead letters,
//!   the async queue, the MQTT spool, timer state) and the at-least-once
//!   delivery built on it (retries, then a committed dead letter).
//! - `wasmgate-trigger-http`, `wasmgate-trigger-mqtt`,
//!   `wasmgate-trigger-timer` are the event sources; each keeps its pure
//!   logic (router, ack order, schedules) apart from its I/O, and none
//!   depends on another.
//! - this crate: [`cli`] parses the command line; [`up`] is the composition
//!   root ([`up::Gateway`]), with [`metrics`] and the [`admin`] listener;
//!   [`check`], [`invoke`], [`dlq`], [`wit`],
//!   [`new`] and [`sign`] (keygen, sign, verify) are the other commands.

pub mod admin;
pub mod check;
pub mod cli;
pub mod deploy;
pub mod dlq;
pub mod dlq_api;
pub mod invoke;
pub mod kv;
pub mod metrics;
pub mod new;
pub mod page;
pub mod reload;
pub mod sign;
pub mod status;
pub mod up;
pub mod wit;
