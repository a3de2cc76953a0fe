//! Accepting and serving connections (HTTP/1.1 over hyper), with the limits a server facing other
//! programs needs and that `axum::serve` does not set:
//! - at most `max_connections` at once: beyond, a connection gets a short 503 and is closed;
//! - request headers must arrive within `header_read_timeout` (slowloris; idle keep-alive
//!   connections close after it too);
//! - a client that stops reading (its TCP window stays full for `write_timeout`) is disconnected:
//!   its response is dropped, which cancels its sequences and frees their KV blocks; the kernel
//!   send buffer is capped (256 KB) so that this happens after a few hundred tokens, not megabytes;
//! - on shutdown no new connection is accepted, every open one is told to close after its current
//!   response, `drain` runs (the in-flight requests' grace period), and whatever connection is still
//!   open a moment later is closed, so a stalled client cannot keep the process alive.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Sleep;

/// Connection limits (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
    /// Each connection's kernel send buffer (`SO_SNDBUF`). Linux grows it up to 4 MB for a client
    /// that stops reading; capped, a stalled client costs little memory and is noticed after a few
    /// hundred tokens (token streams need far less to run at full speed).
    pub send_buffer: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            send_buffer: 256 << 10,
        }
    }
}

/// How long connections may take to close once `drain` is done.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Bytes hyper buffers per connection (request heads must fit; responses queue at most this much
/// before the body stops being polled).
const HTTP_BUFFER: usize = 64 << 10;
/// Refusals (503 at the connection limit) being written at once; beyond, sockets are just closed.
const MAX_REFUSALS: usize = 64;

/// Serves `app` on `listener` until `shutdown` completes, then drains (see the module docs).
pub async fn serve_connections<S, D>(listener: TcpListener, app: Router, limits: ConnLimits, shutdown: S, drain: D)
where
    S: Future<Output = ()>,
    D: Future<Output = ()>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(limits.send_buffer);
                    match slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let conn = serve_one(stream, app.clone(), limits, closing_rx.clone());
                            tasks.spawn(async move {
                                conn.await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                                tasks.spawn(async move {
                                    refuse(stream, limits.max_connections).await;
                                    drop(permit);
                                });
                            }
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drain.await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if !tasks.is_empty() {
        tracing::info!("closing {} connections that did not finish", tasks.len());
        tasks.shutdown().await;
    }
}

/// One connection, until the client closes it, a limit closes it, or shutdown.
async fn serve_one(stream: TcpStream, app: Router, limits: ConnLimits, mut closing: watch::Receiver<bool>) {
    let io = TokioIo::new(WriteDeadline::new(stream, limits.write_timeout));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(HTTP_BUFFER);
    let conn = http.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut told = *closing.borrow();
    if told {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            changed = closing.changed(), if !told => {
                if changed.is_err() || *closing.borrow() {
                    told = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = format!(
        "{{\"error\":{{\"message\":\"the server has too many open connections (--max-connections {max}); retry shortly\",\"type\":\"server_error\",\"code\":503}}}}"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes, so that closing with its request unread
        // does not reset the connection before it has read the answer.
        let mut sink = [0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// A stream whose writes fail with `TimedOut` once they have been blocked for `timeout` (the peer
/// stopped reading and the socket's buffers are full).
pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout, blocked: None }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.blocked = None;
            return r;
        }
        let timeout = self.timeout;
        let sleep = self.blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}; disconnected"),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that never reads: the writer fails after the timeout instead of waiting forever.
    #[tokio::test]
    async fn a_blocked_write_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, Duration::from_millis(100));
        let t = std::time::Instant::now();
        let big = vec![7u8; 4096];
        let err = w.write_all(&big).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(100) && t.elapsed() < Duration::from_secs(5));
    }

    /// A slow but steady reader is never cut off: each write that progresses restarts the clock.
    #[tokio::test]
    async fn a_slow_reader_is_served() {
        let (a, mut b) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 4096 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                got += tokio::io::AsyncReadExt::read(&mut b, &mut buf).await.unwrap();
            }
            got
        });
        let mut w = WriteDeadline::new(a, Duration::from_millis(100));
        w.write_all(&vec![7u8; 4096]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 4096);
    }
}
