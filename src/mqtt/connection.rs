//! One task per MQTT connection: CONNECT and authentication, then packets in both directions
//! until DISCONNECT, keep-alive expiry, takeover, a close request (kick, revocation, slow
//! consumer, shutdown), a protocol error or a lost socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, DisconnectReasonCode, LastWill, LastWillProperties, Packet,
    PingResp, PubAck, PubAckProperties, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason,
    PubRel, PubRelReason, PublishProperties, RetainForwardRule, SubAck, SubscribeReasonCode,
    UnsubAck, UnsubAckReason,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::acl::{Acl, Action, Identity, BOOTSTRAP_CLIENT_PREFIX};
use super::bridge::Bridge;
use super::broker::{
    Broker, CloseReason, ConnectRefusal, ConnectRequest, ConnectionInfo, Link, Message, Outbound,
    PublishRefusal, SubOptions, TrafficStats, Will,
};
use super::codec::{self, CodecError, Refusal, Version};
use super::topic;
use super::transport::{ListenerKind, Transport};
use crate::certificates::{certificate_owner, Standing};
use crate::throttle::{AuthThrottle, Verdict};
use crate::tls::PeerCertificate;
use crate::users::MqttUsers;
use thinghub_actors::thing::validate_thing_name;

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
    /// Topic aliases per direction: a v5 client may use this many, and the server uses up to
    /// this many (fewer if the client announces a lower Topic Alias Maximum).
    pub topic_alias_max: u16,
    /// Longest client id, bytes.
    pub client_id_bytes_max: usize,
    /// Longest keep-alive the server accepts, seconds (0 = the client's choice). v5 clients are
    /// told the effective value (server keep-alive); 3.1.1 clients keep their own.
    pub keep_alive_max_s: u16,
    /// QoS 1/2 publishes a v5 client may have unacknowledged (its Receive Maximum, announced in
    /// CONNACK); more closes the connection with 0x93.
    pub inbound_inflight_max: u16,
    /// A write to the client that makes no progress for this long closes the connection as a
    /// slow consumer (a client that stops reading must not hold its task and socket).
    pub write_stall_max: Duration,
    /// Longest a persistent session's SUBACK waits for its subscriptions to be durable.
    pub subscribe_durable_wait: Duration,
    /// The HTTP path MQTT over WebSocket is served on.
    pub ws_path: String,
    /// Browser origins whose pages may use a client certificate as the identity over
    /// WebSocket (`mqtt_ws_origins_allowed`).
    pub ws_origins_allowed: Vec<String>,
}

/// What every connection shares.
pub struct MqttContext {
    /// Sessions and routing.
    pub broker: Arc<Broker>,
    /// The per-Thing fast path (the only way to the Things).
    pub bridge: Arc<Bridge>,
    /// Credentials.
    pub users: Arc<MqttUsers>,
    /// Failed-authentication throttling (shared with HTTP).
    pub throttle: Arc<AuthThrottle>,
    /// Authorization.
    pub acl: Acl,
    /// Policies.
    pub config: ConnectionConfig,
    /// Cumulocity devices' `s/...` topics (`--cumulocity`), if served.
    pub cumulocity: Option<Arc<super::cumulocity::Cumulocity>>,
    /// Open sockets per listener.
    pub listeners: Arc<super::transport::ListenerStats>,
}

/// A write buffer grown past this is given back once written.
const WRITE_BUF_KEPT_BYTES_MAX: usize = 64 * 1024;
/// Most outbound packets encoded into one write.
const WRITE_BATCH_PACKETS_MAX: usize = 64;

struct Conn {
    version: Version,
    io: Transport,
    read_buf: BytesMut,
    write_buf: BytesMut,
    peer: SocketAddr,
    /// The listener it came in on.
    listener: ListenerKind,
    /// The client certificate rustls verified (TLS listeners with client authentication).
    certificate: Option<Box<PeerCertificate>>,
    /// v5: the client's maximum packet size; larger packets are never sent to it.
    client_packet_bytes_max: Option<usize>,
    /// v5: topic aliases the server set up toward the client, and how many it may use.
    aliases_out: HashMap<Arc<str>, u16>,
    alias_out_max: u16,
    /// QoS 1 PUBACKs queued since the last write (they count against the receive maximum).
    pubacks_queued: u16,
    /// How long a write may make no progress.
    write_stall_max: Duration,
    /// A write was cut off part-way: the stream may end inside a packet, so nothing more
    /// (a v5 DISCONNECT) may be written to it.
    write_broken: bool,
    /// Bytes and packets (metrics).
    traffic: Arc<TrafficStats>,
    /// A Cumulocity device's own topics' prefix inside the broker (`$c8y/{device}/`), stripped
    /// from what it receives.
    c8y_prefix: Option<String>,
}

impl Conn {
    /// Encodes `packet` behind what is queued; the session loop writes the queue, with the
    /// outbound messages produced meanwhile, in one syscall once the packets read so far are
    /// handled.
    fn queue(&mut self, packet: Packet) -> std::io::Result<()> {
        self.traffic.sent(&packet);
        codec::write(self.version, packet, &mut self.write_buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Writes `packet` now, after anything queued before it (only before the session runs).
    async fn send(&mut self, packet: Packet) -> std::io::Result<()> {
        self.queue(packet)?;
        self.flush_encoded().await
    }

    /// Writes what is queued in the write buffer, consuming it as it goes (so a flush cut off
    /// part-way, by a close request, leaves exactly the unwritten rest; `write_broken` says the
    /// stream may end inside a packet until that rest is written). A write that makes no
    /// progress for `write_stall_max` fails with `TimedOut`.
    async fn flush_encoded(&mut self) -> std::io::Result<()> {
        let wrote = !self.write_buf.is_empty();
        while !self.write_buf.is_empty() {
            let n = self.io.write(&self.write_buf, self.write_stall_max).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.traffic
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
            self.write_broken = n < self.write_buf.len();
            bytes::Buf::advance(&mut self.write_buf, n);
        }
        if wrote {
            self.io.flush(self.write_stall_max).await?;
        }
        self.pubacks_queued = 0;
        if self.write_buf.capacity() > WRITE_BUF_KEPT_BYTES_MAX {
            self.write_buf = BytesMut::new();
        }
        Ok(())
    }

    /// Reads more bytes; `Ok(false)` on end of stream. Over TCP it waits for readiness without
    /// a buffer, so an idle connection holds no read buffer at all.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let n = self.io.read_into(&mut self.read_buf).await?;
        if n == 0 {
            return Ok(false);
        }
        self.traffic.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes raw bytes now (before a session runs, or while closing).
    async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes, self.write_stall_max).await
    }
}

