//! One task per MQTT connection: CONNECT and authentication, then packets in both directions
//! until DISCONNECT, keep-alive expiry, takeover, a protocol error or shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Disconnect, DisconnectReasonCode, LastWill, LastWillProperties,
    Packet, PingResp, PubAck, PubAckProperties, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, PubRel, PubRelReason, PublishProperties, RetainForwardRule, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::acl::{Acl, Action, Identity};
use super::bridge::Bridge;
use super::broker::{Broker, CloseReason, ConnectionInfo, Message, Outbound, SubOptions};
use super::codec::{self, CodecError, Refusal, Version};
use super::topic;
use crate::users::MqttUsers;
use thinghub_actors::Things;

/// Connection bounds and policies.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Accept clients without credentials (development only).
    pub allow_anonymous: bool,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// Largest packet accepted (and sent), bytes.
    pub packet_bytes_max: usize,
    /// Outbound messages buffered per connection before it counts as a slow consumer.
    pub outbound_queue_max: usize,
    /// Topic aliases a v5 client may use.
    pub topic_alias_max: u16,
    /// Longest client id, bytes.
    pub client_id_bytes_max: usize,
    /// Longest keep-alive the server accepts, seconds (0 = the client's choice). v5 clients are
    /// told the effective value (server keep-alive); 3.1.1 clients keep their own.
    pub keep_alive_max_s: u16,
}

/// What every connection shares.
pub struct MqttContext {
    /// Sessions and routing.
    pub broker: Arc<Broker>,
    /// The Things (lifecycle events).
    pub things: Things,
    /// The per-Thing fast path.
    pub bridge: Arc<Bridge>,
    /// Credentials.
    pub users: Arc<MqttUsers>,
    /// Authorization.
    pub acl: Acl,
    /// Policies.
    pub config: ConnectionConfig,
}

/// Bytes read per readiness event (into a stack chunk; buffers exist only while data is partial).
const READ_CHUNK_BYTES: usize = 4096;
/// Most outbound packets encoded into one write.
const WRITE_BATCH_PACKETS_MAX: usize = 64;

struct Will {
    topic: Arc<str>,
    payload: Bytes,
    qos: u8,
    retain: bool,
    delay: Duration,
    properties: Option<Arc<PublishProperties>>,
    expiry: Option<Duration>,
}

struct Conn {
    version: Version,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    read_buf: BytesMut,
    write_buf: BytesMut,
    peer: SocketAddr,
    /// v5: the client's maximum packet size; larger packets are never sent to it.
    client_packet_bytes_max: Option<usize>,
}

impl Conn {
    /// Writes `packet` now, after anything queued before it.
    async fn send(&mut self, packet: Packet) -> std::io::Result<()> {
        self.queue(packet)?;
        self.flush_encoded().await
    }

