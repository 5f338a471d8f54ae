//! A manifest file from anywhere: parsing and validation (and the HTTP
//! rules, compiled as every command compiles them) must return an error,
//! never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use wasmgate_manifest::Manifest;
use wasmgate_manifest::limits::{HumanDuration, Size};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Size::parse(text);
    let _ = HumanDuration::parse(text);
    if let Ok(m) = Manifest::parse(Path::new("fuzz/wasmgate.toml"), text.to_string()) {
        let _ = wasmgate_trigger_http::router::Router::build(&m);
        let _ = wasmgate_trigger_timer::specs(&m);
    }
});