/// Serves one accepted socket. `permit` is `None` when the connection limit is reached: the
/// client then gets a "server busy" CONNACK.
pub async fn serve(
    io: Transport,
    opened: super::transport::OpenGuard,
    certificate: Option<PeerCertificate>,
    peer: SocketAddr,
    ctx: Arc<MqttContext>,
    permit: Option<OwnedSemaphorePermit>,
    accepted_at: Instant,
) {
    let mut conn = Conn {
        version: Version::V311,
        io,
        read_buf: BytesMut::new(),
        write_buf: BytesMut::new(),
        peer,
        listener: opened.kind(),
        certificate: certificate.map(Box::new),
        client_packet_bytes_max: None,
        aliases_out: HashMap::new(),
        alias_out_max: 0,
        pubacks_queued: 0,
        write_stall_max: ctx.config.write_stall_max,
        write_broken: false,
        traffic: ctx.broker.stats.traffic.clone(),
        c8y_prefix: None,
    };
    // The connect timeout counts from the accept, TLS handshake and WebSocket upgrade included.
    let connect = match tokio::time::timeout_at(
        accepted_at + ctx.config.connect_timeout,
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
    drop(opened);
}

/// Reads the CONNECT packet (choosing the protocol version from it).
async fn read_connect(conn: &mut Conn, ctx: &MqttContext) -> std::io::Result<Option<Packet>> {
    loop {
        match codec::connect_header(&conn.read_buf) {
            Ok(header) => {
                match header.level {
                    4 => conn.version = Version::V311,
                    5 => conn.version = Version::V5,
                    level => {
                        tracing::info!(peer = %conn.peer, level, "refusing unsupported MQTT protocol level");
                        conn.write_raw(&codec::raw_connack_v3(1)).await?;
                        return Ok(None);
                    }
                }
                if let Err(e) = header.check() {
                    tracing::info!(peer = %conn.peer, error = %e, "malformed CONNECT; closing");
                    if conn.version == Version::V5 {
                        let _ = refuse(conn, Refusal::Malformed).await;
                    }
                    return Ok(None);
                }
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
            Ok(packet @ Packet::Connect(..)) => {
                conn.traffic.received(&packet);
                return Ok(Some(packet));
            }
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
    conn.io.shutdown().await
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
    keep_alive: Duration,
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
    if ctx.cumulocity.is_some() {
        conn.c8y_prefix =
            super::cumulocity::Cumulocity::own_prefix_of(&established.session.identity);
    }
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

/// Refuses a client id that a registered Thing reserves (its `mqttClientId`) to anyone not
/// bound to that Thing: otherwise they could hold the device's session and lock it out.
fn reserved_client_id(conn: &Conn, ctx: &MqttContext, client_id: &str) -> Result<(), Refusal> {
    // With Cumulocity devices, `d:{id}` is the same device as `{id}`: reserved with it.
    if ctx.cumulocity.is_some() {
        if let Some(plain) = client_id.strip_prefix("d:") {
            reserved_client_id(conn, ctx, plain)?;
        }
    }
    match ctx.users.client_id_reserved_by(client_id) {
        Ok(Some(thing)) => {
            tracing::info!(peer = %conn.peer, %client_id, %thing, "client id reserved for a Thing's users; refusing");
            Err(Refusal::BadClientId)
        }
        Ok(None) => Ok(()),
        // Unknown whether it is reserved: refuse rather than risk a device's session.
        Err(_) => Err(Refusal::ServerBusy),
    }
}

/// Checks the CONNECT's credentials (throttled per source address and username) and returns
/// who the client is (with the fingerprint of the user record it was checked against), or the
/// refusal to answer with.
async fn authenticate(
    conn: &Conn,
    ctx: &MqttContext,
    client_id: &str,
    login: Option<rumqttd::protocol::Login>,
) -> Result<(Identity, Option<[u8; 32]>), Refusal> {
    if let Some(certificate) = conn.certificate.as_deref() {
        return authenticate_certificate(conn, ctx, client_id, login, certificate);
    }
    let Some(login) = login else {
        if ctx.config.allow_anonymous {
            reserved_client_id(conn, ctx, client_id)?;
            let identity = Identity {
                client_id: client_id.to_owned(),
                username: None,
                thing: None,
                superuser: false,
                bootstrap: false,
            };
            return Ok((identity, None));
        }
        tracing::debug!(peer = %conn.peer, %client_id, "anonymous connection refused");
        return Err(Refusal::NotAuthorized);
    };
    let mut username = plain_username(&login.username).to_owned();
    if let Some(c8y) = &ctx.cumulocity {
        match c8y.strip_tenant(&username) {
            Some(user) => username = user.to_owned(),
            None => {
                tracing::info!(peer = %conn.peer, username = %login.username, "a username for another Cumulocity tenant");
                return Err(Refusal::BadCredentials);
            }
        }
    }
    let users = ctx.users.clone();
    // The cache answers repeat connects inline; only a miss pays for argon2, on a blocking
    // thread (spawning one per CONNECT cost ~25 KB of RSS per connection).
    let outcome = match users.authenticate_cached(&username, &login.password) {
        Some(auth) => Some(auth),
        None => {
            if let Verdict::Wait(wait) = ctx.throttle.check(conn.peer.ip(), Some(&username)) {
                tracing::debug!(peer = %conn.peer, %username, ?wait, "authentication throttled");
                return Err(Refusal::Throttled);
            }
            let name = username.clone();
            let password = login.password;
            tokio::task::spawn_blocking(move || users.authenticate(&name, &password))
                .await
                .ok()
                .flatten()
        }
    };
    let Some(auth) = outcome else {
        ctx.throttle.failed(conn.peer.ip(), Some(&username), "mqtt");
        return Err(Refusal::BadCredentials);
    };
    ctx.throttle.succeeded(conn.peer.ip(), &username);
    if auth.bootstrap {
        // The Cumulocity bootstrap user, shared by every new device: its connection is keyed
        // apart from the device's own session, so it can never take over or read it.
        let device = client_id.strip_prefix("d:").unwrap_or(client_id);
        let Some(c8y) = ctx.cumulocity.as_ref() else {
            return Err(Refusal::NotAuthorized);
        };
        if validate_thing_name(device).is_err() {
            tracing::info!(peer = %conn.peer, %client_id, "bootstrap connection with a client id that is no device id; refusing");
            return Err(Refusal::BadClientId);
        }
        if !c8y.is_registered(device) {
            // Only registered ids: made-up ones could only fill the bootstrap connections.
            tracing::info!(peer = %conn.peer, %client_id, "bootstrap connection for a device that is not registered; refusing");
            return Err(Refusal::NotAuthorized);
        }
        let identity = Identity {
            client_id: format!("{BOOTSTRAP_CLIENT_PREFIX}{device}"),
            username: Some(username),
            thing: None,
            superuser: false,
            bootstrap: true,
        };
        return Ok((identity, Some(auth.fingerprint)));
    }
    if auth.thing_name.is_none() {
        reserved_client_id(conn, ctx, client_id)?;
    }
    // A Cumulocity device may use the `d:` form of its Thing's client id (the same session).
    let c8y_form = ctx.cumulocity.is_some()
        && auth.thing_name.is_some()
        && auth
            .thing_client_id
            .as_deref()
            .is_some_and(|own| client_id.strip_prefix("d:") == Some(own));
    if let Some(thing) = &auth.thing_name {
        // A Thing's user connects as that Thing, with its client id and no other: anything else
        // could take over, read or kick another device's session.
        match &auth.thing_client_id {
            Some(_) if c8y_form => {}
            Some(own) if own == client_id => {}
            Some(own) => {
                tracing::info!(peer = %conn.peer, %username, %thing, %client_id, expected = %own, "a Thing's user must connect with the Thing's mqttClientId");
                return Err(Refusal::BadClientId);
            }
            None => {
                tracing::info!(peer = %conn.peer, %username, %thing, "the user's Thing is not registered");
                return Err(Refusal::NotAuthorized);
            }
        }
    }
    // A Cumulocity device's `d:` form is its Thing's client id: one session either way (a
    // second connection takes the first over, deletion and restore find it).
    let client_id = match (&auth.thing_client_id, c8y_form) {
        (Some(own), true) => own.clone(),
        _ => client_id.to_owned(),
    };
    if client_id.starts_with(BOOTSTRAP_CLIENT_PREFIX) {
        // A Thing's client id set so by an operator: still the bootstrap connections' own.
        tracing::info!(peer = %conn.peer, %client_id, "a client id in the bootstrap connections' namespace; refusing");
        return Err(Refusal::BadClientId);
    }
    let identity = Identity {
        client_id,
        username: Some(username),
        thing: auth.thing_name,
        superuser: auth.superuser,
        bootstrap: false,
    };
    Ok((identity, Some(auth.fingerprint)))
}

/// A client certificate rustls verified is the identity: the Thing it names (CN or SAN) must
/// have it registered and active, and the client connects with that Thing's client id. A
/// username, if sent, must be empty or that Thing's name; a password is not needed.
fn authenticate_certificate(
    conn: &Conn,
    ctx: &MqttContext,
    client_id: &str,
    login: Option<rumqttd::protocol::Login>,
    certificate: &PeerCertificate,
) -> Result<(Identity, Option<[u8; 32]>), Refusal> {
    let fingerprint = certificate.fingerprint.as_str();
    let refused = |why: &str| {
        tracing::info!(peer = %conn.peer, %client_id, %fingerprint, name = certificate.name.as_deref().unwrap_or("-"), "client certificate refused: {why}");
        ctx.throttle.failed(conn.peer.ip(), None, "mqtt");
        Refusal::NotAuthorized
    };
    let Some(thing) = certificate.name.as_deref() else {
        return Err(refused("it names no device (see tls_client_identity)"));
    };
    if validate_thing_name(thing).is_err() {
        return Err(refused("the name it carries is no Thing name"));
    }
    if let Some(login) = &login {
        let username = plain_username(&login.username);
        if !username.is_empty() && username != thing {
            return Err(refused("the CONNECT's username names someone else"));
        }
    }
    match ctx.users.certificates().standing(thing, fingerprint) {
        Ok(Standing::Active) => {}
        Ok(Standing::Revoked) => return Err(refused("it was revoked")),
        Ok(Standing::Unknown) => return Err(refused("it is not registered for its Thing")),
        Err(e) => {
            tracing::error!(%thing, error = %e, "cannot read the device certificates");
            return Err(Refusal::ServerBusy);
        }
    }
    let owner = certificate_owner(thing);
    let rights = match ctx.users.rights(&owner) {
        Ok(Some(rights)) => rights,
        Ok(None) => return Err(refused("it was revoked meanwhile")),
        Err(e) => {
            tracing::error!(%thing, error = %e, "cannot read the device certificates");
            return Err(Refusal::ServerBusy);
        }
    };
    match rights.thing_client_id.as_deref() {
        Some(own) if own == client_id => {}
        Some(own) => {
            tracing::info!(peer = %conn.peer, %thing, %client_id, expected = %own, "a Thing's certificate must connect with the Thing's mqttClientId");
            return Err(Refusal::BadClientId);
        }
        None => return Err(refused("its Thing is not registered")),
    }
    ctx.throttle.succeeded(conn.peer.ip(), &owner);
    let identity = Identity {
        client_id: client_id.to_owned(),
        username: Some(owner),
        thing: Some(thing.to_owned()),
        superuser: false,
        bootstrap: false,
    };
    Ok((identity, Some(rights.fingerprint)))
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
    } else if connect.client_id.len() > ctx.config.client_id_bytes_max
        || connect.client_id.starts_with(BOOTSTRAP_CLIENT_PREFIX)
    {
        // The second: bootstrap connections' own session keys.
        return refuse(conn, Refusal::BadClientId).await.map(|()| None);
    } else {
        connect.client_id.clone()
    };

    let (identity, fingerprint) = match authenticate(conn, ctx, &client_id, login).await {
        Ok(found) => found,
        Err(refusal) => return refuse(conn, refusal).await.map(|()| None),
    };

    let expiry_requested = if v5 {
        match properties.as_ref().and_then(|p| p.session_expiry_interval) {
            // 0xFFFFFFFF: the session does not expire (the server's bound still applies).
            Some(u32::MAX) => Duration::MAX,
            Some(s) => Duration::from_secs(u64::from(s)),
            None => Duration::ZERO,
        }
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
    conn.alias_out_max = properties
        .as_ref()
        .and_then(|p| p.topic_alias_max)
        .unwrap_or(0)
        .min(ctx.config.topic_alias_max);
    let keep_alive_max = ctx.config.keep_alive_max_s;
    let server_keep_alive = (v5
        && keep_alive_max > 0
        && (connect.keep_alive == 0 || connect.keep_alive > keep_alive_max))
        .then_some(keep_alive_max);
    let keep_alive_s = server_keep_alive.unwrap_or(connect.keep_alive);
    let will = match last_will {
        None => None,
        Some(will) => match to_will(will, will_properties, &client_id) {
            Ok(will)
                if ctx
                    .acl
                    .allows(&identity, Action::Publish, &will.message.topic) =>
            {
                Some(will)
            }
            Ok(will) => {
                tracing::info!(%client_id, topic = %will.message.topic, "will message not allowed by the ACL; dropped");
                ctx.broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                tracing::info!(peer = %conn.peer, %client_id, error = %e, "invalid will topic; refusing");
                if v5 {
                    let _ = refuse(conn, Refusal::Malformed).await;
                }
                return Ok(None);
            }
        },
    };

    let (tx, rx) = mpsc::channel(ctx.config.outbound_queue_max.max(1));
    let link = Arc::new(Link::default());
    let request = ConnectRequest {
        identity: identity.clone(),
        clean_start: connect.clean_session,
        // A bootstrap connection keeps no session: its device asks again after a reconnect.
        expiry: if identity.bootstrap {
            Duration::ZERO
        } else {
            expiry_requested
        },
        receive_maximum,
        will,
        verify: verification(ctx, &identity, fingerprint),
    };
    let registered = match ctx.broker.connect(request, tx, link.clone()) {
        Ok(registered) => registered,
        Err(refusal) => {
            tracing::info!(peer = %conn.peer, %client_id, username = identity.username.as_deref().unwrap_or("-"), error = %refusal, "connection refused");
            let refusal = match refusal {
                ConnectRefusal::NotOwner | ConnectRefusal::Revoked => Refusal::NotAuthorized,
                ConnectRefusal::SessionsFull | ConnectRefusal::UserSessionsFull => {
                    Refusal::QuotaExceeded
                }
                ConnectRefusal::Unverifiable => Refusal::ServerBusy,
            };
            return refuse(conn, refusal).await.map(|()| None);
        }
    };
    let expiry_lowered = registered.expiry < expiry_requested;
    let connack_properties = v5.then(|| ConnAckProperties {
        assigned_client_identifier: assigned,
        session_expiry_interval: expiry_lowered
            .then(|| u32::try_from(registered.expiry.as_secs()).unwrap_or(u32::MAX - 1)),
        receive_max: Some(ctx.config.inbound_inflight_max),
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
            peer: conn.peer.to_string(),
            protocol: if v5 { "5.0" } else { "3.1.1" },
            listener: conn.listener.as_str(),
            certificate: conn.certificate.as_ref().map(|c| c.fingerprint.clone()),
            connected_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        },
    );
    if let Some(thing) = &identity.thing {
        ctx.bridge
            .connected(thing, &client_id, registered.connection_id)
            .await;
    }

    Ok(Some(Established {
        session: Session {
            identity,
            connection_id: registered.connection_id,
            link,
            persistent_at_connect: !registered.expiry.is_zero(),
            aliases: HashMap::new(),
            qos2_pending: 0,
        },
        rx,
        keep_alive: Duration::from_millis(u64::from(keep_alive_s) * 1500),
        v5,
    }))
}

/// What the broker checks again under its lock before registering the session: the user record
/// is the one the password was checked against, and a Thing's user's Thing still holds the
/// client id (a change or a deletion racing the CONNECT cannot slip past its revocation).
fn verification(
    ctx: &MqttContext,
    identity: &Identity,
    fingerprint: Option<[u8; 32]>,
) -> Option<super::broker::Verify> {
    use super::broker::Verified;
    let username = identity.username.clone()?;
    let fingerprint = fingerprint?;
    let users = ctx.users.clone();
    let thing = identity.thing.clone();
    let client_id = identity.client_id.clone();
    Some(Box::new(move || {
        match users.fingerprint(&username) {
            Ok(Some(now)) if now == fingerprint => {}
            Ok(_) => return Verified::Changed,
            Err(e) => {
                tracing::error!(%username, error = %e, "cannot read the user again");
                return Verified::Unreadable;
            }
        }
        let Some(thing) = &thing else {
            return Verified::Yes;
        };
        match users.client_id_reserved_by(&client_id) {
            Ok(owner) if owner.as_ref() == Some(thing) => Verified::Yes,
            Ok(_) => Verified::Changed,
            Err(_) => Verified::Unreadable,
        }
    }))
}

/// The v5 DISCONNECT reason code the server sends when it closes a connection for `reason`.
fn disconnect_code(reason: CloseReason) -> Option<DisconnectReasonCode> {
    match reason {
        CloseReason::Takeover => Some(DisconnectReasonCode::SessionTakenOver),
        CloseReason::KeepAliveTimeout => Some(DisconnectReasonCode::KeepAliveTimeout),
        CloseReason::ServerShutdown => Some(DisconnectReasonCode::ServerShuttingDown),
        CloseReason::Kicked => Some(DisconnectReasonCode::AdministrativeAction),
        CloseReason::ProtocolError => Some(DisconnectReasonCode::ProtocolError),
        CloseReason::SlowConsumer => Some(DisconnectReasonCode::QuotaExceeded),
        CloseReason::Revoked => Some(DisconnectReasonCode::NotAuthorized),
        CloseReason::ReceiveMaximumExceeded => Some(DisconnectReasonCode::ReceiveMaximumExceeded),
        CloseReason::Normal | CloseReason::ConnectionLost => None,
    }
}

/// The wire value of a reason code (rumqttd's enum has no explicit discriminants).
fn disconnect_code_byte(code: DisconnectReasonCode) -> u8 {
    match code {
        DisconnectReasonCode::SessionTakenOver => 0x8e,
        DisconnectReasonCode::KeepAliveTimeout => 0x8d,
        DisconnectReasonCode::ServerShuttingDown => 0x8b,
        DisconnectReasonCode::AdministrativeAction => 0x98,
        DisconnectReasonCode::ProtocolError => 0x82,
        DisconnectReasonCode::QuotaExceeded => 0x97,
        DisconnectReasonCode::NotAuthorized => 0x87,
        DisconnectReasonCode::ReceiveMaximumExceeded => 0x93,
        _ => 0x80,
    }
}

/// After the session loop: DISCONNECT (v5), socket shutdown, session detach (the broker
/// publishes the will or holds it for its delay), the Thing's disconnect event.
async fn close(conn: &mut Conn, ctx: &MqttContext, established: Established, reason: CloseReason) {
    let Established {
        session,
        v5,
        mut rx,
        ..
    } = established;
    let client_id = session.identity.client_id.clone();
    if v5 && !conn.write_broken {
        if let Some(code) = disconnect_code(reason) {
            let bytes = codec::server_disconnect_v5(disconnect_code_byte(code));
            // Bounded: a client that stopped reading must not hold the close up.
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, conn.write_raw(&bytes)).await;
        }
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, conn.io.shutdown()).await;
    let was_current = ctx
        .broker
        .disconnect(&client_id, session.connection_id, reason);
    // Nothing more can arrive (the broker dropped the sender): give back what is left.
    rx.close();
    while let Ok(outbound) = rx.try_recv() {
        ctx.broker.taken(&session.link, outbound.size());
    }
    tracing::debug!(peer = %conn.peer, %client_id, reason = reason.as_str(), was_current, "disconnected");
    if let Some(thing) = &session.identity.thing {
        ctx.bridge
            .disconnected(thing, &client_id, session.connection_id, reason.as_str())
            .await;
    }
}

/// How long closing a connection may wait for its socket.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

fn to_will(
    will: LastWill,
    properties: Option<LastWillProperties>,
    client_id: &str,
) -> Result<Will, topic::TopicError> {
    let topic = std::str::from_utf8(&will.topic).map_err(|_| topic::TopicError::Empty)?;
    topic::validate_topic_name(topic)?;
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
    Ok(Will {
        message: Message {
            topic: Arc::from(topic),
            payload: will.message,
            qos: codec::qos_number(will.qos),
            retain: will.retain,
            publisher: Some(Arc::from(client_id)),
            properties: forwarded.filter(has_forwarded_fields).map(Arc::new),
            expires_at: None,
        },
        delay,
        expiry,
    })
}

/// Whether properties carry anything worth forwarding (aliases and ids are per hop).
fn has_forwarded_fields(p: &PublishProperties) -> bool {
    p.payload_format_indicator.is_some()
        || p.response_topic.is_some()
        || p.correlation_data.is_some()
        || !p.user_properties.is_empty()
        || p.content_type.is_some()
}

struct Session {
    identity: Identity,
    connection_id: u64,
    link: Arc<Link>,
    /// Whether the CONNECT asked for a session that outlives the connection (v5: a DISCONNECT
    /// may then change its expiry, but may not make a non-persistent one persistent).
    persistent_at_connect: bool,
    /// Topic aliases the client set up.
    aliases: HashMap<u16, Arc<str>>,
    /// Inbound QoS 2 messages awaiting PUBREL (as last reported by the broker).
    qos2_pending: usize,
}

/// Writes the queued bytes unless the connection is asked to close first; a client that stopped
/// reading is closed as a slow consumer once a write makes no progress for `write_stall_max`.
async fn flush_or_close(
    conn: &mut Conn,
    ctx: &MqttContext,
    link: &Link,
) -> Result<(), CloseReason> {
    tokio::select! {
        written = conn.flush_encoded() => written.map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                ctx.broker.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                CloseReason::SlowConsumer
            } else {
                CloseReason::ConnectionLost
            }
        }),
        reason = link.closed() => Err(reason),
    }
}

async fn session_loop(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    rx: &mut mpsc::Receiver<Outbound>,
    keep_alive: Duration,
) -> CloseReason {
    let link = session.link.clone();
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
            if let Some(reason) = link.reason() {
                return reason;
            }
            // The packet is taken out of the read result before the await below, so the
            // connection's resting state does not keep a packet-sized slot.
            let packet = match codec::read(
                conn.version,
                &mut conn.read_buf,
                ctx.config.packet_bytes_max,
            ) {
                Ok(packet) => {
                    conn.traffic.received(&packet);
                    packet
                }
                Err(CodecError::Incomplete) => break,
                Err(e) => {
                    tracing::info!(peer = %conn.peer, client_id = %session.identity.client_id, error = %e, "protocol error; closing");
                    return CloseReason::ProtocolError;
                }
            };
            if !keep_alive.is_zero() {
                deadline.as_mut().reset(Instant::now() + keep_alive);
            }
            // Boxed: handling a publish or a subscribe (fast-path requests to Thing actors
            // included) needs kilobytes of future state that an idle connection should not
            // carry. Every other packet (a device's PUBACK for each reply, PINGREQ) is handled
            // at once, without allocating that future.
            let handled = if matches!(packet, Packet::Publish(..) | Packet::Subscribe(..)) {
                Box::pin(handle_packet(conn, ctx, session, packet)).await
            } else {
                handle_control(conn, ctx, session, packet)
            };
            match handled {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    // Acknowledgements already queued still go out (bounded).
                    let _ = Box::pin(tokio::time::timeout(
                        CLOSE_WRITE_TIMEOUT,
                        conn.flush_encoded(),
                    ))
                    .await;
                    return reason;
                }
                Err(_) => return CloseReason::ConnectionLost,
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
                let Ok(outbound) = rx.try_recv() else {
                    break;
                };
                if let Err(reason) = encode_or_discard(conn, ctx, session, outbound) {
                    return reason;
                }
                encoded += 1;
            }
            if let Err(reason) = flush_or_close(conn, ctx, &link).await {
                return reason;
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
                loop {
                    match next {
                        Some(outbound) => {
                            if let Err(reason) = encode_or_discard(conn, ctx, session, outbound) {
                                return reason;
                            }
                            encoded += 1;
                        }
                        // The broker dropped the session (revocation, kick): its reason is set.
                        None => return link.reason().unwrap_or(CloseReason::ServerShutdown),
                    }
                    if encoded >= WRITE_BATCH_PACKETS_MAX {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(more) => next = Some(more),
                        Err(_) => break,
                    }
                }
                if let Err(reason) = flush_or_close(conn, ctx, &link).await {
                    return reason;
                }
            },
            reason = link.closed() => {
                let _ = Box::pin(tokio::time::timeout(CLOSE_WRITE_TIMEOUT, conn.flush_encoded()))
                    .await;
                return reason;
            }
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
    ctx.broker.taken(&session.link, outbound.size());
    match encode_outbound(conn, outbound) {
        Ok(()) => Ok(()),
        Err(CodecError::TooLarge(bytes)) => {
            tracing::debug!(client_id = %session.identity.client_id, bytes, "publish larger than the client's maximum packet size; discarded");
            ctx.broker
                .stats
                .messages_dropped
                .fetch_add(1, Ordering::Relaxed);
            if let Some(pkid) = settles {
                ctx.broker
                    .acknowledged(&session.identity.client_id, session.connection_id, pkid);
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
            // v5 topic alias toward the client: a known topic goes out as an empty topic plus
            // its alias; a new one takes a free alias (sent with the topic) while any is left.
            let (alias, known_alias) = match conn.aliases_out.get(&publish.topic) {
                Some(&alias) => (Some(alias), true),
                None if (conn.aliases_out.len() as u16) < conn.alias_out_max => {
                    (Some(conn.aliases_out.len() as u16 + 1), false)
                }
                None => (None, false),
            };
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
                    properties.subscription_identifiers = publish.subscription_ids.clone();
                    properties.topic_alias = alias;
                    let any = has_forwarded_fields(&properties)
                        || properties.message_expiry_interval.is_some()
                        || properties.topic_alias.is_some()
                        || !properties.subscription_identifiers.is_empty();
                    any.then_some(properties)
                }
            };
            let name: &str = match &conn.c8y_prefix {
                // A Cumulocity device's own topic goes out under its plain name (`s/ds`).
                Some(prefix) => publish
                    .topic
                    .strip_prefix(prefix.as_str())
                    .unwrap_or(&publish.topic),
                None => &publish.topic,
            };
            let topic = if known_alias { "" } else { name };
            let packet = codec::make_publish(
                topic,
                &publish.payload,
                publish.qos,
                publish.pkid,
                publish.retain,
                publish.dup,
            );
            let before = conn.write_buf.len();
            let packet = Packet::Publish(packet, properties);
            conn.traffic.sent(&packet);
            conn.traffic.publish_sent(publish.qos);
            codec::write(conn.version, packet, &mut conn.write_buf)?;
            if conn
                .client_packet_bytes_max
                .is_some_and(|max| conn.write_buf.len() - before > max)
            {
                // Larger than the client accepts: discard it, as if sent (MQTT 5 3.1.2.25). A
                // new alias it carried was never seen by the client, so it is not kept.
                conn.write_buf.truncate(before);
                return Err(CodecError::TooLarge(publish.payload.len()));
            }
            if let (Some(alias), false) = (alias, known_alias) {
                conn.aliases_out.insert(publish.topic.clone(), alias);
            }
            Ok(())
        }
        Outbound::PubRel(pkid) => {
            let packet = Packet::PubRel(
                PubRel {
                    pkid,
                    reason: PubRelReason::Success,
                },
                None,
            );
            conn.traffic.sent(&packet);
            codec::write(conn.version, packet, &mut conn.write_buf)
        }
    }
}

