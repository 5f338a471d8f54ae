//! Paths of the guest components in `guests/`, built once by this crate's
//! build script for the tests and benchmarks.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));