    /// Encodes `packet` behind what is queued; the session loop writes the queue, with the
    /// outbound messages produced meanwhile, in one syscall once the packets read so far are
    /// handled.
    fn queue(&mut self, packet: Packet) -> std::io::Result<()> {
        codec::write(self.version, packet, &mut self.write_buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Writes what `encode_outbound` put in the write buffer.
    async fn flush_encoded(&mut self) -> std::io::Result<()> {
        if !self.write_buf.is_empty() {
            self.writer.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        if self.write_buf.capacity() > 16 * READ_CHUNK_BYTES {
            self.write_buf = BytesMut::new();
        }
        Ok(())
    }

    /// Reads more bytes; `Ok(false)` on end of stream. Waits for readiness without a buffer and
    /// reads into a stack chunk, so an idle connection holds no read buffer at all.
    async fn fill(&mut self) -> std::io::Result<bool> {
        loop {
            self.reader.readable().await?;
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            match self.reader.try_read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.read_buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Serves one accepted socket. `permit` is `None` when the connection limit is reached: the
/// client then gets a "server busy" CONNACK.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<MqttContext>,
    permit: Option<OwnedSemaphorePermit>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let (reader, writer) = stream.into_split();
    let mut conn = Conn {
        version: Version::V311,
        reader,
        writer,
        read_buf: BytesMut::new(),
        write_buf: BytesMut::new(),
        peer,
        client_packet_bytes_max: None,
    };
    let connect = match tokio::time::timeout(
        ctx.config.connect_timeout,
        Box::pin(read_connect(&mut conn, &ctx)),
    )
    .await
    {
        // Boxed: the packet is only read while establishing the session.
        Ok(Ok(Some(packet))) => Box::new(packet),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection closed before CONNECT completed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
            return;
        }
    };
    if permit.is_none() {
        tracing::warn!(%peer, "connection limit reached; refusing");
        let _ = Box::pin(refuse(&mut conn, Refusal::ServerBusy)).await;
        return;
    }
    if let Err(e) = run_session(conn, connect, &ctx).await {
        tracing::debug!(%peer, error = %e, "connection ended with an IO error");
    }
    drop(permit);
}

/// Reads the CONNECT packet (choosing the protocol version from it).
async fn read_connect(conn: &mut Conn, ctx: &MqttContext) -> std::io::Result<Option<Packet>> {
    loop {
        match codec::connect_level(&conn.read_buf) {
            Ok(4) => conn.version = Version::V311,
            Ok(5) => conn.version = Version::V5,
            Ok(level) => {
                tracing::info!(peer = %conn.peer, level, "refusing unsupported MQTT protocol level");
                conn.writer.write_all(&codec::raw_connack_v3(1)).await?;
                return Ok(None);
            }
            Err(CodecError::Incomplete) => {
                if !conn.fill().await? {
                    return Ok(None);
                }
                continue;
            }
            Err(e) => {
                tracing::info!(peer = %conn.peer, error = %e, "invalid first packet; closing");
                return Ok(None);
            }
        }
        match codec::read(
            conn.version,
            &mut conn.read_buf,
            ctx.config.packet_bytes_max,
        ) {
            Ok(packet @ Packet::Connect(..)) => return Ok(Some(packet)),
            Ok(_) => return Ok(None),
            Err(CodecError::Incomplete) => {
                if !conn.fill().await? {
                    return Ok(None);
                }
            }
            Err(e) => {
                tracing::info!(peer = %conn.peer, error = %e, "malformed CONNECT; refusing");
                if conn.version == Version::V5 {
                    let _ = refuse(conn, Refusal::Malformed).await;
                }
                return Ok(None);
            }
        }
    }
}

async fn refuse(conn: &mut Conn, refusal: Refusal) -> std::io::Result<()> {
    let connack = ConnAck {
        session_present: false,
        code: codec::refusal_code(conn.version, refusal),
    };
    conn.send(Packet::ConnAck(connack, None)).await?;
    conn.writer.shutdown().await
}

fn new_client_id() -> String {
    use rand::Rng;
    format!("thinghub-{:016x}", rand::thread_rng().gen::<u64>())
}

/// Strips the `?SDK=...` suffix the AWS IoT Device SDKs append to usernames.
fn plain_username(username: &str) -> &str {
    match username.find("?SDK=") {
        Some(i) => &username[..i],
        None => username,
    }
}

/// What a connection keeps for its whole life once its CONNECT was accepted (small on purpose:
/// an idle connection's task holds this and `session_loop`'s state, nothing else).
struct Established {
    session: Session,
    rx: mpsc::Receiver<Outbound>,
    connection_id: u64,
    keep_alive: Duration,
    will: Option<Box<Will>>,
    v5: bool,
}

async fn run_session(
    mut conn: Conn,
    connect: Box<Packet>,
    ctx: &MqttContext,
) -> std::io::Result<()> {
    // Boxed: the CONNECT handling's state (the packet, properties, authentication) is freed
    // once the session runs, so an idle connection does not carry it.
    let Some(mut established) = Box::pin(establish(&mut conn, connect, ctx)).await? else {
        return Ok(());
    };
    let reason = session_loop(
        &mut conn,
        ctx,
        &mut established.session,
        &mut established.rx,
        established.keep_alive,
    )
    .await;
    Box::pin(close(&mut conn, ctx, established, reason)).await;
    Ok(())
}

/// CONNECT -> authentication -> session attach -> CONNACK; `None` when the client was refused.
async fn establish(
    conn: &mut Conn,
    connect: Box<Packet>,
    ctx: &MqttContext,
) -> std::io::Result<Option<Established>> {
    let Packet::Connect(connect, properties, last_will, will_properties, login) = *connect else {
        return Ok(None);
    };
    let v5 = conn.version == Version::V5;
    // Client id: empty is allowed for a clean session (the server assigns one).
    let mut assigned = None;
    let client_id = if connect.client_id.is_empty() {
        if !v5 && !connect.clean_session {
            return refuse(conn, Refusal::BadClientId).await.map(|()| None);
        }
        let id = new_client_id();
        assigned = Some(id.clone());
        id
    } else if connect.client_id.len() > ctx.config.client_id_bytes_max {
        return refuse(conn, Refusal::BadClientId).await.map(|()| None);
    } else {
        connect.client_id.clone()
    };

    // Authentication.
    let identity = match login {
        Some(login) => {
            let username = plain_username(&login.username).to_owned();
            let users = ctx.users.clone();
            let password = login.password.clone();
            let name = username.clone();
            // The cache answers repeat connects inline; only a miss pays for argon2, on a
            // blocking thread (spawning one per CONNECT cost ~25 KB of RSS per connection).
            let outcome = match users.authenticate_cached(&name, &password) {
                Some(auth) => Some(auth),
                None => tokio::task::spawn_blocking(move || users.authenticate(&name, &password))
                    .await
                    .ok()
                    .flatten(),
            };
            match outcome {
                Some(auth) => Identity {
                    client_id: client_id.clone(),
                    username: Some(username),
                    thing: auth.thing_name,
                    superuser: auth.superuser,
                },
                None => {
                    tracing::info!(peer = %conn.peer, %client_id, %username, "bad username or password");
                    return refuse(conn, Refusal::BadCredentials).await.map(|()| None);
                }
            }
        }
        None if ctx.config.allow_anonymous => Identity {
            client_id: client_id.clone(),
            username: None,
            thing: None,
            superuser: false,
        },
        None => {
            tracing::info!(peer = %conn.peer, %client_id, "anonymous connection refused");
            return refuse(conn, Refusal::NotAuthorized).await.map(|()| None);
        }
    };

    let expiry = if v5 {
        Duration::from_secs(u64::from(
            properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0),
        ))
    } else if connect.clean_session {
        Duration::ZERO
    } else {
        Duration::MAX
    };
    let receive_maximum = properties
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .map(usize::from);
    conn.client_packet_bytes_max = properties
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .map(|m| m as usize);
    let keep_alive_max = ctx.config.keep_alive_max_s;
    let server_keep_alive = (v5
        && keep_alive_max > 0
        && (connect.keep_alive == 0 || connect.keep_alive > keep_alive_max))
        .then_some(keep_alive_max);
    let keep_alive_s = server_keep_alive.unwrap_or(connect.keep_alive);
    let will = last_will.map(|w| to_will(w, will_properties));

    let (tx, rx) = mpsc::channel(ctx.config.outbound_queue_max.max(1));
    let registered = ctx.broker.connect(
        &client_id,
        connect.clean_session,
        expiry,
        receive_maximum,
        tx,
    );
    let connack_properties = v5.then(|| ConnAckProperties {
        assigned_client_identifier: assigned,
        topic_alias_max: Some(ctx.config.topic_alias_max),
        max_packet_size: Some(ctx.config.packet_bytes_max as u32),
        retain_available: Some(1),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(1),
        server_keep_alive,
        max_qos: None,
        ..ConnAckProperties::default()
    });
    conn.send(Packet::ConnAck(
        ConnAck {
            session_present: registered.session_present,
            code: rumqttd::protocol::ConnectReturnCode::Success,
        },
        connack_properties,
    ))
    .await?;
    tracing::debug!(peer = %conn.peer, %client_id, thing = ?identity.thing, "connected");
    ctx.broker.describe_connection(
        &client_id,
        registered.connection_id,
        ConnectionInfo {
            username: identity.username.clone(),
            thing: identity.thing.clone(),
            peer: conn.peer.to_string(),
            protocol: if v5 { "5.0" } else { "3.1.1" },
            connected_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        },
    );
    if let Some(thing) = &identity.thing {
        if let Err(e) = ctx
            .things
            .record_connected(thing, &client_id, registered.connection_id)
            .await
        {
            tracing::warn!(%thing, %client_id, error = %e, "cannot record the connect");
        }
    }

    Ok(Some(Established {
        session: Session {
            identity,
            aliases: HashMap::new(),
        },
        rx,
        connection_id: registered.connection_id,
        keep_alive: Duration::from_millis(u64::from(keep_alive_s) * 1500),
        will: will.map(Box::new),
        v5,
    }))
}

/// After the session loop: DISCONNECT (v5), socket shutdown, session detach, the Thing's
/// disconnect event, the will.
async fn close(conn: &mut Conn, ctx: &MqttContext, established: Established, reason: CloseReason) {
    let Established {
        session,
        connection_id,
        will,
        v5,
        ..
    } = established;
    let client_id = session.identity.client_id.clone();
    if v5 {
        let code = match reason {
            CloseReason::Takeover => Some(DisconnectReasonCode::SessionTakenOver),
            CloseReason::KeepAliveTimeout => Some(DisconnectReasonCode::KeepAliveTimeout),
            CloseReason::ServerShutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            CloseReason::Kicked => Some(DisconnectReasonCode::AdministrativeAction),
            CloseReason::ProtocolError => Some(DisconnectReasonCode::ProtocolError),
            CloseReason::SlowConsumer => Some(DisconnectReasonCode::QuotaExceeded),
            CloseReason::Normal | CloseReason::ConnectionLost => None,
        };
        if let Some(reason_code) = code {
            let _ = conn
                .send(Packet::Disconnect(Disconnect { reason_code }, None))
                .await;
        }
    }
    let _ = conn.writer.shutdown().await;
    let was_current = ctx.broker.disconnect(&client_id, connection_id);
    tracing::debug!(peer = %conn.peer, %client_id, reason = reason.as_str(), was_current, "disconnected");
    if let Some(thing) = &session.identity.thing {
        if let Err(e) = ctx
            .things
            .record_disconnected(thing, &client_id, connection_id, reason.as_str())
            .await
        {
            tracing::warn!(%thing, %client_id, error = %e, "cannot record the disconnect");
        }
    }

    if let Some(will) = will.filter(|_| reason.publishes_will()) {
        publish_will(ctx, &session.identity, *will);
    }
}

fn to_will(will: LastWill, properties: Option<LastWillProperties>) -> Will {
    let delay = Duration::from_secs(u64::from(
        properties
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0),
    ));
    let expiry = properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .map(|s| Duration::from_secs(u64::from(s)));
    let forwarded = properties.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    });
    Will {
        topic: Arc::from(String::from_utf8_lossy(&will.topic).as_ref()),
        payload: will.message,
        qos: codec::qos_number(will.qos),
        retain: will.retain,
        delay,
        properties: forwarded.filter(has_forwarded_fields).map(Arc::new),
        expiry,
    }
}

