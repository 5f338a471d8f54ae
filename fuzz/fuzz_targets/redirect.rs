//! Redirect templates from manifests, rendered with request values from
//! clients: parsing fails cleanly, rendering never panics.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wasmgate_trigger_http::router::{RedirectInput, Template};

#[derive(Debug, Arbitrary)]
struct Input {
    template: String,
    host: String,
    port: u16,
    path: String,
    query: String,
    https: bool,
}

fuzz_target!(|input: Input| {
    if let Ok(t) = Template::parse(&input.template) {
        let _ = t.render(&RedirectInput {
            protocol: if input.https { "https" } else { "http" },
            host: &input.host,
            port: input.port,
            path: &input.path,
            query: &input.query,
        });
    }
});
