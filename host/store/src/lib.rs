//! wasmgate-store: the host's durable state in `state_dir`, and the
//! at-least-once delivery built on it.
//!
//! - [`deadletter`]: the dead-letter store behind `wasmgate dlq`.
//! - [`keyvalue`]: the buckets guests open with `wasi:keyvalue`, group
//!   committed.
//! - [`queue`]: the durable queue behind `wasmgate invoke --async`, and its
//!   consumer.
//! - [`spool`]: MQTT publishes waiting for the broker.
//! - [`timer_state`]: each timer's last fire time, for catch-up.
//! - [`delivery`]: retries with backoff, then a committed dead letter.
//!
//! The SQLite files share one way to open them ([`sqlite::open`]): WAL mode,
//! `synchronous = FULL`, a busy timeout, a schema created if missing.

pub mod deadletter;
pub mod delivery;
pub mod keyvalue;
pub mod queue;
pub mod spool;
pub mod sqlite;
pub mod timer_state;
