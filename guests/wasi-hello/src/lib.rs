//! `wasi-hello`: a wasi:http hello world built with someone else's toolchain —
//! the upstream `wasi` crate's proxy world and its `export!` macro, not the
//! wasmgate SDK. It is what a developer would write for `wasmtime serve`; the
//! tests run it unchanged under wasmgate.
//!
//! - every path: `200 hello from an upstream wasi guest: METHOD PATH`;
//! - `/body`: `200` with the request body it read (streamed in, streamed out);
//! - a request header `x-echo` comes back as the response header `x-echo`.

use std::io::Read as _;

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Component;

wasi::http::proxy::export!(Component);

impl Guest for Component {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = method_name(&request.method());
        let path = request.path_with_query().unwrap_or_default();

        let mut headers: Vec<(String, Vec<u8>)> = vec![(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )];
        for value in request.headers().get("x-echo") {
            headers.push(("x-echo".to_string(), value));
        }

        let body = if path == "/body" || path.starts_with("/body?") {
            match read_body(request) {
                Ok(body) => body,
                Err(message) => {
                    respond(response_out, 400, &headers, message.as_bytes());
                    return;
                }
            }
        } else {
            format!("hello from an upstream wasi guest: {method} {path}\n").into_bytes()
        };
        respond(response_out, 200, &headers, &body);
    }
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

/// Reads the whole request body through its input stream.
fn read_body(request: IncomingRequest) -> Result<Vec<u8>, String> {
    let incoming = request
        .consume()
        .map_err(|()| "request body already taken\n".to_string())?;
    let mut body = Vec::new();
    {
        let mut stream = incoming
            .stream()
            .map_err(|()| "request body stream already taken\n".to_string())?;
        stream
            .read_to_end(&mut body)
            .map_err(|e| format!("reading the request body failed: {e}\n"))?;
    }
    // The stream is dropped: the body (and its trailers) can finish.
    drop(IncomingBody::finish(incoming));
    Ok(body)
}

fn respond(
    response_out: ResponseOutparam,
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
) {
    let fields = Fields::from_list(headers).expect("response headers are valid");
    let response = OutgoingResponse::new(fields);
    response
        .set_status_code(status)
        .expect("the status code is valid");
    let outgoing = response.body().expect("the body is taken once");
    ResponseOutparam::set(response_out, Ok(response));
    {
        let mut stream = outgoing.write().expect("the stream is taken once");
        // A client that went away is not the guest's problem: stop writing.
        // (`std::io::Write`, which waits for room; the inherent `write` and
        // `flush` of the stream do not block.)
        let written = std::io::Write::write_all(&mut stream, body)
            .and_then(|()| std::io::Write::flush(&mut stream));
        if written.is_err() {
            return;
        }
    }
    OutgoingBody::finish(outgoing, None).expect("the body is complete");
}
