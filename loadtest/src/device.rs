//! A lean simulated device: one raw MQTT 3.1.1 connection (rumqttc's codec, no event loop)
//! from one of several 127.0.0.x source addresses, over TCP or TLS, and the bounded way to
//! connect thousands.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::mqtt::BENCH_USER;

/// Source addresses the devices are spread over (each has its own ephemeral port range).
const SOURCE_ADDRESSES: u8 = 8;
/// Largest packet a simulated device reads.
const PACKET_BYTES_MAX: usize = 64 * 1024;
/// Device handshakes in flight while connecting: a burst beyond the listen backlog turns into
/// SYN retries seconds apart.
const CONNECTS_IN_FLIGHT: usize = 200;
/// How long a whole fleet may take to connect and subscribe.
const CONNECT_ALL_SECONDS_MAX: u64 = 180;

/// TLS for the devices: trusts one CA (the server's, from `thinghub certs init`).
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl ClientTls {
    /// Trusting the CA in `ca_file` (PEM), verifying the server as `host`.
    pub fn trusting(ca_file: &std::path::Path, host: &str) -> Result<ClientTls> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("read {}", ca_file.display()))?
        {
            roots.add(cert.with_context(|| format!("parse {}", ca_file.display()))?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name: rustls::pki_types::ServerName::try_from(host.to_owned())?,
        })
    }
}

/// Where devices connect: an MQTT address, over TLS or not.
#[derive(Clone)]
pub struct Endpoint {
    /// The listener.
    pub addr: SocketAddr,
    /// TLS, for a TLS listener.
    pub tls: Option<ClientTls>,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, tls: None }
    }
}

impl Endpoint {
    /// `tcp` or `tls`.
    pub fn transport(&self) -> &'static str {
        if self.tls.is_some() {
            "tls"
        } else {
            "tcp"
        }
    }

    /// Opens a connection from source address number `index % SOURCE_ADDRESSES` (TCP, then
    /// the TLS handshake if any).
    pub async fn open(&self, index: usize) -> Result<(Reader, Writer)> {
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (index % SOURCE_ADDRESSES as usize) as u8,
        ));
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(match &self.tls {
            None => {
                let (reader, writer) = stream.into_split();
                (Reader::Tcp(reader), Writer::Tcp(writer))
            }
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.name.clone(), stream)
                    .await
                    .context("TLS handshake")?;
                let (reader, writer) = tokio::io::split(stream);
                (Reader::Tls(reader), Writer::Tls(writer))
            }
        })
    }
}

/// A device connection's read side.
pub enum Reader {
    /// TCP.
    Tcp(OwnedReadHalf),
    /// TLS.
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

impl Reader {
    /// Reads what arrived into `buf`; 0 at the end.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Reader::Tcp(r) => r.read_buf(buf).await,
            Reader::Tls(r) => r.read_buf(buf).await,
        }
    }

    /// Reads exactly `buf.len()` bytes.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Reader::Tcp(r) => r.read_exact(buf).await.map(drop),
            Reader::Tls(r) => r.read_exact(buf).await.map(drop),
        }
    }
}

/// A device connection's write side.
pub enum Writer {
    /// TCP.
    Tcp(OwnedWriteHalf),
    /// TLS.
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl Writer {
    /// Writes all of `bytes` (and, over TLS, flushes the records).
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Tcp(w) => w.write_all(bytes).await,
            Writer::Tls(w) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }
}

/// Appends the encoding of `packet` to `out`.
pub fn encode_into(packet: Packet, out: &mut BytesMut) -> Result<()> {
    packet
        .write(out, PACKET_BYTES_MAX)
        .map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
    Ok(())
}

/// A connected, subscribed device (as the benchmark's superuser, client id `client_id`).
pub struct RawDevice {
    reader: Reader,
    writer: Writer,
    buffer: BytesMut,
    next_pkid: u16,
}

impl RawDevice {
    /// Connects device number `index` and subscribes to `filters` (QoS 1); returns once the
    /// SUBACK is in.
    pub async fn connect(
        server: impl Into<Endpoint>,
        index: usize,
        client_id: String,
        filters: Vec<String>,
    ) -> Result<RawDevice> {
        RawDevice::connect_as(server, index, client_id, filters, Some(BENCH_USER)).await
    }

