//! Topic filters from manifests and topic names from guests and devices:
//! parsing and matching must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmgate_manifest::topic::{TopicFilter, validate_name};

fuzz_target!(|data: (&str, &str)| {
    let (filter, name) = data;
    let _ = validate_name(name);
    if let Ok(f) = TopicFilter::parse(filter) {
        let _ = f.matches(name);
    }
});
