//! `axum-hello ADDR`: the native baseline for `bench/http.sh`. Answers every
//! request exactly like the `hello-http` guest does — `200`,
//! `content-type: text/plain; charset=utf-8`,
//! `Hello from wasmgate: METHOD PATH?QUERY\n` — on a multi-threaded tokio
//! runtime (one worker per core), TCP_NODELAY like wasmgate, with nothing else in the way (no logging,
//! no middleware). Prints `listening on ADDR` once bound (`127.0.0.1:0`
//! picks a free port).

use axum::http::{Method, Uri, header};
use axum::response::IntoResponse;
use axum::serve::ListenerExt as _;

async fn hello(method: Method, uri: Uri) -> impl IntoResponse {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("Hello from wasmgate: {method} {path}\n"),
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    println!("listening on {}", listener.local_addr().unwrap());
    // Like wasmgate's listener: no Nagle delay on responses.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = axum::Router::new().fallback(hello);
    axum::serve(listener, app).await.unwrap();
}
