//! A TCP listener for the HTTP servers that stops accepting on request without resetting the
//! connections the kernel has already accepted on its behalf, and serves HTTPS when given a TLS
//! acceptor (`crate::tls`).
//!
//! Dropping a listening socket resets every connection still in its accept queue: the client
//! connected, may have sent its request, and gets "connection reset" instead of an answer or a
//! clean refusal. So on close this listener first accepts (without waiting) whatever the queue
//! holds and hands those connections to the server, then closes the socket: from then on
//! clients are refused at connect, which they can safely retry elsewhere.
//!
//! A connection the server accepted but has not read from yet is closed, unread, by a graceful
//! shutdown (to the server it is an idle keep-alive connection), which resets it too. So the
//! listener keeps track of those ([`Connection`]), and the server waits until none accepted in
//! the last [`FRESH`] is left unread before its graceful shutdown
//! ([`ListenerCloser::wait_until_read`]). Older unread connections are spares a client's pool
//! opened and keeps idle: waiting for them would only delay the shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A connection accepted this recently and not read from yet is waited for at shutdown: its
/// client connected to send a request, which is on its way.
pub const FRESH: Duration = Duration::from_millis(250);

/// The accepted connections not read from yet, by number, with when they were accepted.
#[derive(Default)]
struct Unread {
    next: AtomicU64,
    accepted: parking_lot::Mutex<HashMap<u64, Instant>>,
}

/// The listener side; give it to `axum::serve` (through `ListenerExt::tap_io`, which lets the
/// handlers see the peer address).
pub struct ClosableListener {
    state: State,
    close: CancellationToken,
    closed: CancellationToken,
    unread: Arc<Unread>,
    /// HTTPS: each connection's handshake runs on its first read ([`crate::tls::LazyTls`]).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A connection as the HTTP server sees it: plain, or TLS over it. A TLS connection counts as
/// unread until its first read of decrypted data returns (the handshake's reads do not count:
/// the request is still on its way then).
pub enum HttpIo {
    Plain(Connection),
    Tls(Box<crate::tls::LazyTls<Connection>>, Unmarked),
}

/// A connection's place among the unread, until it is read from.
pub struct Unmarked(Option<(Arc<Unread>, u64)>);

impl Unmarked {
    fn mark(&mut self) {
        if let Some((unread, number)) = self.0.take() {
            unread.accepted.lock().remove(&number);
        }
    }
}

impl Drop for Unmarked {
    fn drop(&mut self) {
        self.mark();
    }
}

enum State {
    Open(TcpListener),
    /// Closing: accepting what the kernel queued before the socket is closed.
    Draining(std::net::TcpListener),
    Closed,
}

/// Closes a [`ClosableListener`] from outside.
#[derive(Clone)]
pub struct ListenerCloser {
    close: CancellationToken,
    closed: CancellationToken,
    unread: Arc<Unread>,
}

/// An accepted connection, counted as unread until its first read returns (data, end of
/// stream or an error).
pub struct Connection {
    stream: TcpStream,
    /// Its place among the unread, until the first read returns.
    unread: Unmarked,
}

impl ClosableListener {
    pub fn new(listener: TcpListener) -> (ClosableListener, ListenerCloser) {
        let (close, closed) = (CancellationToken::new(), CancellationToken::new());
        let unread = Arc::new(Unread::default());
        let closer = ListenerCloser { close: close.clone(), closed: closed.clone(), unread: unread.clone() };
        (ClosableListener { state: State::Open(listener), close, closed, unread, tls: None }, closer)
    }

    /// Serves HTTPS with `acceptor` instead of plain HTTP.
    pub fn with_tls(mut self, acceptor: Option<tokio_rustls::TlsAcceptor>) -> ClosableListener {
        self.tls = acceptor;
        self
    }

    fn counted(&self, (stream, peer): (TcpStream, SocketAddr)) -> (HttpIo, SocketAddr) {
        let number = self.unread.next.fetch_add(1, Ordering::Relaxed);
        self.unread.accepted.lock().insert(number, Instant::now());
        let place = Unmarked(Some((self.unread.clone(), number)));
        let io = match &self.tls {
            None => HttpIo::Plain(Connection { stream, unread: place }),
            Some(acceptor) => {
                let connection = Connection { stream, unread: Unmarked(None) };
                HttpIo::Tls(Box::new(crate::tls::LazyTls::new(acceptor, connection)), place)
            }
        };
        (io, peer)
    }

