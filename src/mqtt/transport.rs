//! The byte streams an MQTT connection runs over: plain TCP, TLS, and WebSocket (plain or over
//! TLS). The connection task reads and writes MQTT bytes through [`Transport`] and never knows
//! which one it has.
//!
//! - TCP keeps the readiness-based path (no buffer while idle, `try_write` first).
//! - TLS is rustls through tokio-rustls; after a batch of writes the TLS records are flushed.
//! - WebSocket carries MQTT in binary messages (MQTT 5.0 §6: subprotocol `mqtt`, a packet may
//!   span messages and a message may hold several packets). A text message is a protocol error.
//!   tungstenite answers pings by itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Bytes read per readiness event (into a stack chunk; buffers exist only while data is partial).
const READ_CHUNK_BYTES: usize = 4096;

/// Any byte stream a connection can run over (a TLS stream, a plain socket under WebSocket).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// MQTT over TCP (`mqtt_listen`, 1883).
    Tcp,
    /// MQTT over TLS (`mqtt_tls_listen`, 8883).
    Tls,
    /// MQTT over WebSocket (`mqtt_ws_listen`).
    Ws,
    /// MQTT over WebSocket over TLS (`mqtt_wss_listen`).
    Wss,
}

impl ListenerKind {
    /// Every kind, in the order of [`ListenerStats`]'s arrays.
    pub const ALL: [ListenerKind; 4] = [
        ListenerKind::Tcp,
        ListenerKind::Tls,
        ListenerKind::Ws,
        ListenerKind::Wss,
    ];

    /// The name shown in the client list, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Open MQTT sockets per listener (metrics), CONNECT done or not.
#[derive(Debug, Default)]
pub struct ListenerStats {
    open: [AtomicU64; 4],
    accepted: [AtomicU64; 4],
    /// WebSocket upgrades refused (wrong path or subprotocol, not a WebSocket request).
    pub ws_upgrades_refused: AtomicU64,
}

impl ListenerStats {
    /// `(listener, open sockets, sockets accepted)` for every listener kind.
    pub fn per_listener(&self) -> [(&'static str, u64, u64); 4] {
        ListenerKind::ALL.map(|kind| {
            (
                kind.as_str(),
                self.open[kind.index()].load(Ordering::Relaxed),
                self.accepted[kind.index()].load(Ordering::Relaxed),
            )
        })
    }

    /// Counts a socket as open until the guard is dropped.
    pub fn opened(self: &Arc<Self>, kind: ListenerKind) -> OpenGuard {
        self.open[kind.index()].fetch_add(1, Ordering::Relaxed);
        self.accepted[kind.index()].fetch_add(1, Ordering::Relaxed);
        OpenGuard {
            stats: self.clone(),
            kind,
        }
    }
}

/// Decrements a listener's open-socket gauge when dropped.
pub struct OpenGuard {
    stats: Arc<ListenerStats>,
    kind: ListenerKind,
}

impl OpenGuard {
    /// The listener.
    pub fn kind(&self) -> ListenerKind {
        self.kind
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.stats.open[self.kind.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's byte stream.
pub enum Transport {
    /// Plain TCP, split for readiness-based IO.
    Tcp {
        /// Read half.
        reader: OwnedReadHalf,
        /// Write half.
        writer: OwnedWriteHalf,
    },
    /// A TLS stream.
    Stream(Box<dyn Io>),
    /// WebSocket binary messages over TCP or TLS.
    WebSocket(Box<WebSocketStream<Box<dyn Io>>>),
}

impl Transport {
    /// Plain TCP.
    pub fn tcp(stream: TcpStream) -> Transport {
        let (reader, writer) = stream.into_split();
        Transport::Tcp { reader, writer }
    }

    /// Reads what arrives next into `buf`; `Ok(0)` at the end of the stream. Cancel-safe: if
    /// the future is dropped, nothing was consumed.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            // `poll_read`, not `readable` + `try_read`: a read that fills less than the chunk
            // drained the socket, and tokio then clears the readiness itself, so the next
            // read waits for epoll instead of costing a `recvfrom` that returns EAGAIN (one
            // wasted syscall per request otherwise). The chunk lives only during one poll, so
            // an idle connection's future does not carry it.
            Transport::Tcp { reader, .. } => {
                std::future::poll_fn(|cx| {
                    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK_BYTES];
                    let mut read = ReadBuf::uninit(&mut chunk);
                    match std::pin::Pin::new(&mut *reader).poll_read(cx, &mut read) {
                        Poll::Ready(Ok(())) => {
                            buf.extend_from_slice(read.filled());
                            Poll::Ready(Ok(read.filled().len()))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await
            }
            // Straight into the buffer: a stack chunk held across this await would sit in
            // every connection's future (TCP ones too), 4 KiB each while idle.
            Transport::Stream(stream) => {
                buf.reserve(READ_CHUNK_BYTES);
                stream.read_buf(buf).await
            }
            Transport::WebSocket(ws) => loop {
                match ws.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Binary(bytes))) => {
                        if bytes.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&bytes);
                        return Ok(bytes.len());
                    }
                    Some(Ok(Message::Text(_))) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "MQTT over WebSocket is carried in binary messages, not text",
                        ))
                    }
                    // Pings are answered by tungstenite; pongs and raw frames carry nothing.
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                }
            },
        }
    }

    /// Writes a prefix of `bytes` and returns its length (all of it for WebSocket, one message);
    /// a write that makes no progress for `stall` fails with `TimedOut`.
    pub async fn write(&mut self, bytes: &[u8], stall: Duration) -> std::io::Result<usize> {
        match self {
            Transport::Tcp { writer, .. } => loop {
                // Straight into the socket when it has room (no timer on the common path).
                match writer.try_write(bytes) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Boxed: the timer exists only while the socket is full, so an idle
                        // connection's task does not carry it.
                        let wait = Box::pin(tokio::time::timeout(stall, writer.writable()));
                        match wait.await {
                            Ok(ready) => ready?,
                            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
                        }
                    }
                    Err(e) => return Err(e),
                }
            },
            // Boxed, as the TCP timer: only while writing.
            Transport::Stream(stream) => Box::pin(stalled(stall, stream.write(bytes))).await,
            Transport::WebSocket(ws) => {
                let message = Message::Binary(bytes::Bytes::copy_from_slice(bytes));
                Box::pin(stalled(stall, ws.send(message))).await?;
                Ok(bytes.len())
            }
        }
    }

    /// Pushes out what a layer above TCP still buffers (TLS records); nothing for TCP.
    pub async fn flush(&mut self, stall: Duration) -> std::io::Result<()> {
        match self {
            Transport::Tcp { .. } => Ok(()),
            Transport::Stream(stream) => Box::pin(stalled(stall, stream.flush())).await,
            Transport::WebSocket(ws) => Box::pin(stalled(stall, ws.flush()))
                .await
                .map_err(std::io::Error::other),
        }
    }

    /// Writes all of `bytes` (only before a session runs, or while closing).
    pub async fn write_all(&mut self, bytes: &[u8], stall: Duration) -> std::io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self.write(rest, stall).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            rest = &rest[n..];
        }
        self.flush(stall).await
    }

    /// Ends the stream: TCP FIN, TLS close_notify, WebSocket close frame.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Transport::Tcp { writer, .. } => writer.shutdown().await,
            Transport::Stream(stream) => stream.shutdown().await,
            Transport::WebSocket(ws) => (**ws).close(None).await.map_err(std::io::Error::other),
        }
    }
}