/// Whether properties carry anything worth forwarding (aliases and ids are per hop).
fn has_forwarded_fields(p: &PublishProperties) -> bool {
    p.payload_format_indicator.is_some()
        || p.response_topic.is_some()
        || p.correlation_data.is_some()
        || !p.user_properties.is_empty()
        || p.content_type.is_some()
}

fn publish_will(ctx: &MqttContext, identity: &Identity, will: Will) {
    if topic::validate_topic_name(&will.topic).is_err()
        || !ctx.acl.allows(identity, Action::Publish, &will.topic)
    {
        tracing::info!(client_id = %identity.client_id, topic = %will.topic, "will message not allowed; dropped");
        ctx.broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut message = Message {
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        publisher: Some(Arc::from(identity.client_id.as_str())),
        properties: will.properties,
        expires_at: None,
    };
    let expiry = will.expiry;
    let stamp_expiry = move |message: &mut Message| {
        message.expires_at = expiry.map(|e| std::time::Instant::now() + e);
    };
    if will.delay.is_zero() {
        stamp_expiry(&mut message);
        ctx.broker.publish(message);
        return;
    }
    // v5 will delay: published only if the client has not come back by then.
    let broker = ctx.broker.clone();
    let client_id = identity.client_id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(will.delay).await;
        if !broker.is_connected(&client_id) {
            // The expiry interval starts when the will is published.
            stamp_expiry(&mut message);
            broker.publish(message);
        }
    });
}

