//! The HTTP accept loop: hyper's HTTP/1 server under the bounds `axum::serve` cannot set.
//!
//! - At most `connections_max` connections; past it a client gets `503` with a JSON body and the
//!   socket closes (answering costs a small, separately bounded task).
//! - A request's headers must arrive within `header_read_timeout` of the connection being ready
//!   for a request (hyper re-arms this timer when a keep-alive connection goes idle), so
//!   half-sent requests cannot hold sockets.
//! - A keep-alive connection with no request for `keep_alive_idle` is closed.
//! - A write to the client that makes no progress for `write_stall` closes the connection (a
//!   client that stops reading a response cannot hold it; hyper has no write timeout).
//! - Each request carries the peer address ([`ConnectInfo`]) and the body read timeout
//!   ([`BodyReadTimeout`]) as extensions.
//! - Shutdown stops accepting, lets requests in flight finish (idle connections close at once)
//!   and gives up on the rest after `drain_timeout`.
//! - Several listeners (HTTP and HTTPS) share the bounds; an HTTPS connection's TLS handshake
//!   runs in its own task, bounded by [`Tls::accept`], and counts against `connections_max`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service as _};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::tls::Tls;

/// One HTTP listener: its socket, and TLS for HTTPS.
pub struct HttpListener {
    /// The bound socket.
    pub socket: TcpListener,
    /// TLS settings (HTTPS), or none (HTTP).
    pub tls: Option<Arc<Tls>>,
}

/// Open HTTP connections per listener (metrics).
#[derive(Debug, Default)]
pub struct HttpListenerStats {
    /// Plain HTTP connections open now.
    pub http_open: AtomicU64,
    /// HTTPS connections open now (handshake done or not).
    pub https_open: AtomicU64,
}

impl HttpListenerStats {
    fn gauge(&self, tls: bool) -> &AtomicU64 {
        if tls {
            &self.https_open
        } else {
            &self.http_open
        }
    }
}

/// Accepted sockets waiting for the accept loop, per listener.
const ACCEPTED_QUEUE_MAX: usize = 64;

/// Bounds of the HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerConfig {
    /// Simultaneous connections.
    pub connections_max: usize,
    /// Time a request's headers have to arrive once the connection is ready for a request.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight for this long is closed.
    pub keep_alive_idle: Duration,
    /// Time a request body has to arrive (read by the JSON extractor).
    pub body_read_timeout: Duration,
    /// A write that makes no progress for this long closes the connection.
    pub write_stall: Duration,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

/// The body read timeout, as a request extension (see [`super::extract::JsonBody`]).
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub Duration);

const BUSY_BODY: &str =
    r#"{"code":503,"message":"too many simultaneous HTTP connections; retry later"}"#;
/// Refusals being written at once (a flood past the connection limit is simply closed).
const REFUSALS_IN_FLIGHT_MAX: usize = 64;
/// How long a refusal may take to write.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Accepts on one listener and hands the sockets to the accept loop.
async fn accept_into(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    accepted: mpsc::Sender<(TcpStream, SocketAddr, Option<Arc<Tls>>)>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if accepted.send((stream, peer, tls.clone())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves `router` on `listeners` until `shutdown` resolves, then drains.
pub async fn serve(
    listeners: Vec<HttpListener>,
    router: Router,
    config: ListenerConfig,
    stats: Arc<HttpListenerStats>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(config.connections_max));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let (accepted_tx, mut accepted) = mpsc::channel(ACCEPTED_QUEUE_MAX);
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        acceptors.spawn(accept_into(
            listener.socket,
            listener.tls,
            accepted_tx.clone(),
        ));
    }
    drop(accepted_tx);
    loop {
        let (stream, peer, tls) = tokio::select! {
            next = accepted.recv() => match next {
                Some(next) => next,
                None => break,
            },
            () = &mut shutdown => break,
        };
        while connections.try_join_next().is_some() {}
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                connections.spawn(connection(
                    stream,
                    peer,
                    tls,
                    router.clone(),
                    config,
                    stats.clone(),
                    stop_rx.clone(),
                    permit,
                ));
            }
            Err(_) => {
                tracing::debug!(%peer, "HTTP connection limit reached; refusing");
                // Plain HTTP gets a 503; an HTTPS client would need a handshake first.
                if tls.is_none() {
                    if let Ok(permit) = refusals.clone().try_acquire_owned() {
                        tokio::spawn(refuse(stream, permit));
                    }
                }
            }
        }
    }
    // Stop accepting: the listening sockets close with their tasks.
    acceptors.shutdown().await;
    let _ = stop_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(config.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "HTTP connections still open after the drain timeout; closing them"
        );
        connections.shutdown().await;
    }
}

