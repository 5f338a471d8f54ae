//! `hello-http`: the smallest wasi:http guest. Answers every request with
//! `200 Hello from wasmgate` and the request's method and path.

wasmgate_guest::bindings!("http-app");

use exports::wasi::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Other(m) => m,
            other => format!("{other:?}").to_uppercase(),
        };
        let path = request.path_with_query().unwrap_or_default();
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .expect("static header is valid");
        let response = OutgoingResponse::new(headers);
        response
            .set_status_code(200)
            .expect("200 is a valid status");
        let body = response.body().expect("body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let text = format!("Hello from wasmgate: {method} {path}\n");
        {
            let stream = body.write().expect("stream is taken once");
            stream
                .blocking_write_and_flush(text.as_bytes())
                .expect("client is reading");
        }
        OutgoingBody::finish(body, None).expect("body is complete");
    }
}

export!(Hello);
