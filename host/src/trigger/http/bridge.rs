//! The guest bridge: one HTTP request through `wasi:http/incoming-handler`.
//!
//! The request body streams into the guest and the response body streams
//! out while the guest runs; the invocation (and its limits: fuel, memory,
//! deadline) lasts until the guest's `handle` returns. The response head goes
//! back to the client as soon as the guest sets it.
//!
//! With `reuse = N` a finished, healthy instance is kept and serves the next
//! request (one at a time), up to N requests; a failed one is dropped.

use crate::invoke::{Invocable, InvocationContext, Outcome, StoreRun, log_http_outcome};
use bytes::Bytes;
use hyper::body::Body;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::exports::wasi::http::incoming_handler::Guest;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// A component that answers HTTP, with its pool of warm instances.
pub struct HttpComponent {
    invocable: Arc<Invocable>,
    reuse: u32,
    warm: Mutex<Vec<Warm>>,
}

struct Warm {
    run: StoreRun,
    guest: Guest,
    served: u32,
}

/// What the bridge made of a request.
pub enum Served {
    /// The guest's response (its body may still be streaming).
    Response(hyper::Response<HyperOutgoingBody>),
    /// No usable response: the outcome says why (trap, limit, throttled,
    /// or a guest that set an error or no response at all).
    Failed(Box<Outcome>),
}

impl HttpComponent {
    /// `reuse` requests per instance (1: fresh per request).
    pub fn new(invocable: Arc<Invocable>, reuse: u32) -> Self {
        Self {
            invocable,
            reuse: reuse.max(1),
            warm: Mutex::new(Vec::new()),
        }
    }

    /// Runs the guest for `req` (an absolute-URI request). Never waits for a
    /// concurrency slot: none free → a throttled outcome.
    pub async fn serve<B>(
        self: &Arc<Self>,
        req: hyper::Request<B>,
        scheme: Scheme,
        ctx: InvocationContext,
    ) -> Served
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let Some(permit) = self.invocable.try_slot() else {
            let outcome = self.invocable.throttled(&ctx);
            log_http_outcome(&outcome);
            return Served::Failed(Box::new(outcome));
        };
        let started = Instant::now();
        let warm = if self.reuse > 1 {
            self.warm.lock().expect("warm pool").pop()
        } else {
            None
        };
        let (mut run, guest, served) = match warm {
            Some(w) => (w.run, Some(w.guest), w.served),
            None => (self.invocable.new_store(None), None, 0),
        };
        run.arm(&self.invocable, started);
        let (response_tx, response_rx) = tokio::sync::oneshot::channel();
        let resources = (|| {
            let mut http = run.store.data_mut().http();
            let req = http.new_incoming_request(scheme, req)?;
            let out = http.new_response_outparam(response_tx)?;
            wasmtime::Result::Ok((req, out))
        })();
        let (req, out) = match resources {
            Ok(r) => r,
            Err(e) => {
                let outcome = self.invocable.finish(&mut run, &ctx, started, Ok(Err(e)));
                log_http_outcome(&outcome);
                return Served::Failed(Box::new(outcome));
            }
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let _ticking = this.invocable.ticking();
            let mut guest = guest;
            let remaining = run.deadline.saturating_duration_since(Instant::now());
            let result = tokio::time::timeout(
                remaining,
                call(&this.invocable, &mut run, &mut guest, req, out),
            )
            .await;
            let healthy = matches!(result, Ok(Ok(())));
            let outcome =
                this.invocable
                    .finish(&mut run, &ctx, started, result.map(|r| r.map(|()| Ok(()))));
            log_http_outcome(&outcome);
            this.invocable.forward_publishes(&outcome);
            if healthy
                && served + 1 < this.reuse
                && let Some(guest) = guest
            {
                this.warm.lock().expect("warm pool").push(Warm {
                    run,
                    guest,
                    served: served + 1,
                });
            }
            drop(permit);
            let _ = done_tx.send(outcome);
        });
        let mut done_rx = done_rx;
        tokio::select! {
            biased;
            response = response_rx => match response {
                Ok(Ok(response)) => Served::Response(response),
                Ok(Err(code)) => {
                    let mut outcome = done_rx.await.expect("the invocation task reports its outcome");
                    guest_error(&mut outcome, &code);
                    Served::Failed(Box::new(outcome))
                }
                Err(_) => Served::Failed(Box::new(done_rx.await.expect("the invocation task reports its outcome"))),
            },
            outcome = &mut done_rx => {
                let mut outcome = outcome.expect("the invocation task reports its outcome");
                if outcome.is_ok() {
                    outcome.status = crate::invoke::Status::Trap {
                        message: "the guest returned without setting a response".into(),
                    };
                }
                Served::Failed(Box::new(outcome))
            }
        }
    }
}

/// A guest that answered with an `error-code` instead of a response.
fn guest_error(outcome: &mut Outcome, code: &ErrorCode) {
    if outcome.is_ok() {
        outcome.status = crate::invoke::Status::Trap {
            message: format!("the guest answered with an error: {code:?}"),
        };
    }
}

async fn call(
    invocable: &Invocable,
    run: &mut StoreRun,
    guest: &mut Option<Guest>,
    req: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostIncomingRequest>,
    out: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostResponseOutparam>,
) -> wasmtime::Result<()> {
    if guest.is_none() {
        let Some(indices) = invocable.http_indices() else {
            wasmtime::bail!("the component does not export wasi:http/incoming-handler");
        };
        let instance = invocable.pre().instantiate_async(&mut run.store).await?;
        *guest = Some(indices.load(&mut run.store, &instance)?);
    }
    let handler = guest.as_ref().expect("instantiated above");
    handler.call_handle(&mut run.store, req, out).await
}
