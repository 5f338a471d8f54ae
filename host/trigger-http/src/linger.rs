//! Lingering close: a connection closed with part of the request unread
//! (an answer given before the body was read: the host's 413, or a guest
//! that ignores the body) is half-closed, and what the client still sends
//! is read and discarded for a bounded time, before the socket closes.
//!
//! Closing a TCP socket with unread data in its receive buffer makes the
//! kernel send a reset instead of a FIN, and a reset can reach the client
//! before it has read the answer, which is then lost: the client sees
//! "connection reset" or "broken pipe" instead of the 413. Web servers
//! linger for this reason (nginx's `lingering_close`).
//!
//! The bounds: [`LINGER_TIME`] in all, [`LINGER_IDLE`] without a byte from
//! the client, [`LINGER_BYTES`] discarded; whichever comes first ends it.
//! The connection keeps its `max_connections` permit meanwhile, so lingering
//! connections are counted like any other.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Longest a closing connection reads and discards the client's data.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// A closing connection from which nothing arrives this long is closed.
pub const LINGER_IDLE: Duration = Duration::from_secs(1);
/// Most bytes a closing connection discards before it closes regardless.
pub const LINGER_BYTES: u64 = 64 << 20;

/// A stream whose shutdown lingers (see the module documentation).
pub struct Lingering<S> {
    inner: S,
    closing: Option<Closing>,
}

struct Closing {
    write_closed: bool,
    deadline: Pin<Box<Sleep>>,
    idle: Pin<Box<Sleep>>,
    discarded: u64,
}

impl<S> Lingering<S> {
    /// Wraps `inner`; nothing changes until it is shut down.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            closing: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Sends the FIN, then reads and discards until the client closes its
    /// side or a bound is reached. Read errors end it quietly: the answer
    /// has been written either way.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let closing = this.closing.get_or_insert_with(|| Closing {
            write_closed: false,
            deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
            idle: Box::pin(tokio::time::sleep(LINGER_IDLE)),
            discarded: 0,
        });
        if !closing.write_closed {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            closing.write_closed = true;
            closing.idle.as_mut().reset(Instant::now() + LINGER_IDLE);
        }
        let mut scratch = [0u8; 8192];
        loop {
            if closing.deadline.as_mut().poll(cx).is_ready()
                || closing.idle.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    closing.discarded += buf.filled().len() as u64;
                    if closing.discarded >= LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                    closing.idle.as_mut().reset(Instant::now() + LINGER_IDLE);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer still writing when the other side shuts down: the shutdown
    /// waits for its EOF, and the peer's writes all succeed.
    #[tokio::test]
    async fn shutdown_reads_until_the_peer_closes() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = Lingering::new(a);
        let writer = tokio::spawn(async move {
            for _ in 0..100 {
                b.write_all(&[1u8; 1000]).await.unwrap();
            }
            b.shutdown().await.unwrap();
            let mut rest = Vec::new();
            b.read_to_end(&mut rest).await.unwrap();
        });
        a.shutdown().await.unwrap();
        writer.await.unwrap();
    }

    /// A peer that neither writes nor closes is given up on after the idle
    /// bound; one that keeps writing, after the total bound.
    #[tokio::test(start_paused = true)]
    async fn shutdown_is_bounded_in_time() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut a = Lingering::new(a);
        let start = Instant::now();
        a.shutdown().await.unwrap();
        assert_eq!(start.elapsed(), LINGER_IDLE);

        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = Lingering::new(a);
        tokio::spawn(async move {
            while b.write_all(&[0u8; 10]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let start = Instant::now();
        a.shutdown().await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= LINGER_TIME && took < LINGER_TIME + LINGER_IDLE,
            "{took:?}"
        );
    }
}
