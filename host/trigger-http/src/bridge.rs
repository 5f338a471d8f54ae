//! The guest bridge: one HTTP request through `wasi:http/incoming-handler`,
//! on the runtime's one invocation path.
//!
//! The request body streams into the guest and the response body streams
//! out while the guest runs; the invocation (and its limits: fuel, memory,
//! deadline) lasts until the guest's `handle` returns, in a task of its own.
//! The response head goes back to the client as soon as the guest sets it.
//! Instance reuse (`reuse = N`), outcomes, logging and publishing are the
//! runtime's, as for every other trigger.

use bytes::Bytes;
use hyper::body::Body;
use std::sync::Arc;
use wasmgate_runtime::invoke::{
    Admission, HttpExchange, Invocable, InvocationContext, Outcome, Scheme,
};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// What the bridge made of a request.
pub enum Served {
    /// The guest's response (its body may still be streaming).
    Response(hyper::Response<HyperOutgoingBody>),
    /// No usable response: the outcome says why (trap, limit, throttled,
    /// or a guest that set an error or no response at all).
    Failed(Box<Outcome>),
}

/// Runs `component` for `req` (an absolute-URI request). Never waits for a
/// concurrency slot: none free → a throttled outcome.
pub async fn serve<B>(
    component: &Arc<Invocable>,
    req: hyper::Request<B>,
    scheme: Scheme,
    ctx: InvocationContext,
) -> Served
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let (response_tx, response_rx) = tokio::sync::oneshot::channel();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let exchange = HttpExchange::new(req, scheme, response_tx);
    let component = component.clone();
    tokio::spawn(async move {
        let outcome = component.invoke(exchange, ctx, Admission::Reject).await;
        let _ = done_tx.send(outcome);
    });
    const REPORTS: &str = "the invocation task reports its outcome";
    tokio::select! {
        biased;
        response = response_rx => match response {
            Ok(Ok(response)) => Served::Response(response),
            // An error code, or no answer at all: the outcome says why.
            _ => Served::Failed(Box::new(done_rx.await.expect(REPORTS))),
        },
        outcome = &mut done_rx => Served::Failed(Box::new(outcome.expect(REPORTS))),
    }
}