/// Runs `io`, failing with `TimedOut` if it does not finish within `stall`.
async fn stalled<T, E>(
    stall: Duration,
    io: impl std::future::Future<Output = Result<T, E>>,
) -> std::io::Result<T>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(stall, io).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            match e.downcast::<std::io::Error>() {
                Ok(io) => Err(*io),
                Err(other) => Err(std::io::Error::other(other)),
            }
        }
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// tungstenite's read buffer per WebSocket connection.
const WS_READ_BUFFER_BYTES: usize = 4096;

/// The WebSocket subprotocols MQTT clients ask for: `mqtt` (MQTT 3.1.1 and 5.0) and the
/// `mqttv3.1` of older clients.
const MQTT_SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// An accepted WebSocket and the `Origin` its upgrade request carried (a browser page's).
pub type Upgraded = (WebSocketStream<Box<dyn Io>>, Option<String>);

/// Answers a WebSocket upgrade on `stream`: the request must be for `path` and offer an MQTT
/// subprotocol (echoed back); anything else gets a 4xx answer naming what was wrong.
pub async fn accept_websocket(
    stream: Box<dyn Io>,
    path: &str,
    message_bytes_max: usize,
) -> Result<Upgraded, String> {
    let mut origin = None;
    // The callback's type is tungstenite's (its error is an HTTP response).
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        origin = request
            .headers()
            .get("origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let refuse = |status: StatusCode, why: String| {
            let mut answer = ErrorResponse::new(Some(why));
            *answer.status_mut() = status;
            answer
        };
        if request.uri().path() != path {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "MQTT over WebSocket is served on {path}, not {}",
                    request.uri().path()
                ),
            ));
        }
        let offered = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| MQTT_SUBPROTOCOLS.contains(p));
        let Some(chosen) = offered else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "MQTT over WebSocket needs the subprotocol 'mqtt' (Sec-WebSocket-Protocol)".into(),
            ));
        };
        if let Ok(value) = HeaderValue::from_str(chosen) {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", value);
        }
        Ok(response)
    };
    // tungstenite allocates its read buffer up front (128 KiB by default) and keeps its write
    // buffer at its largest: small and written through, an idle connection holds 4 KiB.
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(message_bytes_max.saturating_mul(2))
        .max_message_size(Some(message_bytes_max))
        .max_frame_size(Some(message_bytes_max));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config))
        .await
        .map_err(|e| e.to_string())?;
    Ok((ws, origin))
}
