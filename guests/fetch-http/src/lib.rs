//! `fetch-http`: an HTTP guest that makes an outbound request.
//!
//! `GET /?authority=HOST:PORT` sends `GET http://HOST:PORT/` through
//! `wasi:http/outgoing-handler` and answers `200 upstream <status>`, or
//! `502 <error>` when the request fails (e.g. the host denied it because
//! HOST is not in `allow.outbound_http`).

wasmgate_guest::bindings!("http-app");

use exports::wasi::http::incoming_handler::Guest;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

struct Fetch;

fn fetch(authority: &str) -> Result<u16, ErrorCode> {
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_scheme(Some(&Scheme::Http))
        .expect("http is valid");
    request
        .set_authority(Some(authority))
        .map_err(|()| ErrorCode::InternalError(Some(format!("bad authority {authority:?}"))))?;
    request.set_path_with_query(Some("/")).expect("/ is valid");
    let response = outgoing_handler::handle(request, None)?;
    response.subscribe().block();
    let response = response
        .get()
        .expect("ready after block")
        .expect("taken once")?;
    Ok(response.status())
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(status).expect("valid status");
    let body = response.body().expect("body is taken once");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = body.write().expect("stream is taken once");
        stream
            .blocking_write_and_flush(text.as_bytes())
            .expect("client is reading");
    }
    OutgoingBody::finish(body, None).expect("body is complete");
}

impl Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let Some(authority) = path.split_once("authority=").map(|(_, a)| a.to_string()) else {
            return respond(out, 400, "missing ?authority=HOST:PORT\n");
        };
        match fetch(&authority) {
            Ok(status) => respond(out, 200, &format!("upstream {status}\n")),
            Err(e) => respond(out, 502, &format!("{e:?}\n")),
        }
    }
}

export!(Fetch);
