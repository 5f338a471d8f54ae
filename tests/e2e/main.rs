//! End-to-end tests: real guests built from `guests/`, the real `wasmgate`
//! binary, and the host library's invocation path.

// An end-to-end test reads as one scenario, start to finish.
#![allow(clippy::too_many_lines)]
mod admin;
#[cfg(feature = "embedded-broker")]
mod broker;
mod cache;
mod cli;
mod deploy;
mod dlq;
mod examples;
mod http;
mod keyvalue;
mod kvstream;
mod layout;
mod limits;
mod manifest;
mod mqtt;
mod pause;
mod reload;
mod service;
mod signing;
#[cfg(feature = "embedded-broker")]
mod templates;
mod timer;
mod util;