/// Handles one packet from the client; `Some(reason)` ends the connection. Replies are queued
/// and written by the session loop once the packets read so far are handled.
async fn handle_packet(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    packet: Packet,
) -> std::io::Result<Option<CloseReason>> {
    match packet {
        Packet::Publish(publish, properties) => {
            handle_publish(conn, ctx, session, publish, properties).await
        }
        Packet::Subscribe(subscribe, properties) => {
            handle_subscribe(conn, ctx, session, subscribe, properties).await
        }
        other => handle_control(conn, ctx, session, other),
    }
}

/// Every packet but PUBLISH and SUBSCRIBE: handled without waiting on anything.
fn handle_control(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    packet: Packet,
) -> std::io::Result<Option<CloseReason>> {
    let client_id = session.identity.client_id.as_str();
    let connection_id = session.connection_id;
    match packet {
        Packet::PubAck(ack, _) => ctx.broker.acknowledged(client_id, connection_id, ack.pkid),
        Packet::PubRec(rec, _) => ctx.broker.received(client_id, connection_id, rec.pkid),
        Packet::PubComp(comp, _) => ctx.broker.acknowledged(client_id, connection_id, comp.pkid),
        Packet::PubRel(rel, _) => handle_pubrel(conn, ctx, session, rel.pkid)?,
        Packet::Unsubscribe(unsubscribe, _) => handle_unsubscribe(conn, ctx, session, unsubscribe)?,
        Packet::PingReq(_) => conn.queue(Packet::PingResp(PingResp))?,
        Packet::Disconnect(disconnect, properties) => {
            return Ok(Some(handle_disconnect(
                ctx, session, disconnect, properties,
            )));
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

/// PUBREL: the client releases an inbound QoS 2 id; PUBCOMP answers (v5: "not found" for an
/// unknown id).
fn handle_pubrel(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    pkid: u16,
) -> std::io::Result<()> {
    let known = ctx
        .broker
        .qos2_released(&session.identity.client_id, session.connection_id, pkid);
    if known {
        session.qos2_pending = session.qos2_pending.saturating_sub(1);
    }
    let reason = if known || conn.version != Version::V5 {
        PubCompReason::Success
    } else {
        PubCompReason::PacketIdentifierNotFound
    };
    conn.queue(Packet::PubComp(PubComp { pkid, reason }, None))
}

/// SUBSCRIBE: each filter is validated, authorized and added; SUBACK answers per filter. For a
/// persistent session the SUBACK waits until the subscriptions are durable (stored and synced),
/// so an acknowledged subscription survives a crash; if storage cannot make them durable in
/// time the new ones are removed again and refused (3.1.1: 0x80, v5: 0x83). A filter the
/// session already had stays (it is durable; only its new options are written behind).
async fn handle_subscribe(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    subscribe: rumqttd::protocol::Subscribe,
    properties: Option<rumqttd::protocol::SubscribeProperties>,
) -> std::io::Result<Option<CloseReason>> {
    let v5 = conn.version == Version::V5;
    let client_id = &session.identity.client_id;
    let subscription_id = properties.as_ref().and_then(|p| p.id);
    if subscription_id == Some(0) {
        tracing::info!(%client_id, "subscription identifier 0; closing");
        return Ok(Some(CloseReason::ProtocolError));
    }
    let mut codes = Vec::with_capacity(subscribe.filters.len());
    // (index of the filter, the subscription as the broker holds it) of those that are new.
    let mut added: Vec<(usize, String)> = Vec::new();
    for (index, filter) in subscribe.filters.iter().enumerate() {
        // A Cumulocity device's `s/ds` and `s/e` are its own: subscribed under its namespace,
        // without the ACL (nobody else's can be named); other `s/` filters are refused.
        let own = match &ctx.cumulocity {
            Some(_) if super::cumulocity::Cumulocity::is_c8y_topic(&filter.path) => {
                match super::cumulocity::Cumulocity::own_subscription(
                    &session.identity,
                    &filter.path,
                ) {
                    Some(own) => Some(own),
                    None => {
                        tracing::info!(%client_id, filter = %filter.path, "not a Cumulocity topic this connection may subscribe to");
                        codes.push(if v5 {
                            SubscribeReasonCode::NotAuthorized
                        } else {
                            SubscribeReasonCode::Failure
                        });
                        continue;
                    }
                }
            }
            _ => None,
        };
        let path = own.as_deref().unwrap_or(&filter.path);
        let code = match topic::parse_filter(path) {
            Err(e) => {
                tracing::info!(%client_id, filter = %filter.path, error = %e, "invalid filter");
                if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                }
            }
            Ok(parsed)
                if !ctx
                    .acl
                    .allows(&session.identity, Action::Subscribe, &parsed.filter) =>
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
                match ctx
                    .broker
                    .subscribe(client_id, session.connection_id, path, parsed, options)
                {
                    Ok(is_new) => {
                        if is_new {
                            added.push((index, path.to_owned()));
                        }
                        SubscribeReasonCode::Success(codec::qos_of(qos))
                    }
                    Err(refusal) => {
                        tracing::info!(%client_id, filter = %filter.path, %refusal, "subscription refused");
                        if v5 {
                            SubscribeReasonCode::QuotaExceeded
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    }
                }
            }
        };
        codes.push(code);
    }
    if session.persistent_at_connect
        && !added.is_empty()
        && !ctx
            .broker
            .wait_durable(ctx.config.subscribe_durable_wait)
            .await
    {
        tracing::error!(%client_id, "subscriptions could not be made durable in time; refused");
        for (index, filter) in &added {
            ctx.broker
                .unsubscribe(client_id, session.connection_id, filter);
            if let Some(code) = codes.get_mut(*index) {
                *code = if v5 {
                    SubscribeReasonCode::ImplementationSpecific
                } else {
                    SubscribeReasonCode::Failure
                };
            }
        }
    }
    conn.queue(Packet::SubAck(
        SubAck {
            pkid: subscribe.pkid,
            return_codes: codes,
        },
        None,
    ))?;
    Ok(None)
}

/// UNSUBSCRIBE: UNSUBACK with a reason per filter.
fn handle_unsubscribe(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    unsubscribe: rumqttd::protocol::Unsubscribe,
) -> std::io::Result<()> {
    let reasons = unsubscribe
        .filters
        .iter()
        .map(|filter| {
            let own = ctx.cumulocity.as_ref().and_then(|_| {
                super::cumulocity::Cumulocity::own_subscription(&session.identity, filter)
            });
            let filter = own.as_deref().unwrap_or(filter);
            if ctx
                .broker
                .unsubscribe(&session.identity.client_id, session.connection_id, filter)
            {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            }
        })
        .collect();
    conn.queue(Packet::UnsubAck(
        UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
        },
        None,
    ))
}

/// DISCONNECT from the client: a v5 session expiry change, then the reason the connection ends
/// with (any reason code but "normal" publishes the will, MQTT 5 3.14.2.1).
fn handle_disconnect(
    ctx: &MqttContext,
    session: &mut Session,
    disconnect: rumqttd::protocol::Disconnect,
    properties: Option<rumqttd::protocol::DisconnectProperties>,
) -> CloseReason {
    let client_id = &session.identity.client_id;
    if let Some(seconds) = properties.and_then(|p| p.session_expiry_interval) {
        // MQTT 5 3.14.2.2.2: a session that was not persistent may not become one here.
        if !session.persistent_at_connect && seconds > 0 {
            tracing::info!(%client_id, "DISCONNECT sets a session expiry on a non-persistent session; protocol error");
            return CloseReason::ProtocolError;
        }
        let expiry = if seconds == u32::MAX {
            Duration::MAX
        } else {
            Duration::from_secs(u64::from(seconds))
        };
        ctx.broker
            .set_session_expiry(client_id, session.connection_id, expiry);
    }
    if disconnect.reason_code == DisconnectReasonCode::NormalDisconnection {
        CloseReason::Normal
    } else {
        CloseReason::ConnectionLost
    }
}

/// What a client's PUBLISH became.
enum PublishOutcome {
    /// Handled (routed, or answered by the fast path).
    Accepted,
    /// Refused by the ACL (dropped, counted).
    NotAuthorized,
    /// Refused by a retained bound.
    QuotaExceeded,
}

async fn handle_publish(
    conn: &mut Conn,
    ctx: &MqttContext,
    session: &mut Session,
    publish: rumqttd::protocol::Publish,
    properties: Option<PublishProperties>,
) -> std::io::Result<Option<CloseReason>> {
    let v5 = conn.version == Version::V5;
    let client_id = session.identity.client_id.clone();
    ctx.broker.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    let (qos, pkid, _dup) = codec::publish_header(&publish);
    conn.traffic.publish_received(qos);
    // Receive maximum (v5): QoS 1 counts until its PUBACK is written, QoS 2 until PUBREL.
    let receive_max = usize::from(ctx.config.inbound_inflight_max);
    if v5 && qos == 1 && usize::from(conn.pubacks_queued) + session.qos2_pending >= receive_max {
        tracing::info!(%client_id, receive_max, "receive maximum exceeded; closing");
        return Ok(Some(CloseReason::ReceiveMaximumExceeded));
    }
    // Topic (v5 topic aliases: a non-empty topic with an alias sets it; an empty one uses it).
    let alias = properties.as_ref().and_then(|p| p.topic_alias);
    if alias.is_some_and(|a| a == 0 || a > ctx.config.topic_alias_max) {
        tracing::info!(%client_id, ?alias, "topic alias out of range; closing");
        return Ok(Some(CloseReason::ProtocolError));
    }
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
            session.aliases.insert(alias, topic.clone());
        }
        topic
    };
    if qos == 2 {
        match ctx
            .broker
            .qos2_arrived(&client_id, session.connection_id, pkid)
        {
            // A resend of one not yet released: acknowledged again, not delivered again.
            None => {
                conn.queue(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ))?;
                return Ok(None);
            }
            Some(pending) => {
                session.qos2_pending = pending;
                if v5 && pending + usize::from(conn.pubacks_queued) > receive_max {
                    tracing::info!(%client_id, receive_max, "receive maximum exceeded; closing");
                    return Ok(Some(CloseReason::ReceiveMaximumExceeded));
                }
            }
        }
    }
    let c8y = ctx
        .cumulocity
        .as_ref()
        .filter(|_| super::cumulocity::Cumulocity::is_c8y_topic(&topic));
    let outcome = if let Some(c8y) = c8y {
        // SmartREST: rows for the device's Thing, answered on its `s/e`; only `s/us` and
        // `s/us/{child}` take rows, and only from a connection that is a device.
        let device = super::cumulocity::Cumulocity::device_of(&session.identity);
        // Every `s/` publish of a device is answered: rows on `s/us`, a 43 on `s/e` otherwise.
        let bootstrap = super::cumulocity::Cumulocity::bootstrap_device(&session.identity);
        if device.is_some() {
            c8y.upstream(&session.identity, &topic, &publish.payload)
                .await;
            PublishOutcome::Accepted
        } else if let Some(device) = bootstrap.filter(|_| &*topic == "s/ucr") {
            // The bootstrap user asks for its device's credentials. The answer goes straight to
            // this connection (QoS 0, before the PUBACK), never through the broker: a
            // superuser's `$c8y/#` must not see passwords. Only a connection subscribed to
            // its `s/dcr` can be answered.
            let dcr = super::cumulocity::Cumulocity::own_subscription(&session.identity, "s/dcr");
            let connection_id = session.connection_id;
            let current = || ctx.broker.live_connection(&client_id) == Some(connection_id);
            let subscribed = current()
                && dcr.is_some_and(|filter| {
                    !ctx.broker
                        .subscriptions(Some(&client_id), Some(&filter), None, None, 1)
                        .is_empty()
                });
            let peer = conn.peer.to_string();
            let asking = super::cumulocity::Asking {
                peer: &peer,
                subscribed,
                packet_bytes_max: conn.client_packet_bytes_max,
                current: &current,
            };
            if let Some(row) = c8y.credentials_requested(device, &asking).await {
                let packet =
                    codec::make_publish("s/dcr", &bytes::Bytes::from(row), 0, 0, false, false);
                let packet = Packet::Publish(packet, None);
                conn.queue(packet)?;
                conn.traffic.publish_sent(0);
                // Written now: an answer left in the buffer of a connection that closes is
                // lost, and the one issuance with it.
                if let Err(e) = conn.flush_encoded().await {
                    c8y.credentials_lost(device).await;
                    return Err(e);
                }
            }
            PublishOutcome::Accepted
        } else {
            ctx.broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%client_id, %topic, "not a Cumulocity topic this connection may publish on; dropped");
            PublishOutcome::NotAuthorized
        }
    } else if !ctx.acl.allows(&session.identity, Action::Publish, &topic) {
        ctx.broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%client_id, %topic, "publish denied by ACL; dropped");
        PublishOutcome::NotAuthorized
    } else if let Some(request) = ctx.bridge.parse(&topic) {
        // The fast path: the Thing's actor answers; the request is not routed to subscribers.
        // The PUBACK below goes out only after the answer (durable, its effects out).
        ctx.bridge
            .handle(request, &publish.payload, session.identity.thing.as_deref())
            .await;
        PublishOutcome::Accepted
    } else {
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
        let routed = ctx.broker.publish(Message {
            topic: topic.clone(),
            payload: publish.payload.clone(),
            qos,
            retain: publish.retain,
            publisher: Some(Arc::from(client_id.as_str())),
            properties: forwarded,
            expires_at,
        });
        match routed {
            Ok(_) => {
                ctx.broker.tap.message(
                    Some(&session.identity),
                    &topic,
                    qos,
                    publish.retain,
                    &publish.payload,
                    "mqtt",
                );
                PublishOutcome::Accepted
            }
            Err(PublishRefusal::RetainedQuotaExceeded) => PublishOutcome::QuotaExceeded,
        }
    };
    match qos {
        1 => {
            let reason = match (outcome, v5) {
                (PublishOutcome::Accepted, _) | (_, false) => PubAckReason::Success,
                (PublishOutcome::NotAuthorized, true) => PubAckReason::NotAuthorized,
                (PublishOutcome::QuotaExceeded, true) => PubAckReason::QuotaExceeded,
            };
            let properties = v5_reason_string(reason);
            // Queued: it goes out with the fast path's reply in one write.
            conn.queue(Packet::PubAck(PubAck { pkid, reason }, properties))?;
            conn.pubacks_queued = conn.pubacks_queued.saturating_add(1);
        }
        2 => {
            let reason = match (outcome, v5) {
                (PublishOutcome::Accepted, _) | (_, false) => PubRecReason::Success,
                (PublishOutcome::NotAuthorized, true) => PubRecReason::NotAuthorized,
                (PublishOutcome::QuotaExceeded, true) => PubRecReason::QuotaExceeded,
            };
            if reason != PubRecReason::Success {
                // A failure PUBREC ends the exchange: no PUBREL follows, so the id is free now.
                ctx.broker
                    .qos2_released(&client_id, session.connection_id, pkid);
                session.qos2_pending = session.qos2_pending.saturating_sub(1);
            }
            conn.queue(Packet::PubRec(PubRec { pkid, reason }, None))?;
        }
        _ => {}
    }
    Ok(None)
}

fn v5_reason_string(reason: PubAckReason) -> Option<PubAckProperties> {
    let text = match reason {
        PubAckReason::NotAuthorized => "publish not authorized",
        PubAckReason::QuotaExceeded => "retained message store is full",
        _ => return None,
    };
    Some(PubAckProperties {
        reason_string: Some(text.into()),
        user_properties: Vec::new(),
    })
}
