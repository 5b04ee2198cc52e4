//! A lean simulated device: one raw MQTT 3.1.1 connection (rumqttc's codec, no event loop)
//! from one of several 127.0.0.x source addresses, and the bounded way to connect thousands.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

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

/// Appends the encoding of `packet` to `out`.
pub fn encode_into(packet: Packet, out: &mut BytesMut) -> Result<()> {
    packet
        .write(out, PACKET_BYTES_MAX)
        .map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
    Ok(())
}

/// A connected, subscribed device (as the benchmark's superuser, client id `client_id`).
pub struct RawDevice {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buffer: BytesMut,
    next_pkid: u16,
}

impl RawDevice {
    /// Connects device number `index` and subscribes to `filters` (QoS 1); returns once the
    /// SUBACK is in.
    pub async fn connect(
        server: SocketAddr,
        index: usize,
        client_id: String,
        filters: Vec<String>,
    ) -> Result<RawDevice> {
        RawDevice::connect_as(server, index, client_id, filters, Some(BENCH_USER)).await
    }

    /// Like [`RawDevice::connect`], with other credentials (or none, for a broker that allows
    /// anonymous clients).
    pub async fn connect_as(
        server: SocketAddr,
        index: usize,
        client_id: String,
        filters: Vec<String>,
        credentials: Option<(&str, &str)>,
    ) -> Result<RawDevice> {
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (index % SOURCE_ADDRESSES as usize) as u8,
        ));
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
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
