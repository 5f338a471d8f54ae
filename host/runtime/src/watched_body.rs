//! A response body that notices when it is dropped before its end.
//!
//! An HTTP guest streams its response body while it runs. When the client
//! goes away first (or hyper stops reading, as for a `HEAD` request), the
//! body is dropped with frames still to come, and the guest's next write
//! fails; a guest that treats that as fatal (Rust's `expect`, say) traps.
//! That trap is the client's doing, not a fault of the component: the
//! invocation is then classified `client_closed`, not `trap`, so a client
//! that hangs up early can neither fill a component's failure counts nor
//! weigh in a deploy's watch. (The body is also dropped when the gateway
//! stops waiting for the response: `request_timeout`, or a request body
//! past `max_body`.) Responses that carry no body on the wire (`HEAD`,
//! 204, 304) are not watched: [`without_body`] drains them.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// Wraps a guest's response body; `gone` is set when it is dropped before
/// its last frame.
pub(crate) struct WatchedBody {
    inner: HyperOutgoingBody,
    ended: bool,
    gone: Arc<AtomicBool>,
}

impl WatchedBody {
    /// `inner`, watched through `gone`.
    pub(crate) fn wrap(inner: HyperOutgoingBody, gone: Arc<AtomicBool>) -> HyperOutgoingBody {
        use http_body_util::BodyExt;
        WatchedBody {
            inner,
            ended: false,
            gone,
        }
        .boxed_unsync()
    }
}

/// A response that carries no body on the wire (to a `HEAD` request, or a
/// 204 or 304): hyper would drop the guest's body unread and the guest's
/// next write would fail. Its body is read and discarded instead (as long
/// as the guest writes: its limits bound that), so the guest runs as it
/// would for a `GET`; the client gets the head.
pub(crate) fn without_body(
    response: hyper::Response<HyperOutgoingBody>,
) -> hyper::Response<HyperOutgoingBody> {
    use http_body_util::BodyExt;
    let (parts, mut body) = response.into_parts();
    tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
    let empty = http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    hyper::Response::from_parts(parts, empty)
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        if !self.ended && !self.inner.is_end_stream() {
            self.gone.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn body(text: &'static str) -> HyperOutgoingBody {
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_is_not_gone() {
        let gone = Arc::new(AtomicBool::new(false));
        let b = WatchedBody::wrap(body("hello"), gone.clone());
        assert_eq!(b.collect().await.unwrap().to_bytes(), "hello");
        assert!(!gone.load(Ordering::Relaxed));
    }

    #[test]
    fn a_body_dropped_unread_is_gone() {
        let gone = Arc::new(AtomicBool::new(false));
        drop(WatchedBody::wrap(Unended.boxed_unsync(), gone.clone()));
        assert!(gone.load(Ordering::Relaxed));
    }

    /// A streaming body whose guest has not finished it.
    struct Unended;

    impl Body for Unended {
        type Data = Bytes;
        type Error = wasmtime_wasi_http::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>> {
            Poll::Pending
        }
    }
}
