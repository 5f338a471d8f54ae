//! End-to-end tests: real guests built from `guests/`, the real `wasmgate`
//! binary, and the host library's invocation path.

#[cfg(feature = "embedded-broker")]
mod broker;
mod cache;
mod cli;
mod dlq;
mod http;
mod limits;
mod manifest;
mod mqtt;
mod timer;
mod util;