    /// The next connection the kernel already completed, once closing; `None` when there is
    /// none left, after which the socket is closed.
    fn next_queued(&mut self) -> Option<(TcpStream, SocketAddr)> {
        if let State::Open(_) = self.state {
            let State::Open(listener) = std::mem::replace(&mut self.state, State::Closed) else { return None };
            // Out of the reactor, non-blocking: `accept` answers WouldBlock once the queue is empty.
            match listener.into_std() {
                Ok(listener) => self.state = State::Draining(listener),
                Err(error) => tracing::warn!(error = %error, "listener not drained before closing"),
            }
        }
        if let State::Draining(listener) = &self.state {
            while let Ok((stream, peer)) = listener.accept() {
                match stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream)) {
                    Ok(stream) => return Some((stream, peer)),
                    Err(error) => tracing::debug!(error = %error, "queued connection dropped"),
                }
            }
        }
        self.state = State::Closed;
        self.closed.cancel();
        None
    }
}

impl axum::serve::Listener for ClosableListener {
    type Io = HttpIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (HttpIo, SocketAddr) {
        loop {
            if self.close.is_cancelled() {
                if let Some(connection) = self.next_queued() {
                    return self.counted(connection);
                }
                // Closed: the server stops waiting for connections when its shutdown signal fires.
                std::future::pending::<()>().await;
            }
            let State::Open(listener) = &self.state else {
                std::future::pending::<()>().await;
                continue;
            };
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(connection) => return self.counted(connection),
                    // Per-connection errors and running out of file descriptors are passing:
                    // axum's own listener waits a little and goes on as well.
                    Err(error) => {
                        tracing::debug!(error = %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = self.close.cancelled() => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.state {
            State::Open(listener) => listener.local_addr(),
            State::Draining(listener) => listener.local_addr(),
            State::Closed => Err(io::Error::new(io::ErrorKind::NotConnected, "listener closed")),
        }
    }
}

impl ListenerCloser {
    /// Stops accepting: serves what the kernel has queued, then closes the socket. Waits (up to
    /// `bound`) until the socket is closed; a server that no longer polls its listener (it
    /// already stopped) closes it by dropping it.
    pub async fn close(&self, bound: Duration) {
        self.close.cancel();
        let _ = tokio::time::timeout(bound, self.closed.cancelled()).await;
    }

    /// Waits (up to `bound`) until the server has read from every connection accepted in the
    /// last [`FRESH`], so that a graceful shutdown finds their requests under way rather than
    /// closing them unread.
    pub async fn wait_until_read(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        let waiting = || self.unread.accepted.lock().values().any(|at| at.elapsed() < FRESH);
        while waiting() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if polled.is_ready() {
            this.unread.mark();
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl AsyncRead for HttpIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            HttpIo::Tls(io, unmarked) => {
                let polled = Pin::new(io.as_mut()).poll_read(cx, buf);
                if polled.is_ready() {
                    unmarked.mark();
                }
                polled
            }
        }
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HttpIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            HttpIo::Tls(io, _) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HttpIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            HttpIo::Tls(io, _) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HttpIo::Plain(io) => io.is_write_vectored(),
            HttpIo::Tls(..) => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpIo::Plain(io) => Pin::new(io).poll_flush(cx),
            HttpIo::Tls(io, _) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HttpIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            HttpIo::Tls(io, _) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::ListenerExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connection queued by the kernel when the listener closes is served, not reset; one
    /// attempted after is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_connections_are_served_and_later_ones_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (listener, closer) = ClosableListener::new(listener);
        let hold = tokio::sync::Semaphore::new(0);
        let hold = std::sync::Arc::new(hold);
        let app = {
            let hold = hold.clone();
            axum::Router::new().route(
                "/",
                axum::routing::get(move || {
                    let hold = hold.clone();
                    async move {
                        let _ = hold.acquire().await;
                        "ok"
                    }
                }),
            )
        };
        let stop = CancellationToken::new();
        let serve = axum::serve(listener.tap_io(|_| {}), app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        let server = tokio::spawn(async move { serve.await });
        // One request in flight, held by the handler, so the server is busy when we close.
        let mut first = TcpStream::connect(addr).await.expect("connect");
        first.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("write");
        // Connected (queued by the kernel) but maybe not yet accepted by the server.
        let mut queued = TcpStream::connect(addr).await.expect("connect");
        queued.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("write");
        closer.close(Duration::from_secs(5)).await;
        assert!(TcpStream::connect(addr).await.is_err(), "connections after the close are refused");
        closer.wait_until_read(Duration::from_secs(5)).await;
        stop.cancel();
        hold.add_permits(10);
        for mut stream in [first, queued] {
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        assert!(matches!(tokio::time::timeout(Duration::from_secs(5), server).await, Ok(Ok(Ok(())))));
    }
}