    /// Like [`RawDevice::connect`], with other credentials (or none, for a broker that allows
    /// anonymous clients).
    pub async fn connect_as(
        server: impl Into<Endpoint>,
        index: usize,
        client_id: String,
        filters: Vec<String>,
        credentials: Option<(&str, &str)>,
    ) -> Result<RawDevice> {
        let (reader, writer) = server.into().open(index).await?;
        let mut device = RawDevice {
            reader,
            writer,
            buffer: BytesMut::with_capacity(4096),
            next_pkid: 1,
        };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = 0;
        if let Some((user, password)) = credentials {
            connect.set_login(user, password);
        }
        let mut subscribe = Subscribe::new_many(
            filters
                .into_iter()
                .map(|path| SubscribeFilter::new(path, QoS::AtLeastOnce)),
        );
        subscribe.pkid = 1;
        let mut out = BytesMut::new();
        encode_into(Packet::Connect(connect), &mut out)?;
        encode_into(Packet::Subscribe(subscribe), &mut out)?;
        device.writer.write_all(&out).await?;
        loop {
            match device.next().await? {
                Some(Packet::SubAck(_)) => return Ok(device),
                Some(Packet::ConnAck(ack))
                    if ack.code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
                {
                    bail!("device {index}: connection refused: {:?}", ack.code)
                }
                Some(_) => {}
                None => bail!("device {index}: closed before SUBACK"),
            }
        }
    }

    /// The next packet, or `None` when the server closed the connection.
    pub async fn next(&mut self) -> Result<Option<Packet>> {
        loop {
            match Packet::read(&mut self.buffer, PACKET_BYTES_MAX) {
                Ok(packet) => return Ok(Some(packet)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if self.reader.read_buf(&mut self.buffer).await? == 0 {
                        return Ok(None);
                    }
                }
                Err(e) => bail!("bad packet: {e:?}"),
            }
        }
    }

    /// Appends the PUBACK a QoS 1 `publish` needs to `out`.
    pub fn ack_into(publish: &Publish, out: &mut BytesMut) -> Result<()> {
        if publish.qos == QoS::AtLeastOnce {
            encode_into(Packet::PubAck(PubAck::new(publish.pkid)), out)?;
        }
        Ok(())
    }

    /// Appends a QoS 1 publish with the next packet id to `out`.
    pub fn publish_into(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        out: &mut BytesMut,
    ) -> Result<()> {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        publish.pkid = self.next_pkid;
        encode_into(Packet::Publish(publish), out)
    }

    /// Writes `out` (and clears it).
    pub async fn send(&mut self, out: &mut BytesMut) -> Result<()> {
        if !out.is_empty() {
            self.writer.write_all(out).await?;
            out.clear();
        }
        Ok(())
    }
}

/// Starts `devices` device tasks (`spawn(index, ready)`; each sends on `ready` once subscribed)
/// with at most [`CONNECTS_IN_FLIGHT`] handshakes at once, and returns when all are ready.
pub async fn connect_all<F, Fut>(
    devices: usize,
    tasks: &mut tokio::task::JoinSet<Result<()>>,
    spawn: F,
) -> Result<()>
where
    F: Fn(usize, tokio::sync::mpsc::Sender<()>) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(devices.max(1));
    let by = Instant::now() + Duration::from_secs(CONNECT_ALL_SECONDS_MAX);
    let mut connected = 0;
    for index in 0..devices {
        tasks.spawn(spawn(index, ready_tx.clone()));
        if index + 1 - connected >= CONNECTS_IN_FLIGHT {
            wait_ready(&mut ready_rx, tasks, by, connected, devices).await?;
            connected += 1;
        }
    }
    drop(ready_tx);
    while connected < devices {
        wait_ready(&mut ready_rx, tasks, by, connected, devices).await?;
        connected += 1;
    }
    Ok(())
}

/// One more device ready, or the first device that failed (no device task ends while
/// connecting unless it failed).
async fn wait_ready(
    ready: &mut tokio::sync::mpsc::Receiver<()>,
    tasks: &mut tokio::task::JoinSet<Result<()>>,
    by: Instant,
    connected: usize,
    devices: usize,
) -> Result<()> {
    let outcome = tokio::time::timeout_at(by.into(), async {
        tokio::select! {
            got = ready.recv() => got.context("every device ended before subscribing"),
            Some(ended) = tasks.join_next() => match ended {
                Ok(Ok(())) => bail!("a device's connection closed while connecting"),
                Ok(Err(e)) => Err(e.context("a device failed while connecting")),
                Err(e) => bail!("a device task failed: {e}"),
            },
        }
    })
    .await;
    outcome.with_context(|| format!("only {connected} of {devices} devices connected in time"))?
}