/// Counts the requests in flight on one connection (the idle timer runs only at zero).
struct Busy(watch::Sender<usize>);

impl Busy {
    fn enter(counter: &watch::Sender<usize>) -> Busy {
        counter.send_modify(|n| *n += 1);
        Busy(counter.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Counts a connection in its listener's gauge while it lives.
struct Open(Arc<HttpListenerStats>, bool);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.gauge(self.1).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Request extension: whether the request came over HTTPS (the console marks its cookie
/// `Secure` then).
#[derive(Debug, Clone, Copy)]
pub struct OverTls(pub bool);

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<Tls>>,
    router: Router,
    config: ListenerConfig,
    stats: Arc<HttpListenerStats>,
    stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    stats.gauge(tls.is_some()).fetch_add(1, Ordering::Relaxed);
    let _open = Open(stats, tls.is_some());
    let _ = stream.set_nodelay(true);
    match tls {
        None => serve_connection(stream, peer, false, router, config, stop, permit).await,
        Some(tls) => {
            // Boxed: the handshake's state is gone once the connection runs.
            let Ok((stream, _)) =
                Box::pin(tls.accept("https", crate::tls::Peers::ApiClients, stream)).await
            else {
                return;
            };
            serve_connection(stream, peer, true, router, config, stop, permit).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    peer: SocketAddr,
    secure: bool,
    router: Router,
    config: ListenerConfig,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let (busy_tx, mut busy_rx) = watch::channel(0usize);
    let router = TowerToHyperService::new(router);
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(OverTls(secure));
        request
            .extensions_mut()
            .insert(BodyReadTimeout(config.body_read_timeout));
        let busy = Busy::enter(&busy_tx);
        let response = router.call(request);
        async move {
            let response = response.await;
            drop(busy);
            response
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    let io = StallGuard {
        inner: stream,
        stall: config.write_stall,
        timer: None,
    };
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    let idle = tokio::time::sleep(config.keep_alive_idle);
    let mut idle = pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection closed");
                }
                break;
            }
            _ = stop.wait_for(|stop| *stop), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            Ok(()) = busy_rx.changed() => {
                if *busy_rx.borrow_and_update() == 0 {
                    idle.as_mut().reset(Instant::now() + config.keep_alive_idle);
                }
            }
            () = &mut idle, if !closing && *busy_rx.borrow() == 0 => {
                closing = true;
                // Idle keep-alive: closes at once; a request being read finishes first.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A socket whose writes fail with `TimedOut` once one has made no progress for `stall`.
struct StallGuard<S> {
    inner: S,
    stall: Duration,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallGuard<S> {
    /// Passes a write's outcome on; while it is pending, runs the stall timer.
    fn guard<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        outcome: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        use std::task::Poll;
        match outcome {
            Poll::Ready(result) => {
                self.timer = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let stall = self.stall;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> tokio::io::AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let outcome = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let outcome = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let outcome = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, outcome)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answers a connection past the limit with 503 and closes it.
async fn refuse(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BUSY_BODY}",
        BUSY_BODY.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the answer away.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}