struct Session {
    identity: Identity,
    aliases: HashMap<u16, Arc<str>>,
}

async fn session_loop(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    rx: &mut mpsc::Receiver<Outbound>,
    keep_alive: Duration,
) -> CloseReason {
    // Keep-alive 0 means no timeout.
    let no_timeout = Duration::from_secs(365 * 24 * 3600);
    let deadline = tokio::time::sleep(if keep_alive.is_zero() {
        no_timeout
    } else {
        keep_alive
    });
    tokio::pin!(deadline);
    loop {
        // Handle every complete packet already buffered.
        loop {
            match codec::read(
                conn.version,
                &mut conn.read_buf,
                ctx.config.packet_bytes_max,
            ) {
                Ok(packet) => {
                    if !keep_alive.is_zero() {
                        deadline.as_mut().reset(Instant::now() + keep_alive);
                    }
                    // Boxed: handling a packet (fast-path requests to Thing actors included) needs
                    // kilobytes of future state that an idle connection should not carry.
                    match Box::pin(handle_packet(conn, ctx, session, packet)).await {
                        Ok(None) => {}
                        Ok(Some(reason)) => return reason,
                        Err(_) => return CloseReason::ConnectionLost,
                    }
                }
                Err(CodecError::Incomplete) => break,
                Err(e) => {
                    tracing::info!(peer = %conn.peer, client_id = %session.identity.client_id, error = %e, "protocol error; closing");
                    return CloseReason::ProtocolError;
                }
            }
        }
        if conn.read_buf.is_empty() && conn.read_buf.capacity() > 0 {
            conn.read_buf = BytesMut::new();
        }
        if !conn.write_buf.is_empty() {
            // Acknowledgements queued by the packets just handled go out together with what
            // they produced for this client meanwhile (a fast-path reply), in one write.
            let mut encoded = 0;
            while encoded < WRITE_BATCH_PACKETS_MAX {
                match rx.try_recv() {
                    Ok(Outbound::Close(reason)) => {
                        let _ = conn.flush_encoded().await;
                        return reason;
                    }
                    Ok(outbound) => {
                        if let Err(reason) = encode_or_discard(conn, ctx, session, outbound) {
                            return reason;
                        }
                        encoded += 1;
                    }
                    Err(_) => break,
                }
            }
            if conn.flush_encoded().await.is_err() {
                return CloseReason::ConnectionLost;
            }
        }
        tokio::select! {
            filled = conn.fill() => match filled {
                Ok(true) => {}
                Ok(false) | Err(_) => return CloseReason::ConnectionLost,
            },
            outbound = rx.recv() => {
                // Encode everything already queued, then write it with one syscall.
                let mut next = outbound;
                let mut encoded = 0;
                conn.write_buf.clear();
                loop {
                    match next {
                        Some(Outbound::Close(reason)) => {
                            let _ = conn.flush_encoded().await;
                            return reason;
                        }
                        Some(outbound) => {
                            if let Err(reason) = encode_or_discard(conn, ctx, session, outbound) {
                                return reason;
                            }
                            encoded += 1;
                        }
                        None => return CloseReason::ServerShutdown,
                    }
                    if encoded >= WRITE_BATCH_PACKETS_MAX {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(more) => next = Some(more),
                        Err(_) => break,
                    }
                }
                if conn.flush_encoded().await.is_err() {
                    return CloseReason::ConnectionLost;
                }
            },
            () = &mut deadline => return CloseReason::KeepAliveTimeout,
        }
    }
}

