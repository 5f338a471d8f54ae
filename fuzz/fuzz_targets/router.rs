//! HTTP rules written by an operator and requests sent by anyone: building
//! the router must fail cleanly on bad rules, and routing a request must
//! end (in time linear in the request) whatever the rules and the request.
#![no_main]

use arbitrary::Arbitrary;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use wasmgate_manifest::Manifest;
use wasmgate_trigger_http::router::{RequestInfo, Router};

#[derive(Debug, Arbitrary)]
struct Rule {
    host: Option<String>,
    path: Option<String>,
    header: Option<(String, String)>,
    query: Option<(String, String)>,
    source: Option<String>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    rules: Vec<Rule>,
    method: String,
    host: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    source: [u8; 4],
}

/// A TOML basic string holding `s`.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fuzz_target!(|input: Input| {
    let mut text = String::from("[component.c]\nsource = \"c.wasm\"\n");
    for (i, r) in input.rules.iter().take(16).enumerate() {
        text.push_str(&format!(
            "[[trigger.http]]\npriority = {}\ncomponent = \"c\"\n",
            i + 1
        ));
        if let Some(h) = &r.host {
            text.push_str(&format!("host = {}\n", quoted(h)));
        }
        if let Some(p) = &r.path {
            text.push_str(&format!("path = {}\n", quoted(p)));
        }
        if let Some((k, v)) = &r.header {
            text.push_str(&format!("headers = {{ {} = {} }}\n", quoted(k), quoted(v)));
        }
        if let Some((k, v)) = &r.query {
            text.push_str(&format!("query = {{ {} = {} }}\n", quoted(k), quoted(v)));
        }
        if let Some(s) = &r.source {
            text.push_str(&format!("source_ip = {}\n", quoted(s)));
        }
    }
    let Ok(m) = Manifest::parse(Path::new("fuzz/wasmgate.toml"), text) else {
        return;
    };
    let Ok(router) = Router::build(&m) else {
        return;
    };
    let _ = router.warnings();
    let mut headers = HeaderMap::new();
    for (k, v) in input.headers.iter().take(32) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
    let req = RequestInfo {
        method: &input.method,
        host: &input.host,
        path: &input.path,
        query: &input.query,
        headers: &headers,
        source: std::net::IpAddr::from(input.source),
    };
    let _ = router.route(&req);
});
