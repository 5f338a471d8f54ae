//! End-to-end tests: real guests built from `guests/`, the real `wasmgate`
//! binary, and the host library's invocation path.

mod cache;
mod cli;
mod dlq;
mod http;
mod limits;
mod manifest;
mod timer;
mod util;