/// Appends one outbound packet to the write buffer; a publish larger than the client's maximum
/// packet size is discarded (counted, and settled so the window moves on).
fn encode_or_discard(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &Session,
    outbound: Outbound,
) -> Result<(), CloseReason> {
    let settles = match &outbound {
        Outbound::Publish(p) if p.qos > 0 => Some(p.pkid),
        _ => None,
    };
    match encode_outbound(conn, outbound) {
        Ok(()) => Ok(()),
        Err(CodecError::TooLarge(bytes)) => {
            tracing::debug!(client_id = %session.identity.client_id, bytes, "publish larger than the client's maximum packet size; discarded");
            ctx.broker
                .stats
                .messages_dropped
                .fetch_add(1, Ordering::Relaxed);
            if let Some(pkid) = settles {
                ctx.broker.acknowledged(&session.identity.client_id, pkid);
            }
            Ok(())
        }
        Err(_) => Err(CloseReason::ProtocolError),
    }
}

/// Appends one outbound packet to the write buffer.
fn encode_outbound(conn: &mut Conn, outbound: Outbound) -> Result<(), CodecError> {
    match outbound {
        Outbound::Publish(publish) => {
            let properties = match conn.version {
                Version::V311 => None,
                Version::V5 => {
                    let remaining_s = publish.expires_at.map(|at| {
                        let left = at.saturating_duration_since(std::time::Instant::now());
                        // Whole seconds, rounded up, at least 1 (0 would mean "no expiry").
                        left.as_secs()
                            .saturating_add(u64::from(left.subsec_nanos() > 0))
                            .clamp(1, u64::from(u32::MAX)) as u32
                    });
                    let mut properties =
                        publish
                            .properties
                            .as_deref()
                            .cloned()
                            .unwrap_or(PublishProperties {
                                payload_format_indicator: None,
                                message_expiry_interval: None,
                                topic_alias: None,
                                response_topic: None,
                                correlation_data: None,
                                user_properties: Vec::new(),
                                subscription_identifiers: Vec::new(),
                                content_type: None,
                            });
                    properties.message_expiry_interval = remaining_s;
                    properties.subscription_identifiers =
                        publish.subscription_id.into_iter().collect();
                    let any = has_forwarded_fields(&properties)
                        || properties.message_expiry_interval.is_some()
                        || !properties.subscription_identifiers.is_empty();
                    any.then_some(properties)
                }
            };
            let packet = codec::make_publish(
                &publish.topic,
                &publish.payload,
                publish.qos,
                publish.pkid,
                publish.retain,
                publish.dup,
            );
            let before = conn.write_buf.len();
            codec::write(
                conn.version,
                Packet::Publish(packet, properties),
                &mut conn.write_buf,
            )?;
            if conn
                .client_packet_bytes_max
                .is_some_and(|max| conn.write_buf.len() - before > max)
            {
                // Larger than the client accepts: discard it, as if sent (MQTT 5 3.1.2.25).
                conn.write_buf.truncate(before);
                return Err(CodecError::TooLarge(publish.payload.len()));
            }
            Ok(())
        }
        Outbound::PubRel(pkid) => codec::write(
            conn.version,
            Packet::PubRel(
                PubRel {
                    pkid,
                    reason: PubRelReason::Success,
                },
                None,
            ),
            &mut conn.write_buf,
        ),
        Outbound::Close(_) => Ok(()),
    }
}

