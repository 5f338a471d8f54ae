//! %%name%%: a JSON echo over HTTP, on the standard `wasi:http` interface
//! (the same component runs under `wasmtime serve`).
//!
//! Any method and path: a body of JSON comes back as
//! `{"method": ..., "path": ..., "echo": <the body>}` with 200 (`"echo": null`
//! for no body); a body that is not JSON gets 400, one over 64 KiB gets 413,
//! each with `{"error": ...}`.

wit_bindgen::generate!({
    world: "wasmgate:edge/http-app",
    path: "wasmgate-wit",
    generate_all,
});

use exports::wasi::http::incoming_handler::Guest;
use serde_json::{Value, json};
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::StreamError;

/// The largest body read; a longer one is answered 413.
const MAX_BODY: usize = 64 * 1024;

struct Echo;

impl Guest for Echo {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Patch => "PATCH".to_string(),
            Method::Options => "OPTIONS".to_string(),
            Method::Connect => "CONNECT".to_string(),
            Method::Trace => "TRACE".to_string(),
            Method::Other(m) => m,
        };
        let path = request.path_with_query().unwrap_or_default();
        let (status, reply) = match read_body(request) {
            Err((status, error)) => (status, json!({"error": error})),
            Ok(body) if body.is_empty() => (200, json!({"method": method, "path": path, "echo": null})),
            Ok(body) => match serde_json::from_slice::<Value>(&body) {
                Ok(echo) => (200, json!({"method": method, "path": path, "echo": echo})),
                Err(e) => (400, json!({"error": format!("body is not JSON: {e}")})),
            },
        };
        println!("{method} {path} -> {status}");
        respond(response_out, status, reply.to_string().as_bytes());
    }
}

/// The request's body, or the status and error to answer with: 413 when it
/// is longer than [`MAX_BODY`], 400 when it cannot be read to its end.
fn read_body(request: IncomingRequest) -> Result<Vec<u8>, (u16, String)> {
    let Ok(body) = request.consume() else {
        return Ok(Vec::new());
    };
    let mut bytes = Vec::new();
    {
        let stream = body.stream().expect("the stream is taken once");
        loop {
            match stream.blocking_read(16 * 1024) {
                Ok(chunk) if bytes.len() + chunk.len() > MAX_BODY => {
                    return Err((413, format!("body over {MAX_BODY} bytes")));
                }
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err((400, format!("body not read: {}", e.to_debug_string())));
                }
            }
        }
    }
    Ok(bytes)
}

fn respond(response_out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".into(), b"application/json".to_vec())])
        .expect("a valid header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let outgoing = response.body().expect("the body is taken once");
    ResponseOutparam::set(response_out, Ok(response));
    {
        let stream = outgoing.write().expect("the stream is taken once");
        // A blocking write takes at most 4096 bytes at a time.
        for chunk in body.chunks(4096) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                return; // the client went away
            }
        }
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

export!(Echo);