/// Handles one packet from the client; `Some(reason)` ends the connection.
async fn handle_packet(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    packet: Packet,
) -> std::io::Result<Option<CloseReason>> {
    let v5 = conn.version == Version::V5;
    let client_id = session.identity.client_id.clone();
    match packet {
        Packet::Publish(publish, properties) => {
            ctx.broker.stats.messages_in.fetch_add(1, Ordering::Relaxed);
            let (qos, pkid, _dup) = codec::publish_header(&publish);
            // Topic (v5 topic aliases: a non-empty topic with an alias sets it; an empty one uses it).
            let alias = properties.as_ref().and_then(|p| p.topic_alias);
            let topic: Arc<str> = if publish.topic.is_empty() {
                match alias.and_then(|a| session.aliases.get(&a)) {
                    Some(topic) => topic.clone(),
                    None => {
                        tracing::info!(%client_id, "PUBLISH with an empty topic and no known alias");
                        return Ok(Some(CloseReason::ProtocolError));
                    }
                }
            } else {
                let Ok(text) = std::str::from_utf8(&publish.topic) else {
                    return Ok(Some(CloseReason::ProtocolError));
                };
                if topic::validate_topic_name(text).is_err() {
                    tracing::info!(%client_id, topic = text, "invalid topic name; closing");
                    return Ok(Some(CloseReason::ProtocolError));
                }
                let topic: Arc<str> = Arc::from(text);
                if let Some(alias) = alias {
                    if alias == 0 || alias > ctx.config.topic_alias_max {
                        return Ok(Some(CloseReason::ProtocolError));
                    }
                    session.aliases.insert(alias, topic.clone());
                }
                topic
            };
            let allowed = ctx.acl.allows(&session.identity, Action::Publish, &topic);
            if !allowed {
                ctx.broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%client_id, %topic, "publish denied by ACL; dropped");
            }
            let duplicate_qos2 = qos == 2 && !ctx.broker.qos2_arrived(&client_id, pkid);
            let request = if allowed && !duplicate_qos2 {
                ctx.bridge
                    .parse(&topic)
                    .map(|(thing, op, namespace)| (thing.to_owned(), op, namespace))
            } else {
                None
            };
            let event = if allowed && !duplicate_qos2 && request.is_none() {
                ctx.bridge
                    .parse_event(&topic)
                    .map(|(thing, event_type)| (thing.to_owned(), event_type.to_owned()))
            } else {
                None
            };
            let command_response =
                if allowed && !duplicate_qos2 && request.is_none() && event.is_none() {
                    ctx.bridge
                        .parse_command_response(&topic)
                        .map(|(thing, id, namespace)| (thing.to_owned(), id.to_owned(), namespace))
                } else {
                    None
                };
            if let Some((thing, execution_id, namespace)) = command_response {
                // Applied (or refused and recorded) in the Thing's log before the PUBACK below.
                ctx.bridge
                    .command_response(&thing, &execution_id, namespace, &publish.payload)
                    .await;
            } else if let Some((thing, event_type)) = event {
                // Stored in the Thing's log before the PUBACK below.
                ctx.bridge
                    .event(&thing, &event_type, &publish.payload)
                    .await;
            } else if let Some((thing, op, namespace)) = request {
                // The fast path: the Thing's actor answers; the request is not routed to
                // subscribers. The PUBACK below goes out only after the answer (durable).
                let origin = if session.identity.thing.as_deref() == Some(thing.as_str()) {
                    thinghub_actors::thing::Origin::Device
                } else {
                    thinghub_actors::thing::Origin::Operator
                };
                ctx.bridge
                    .request(&thing, op, namespace, &publish.payload, origin)
                    .await;
            } else if allowed && !duplicate_qos2 {
                let expires_at = properties
                    .as_ref()
                    .and_then(|p| p.message_expiry_interval)
                    .map(|s| std::time::Instant::now() + Duration::from_secs(u64::from(s)));
                let forwarded = properties
                    .map(|p| PublishProperties {
                        topic_alias: None,
                        subscription_identifiers: Vec::new(),
                        message_expiry_interval: None,
                        ..p
                    })
                    .filter(has_forwarded_fields)
                    .map(Arc::new);
                ctx.broker.publish(Message {
                    topic,
                    payload: publish.payload,
                    qos,
                    retain: publish.retain,
                    publisher: Some(Arc::from(client_id.as_str())),
                    properties: forwarded,
                    expires_at,
                });
            }
            match qos {
                1 => {
                    let reason = if allowed || !v5 {
                        PubAckReason::Success
                    } else {
                        PubAckReason::NotAuthorized
                    };
                    // Queued: it goes out with the fast path's reply in one write.
                    conn.queue(Packet::PubAck(
                        PubAck { pkid, reason },
                        v5_puback_props(v5, allowed),
                    ))?;
                }
                2 => {
                    let reason = if allowed || !v5 {
                        PubRecReason::Success
                    } else {
                        PubRecReason::NotAuthorized
                    };
                    conn.send(Packet::PubRec(PubRec { pkid, reason }, None))
                        .await?;
                }
                _ => {}
            }
        }
        Packet::PubAck(ack, _) => ctx.broker.acknowledged(&client_id, ack.pkid),
        Packet::PubRec(rec, _) => ctx.broker.received(&client_id, rec.pkid),
        Packet::PubComp(comp, _) => ctx.broker.acknowledged(&client_id, comp.pkid),
        Packet::PubRel(rel, _) => {
            let known = ctx.broker.qos2_released(&client_id, rel.pkid);
            let reason = if known || !v5 {
                PubCompReason::Success
            } else {
                PubCompReason::PacketIdentifierNotFound
            };
            conn.send(Packet::PubComp(
                PubComp {
                    pkid: rel.pkid,
                    reason,
                },
                None,
            ))
            .await?;
        }
        Packet::Subscribe(subscribe, properties) => {
            let subscription_id = properties.as_ref().and_then(|p| p.id);
            let mut codes = Vec::with_capacity(subscribe.filters.len());
            for filter in subscribe.filters {
                let code = match topic::parse_filter(&filter.path) {
                    Err(e) => {
                        tracing::info!(%client_id, filter = %filter.path, error = %e, "invalid filter");
                        if v5 {
                            SubscribeReasonCode::TopicFilterInvalid
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    }
                    Ok(parsed)
                        if !ctx.acl.allows(
                            &session.identity,
                            Action::Subscribe,
                            &parsed.filter,
                        ) =>
                    {
                        ctx.broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%client_id, filter = %filter.path, "subscription denied by ACL");
                        if v5 {
                            SubscribeReasonCode::NotAuthorized
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    }
                    Ok(parsed) => {
                        let qos = codec::qos_number(filter.qos);
                        let options = SubOptions {
                            qos,
                            no_local: v5 && filter.nolocal,
                            retain_as_published: v5 && filter.preserve_retain,
                            retain_handling: match filter.retain_forward_rule {
                                RetainForwardRule::OnEverySubscribe => 0,
                                RetainForwardRule::OnNewSubscribe => 1,
                                RetainForwardRule::Never => 2,
                            },
                            subscription_id,
                        };
                        ctx.broker
                            .subscribe(&client_id, &filter.path, parsed, options);
                        SubscribeReasonCode::Success(codec::qos_of(qos))
                    }
                };
                codes.push(code);
            }
            conn.send(Packet::SubAck(
                SubAck {
                    pkid: subscribe.pkid,
                    return_codes: codes,
                },
                None,
            ))
            .await?;
        }
        Packet::Unsubscribe(unsubscribe, _) => {
            let reasons = unsubscribe
                .filters
                .iter()
                .map(|filter| {
                    if ctx.broker.unsubscribe(&client_id, filter) {
                        UnsubAckReason::Success
                    } else {
                        UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect();
            conn.send(Packet::UnsubAck(
                UnsubAck {
                    pkid: unsubscribe.pkid,
                    reasons,
                },
                None,
            ))
            .await?;
        }
        Packet::PingReq(_) => conn.send(Packet::PingResp(PingResp)).await?,
        Packet::Disconnect(disconnect, _) => {
            return Ok(Some(
                if disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    CloseReason::ConnectionLost
                } else {
                    CloseReason::Normal
                },
            ));
        }
        Packet::Connect(..) => {
            tracing::info!(%client_id, "second CONNECT on a connection; closing");
            return Ok(Some(CloseReason::ProtocolError));
        }
        other => {
            tracing::info!(%client_id, packet = ?std::mem::discriminant(&other), "unexpected packet from a client; closing");
            return Ok(Some(CloseReason::ProtocolError));
        }
    }
    Ok(None)
}

fn v5_puback_props(v5: bool, allowed: bool) -> Option<PubAckProperties> {
    (v5 && !allowed).then(|| PubAckProperties {
        reason_string: Some("publish not authorized".into()),
        user_properties: Vec::new(),
    })
}
