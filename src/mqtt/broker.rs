//! The broker's shared state: sessions, subscriptions, retained messages, and delivery.
//!
//! Connections (see `connection.rs`) own sockets; this owns everything that outlives one:
//! a session's owner, its subscriptions, its outbound in-flight window (QoS 1/2 awaiting
//! acknowledgement, retransmitted with DUP on reconnect), its bounded queue of messages waiting
//! for the window or for the client to come back, and its will while the will delay runs.
//! Delivery happens at min(publish QoS, subscription QoS).
//!
//! **Invariant:** a session belongs to the identity (username, or none for anonymous
//! development clients) that created it. A CONNECT by anyone else with that client id is
//! refused: it can neither resume, read, discard nor kick the session.
//!
//! Every store here is bounded: sessions in total, messages and bytes queued per session and in
//! total, retained messages and their bytes. What a bound drops or refuses is counted.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::protocol::{Packet, PublishProperties};
use tokio::sync::{mpsc, Notify};

use super::acl::Identity;
use super::codec;
use super::persist::{
    Changes, StoredMessage, StoredOptions, StoredProperties, StoredSession, TimeBase,
};
use super::tap::TapKind;
use super::topic::{self, FilterTrie, ParsedFilter};

/// Broker bounds.
#[derive(Debug, Clone, Copy)]
pub struct BrokerLimits {
    /// Outbound QoS 1/2 messages in flight per session when the client sets no receive maximum.
    pub inflight_max: usize,
    /// Messages queued per session (offline, or beyond the window); the oldest is dropped past it.
    pub session_queue_max: usize,
    /// Bytes (topic + payload) queued or in flight per session; the oldest is dropped past it.
    pub session_queue_bytes_max: usize,
    /// Bytes handed to one connection's channel and not yet written; past it the connection is
    /// closed as a slow consumer.
    pub outbound_bytes_max: usize,
    /// Bytes queued or in flight over all sessions, a hard bound. Half of it is shared, first
    /// come first served; the other half is reserved as each session's fair share (half the
    /// bound divided by the number of sessions), so a session within its share always
    /// receives, however much another user has queued.
    pub queued_bytes_max: usize,
    /// Sessions (connected or persistent) in total; a CONNECT that would create one more is
    /// refused.
    pub sessions_max: usize,
    /// Sessions one username may own (so one user cannot fill the session table); superusers
    /// (backend applications, trusted by the operator) are not counted.
    pub user_sessions_max: usize,
    /// Sessions (live connections: it keeps none) of the Cumulocity bootstrap user.
    pub bootstrap_sessions_max: usize,
    /// Subscriptions one session may hold; a new one past it is refused.
    pub session_subscriptions_max: usize,
    /// Longest a disconnected persistent session is kept.
    pub session_expiry_max: Duration,
    /// Most retained messages kept.
    pub retained_max: usize,
    /// Most bytes (topic + payload) of retained messages kept.
    pub retained_bytes_max: usize,
}

/// A message being routed.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// Publish QoS.
    pub qos: u8,
    /// Retain flag as published.
    pub retain: bool,
    /// The publishing client, for noLocal (None for the server's own messages).
    pub publisher: Option<Arc<str>>,
    /// v5 properties forwarded to v5 subscribers (content type, response topic, correlation
    /// data, user properties, payload format); aliases and subscription ids are per hop.
    pub properties: Option<Arc<PublishProperties>>,
    /// v5 message expiry: not delivered after this instant.
    pub expires_at: Option<Instant>,
}

impl Message {
    /// A JSON document the server publishes on `topic`: QoS 1, never retained (so never refused
    /// by a retained bound), no properties.
    pub fn from_server(topic: String, payload: &serde_json::Value) -> Message {
        Message::server_json(topic, Message::render(payload))
    }

    /// A JSON document's bytes, rendered once for several messages.
    pub fn render(payload: &serde_json::Value) -> Bytes {
        Bytes::from(payload.to_string())
    }

    /// [`Message::from_server`] with the document already rendered.
    pub fn server_json(topic: String, payload: Bytes) -> Message {
        Message {
            topic: Arc::from(topic),
            payload,
            qos: 1,
            retain: false,
            publisher: None,
            properties: None,
            expires_at: None,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Bytes this message holds in a store (topic + payload).
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// A PUBLISH for a connection to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundPublish {
    /// Topic.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// QoS it is delivered at.
    pub qos: u8,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// Retain flag.
    pub retain: bool,
    /// Retransmission.
    pub dup: bool,
    /// v5 subscription identifiers of every matching subscription that has one.
    pub subscription_ids: Vec<usize>,
    /// v5 properties to forward.
    pub properties: Option<Arc<PublishProperties>>,
    /// v5 message expiry (the remaining interval is sent).
    pub expires_at: Option<Instant>,
}

/// What a connection is told to write. Small on purpose (the publish is boxed): every
/// connection's channel allocates a block of 32 of these up front. Closing goes through the
/// connection's [`Link`], never through this channel (which may be full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Write a PUBLISH.
    Publish(Box<OutboundPublish>),
    /// Write a PUBREL (outbound QoS 2, after PUBREC).
    PubRel(u16),
}

impl Outbound {
    /// Bytes it holds (topic + payload), as counted against a connection's outbound budget.
    pub fn size(&self) -> usize {
        match self {
            Outbound::Publish(p) => p.topic.len() + p.payload.len(),
            Outbound::PubRel(_) => 0,
        }
    }
}

/// Why a connection ended (also the reason recorded in lifecycle events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT.
    Normal,
    /// No packet within 1.5x the keep-alive.
    KeepAliveTimeout,
    /// Another connection with the same client id took over.
    Takeover,
    /// An operator kicked the client.
    Kicked,
    /// The client broke the protocol (malformed packet, oversize packet, ...).
    ProtocolError,
    /// The server is shutting down.
    ServerShutdown,
    /// The socket closed or failed without DISCONNECT.
    ConnectionLost,
    /// The client could not keep up with its outbound messages.
    SlowConsumer,
    /// The user was deleted, or its password, binding or rights changed.
    Revoked,
    /// The client sent more unacknowledged QoS 1/2 publishes than the server's receive maximum.
    ReceiveMaximumExceeded,
}

impl CloseReason {
    const ALL: [CloseReason; 10] = [
        CloseReason::Normal,
        CloseReason::KeepAliveTimeout,
        CloseReason::Takeover,
        CloseReason::Kicked,
        CloseReason::ProtocolError,
        CloseReason::ServerShutdown,
        CloseReason::ConnectionLost,
        CloseReason::SlowConsumer,
        CloseReason::Revoked,
        CloseReason::ReceiveMaximumExceeded,
    ];

    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::KeepAliveTimeout => "keepalive_timeout",
            CloseReason::Takeover => "takeover",
            CloseReason::Kicked => "kicked",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::ServerShutdown => "server_shutdown",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Revoked => "revoked",
            CloseReason::ReceiveMaximumExceeded => "receive_maximum_exceeded",
        }
    }

    /// Whether the will message is published: not after a normal DISCONNECT, and not for a
    /// revoked identity (its rights are gone).
    pub fn publishes_will(self) -> bool {
        !matches!(self, CloseReason::Normal | CloseReason::Revoked)
    }

    fn code(self) -> u8 {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .map_or(0, |i| i as u8 + 1)
    }

    fn from_code(code: u8) -> Option<CloseReason> {
        CloseReason::ALL
            .get(usize::from(code).checked_sub(1)?)
            .copied()
    }
}

/// What the broker and one connection share besides the outbound channel: a close request,
/// out of band (the channel may be full: that is what a slow consumer is; the first reason
/// wins), and the bytes handed to the channel and not yet taken out (bounded per connection).
#[derive(Debug, Default)]
pub struct Link {
    reason: AtomicU8,
    notify: Notify,
    outbound_bytes: AtomicUsize,
}

impl Link {
    /// Asks the connection to close for `reason` (ignored if it was already asked).
    pub fn close(&self, reason: CloseReason) {
        if self
            .reason
            .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    /// The reason, once asked.
    pub fn reason(&self) -> Option<CloseReason> {
        CloseReason::from_code(self.reason.load(Ordering::Acquire))
    }

    /// Resolves once the connection is asked to close.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            // `notify_one` leaves a permit when nobody waits, so a close between the check
            // above and this await is not lost.
            self.notify.notified().await;
        }
    }

    /// Bytes in the outbound channel now.
    pub fn outbound_bytes(&self) -> usize {
        self.outbound_bytes.load(Ordering::Relaxed)
    }
}

/// A will message, held by the broker from CONNECT until the connection ends (and then for its
/// delay, unless the session ends first or the client comes back).
#[derive(Debug, Clone)]
pub struct Will {
    /// The message (its `expires_at` is stamped when it is published).
    pub message: Message,
    /// v5 Will Delay Interval.
    pub delay: Duration,
    /// v5 Message Expiry Interval, counted from publication.
    pub expiry: Option<Duration>,
}

/// Subscription options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    /// Maximum QoS granted.
    pub qos: u8,
    /// v5: do not deliver the subscriber's own publications.
    pub no_local: bool,
    /// v5: keep the retain flag as published.
    pub retain_as_published: bool,
    /// v5: 0 = send retained on subscribe, 1 = only if the subscription is new, 2 = never.
    pub retain_handling: u8,
    /// v5 subscription identifier.
    pub subscription_id: Option<usize>,
}

#[derive(Debug, Clone)]
struct Subscriber {
    client: Arc<str>,
    share: Option<Arc<str>>,
    filter: Arc<str>,
    options: SubOptions,
}

impl PartialEq for Subscriber {
    fn eq(&self, other: &Self) -> bool {
        self.client == other.client && self.share == other.share
    }
}

#[derive(Debug, Clone)]
struct Pending {
    topic: Arc<str>,
    payload: Bytes,
    qos: u8,
    retain: bool,
    subscription_ids: Vec<usize>,
    properties: Option<Arc<PublishProperties>>,
    expires_at: Option<Instant>,
}

impl Pending {
    fn outbound(&self, pkid: u16, dup: bool) -> Outbound {
        Outbound::Publish(Box::new(OutboundPublish {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            pkid,
            retain: self.retain,
            dup,
            subscription_ids: self.subscription_ids.clone(),
            properties: self.properties.clone(),
            expires_at: self.expires_at,
        }))
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

#[derive(Debug)]
struct Connection {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    link: Arc<Link>,
    info: Option<ConnectionInfo>,
    will: Option<Box<Will>>,
}

/// Where a live connection comes from (for the clients API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Remote address.
    pub peer: String,
    /// `3.1.1` or `5.0`.
    pub protocol: &'static str,
    /// The listener: `tcp`, `tls`, `ws` or `wss`.
    pub listener: &'static str,
    /// The client certificate's fingerprint, if it connected with one.
    pub certificate: Option<String>,
    /// Unix ms of the CONNECT.
    pub connected_at_ms: u64,
}

/// A session as the clients API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ClientView {
    /// Client id.
    #[serde(rename = "clientId")]
    pub client_id: String,
    /// The user that owns the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The Thing the client acts as.
    #[serde(rename = "thingName", skip_serializing_if = "Option::is_none")]
    pub thing: Option<String>,
    /// Whether a connection is live.
    pub connected: bool,
    /// The live connection's remote address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The live connection's protocol, `3.1.1` or `5.0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// The listener the live connection came in on: `tcp`, `tls`, `ws` or `wss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<&'static str>,
    /// SHA-256 fingerprint of the client certificate the live connection authenticated with.
    #[serde(
        rename = "certificateFingerprint",
        skip_serializing_if = "Option::is_none"
    )]
    pub certificate_fingerprint: Option<String>,
    /// Unix ms of the live connection's CONNECT.
    #[serde(rename = "connectedAt", skip_serializing_if = "Option::is_none")]
    pub connected_at_ms: Option<u64>,
    /// Whether the session outlives the connection.
    pub persistent: bool,
    /// How long the session is kept after its connection ends, seconds.
    #[serde(rename = "sessionExpiryInterval")]
    pub expiry_interval_s: u64,
    /// Subscribed filters.
    pub subscriptions: Vec<String>,
    /// Outbound QoS 1/2 messages awaiting acknowledgement.
    pub inflight: usize,
    /// Messages waiting (offline, or beyond the window).
    pub queued: usize,
    /// Bytes held for the client (queued and in flight).
    #[serde(rename = "queuedBytes")]
    pub queued_bytes: usize,
    /// Messages dropped for this session by a bound since it was created.
    pub dropped: u64,
}

fn view(client_id: &str, session: &Session) -> ClientView {
    let mut subscriptions: Vec<String> = session.subscriptions.keys().cloned().collect();
    subscriptions.sort();
    let info = session.connection.as_ref().and_then(|c| c.info.as_ref());
    ClientView {
        client_id: client_id.to_owned(),
        username: session.identity.username.clone(),
        thing: session.identity.thing.clone(),
        connected: session.connection.is_some(),
        peer: info.map(|i| i.peer.clone()),
        protocol: info.map(|i| i.protocol),
        listener: info.map(|i| i.listener),
        certificate_fingerprint: info.and_then(|i| i.certificate.clone()),
        connected_at_ms: info.map(|i| i.connected_at_ms),
        persistent: session.persistent,
        expiry_interval_s: session.expiry.as_secs(),
        subscriptions,
        inflight: session.inflight.len(),
        queued: session.queue.len(),
        queued_bytes: session.queued_bytes,
        dropped: session.dropped,
    }
}

#[derive(Debug)]
struct Session {
    /// The owner (its username decides who may attach) and its rights.
    identity: Identity,
    connection: Option<Connection>,
    persistent: bool,
    expiry: Duration,
    disconnected_at: Option<Instant>,
    subscriptions: HashMap<String, (ParsedFilter, SubOptions)>,
    /// Outbound QoS 1/2 awaiting PUBACK/PUBREC (value) or PUBCOMP (`None` payload after PUBREC).
    inflight: BTreeMap<u16, Option<Pending>>,
    queue: VecDeque<Pending>,
    /// Bytes of the messages in `queue` and `inflight`.
    queued_bytes: usize,
    window: usize,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids received but not yet released (PUBREL). Kept in the session so
    /// a PUBLISH resent after a reconnect is not delivered twice. Bounded by the receive maximum.
    incoming_qos2: HashSet<u16>,
    /// A will waiting for its delay (or for the session to end), and when it is due.
    pending_will: Option<(Box<Will>, Instant)>,
    /// Messages dropped by a bound.
    dropped: u64,
    /// Whether storage holds a record of it (so removing it must remove the record).
    stored: bool,
}

impl Session {
    fn new(identity: Identity, persistent: bool, expiry: Duration, window: usize) -> Session {
        Session {
            identity,
            connection: None,
            persistent,
            expiry,
            disconnected_at: None,
            subscriptions: HashMap::new(),
            inflight: BTreeMap::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            window,
            next_pkid: 1,
            incoming_qos2: HashSet::new(),
            pending_will: None,
            dropped: 0,
            stored: false,
        }
    }

    /// Whether a change to it must reach storage.
    fn kept(&self) -> bool {
        self.persistent || self.stored
    }

    fn allocate_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let pkid = self.next_pkid;
            self.next_pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            if !self.inflight.contains_key(&pkid) {
                return Some(pkid);
            }
        }
        None
    }
}

/// Counters since start (and two gauges: queued and retained bytes).
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// PUBLISH packets received from clients.
    pub messages_in: AtomicU64,
    /// PUBLISH packets handed to connections.
    pub messages_out: AtomicU64,
    /// Messages dropped (full queues, byte bounds, QoS 0 to a busy connection).
    pub messages_dropped: AtomicU64,
    /// Publishes or subscriptions refused by the ACL.
    pub acl_denied: AtomicU64,
    /// Messages not delivered because their v5 expiry passed.
    pub messages_expired: AtomicU64,
    /// CONNECTs refused because the session belongs to another identity.
    pub sessions_not_owner: AtomicU64,
    /// CONNECTs refused because `sessions_max` was reached.
    pub sessions_refused: AtomicU64,
    /// Retained publishes refused because a retained bound was reached.
    pub retained_refused: AtomicU64,
    /// Connections closed because they could not keep up.
    pub slow_consumers: AtomicU64,
    /// Connections closed because their user was deleted or changed.
    pub revoked: AtomicU64,
    /// Subscriptions removed because the ACL no longer allows them.
    pub subscriptions_revoked: AtomicU64,
    /// Bytes queued or in flight over all sessions now (gauge).
    pub queued_bytes: AtomicU64,
    /// Bytes handed to connections' channels and not yet written (gauge).
    pub outbound_bytes: AtomicU64,
    /// Bytes of retained messages now (gauge).
    pub retained_bytes: AtomicU64,
    /// Bytes and packets over the connections (each connection holds it).
    pub traffic: Arc<TrafficStats>,
}

/// Sessions and subscriptions at one instant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionCounts {
    /// Sessions, connected or kept for an absent client.
    pub sessions: usize,
    /// Sessions with a live connection.
    pub connected: usize,
    /// Sessions that outlive their connection.
    pub persistent: usize,
    /// Subscriptions of every session.
    pub subscriptions: usize,
    /// Of those, shared subscriptions (`$share/{group}/...`).
    pub shared_subscriptions: usize,
    /// Live connections acting as a Thing (its devices online).
    pub things_online: usize,
}

/// What crossed every MQTT connection: bytes, control packets by type, PUBLISH by QoS.
#[derive(Debug, Default)]
pub struct TrafficStats {
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// Packets read, by control packet type number (see `codec::PACKET_TYPES`).
    pub received: [AtomicU64; 15],
    /// Packets written, by control packet type number.
    pub sent: [AtomicU64; 15],
    /// PUBLISH packets read, by QoS.
    pub publish_in: [AtomicU64; 3],
    /// PUBLISH packets written, by QoS.
    pub publish_out: [AtomicU64; 3],
}

impl TrafficStats {
    /// Counts a packet read.
    pub fn received(&self, packet: &Packet) {
        self.received[codec::packet_type(packet)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a packet written.
    pub fn sent(&self, packet: &Packet) {
        self.sent[codec::packet_type(packet)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a PUBLISH read at `qos`.
    pub fn publish_received(&self, qos: u8) {
        self.publish_in[usize::from(qos.min(2))].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a PUBLISH written at `qos`.
    pub fn publish_sent(&self, qos: u8) {
        self.publish_out[usize::from(qos.min(2))].fetch_add(1, Ordering::Relaxed);
    }
}

struct State {
    sessions: HashMap<Arc<str>, Session>,
    /// username -> the client ids of its sessions (for revocation without a scan).
    owners: HashMap<Arc<str>, HashSet<Arc<str>>>,
    trie: FilterTrie<Subscriber>,
    retained: HashMap<Arc<str>, Message>,
    retained_bytes: usize,
    share_cursor: HashMap<(Arc<str>, Arc<str>), usize>,
    next_connection_id: u64,
    /// Sessions changed since the last checkpoint (persistent or stored ones only).
    dirty: HashSet<Arc<str>>,
    /// Retained topics changed since the last checkpoint.
    retained_dirty: HashSet<Arc<str>>,
}

impl State {
    /// Notes that the session of `client_id` changed, if storage cares.
    fn touch(&mut self, client_id: &str) {
        if let Some((key, session)) = self.sessions.get_key_value(client_id) {
            if session.kept() {
                self.dirty.insert(key.clone());
            }
        }
    }
}

/// The broker. Shared by every connection.
pub struct Broker {
    state: Mutex<State>,
    limits: BrokerLimits,
    /// Counters.
    pub stats: BrokerStats,
    /// Checkpoints taken so far ([`Broker::take_changes`]); incremented under the state lock.
    checkpoints_taken: AtomicU64,
    /// Every checkpoint up to this one is durable.
    checkpoints_durable: tokio::sync::watch::Sender<u64>,
    /// Someone waits for durability: the checkpointing task should not wait for its interval.
    checkpoint_wanted: Arc<Notify>,
    /// Subscriptions and messages for the integrations that asked for them.
    pub tap: Arc<super::tap::BrokerTap>,
    /// The id of this process's first connection (every earlier id is a previous process's).
    first_connection_id: u64,
}

/// Whether the identity a CONNECT was authenticated as still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Nothing changed.
    Yes,
    /// The user (or its Thing) changed or went away since it was authenticated.
    Changed,
    /// The stores could not be read.
    Unreadable,
}

/// Checks again, under the broker lock, what a CONNECT was authenticated against: a
/// revocation then either happens before it (and the CONNECT is refused) or after the session
/// is registered (and the revocation finds it), never in between.
pub type Verify = Box<dyn Fn() -> Verified + Send + Sync>;

/// What a CONNECT asks of the broker.
pub struct ConnectRequest {
    /// Who is connecting (the client id is in it).
    pub identity: Identity,
    /// Clean start (3.1.1 clean session).
    pub clean_start: bool,
    /// Session expiry asked for (zero: the session ends with the connection).
    pub expiry: Duration,
    /// The client's receive maximum (v5).
    pub receive_maximum: Option<usize>,
    /// The will, already checked against the ACL.
    pub will: Option<Will>,
    /// Checked under the broker lock before anything changes (`None`: nothing to check).
    pub verify: Option<Verify>,
}

impl std::fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("identity", &self.identity)
            .field("clean_start", &self.clean_start)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// What registering a connection produced.
#[derive(Debug)]
pub struct Registered {
    /// Identifies this connection to later calls.
    pub connection_id: u64,
    /// Whether a previous session was resumed.
    pub session_present: bool,
    /// The session expiry granted (lower than asked when capped).
    pub expiry: Duration,
}

/// Why the broker refused a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// The client id's session belongs to another identity.
    #[error("the session of this client id belongs to another user")]
    NotOwner,
    /// `sessions_max` sessions exist.
    #[error("the session limit is reached")]
    SessionsFull,
    /// The user owns `user_sessions_max` sessions.
    #[error("the user's session limit is reached")]
    UserSessionsFull,
    /// The user or its Thing changed while the CONNECT was being authenticated.
    #[error("the user or its Thing changed while connecting")]
    Revoked,
    /// The user could not be read again.
    #[error("the user could not be read")]
    Unverifiable,
}

/// A subscription as the management API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionView {
    /// The session.
    pub client_id: String,
    /// The filter as subscribed (with `$share/{group}/` if shared).
    pub topic: String,
    /// Maximum QoS.
    pub qos: u8,
    /// v5 no local.
    pub no_local: bool,
    /// v5 retain as published.
    pub retain_as_published: bool,
    /// v5 retain handling.
    pub retain_handling: u8,
}

/// A topic as the management API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicView {
    /// A topic name (retained) or a subscription filter.
    pub topic: String,
    /// A message is retained on it.
    pub retained: bool,
    /// Sessions subscribed with exactly this filter.
    pub subscriptions: usize,
}

impl TopicView {
    fn new(topic: &str) -> TopicView {
        TopicView {
            topic: topic.to_owned(),
            retained: false,
            subscriptions: 0,
        }
    }
}

/// Why the broker refused an operator's subscription change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyRefusal {
    /// No session (connected or persistent) has this client id.
    #[error("no session with this client id (connected or persistent)")]
    NoSession,
    /// The session's user may not subscribe to the filter.
    #[error("the session's user is not authorized to subscribe to this filter")]
    NotAuthorized,
    /// The session already holds `mqtt_session_subscriptions_max` subscriptions.
    #[error("the session already holds {0} subscriptions (mqtt_session_subscriptions_max)")]
    TooManySubscriptions(usize),
}

/// Why the broker refused a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefusal {
    /// Retaining it would pass `retained_max` or `retained_bytes_max`.
    #[error("the retained message store is full")]
    RetainedQuotaExceeded,
}

/// How a user's credentials or rights changed (see [`Broker::revoke_user`]).
pub enum UserChange<'a> {
    /// The user was deleted: its connections close and its sessions are discarded.
    Deleted,
    /// Its password, Thing binding or superuser flag changed: its connections close. Sessions
    /// bound to another Thing than before are discarded; the others keep only the subscriptions
    /// `allowed` still permits under the new rights.
    Updated {
        /// The Thing the user is bound to now.
        thing: Option<String>,
        /// Whether it is a superuser now.
        superuser: bool,
        /// Whether an identity may subscribe to a filter.
        allowed: &'a dyn Fn(&Identity, &str) -> bool,
    },
}

/// The session of `client_id` if `connection_id` is its live connection: a connection that was
/// taken over, kicked or revoked must not act on the session that outlived it.
fn live_session<'s>(
    sessions: &'s mut HashMap<Arc<str>, Session>,
    client_id: &str,
    connection_id: u64,
) -> Option<&'s mut Session> {
    sessions
        .get_mut(client_id)
        .filter(|s| s.connection.as_ref().map(|c| c.id) == Some(connection_id))
}

impl Broker {
    /// An empty broker.
    pub fn new(limits: BrokerLimits) -> Broker {
        let boot_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Unique across restarts (a Thing's log pairs connects and disconnects by it, and a
        // restart records the end of connections a crash left open): the start millisecond
        // times 2^10, below 2^53 (JSON readers keep it exact) until the year 2248. Two starts
        // collide only if the clock steps back or one process opened more than 1,024
        // connections per millisecond it ran.
        let first_connection_id = (boot_ms << 10).max(1);
        Broker {
            first_connection_id,
            state: Mutex::new(State {
                sessions: HashMap::new(),
                owners: HashMap::new(),
                trie: FilterTrie::default(),
                retained: HashMap::new(),
                retained_bytes: 0,
                share_cursor: HashMap::new(),
                next_connection_id: first_connection_id,
                dirty: HashSet::new(),
                retained_dirty: HashSet::new(),
            }),
            limits,
            stats: BrokerStats::default(),
            checkpoints_taken: AtomicU64::new(0),
            checkpoints_durable: tokio::sync::watch::Sender::new(0),
            checkpoint_wanted: Arc::new(Notify::new()),
            tap: Arc::new(super::tap::BrokerTap::new(boot_ms)),
        }
    }

    /// Notified when a caller of [`Broker::wait_durable`] starts waiting.
    pub fn checkpoint_wanted(&self) -> Arc<Notify> {
        self.checkpoint_wanted.clone()
    }

    /// Waits until every change made to the broker before this call is durable (stored by a
    /// checkpoint that was then synced), up to `wait`; returns whether it is. A SUBACK of a
    /// persistent session waits for it: an acknowledged subscription survives a crash.
    pub async fn wait_durable(&self, wait: Duration) -> bool {
        // A checkpoint taken after this read sees the change (it takes the lock after ours).
        let target = self.checkpoints_taken.load(Ordering::Acquire) + 1;
        let mut durable = self.checkpoints_durable.subscribe();
        self.checkpoint_wanted.notify_one();
        tokio::time::timeout(wait, durable.wait_for(|done| *done >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Checkpoints up to `generation` are durable.
    pub fn checkpoints_durable_to(&self, generation: u64) {
        self.checkpoints_durable.send_if_modified(|done| {
            let moved = generation > *done;
            if moved {
                *done = generation;
            }
            moved
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a connection to the client's session, taking over any live one of the same
    /// owner. A persistent session is resumed: unacknowledged messages are resent (DUP), then
    /// the queue drains. Refused when the session belongs to another identity, or when it would
    /// be one session too many.
    pub fn connect(
        &self,
        request: ConnectRequest,
        tx: mpsc::Sender<Outbound>,
        link: Arc<Link>,
    ) -> Result<Registered, ConnectRefusal> {
        let mut guard = self.lock();
        let state = &mut *guard;
        match request.verify.as_ref().map(|verify| verify()) {
            None | Some(Verified::Yes) => {}
            Some(Verified::Changed) => return Err(ConnectRefusal::Revoked),
            Some(Verified::Unreadable) => return Err(ConnectRefusal::Unverifiable),
        }
        let key: Arc<str> = Arc::from(request.identity.client_id.as_str());
        match state.sessions.get(&key) {
            Some(existing) if existing.identity.username != request.identity.username => {
                self.stats
                    .sessions_not_owner
                    .fetch_add(1, Ordering::Relaxed);
                return Err(ConnectRefusal::NotOwner);
            }
            None if state.sessions.len() >= self.limits.sessions_max => {
                self.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
                return Err(ConnectRefusal::SessionsFull);
            }
            // Not superusers; the shared Cumulocity bootstrap user has a bound of its own (every
            // new device of a fleet uses it at once, and anyone with its password can try).
            None if !request.identity.superuser
                && request.identity.username.as_deref().is_some_and(|user| {
                    let max = if request.identity.bootstrap {
                        self.limits.bootstrap_sessions_max
                    } else {
                        self.limits.user_sessions_max
                    };
                    state.owners.get(user).is_some_and(|ids| ids.len() >= max)
                }) =>
            {
                self.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
                return Err(ConnectRefusal::UserSessionsFull);
            }
            _ => {}
        }
        let connection_id = state.next_connection_id;
        state.next_connection_id += 1;
        let window = request
            .receive_maximum
            .unwrap_or(self.limits.inflight_max)
            .clamp(1, self.limits.inflight_max.max(1));
        let expiry = request.expiry.min(self.limits.session_expiry_max);
        let persistent = !expiry.is_zero();
        // Wills that this CONNECT releases: the taken-over connection's (unless this client
        // resumes the session within its delay) and a delayed one if the session ends here.
        let mut wills = Vec::new();
        if let Some(session) = state.sessions.get_mut(&key) {
            if let Some(old) = session.connection.take() {
                old.link.close(CloseReason::Takeover);
                if let Some(will) = old.will {
                    if will.delay.is_zero() || request.clean_start {
                        wills.push(*will);
                    }
                }
            }
            if let Some((will, _)) = session.pending_will.take() {
                if request.clean_start {
                    wills.push(*will);
                }
            }
        }
        if request.clean_start {
            self.remove_session(state, &key);
        }
        let session_present = state.sessions.contains_key(&key);
        if !session_present {
            if let Some(username) = &request.identity.username {
                state
                    .owners
                    .entry(Arc::from(username.as_str()))
                    .or_default()
                    .insert(key.clone());
            }
        }
        let session = state
            .sessions
            .entry(key.clone())
            .or_insert_with(|| Session::new(request.identity.clone(), persistent, expiry, window));
        session.identity = request.identity;
        session.persistent = persistent;
        session.expiry = expiry;
        session.window = window;
        session.disconnected_at = None;
        // Retransmit what was in flight, in packet-id order.
        for (pkid, pending) in &session.inflight {
            // An unacknowledged QoS 1/2 message is resent even if it expired meanwhile: the
            // client may already have it, and the packet id must be settled.
            let outbound = match pending {
                Some(p) => p.outbound(*pkid, true),
                None => Outbound::PubRel(*pkid),
            };
            if !self.hand_over(&link, &tx, outbound) {
                // Still in flight, resent next time; this connection cannot take them now.
                link.close(CloseReason::SlowConsumer);
                break;
            }
        }
        session.connection = Some(Connection {
            id: connection_id,
            tx,
            link,
            info: None,
            will: request.will.map(Box::new),
        });
        self.drain_queue(session);
        state.touch(&key);
        for will in wills {
            self.publish_will(state, will);
        }
        Ok(Registered {
            connection_id,
            session_present,
            expiry,
        })
    }

    /// Detaches a connection that ended for `reason`. A clean session ends here; a persistent
    /// one waits for its client. The connection's will is published now, or after its delay
    /// (or when the session ends, if that comes first). Returns false if this connection had
    /// already been taken over.
    pub fn disconnect(&self, client_id: &str, connection_id: u64, reason: CloseReason) -> bool {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(session) = state.sessions.get_mut(client_id) else {
            return false;
        };
        if session.connection.as_ref().map(|c| c.id) != Some(connection_id) {
            return false;
        }
        let will = session
            .connection
            .take()
            .and_then(|c| c.will)
            .filter(|_| reason.publishes_will());
        let now = Instant::now();
        if session.persistent {
            session.disconnected_at = Some(now);
            state.dirty.insert(Arc::from(client_id));
            match will {
                Some(will) if !will.delay.is_zero() => {
                    let wait = will.delay.min(session.expiry);
                    let due = now.checked_add(wait).unwrap_or(now);
                    session.pending_will = Some((will, due));
                }
                Some(will) => self.publish_will(state, *will),
                None => {}
            }
        } else {
            self.remove_session(state, client_id);
            if let Some(will) = will {
                self.publish_will(state, *will);
            }
        }
        true
    }

    /// v5: the client's DISCONNECT carried a new Session Expiry Interval. Returns the expiry
    /// granted (capped), or `None` if this connection is no longer the session's.
    pub fn set_session_expiry(
        &self,
        client_id: &str,
        connection_id: u64,
        expiry: Duration,
    ) -> Option<Duration> {
        let mut state = self.lock();
        let session = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.connection.as_ref().map(|c| c.id) == Some(connection_id))?;
        let expiry = expiry.min(self.limits.session_expiry_max);
        session.expiry = expiry;
        session.persistent = !expiry.is_zero();
        state.touch(client_id);
        Some(expiry)
    }

    /// An inbound QoS 2 PUBLISH arrived: `Some(n)` the first time for `pkid` (deliver it; `n`
    /// QoS 2 messages of this client now await release), `None` for a resend of one not yet
    /// released (do not deliver again).
    pub fn qos2_arrived(&self, client_id: &str, connection_id: u64, pkid: u16) -> Option<usize> {
        let mut state = self.lock();
        let session = live_session(&mut state.sessions, client_id, connection_id)?;
        let first = session
            .incoming_qos2
            .insert(pkid)
            .then_some(session.incoming_qos2.len());
        state.touch(client_id);
        first
    }

    /// PUBREL: the client releases `pkid`; true if it was pending.
    pub fn qos2_released(&self, client_id: &str, connection_id: u64, pkid: u16) -> bool {
        let mut state = self.lock();
        let released = live_session(&mut state.sessions, client_id, connection_id)
            .is_some_and(|s| s.incoming_qos2.remove(&pkid));
        if released {
            state.touch(client_id);
        }
        released
    }

    /// Records where a connection comes from (shown by the clients API).
    pub fn describe_connection(&self, client_id: &str, connection_id: u64, info: ConnectionInfo) {
        let mut state = self.lock();
        if let Some(connection) = state
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.connection.as_mut())
            .filter(|c| c.id == connection_id)
        {
            connection.info = Some(info);
        }
    }

    /// Sessions with client ids after `after`, in client-id order, at most `limit`.
    pub fn clients(&self, after: Option<&str>, limit: usize) -> Vec<ClientView> {
        let state = self.lock();
        let mut ids: Vec<&Arc<str>> = state
            .sessions
            .keys()
            .filter(|id| after.is_none_or(|after| id.as_ref() > after))
            .collect();
        ids.sort();
        ids.into_iter()
            .take(limit)
            .filter_map(|id| state.sessions.get(id).map(|s| view(id, s)))
            .collect()
    }

    /// Subscriptions of every session (or of `client_id`'s), optionally only the filter
    /// `filter`, or only those whose filter matches the topic name `matching`, in
    /// (client id, filter) order after `after`, at most `limit`. Scans the sessions once
    /// (selecting the page without sorting them all).
    pub fn subscriptions(
        &self,
        client_id: Option<&str>,
        filter: Option<&str>,
        matching: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Vec<SubscriptionView> {
        let state = self.lock();
        let mut found: Vec<(&Arc<str>, &String, &SubOptions)> = Vec::new();
        let sessions: Box<dyn Iterator<Item = (&Arc<str>, &Session)>> = match client_id {
            Some(id) => Box::new(state.sessions.get_key_value(id).into_iter()),
            None => Box::new(state.sessions.iter()),
        };
        for (id, session) in sessions {
            for (raw, (parsed, options)) in &session.subscriptions {
                let wanted = filter.is_none_or(|f| f == raw)
                    && matching.is_none_or(|topic| topic::matches(&parsed.filter, topic))
                    && after
                        .is_none_or(|(a_id, a_raw)| (id.as_ref(), raw.as_str()) > (a_id, a_raw));
                if wanted {
                    found.push((id, raw, options));
                }
            }
        }
        let order = |a: &(&Arc<str>, &String, &SubOptions),
                     b: &(&Arc<str>, &String, &SubOptions)| {
            (a.0, a.1).cmp(&(b.0, b.1))
        };
        if found.len() > limit {
            found.select_nth_unstable_by(limit, order);
            found.truncate(limit);
        }
        found.sort_unstable_by(order);
        found
            .into_iter()
            .map(|(id, raw, options)| SubscriptionView {
                client_id: id.to_string(),
                topic: raw.clone(),
                qos: options.qos,
                no_local: options.no_local,
                retain_as_published: options.retain_as_published,
                retain_handling: options.retain_handling,
            })
            .collect()
    }

    /// Topics with a retained message or a live subscription (its filter), in order after
    /// `after`, at most `limit`: each with whether a message is retained on it and how many
    /// sessions subscribe with exactly that filter.
    pub fn topics(&self, after: Option<&str>, limit: usize) -> Vec<TopicView> {
        let state = self.lock();
        let later = |topic: &str| after.is_none_or(|a| topic > a);
        // One pass to find the page's topics (selected, not every topic sorted), one to count.
        let mut names: HashSet<&str> = state
            .retained
            .keys()
            .map(|t| t.as_ref())
            .filter(|t| later(t))
            .collect();
        for session in state.sessions.values() {
            names.extend(
                session
                    .subscriptions
                    .keys()
                    .map(String::as_str)
                    .filter(|t| later(t)),
            );
        }
        let mut page: Vec<&str> = names.into_iter().collect();
        if page.len() > limit {
            page.select_nth_unstable(limit);
            page.truncate(limit);
        }
        page.sort_unstable();
        let mut views: Vec<TopicView> = page.iter().map(|t| TopicView::new(t)).collect();
        for view in &mut views {
            view.retained = state.retained.contains_key(view.topic.as_str());
        }
        let index: HashMap<&str, usize> = page.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        for session in state.sessions.values() {
            for raw in session.subscriptions.keys() {
                if let Some(i) = index.get(raw.as_str()) {
                    views[*i].subscriptions += 1;
                }
            }
        }
        views
    }

    /// One session.
    pub fn client(&self, client_id: &str) -> Option<ClientView> {
        let state = self.lock();
        state.sessions.get(client_id).map(|s| view(client_id, s))
    }

    /// Whether `client_id` is connected now as Thing `thing`'s device (no view is built).
    pub fn thing_connected(&self, client_id: &str, thing: &str) -> bool {
        let state = self.lock();
        state
            .sessions
            .get(client_id)
            .is_some_and(|s| s.connection.is_some() && s.identity.thing.as_deref() == Some(thing))
    }

    /// Disconnects a client (reason "kicked") and discards its session. False if unknown.
    pub fn kick(&self, client_id: &str) -> bool {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(session) = state.sessions.get_mut(client_id) else {
            return false;
        };
        match &session.connection {
            Some(connection) => {
                // The connection's own disconnect then removes the (no longer persistent) session.
                session.persistent = false;
                connection.link.close(CloseReason::Kicked);
                state.touch(client_id);
            }
            None => {
                if let Some(will) = self
                    .remove_session(state, client_id)
                    .and_then(|s| s.pending_will)
                {
                    self.publish_will(state, *will.0);
                }
            }
        }
        true
    }

    /// A user's credentials or rights changed: every live connection of its sessions closes
    /// (reason `revoked`, no will), and its sessions are discarded or re-authorized (see
    /// [`UserChange`]). Returns the number of connections told to close.
    pub fn revoke_user(&self, username: &str, change: UserChange<'_>) -> usize {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(client_ids) = state.owners.get(username).cloned() else {
            return 0;
        };
        let mut closed = 0;
        for client_id in client_ids {
            let Some(session) = state.sessions.get_mut(&client_id) else {
                continue;
            };
            session.pending_will = None;
            if let Some(connection) = &mut session.connection {
                connection.will = None;
                connection.link.close(CloseReason::Revoked);
                closed += 1;
            }
            let discard = match &change {
                UserChange::Deleted => true,
                UserChange::Updated { thing, .. } => *thing != session.identity.thing,
            };
            if discard {
                tracing::info!(%client_id, username, "session discarded: its user was deleted or rebound");
                self.remove_session(state, &client_id);
                continue;
            }
            if let UserChange::Updated {
                superuser, allowed, ..
            } = &change
            {
                session.identity.superuser = *superuser;
                let removed = revoke_subscriptions(&mut state.trie, &client_id, session, allowed);
                if session.kept() {
                    state.dirty.insert(client_id.clone());
                }
                self.stats
                    .subscriptions_revoked
                    .fetch_add(removed as u64, Ordering::Relaxed);
            }
        }
        self.stats
            .revoked
            .fetch_add(closed as u64, Ordering::Relaxed);
        closed
    }

    /// A Thing was deleted: the session of its client id, if it acts as that Thing, is closed
    /// (reason `revoked`) and discarded. Returns whether there was one.
    pub fn thing_deleted(&self, thing: &str, client_id: &str) -> bool {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.identity.thing.as_deref() == Some(thing))
        else {
            return false;
        };
        if let Some(connection) = &mut session.connection {
            connection.will = None;
            connection.link.close(CloseReason::Revoked);
            self.stats.revoked.fetch_add(1, Ordering::Relaxed);
        }
        self.remove_session(state, client_id);
        true
    }

    /// `client_id` now belongs to Thing `thing` (just registered): a session of it held by
    /// anyone not acting as that Thing is closed and discarded, so nobody who took the id
    /// before the registration keeps the device out. Returns whether there was one.
    pub fn reserve_client_id(&self, client_id: &str, thing: &str) -> bool {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.identity.thing.as_deref() != Some(thing))
        else {
            return false;
        };
        session.pending_will = None;
        if let Some(connection) = &mut session.connection {
            connection.will = None;
            connection.link.close(CloseReason::Revoked);
            self.stats.revoked.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(%client_id, %thing, "session of a client id now reserved for a Thing discarded");
        self.remove_session(state, client_id);
        true
    }

    /// The ACL rules changed: every session keeps only the subscriptions `allowed` still
    /// permits. Returns the number removed.
    pub fn reauthorize_subscriptions(&self, allowed: &dyn Fn(&Identity, &str) -> bool) -> usize {
        let mut guard = self.lock();
        let State {
            sessions,
            trie,
            dirty,
            ..
        } = &mut *guard;
        let mut removed = 0;
        for (client_id, session) in sessions.iter_mut() {
            let here = revoke_subscriptions(trie, client_id, session, allowed);
            if here > 0 && session.kept() {
                dirty.insert(client_id.clone());
            }
            removed += here;
        }
        self.stats
            .subscriptions_revoked
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    /// Whether any subscription matches `topic`.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.lock().trie.matches_any(topic)
    }

    /// Whether any subscription could match a topic whose last level is `level` (false: none
    /// does, whatever the levels before it).
    pub fn may_have_subscribers_ending(&self, level: &str) -> bool {
        self.lock().trie.may_match_ending(level)
    }

    /// The id of this process's first connection: a smaller one was opened by an earlier run.
    pub fn first_connection_id(&self) -> u64 {
        self.first_connection_id
    }

    /// The id of `client_id`'s live connection, if it is connected.
    pub fn live_connection(&self, client_id: &str) -> Option<u64> {
        self.lock()
            .sessions
            .get(client_id)
            .and_then(|s| s.connection.as_ref().map(|c| c.id))
    }

    /// Whether a connection with this client id is live.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.lock()
            .sessions
            .get(client_id)
            .is_some_and(|s| s.connection.is_some())
    }

    /// Adds (or replaces) a subscription. Retained messages are delivered per the retain
    /// handling option. Returns whether it is new (not a replacement): false if the connection
    /// no longer holds the session; refused past `session_subscriptions_max`.
    pub fn subscribe(
        &self,
        client_id: &str,
        connection_id: u64,
        raw: &str,
        parsed: ParsedFilter,
        options: SubOptions,
    ) -> Result<bool, ProxyRefusal> {
        match self.subscribe_session(
            client_id,
            Some(connection_id),
            raw,
            parsed,
            options,
            &|_| true,
        ) {
            Ok((previous, _)) => Ok(previous.is_none()),
            Err(ProxyRefusal::NoSession) => Ok(false),
            Err(refusal) => Err(refusal),
        }
    }

    /// An operator's subscription for `client_id`'s session, connected or not (persistent):
    /// `allowed` decides with the session owner's identity (its user's ACL). Returns the
    /// options it replaced (`None`: it is new) and whether the session is persistent (its
    /// change must be made durable).
    pub fn proxy_subscribe(
        &self,
        client_id: &str,
        raw: &str,
        parsed: ParsedFilter,
        options: SubOptions,
        allowed: &dyn Fn(&Identity) -> bool,
    ) -> Result<(Option<SubOptions>, bool), ProxyRefusal> {
        self.subscribe_session(client_id, None, raw, parsed, options, allowed)
    }

    /// Undoes an operator's subscription that could not be made durable: puts back the
    /// options it replaced (or removes it if it was new), unless the subscription changed
    /// since (the client subscribed again itself): then it is left as the client made it.
    pub fn proxy_undo(
        &self,
        client_id: &str,
        raw: &str,
        ours: SubOptions,
        previous: Option<SubOptions>,
    ) {
        let mut state = self.lock();
        let State { sessions, trie, .. } = &mut *state;
        let Some(key) = sessions.get_key_value(client_id).map(|(k, _)| k.clone()) else {
            return;
        };
        let Some(session) = sessions.get_mut(client_id) else {
            return;
        };
        let Some((parsed, current)) = session.subscriptions.get(raw).cloned() else {
            return;
        };
        if current != ours {
            return;
        }
        trie.remove(&parsed.filter, &probe(&key, &parsed));
        match previous {
            Some(options) => {
                trie.insert(
                    &parsed.filter,
                    Subscriber {
                        client: key.clone(),
                        share: parsed.share_group.as_deref().map(Arc::from),
                        filter: Arc::from(parsed.filter.as_str()),
                        options,
                    },
                );
                session
                    .subscriptions
                    .insert(raw.to_owned(), (parsed, options));
                // Its options are what they were before the undone change.
                self.tap.subscription(
                    TapKind::Subscribed,
                    &session.identity,
                    raw,
                    options.qos,
                    "operator",
                );
            }
            None => {
                session.subscriptions.remove(raw);
                self.tap.subscription(
                    TapKind::Unsubscribed,
                    &session.identity,
                    raw,
                    ours.qos,
                    "operator",
                );
            }
        }
        state.touch(client_id);
    }

    /// Removes an operator's (or any) subscription from `client_id`'s session, connected or
    /// not; returns whether it existed and whether the session is persistent.
    pub fn proxy_unsubscribe(
        &self,
        client_id: &str,
        raw: &str,
    ) -> Result<(bool, bool), ProxyRefusal> {
        let mut state = self.lock();
        let State { sessions, trie, .. } = &mut *state;
        let Some((key, session)) = sessions
            .get_key_value(client_id)
            .map(|(k, s)| (k.clone(), s))
        else {
            return Err(ProxyRefusal::NoSession);
        };
        let persistent = session.persistent;
        let Some(session) = sessions.get_mut(client_id) else {
            return Ok((false, persistent));
        };
        let Some((parsed, options)) = session.subscriptions.remove(raw) else {
            return Ok((false, persistent));
        };
        self.tap.subscription(
            TapKind::Unsubscribed,
            &session.identity,
            raw,
            options.qos,
            "operator",
        );
        trie.remove(&parsed.filter, &probe(&key, &parsed));
        state.touch(client_id);
        Ok((true, persistent))
    }

    fn subscribe_session(
        &self,
        client_id: &str,
        connection_id: Option<u64>,
        raw: &str,
        parsed: ParsedFilter,
        options: SubOptions,
        allowed: &dyn Fn(&Identity) -> bool,
    ) -> Result<(Option<SubOptions>, bool), ProxyRefusal> {
        let mut guard = self.lock();
        let key: Arc<str> = Arc::from(client_id);
        let State {
            sessions,
            trie,
            retained,
            retained_bytes,
            dirty,
            retained_dirty,
            ..
        } = &mut *guard;
        let fair_share = self.fair_share(sessions.len());
        let session = match connection_id {
            Some(id) => live_session(sessions, client_id, id),
            None => sessions.get_mut(client_id),
        }
        .ok_or(ProxyRefusal::NoSession)?;
        if !allowed(&session.identity) {
            return Err(ProxyRefusal::NotAuthorized);
        }
        let previous = session.subscriptions.get(raw).map(|(_, options)| *options);
        if previous.is_none()
            && session.subscriptions.len() >= self.limits.session_subscriptions_max
        {
            return Err(ProxyRefusal::TooManySubscriptions(
                self.limits.session_subscriptions_max,
            ));
        }
        let persistent = session.persistent;
        if session.kept() {
            dirty.insert(key.clone());
        }
        let subscriber = Subscriber {
            client: key.clone(),
            share: parsed.share_group.as_deref().map(Arc::from),
            filter: Arc::from(parsed.filter.as_str()),
            options,
        };
        let is_new = previous.is_none();
        if !is_new {
            trie.remove(&parsed.filter, &subscriber);
        }
        trie.insert(&parsed.filter, subscriber);
        session
            .subscriptions
            .insert(raw.to_owned(), (parsed.clone(), options));
        self.tap.subscription(
            TapKind::Subscribed,
            &session.identity,
            raw,
            options.qos,
            if connection_id.is_some() {
                "mqtt"
            } else {
                "operator"
            },
        );
        let send_retained = parsed.share_group.is_none()
            && (options.retain_handling == 0 || (options.retain_handling == 1 && is_new));
        if send_retained {
            let now = Instant::now();
            retained.retain(|topic, message| {
                let keep = !message.expired(now);
                if !keep {
                    *retained_bytes -= message.size();
                    retained_dirty.insert(topic.clone());
                }
                keep
            });
            self.stats
                .retained_bytes
                .store(*retained_bytes as u64, Ordering::Relaxed);
            let mut matching: Vec<&Message> = retained
                .iter()
                .filter(|(topic, _)| topic::matches(&parsed.filter, topic))
                .map(|(_, message)| message)
                .collect();
            matching.sort_by(|a, b| a.topic.cmp(&b.topic));
            for message in matching {
                let pending = Pending {
                    topic: message.topic.clone(),
                    payload: message.payload.clone(),
                    qos: message.qos.min(options.qos),
                    retain: true,
                    subscription_ids: options.subscription_id.into_iter().collect(),
                    properties: message.properties.clone(),
                    expires_at: message.expires_at,
                };
                self.enqueue(session, pending, fair_share);
            }
        }
        Ok((previous, persistent))
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, client_id: &str, connection_id: u64, raw: &str) -> bool {
        let mut state = self.lock();
        let State { sessions, trie, .. } = &mut *state;
        let Some(key) = sessions.get_key_value(client_id).map(|(k, _)| k.clone()) else {
            return false;
        };
        let Some(session) = live_session(sessions, client_id, connection_id) else {
            return false;
        };
        let Some((parsed, options)) = session.subscriptions.remove(raw) else {
            return false;
        };
        self.tap.subscription(
            TapKind::Unsubscribed,
            &session.identity,
            raw,
            options.qos,
            "mqtt",
        );
        let removed = trie.remove(&parsed.filter, &probe(&key, &parsed));
        state.touch(client_id);
        removed
    }

    /// Routes a message to every matching subscription and updates retained messages.
    /// Returns the number of sessions it was delivered or queued to; refused (and neither
    /// retained nor routed) when retaining it would pass a retained bound.
    pub fn publish(&self, message: Message) -> Result<usize, PublishRefusal> {
        let now = Instant::now();
        let mut state = self.lock();
        self.route_unexpired(&mut state, message, now)
    }

    /// [`Broker::publish`] of several messages under one lock (a server publication on each
    /// enabled namespace's topic); refusals are not reported.
    pub fn publish_all(&self, messages: Vec<Message>) {
        let now = Instant::now();
        let mut state = self.lock();
        for message in messages {
            let _ = self.route_unexpired(&mut state, message, now);
        }
    }

    /// Routes `message` unless it expired before it could be (counted, delivered to no one).
    fn route_unexpired(
        &self,
        state: &mut State,
        message: Message,
        now: Instant,
    ) -> Result<usize, PublishRefusal> {
        if message.expired(now) {
            self.stats.messages_expired.fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        self.route(state, message)
    }

    fn route(&self, state: &mut State, message: Message) -> Result<usize, PublishRefusal> {
        if message.retain {
            self.retain(state, &message)?;
        }
        let mut matched = Vec::new();
        state.trie.matching(&message.topic, &mut matched);
        // No-local subscriptions do not get their own client's messages.
        matched.retain(|s| !(s.options.no_local && message.publisher.as_ref() == Some(&s.client)));
        let deliveries = match matched.len() {
            0 => return Ok(0),
            // The usual case of a device's reply topic: one plain subscription.
            1 if matched[0].share.is_none() => {
                let subscriber = matched.swap_remove(0);
                let ids = subscriber.options.subscription_id.into_iter().collect();
                vec![(subscriber, ids)]
            }
            _ => Self::deliveries(state, matched),
        };
        let fair_share = self.fair_share(state.sessions.len());
        let mut delivered = 0;
        for (subscriber, subscription_ids) in deliveries {
            let Some(session) = state.sessions.get_mut(&subscriber.client) else {
                continue;
            };
            if session.kept() {
                state.dirty.insert(subscriber.client.clone());
            }
            let pending = Pending {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos: message.qos.min(subscriber.options.qos),
                retain: message.retain && subscriber.options.retain_as_published,
                subscription_ids,
                properties: message.properties.clone(),
                expires_at: message.expires_at,
            };
            self.enqueue(session, pending, fair_share);
            delivered += 1;
        }
        Ok(delivered)
    }

    /// One delivery per client (at the highest QoS among its matching subscriptions, with the
    /// identifiers of all of them), one member per share group.
    fn deliveries(state: &mut State, matched: Vec<Subscriber>) -> Vec<(Subscriber, Vec<usize>)> {
        let mut per_client: HashMap<Arc<str>, (Subscriber, Vec<usize>)> = HashMap::new();
        let mut groups: HashMap<(Arc<str>, Arc<str>), Vec<Subscriber>> = HashMap::new();
        for subscriber in matched {
            match &subscriber.share {
                Some(group) => groups
                    .entry((group.clone(), subscriber.filter.clone()))
                    .or_default()
                    .push(subscriber),
                None => add_delivery(&mut per_client, subscriber),
            }
        }
        for (group_key, mut members) in groups {
            members.sort_by(|a, b| a.client.cmp(&b.client));
            let connected: Vec<&Subscriber> = members
                .iter()
                .filter(|m| {
                    state
                        .sessions
                        .get(&m.client)
                        .is_some_and(|s| s.connection.is_some())
                })
                .collect();
            let candidates: Vec<&Subscriber> = if connected.is_empty() {
                members.iter().collect()
            } else {
                connected
            };
            let cursor = state.share_cursor.entry(group_key).or_insert(0);
            let chosen = candidates[*cursor % candidates.len()].clone();
            *cursor = cursor.wrapping_add(1);
            add_delivery(&mut per_client, chosen);
        }
        per_client.into_values().collect()
    }

    /// Stores (or clears, for an empty payload) the retained message of a topic, within bounds.
    fn retain(&self, state: &mut State, message: &Message) -> Result<(), PublishRefusal> {
        let previous = state.retained.get(&message.topic).map(Message::size);
        if message.payload.is_empty() {
            if let Some(previous) = previous {
                state.retained.remove(&message.topic);
                state.retained_bytes -= previous;
                state.retained_dirty.insert(message.topic.clone());
            }
        } else {
            let count = state.retained.len() + usize::from(previous.is_none());
            let bytes = state.retained_bytes - previous.unwrap_or(0) + message.size();
            if count > self.limits.retained_max || bytes > self.limits.retained_bytes_max {
                self.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    topic = %message.topic,
                    publisher = message.publisher.as_deref().unwrap_or("-"),
                    retained = state.retained.len(),
                    retained_bytes = state.retained_bytes,
                    "retained message store is full; publish refused"
                );
                return Err(PublishRefusal::RetainedQuotaExceeded);
            }
            state.retained_bytes = bytes;
            state
                .retained
                .insert(message.topic.clone(), message.clone());
            state.retained_dirty.insert(message.topic.clone());
        }
        self.stats
            .retained_bytes
            .store(state.retained_bytes as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Retained messages and their bytes now.
    pub fn retained_counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.retained.len(), state.retained_bytes)
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client: the slot frees and the queue drains.
    pub fn acknowledged(&self, client_id: &str, connection_id: u64, pkid: u16) {
        let mut guard = self.lock();
        let State {
            sessions, dirty, ..
        } = &mut *guard;
        if let Some(session) = live_session(sessions, client_id, connection_id) {
            if let Some(slot) = session.inflight.remove(&pkid) {
                if let Some(pending) = slot {
                    self.release_bytes(session, pending.size());
                }
                self.drain_queue(session);
                if session.kept() {
                    dirty.insert(Arc::from(client_id));
                }
            }
        }
    }

    /// PUBREC from the client (QoS 2): the message is kept as released and PUBREL goes out.
    pub fn received(&self, client_id: &str, connection_id: u64, pkid: u16) {
        let mut state = self.lock();
        if let Some(session) = live_session(&mut state.sessions, client_id, connection_id) {
            if let Some(slot) = session.inflight.get_mut(&pkid) {
                if let Some(pending) = slot.take() {
                    self.release_bytes(session, pending.size());
                }
            }
            self.send(session, Outbound::PubRel(pkid));
        }
        state.touch(client_id);
    }

    /// Drops persistent sessions whose client stayed away longer than their expiry, and
    /// publishes the wills whose delay passed (or whose session ended).
    pub fn expire_sessions(&self) -> usize {
        let mut guard = self.lock();
        let state = &mut *guard;
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut wills = Vec::new();
        for (key, session) in state.sessions.iter_mut() {
            if session.connection.is_some() {
                continue;
            }
            let gone = session
                .disconnected_at
                .is_some_and(|at| now.duration_since(at) >= session.expiry);
            if gone {
                expired.push(key.clone());
            } else if session
                .pending_will
                .as_ref()
                .is_some_and(|(_, due)| *due <= now)
            {
                if let Some((will, _)) = session.pending_will.take() {
                    wills.push(will);
                }
            }
        }
        for key in &expired {
            if let Some(session) = self.remove_session(state, key) {
                wills.extend(session.pending_will.map(|(will, _)| will));
            }
        }
        for will in wills {
            self.publish_will(state, *will);
        }
        expired.len()
    }

    /// Asks every live connection to close (shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        let state = self.lock();
        for session in state.sessions.values() {
            if let Some(connection) = &session.connection {
                connection.link.close(reason);
            }
        }
    }

    /// Sessions and subscriptions now (one pass over the sessions under the lock, as the
    /// metrics are read).
    pub fn counts(&self) -> SessionCounts {
        let state = self.lock();
        let mut counts = SessionCounts {
            sessions: state.sessions.len(),
            subscriptions: state.trie.len(),
            ..SessionCounts::default()
        };
        for session in state.sessions.values() {
            let connected = session.connection.is_some();
            counts.connected += usize::from(connected);
            counts.things_online += usize::from(connected && session.identity.thing.is_some());
            counts.persistent += usize::from(session.persistent);
            counts.shared_subscriptions += session
                .subscriptions
                .values()
                .filter(|(parsed, _)| parsed.share_group.is_some())
                .count();
        }
        counts
    }

    fn remove_session(&self, state: &mut State, client_id: &str) -> Option<Session> {
        let (key, session) = state.sessions.remove_entry(client_id)?;
        if session.stored {
            state.dirty.insert(key.clone());
        }
        for (parsed, _) in session.subscriptions.values() {
            state.trie.remove(&parsed.filter, &probe(&key, parsed));
        }
        if let Some(username) = &session.identity.username {
            if let Some(ids) = state.owners.get_mut(username.as_str()) {
                ids.remove(&key);
                if ids.is_empty() {
                    state.owners.remove(username.as_str());
                }
            }
        }
        self.stats
            .queued_bytes
            .fetch_sub(session.queued_bytes as u64, Ordering::Relaxed);
        Some(session)
    }

    fn publish_will(&self, state: &mut State, will: Will) {
        let mut message = will.message;
        // The expiry interval starts when the will is published.
        message.expires_at = will.expiry.map(|e| Instant::now() + e);
        if let Err(e) = self.route(state, message) {
            tracing::warn!(error = %e, "will message not published");
        }
    }

    /// Bytes each session may always hold: half the total bound shared out over the sessions.
    fn fair_share(&self, sessions: usize) -> usize {
        self.limits.queued_bytes_max / 2 / sessions.max(1)
    }

    fn hold_bytes(&self, session: &mut Session, bytes: usize) {
        session.queued_bytes += bytes;
        self.stats
            .queued_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn release_bytes(&self, session: &mut Session, bytes: usize) {
        session.queued_bytes -= bytes;
        self.stats
            .queued_bytes
            .fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    fn drop_message(&self, session: &mut Session, why: &'static str) {
        session.dropped += 1;
        self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
        // The first drop of a session is worth an operator's attention; the rest are counted
        // (per session in the clients API, in total in the metrics).
        if session.dropped == 1 {
            tracing::warn!(client_id = %session.identity.client_id, why, "message dropped for a session");
        } else {
            tracing::debug!(client_id = %session.identity.client_id, why, "message dropped for a session");
        }
    }

    /// Hands `outbound` to the live connection; a full channel (or more than
    /// `outbound_bytes_max` not yet written) closes it as a slow consumer (its in-flight
    /// messages are resent when it comes back). False if not handed over.
    fn send(&self, session: &mut Session, outbound: Outbound) -> bool {
        let Some(connection) = &session.connection else {
            return false;
        };
        if self.hand_over(&connection.link, &connection.tx, outbound) {
            return true;
        }
        if connection.link.reason().is_none() {
            self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
            tracing::info!(client_id = %session.identity.client_id, "outbound queue full; closing the slow consumer");
        }
        connection.link.close(CloseReason::SlowConsumer);
        false
    }

    /// Puts `outbound` in a connection's channel, counting its bytes against the connection's
    /// budget until the connection takes it out ([`Broker::taken`]).
    fn hand_over(&self, link: &Link, tx: &mpsc::Sender<Outbound>, outbound: Outbound) -> bool {
        let size = outbound.size();
        let held = link.outbound_bytes.load(Ordering::Relaxed);
        // One message always fits an empty channel, whatever its size.
        if held > 0 && held + size > self.limits.outbound_bytes_max {
            return false;
        }
        link.outbound_bytes.fetch_add(size, Ordering::Relaxed);
        self.stats
            .outbound_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        if tx.try_send(outbound).is_ok() {
            return true;
        }
        self.taken(link, size);
        false
    }

    /// A connection took `bytes` out of its channel (written, discarded, or dropped at close).
    pub fn taken(&self, link: &Link, bytes: usize) {
        link.outbound_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.stats
            .outbound_bytes
            .fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    /// Queues `pending` for `session` within the bounds. `fair_share` is half the total bound
    /// divided by the number of sessions: bytes a session may always hold.
    fn enqueue(&self, session: &mut Session, pending: Pending, fair_share: usize) {
        if session.connection.is_none() && !session.persistent {
            return;
        }
        if pending.qos == 0 && session.connection.is_some() {
            if self.send(session, pending.outbound(0, false)) {
                self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
            } else {
                self.drop_message(session, "outbound queue full");
            }
            return;
        }
        let size = pending.size();
        // Within its fair share a session always gets the bytes; beyond it, only while the
        // shared half has room. Fair shares add up to half the bound and the shared half is
        // the other: the total never passes it.
        let shared = self.limits.queued_bytes_max / 2;
        let over = |session: &Session| {
            let total = self.stats.queued_bytes.load(Ordering::Relaxed) as usize + size;
            session.queue.len() >= self.limits.session_queue_max
                || session.queued_bytes + size > self.limits.session_queue_bytes_max
                || (session.queued_bytes + size > fair_share && total > shared)
        };
        // Make room by dropping this session's oldest queued messages; if that is not enough
        // (the bytes are in flight), the new message is the one dropped.
        while over(session) {
            let Some(oldest) = session.queue.pop_front() else {
                self.drop_message(session, "queue bound reached");
                return;
            };
            self.release_bytes(session, oldest.size());
            self.drop_message(session, "queue bound reached");
        }
        self.hold_bytes(session, size);
        session.queue.push_back(pending);
        self.drain_queue(session);
    }

    /// Moves queued messages into the in-flight window of a connected session.
    fn drain_queue(&self, session: &mut Session) {
        if session.connection.is_none() {
            return;
        }
        while let Some(front) = session.queue.front() {
            let needs_slot = front.qos > 0;
            if needs_slot && session.inflight.len() >= session.window {
                break;
            }
            let Some(pending) = session.queue.pop_front() else {
                break;
            };
            if pending.expired(Instant::now()) {
                self.release_bytes(session, pending.size());
                self.stats.messages_expired.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let pkid = if needs_slot {
                match session.allocate_pkid() {
                    Some(pkid) => pkid,
                    None => {
                        session.queue.push_front(pending);
                        break;
                    }
                }
            } else {
                0
            };
            let outbound = pending.outbound(pkid, false);
            if needs_slot {
                session.inflight.insert(pkid, Some(pending));
            } else {
                self.release_bytes(session, pending.size());
            }
            if !self.send(session, outbound) {
                // In flight: resent when the client is back. A QoS 0 message is lost.
                if !needs_slot {
                    self.drop_message(session, "outbound queue full");
                }
                break;
            }
            self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What [`Broker::restore`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Sessions restored.
    pub sessions: usize,
    /// Sessions not restored: their expiry passed while the server was down.
    pub sessions_expired: usize,
    /// Sessions not restored: their user or Thing no longer holds them.
    pub sessions_revoked: usize,
    /// Sessions not restored: past `sessions_max` (or a user's `user_sessions_max`).
    pub sessions_over_bound: usize,
    /// Messages dropped from restored queues by the queue bounds or because they expired.
    pub messages_dropped: usize,
    /// Subscriptions the ACL no longer allows, or no longer valid, not restored.
    pub subscriptions_dropped: usize,
    /// Retained messages restored.
    pub retained: usize,
    /// Retained messages dropped: expired, or past a retained bound.
    pub retained_dropped: usize,
    /// Records that could not be decoded (dropped).
    pub unreadable: usize,
}

impl Broker {
    /// Takes what changed since the last call, in stored form (see [`super::persist`]).
    pub fn take_changes(&self, time: TimeBase) -> Changes {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut changes = Changes {
            generation: self.checkpoints_taken.fetch_add(1, Ordering::AcqRel) + 1,
            ..Changes::default()
        };
        for key in std::mem::take(&mut state.dirty) {
            let stored = match state.sessions.get_mut(&key) {
                Some(session) if session.persistent => {
                    session.stored = true;
                    Some(stored_session(&key, session, time))
                }
                Some(session) => {
                    session.stored = false;
                    None
                }
                None => None,
            };
            changes.sessions.push((key.to_string(), stored));
        }
        for topic in std::mem::take(&mut state.retained_dirty) {
            let stored = state.retained.get(&topic).map(|m| {
                stored_message(
                    &m.topic,
                    &m.payload,
                    m.qos,
                    true,
                    &[],
                    m.properties.as_deref(),
                    m.expires_at,
                    time,
                )
            });
            changes.retained.push((topic.to_string(), stored));
        }
        changes
    }

    /// Sessions and retained topics changed since the last checkpoint.
    pub fn unstored_changes(&self) -> usize {
        let state = self.lock();
        state.dirty.len() + state.retained_dirty.len()
    }

    /// Marks sessions and retained topics changed again (their checkpoint failed).
    pub fn mark_changed<'a>(
        &self,
        sessions: impl Iterator<Item = &'a str>,
        retained: impl Iterator<Item = &'a str>,
    ) {
        let mut state = self.lock();
        state.dirty.extend(sessions.map(Arc::from));
        state.retained_dirty.extend(retained.map(Arc::from));
    }

    /// Loads stored sessions and retained messages into an empty broker, within the current
    /// bounds. `owner_holds` gives the identity a session is restored with (`None`: dropped);
    /// `allowed` says whether it may still subscribe to a filter. Everything not restored is
    /// marked, so the next checkpoint removes it from storage.
    pub fn restore(
        &self,
        mut sessions: Vec<StoredSession>,
        mut retained: Vec<StoredMessage>,
        owner_holds: &dyn Fn(&StoredSession) -> Option<Identity>,
        allowed: &dyn Fn(&Identity, &str) -> bool,
        time: TimeBase,
    ) -> RestoreReport {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut report = RestoreReport::default();
        // Most recently active first: when a bound cuts, the freshest sessions stay.
        sessions.sort_by_key(|s| std::cmp::Reverse(s.disconnected_at_ms.unwrap_or(u64::MAX)));
        for stored in sessions {
            let key: Arc<str> = Arc::from(stored.client_id.as_str());
            let expiry = if stored.expiry_s == u64::MAX {
                Duration::MAX
            } else {
                Duration::from_secs(stored.expiry_s)
            }
            .min(self.limits.session_expiry_max);
            // A session connected when the server stopped counts its expiry from now.
            let disconnected_at = stored
                .disconnected_at_ms
                .map_or(time.now, |ms| time.to_instant(ms));
            if expiry.is_zero() || time.now.duration_since(disconnected_at) >= expiry {
                report.sessions_expired += 1;
                state.dirty.insert(key);
                continue;
            }
            let Some(identity) = owner_holds(&stored) else {
                report.sessions_revoked += 1;
                tracing::info!(client_id = %key, "stored session not restored: its user or Thing no longer holds it");
                state.dirty.insert(key);
                continue;
            };
            let user_full = !identity.superuser
                && identity.username.as_deref().is_some_and(|user| {
                    state
                        .owners
                        .get(user)
                        .is_some_and(|ids| ids.len() >= self.limits.user_sessions_max)
                });
            if state.sessions.len() >= self.limits.sessions_max || user_full {
                report.sessions_over_bound += 1;
                tracing::warn!(client_id = %key, "stored session not restored: a session bound is reached");
                state.dirty.insert(key);
                continue;
            }
            let mut session = Session::new(identity, true, expiry, self.limits.inflight_max.max(1));
            session.disconnected_at = Some(disconnected_at);
            session.next_pkid = stored.next_pkid.max(1);
            session.incoming_qos2 = stored.incoming_qos2.into_iter().collect();
            session.dropped = stored.dropped;
            session.stored = true;
            for (raw, options) in stored.subscriptions {
                let parsed = match topic::parse_filter(&raw) {
                    Ok(parsed) if allowed(&session.identity, &parsed.filter) => parsed,
                    _ => {
                        report.subscriptions_dropped += 1;
                        tracing::info!(client_id = %key, filter = %raw, "stored subscription not restored: no longer valid or allowed");
                        continue;
                    }
                };
                let options = SubOptions::from(options);
                state.trie.insert(
                    &parsed.filter,
                    Subscriber {
                        client: key.clone(),
                        share: parsed.share_group.as_deref().map(Arc::from),
                        filter: Arc::from(parsed.filter.as_str()),
                        options,
                    },
                );
                session.subscriptions.insert(raw, (parsed, options));
            }
            // In flight: kept whatever the bounds (their packet ids must be settled).
            for (pkid, message) in stored.inflight {
                let pending = message.map(|m| pending_of(m, time));
                if let Some(p) = &pending {
                    self.hold_bytes(&mut session, p.size());
                }
                session.inflight.insert(pkid, pending);
            }
            let fair_share = self.fair_share(state.sessions.len() + 1);
            let dropped_before = session.dropped;
            for message in stored.queue {
                let pending = pending_of(message, time);
                if pending.expired(time.now) {
                    report.messages_dropped += 1;
                    continue;
                }
                // The bounds as for a live message (the oldest goes first).
                session.connection = None;
                self.enqueue(&mut session, pending, fair_share);
            }
            report.messages_dropped += (session.dropped - dropped_before) as usize;
            if session.dropped > dropped_before {
                tracing::warn!(client_id = %key, dropped = session.dropped - dropped_before, "stored messages past the queue bounds dropped at restore");
            }
            if let Some(username) = &session.identity.username {
                state
                    .owners
                    .entry(Arc::from(username.as_str()))
                    .or_default()
                    .insert(key.clone());
            }
            // Rewritten at the first checkpoint in the current form.
            state.dirty.insert(key.clone());
            state.sessions.insert(key, session);
            report.sessions += 1;
        }
        retained.sort_by(|a, b| a.topic.cmp(&b.topic));
        for stored in retained {
            let topic: Arc<str> = Arc::from(stored.topic.as_str());
            let pending = pending_of(stored, time);
            let size = pending.size();
            let over = state.retained.len() >= self.limits.retained_max
                || state.retained_bytes + size > self.limits.retained_bytes_max;
            if pending.expired(time.now) || pending.payload.is_empty() || over {
                if over {
                    tracing::warn!(%topic, "stored retained message not restored: a retained bound is reached");
                }
                report.retained_dropped += 1;
                state.retained_dirty.insert(topic);
                continue;
            }
            state.retained_bytes += size;
            state.retained.insert(
                topic.clone(),
                Message {
                    topic,
                    payload: pending.payload,
                    qos: pending.qos,
                    retain: true,
                    publisher: None,
                    properties: pending.properties,
                    expires_at: pending.expires_at,
                },
            );
            report.retained += 1;
        }
        self.stats
            .retained_bytes
            .store(state.retained_bytes as u64, Ordering::Relaxed);
        report
    }
}

/// A session in stored form.
fn stored_session(key: &str, session: &Session, time: TimeBase) -> StoredSession {
    let message = |p: &Pending| {
        stored_message(
            &p.topic,
            &p.payload,
            p.qos,
            p.retain,
            &p.subscription_ids,
            p.properties.as_deref(),
            p.expires_at,
            time,
        )
    };
    StoredSession {
        client_id: key.to_owned(),
        username: session.identity.username.clone(),
        thing: session.identity.thing.clone(),
        superuser: session.identity.superuser,
        expiry_s: session.expiry.as_secs(),
        disconnected_at_ms: match (&session.connection, session.disconnected_at) {
            (None, Some(at)) => Some(time.to_unix_ms(at)),
            _ => None,
        },
        subscriptions: session
            .subscriptions
            .iter()
            .map(|(raw, (_, options))| (raw.clone(), StoredOptions::from(*options)))
            .collect(),
        inflight: session
            .inflight
            .iter()
            .map(|(pkid, pending)| (*pkid, pending.as_ref().map(message)))
            .collect(),
        queue: session.queue.iter().map(message).collect(),
        next_pkid: session.next_pkid,
        incoming_qos2: session.incoming_qos2.iter().copied().collect(),
        dropped: session.dropped,
    }
}

#[allow(clippy::too_many_arguments)]
fn stored_message(
    topic: &str,
    payload: &Bytes,
    qos: u8,
    retain: bool,
    subscription_ids: &[usize],
    properties: Option<&PublishProperties>,
    expires_at: Option<Instant>,
    time: TimeBase,
) -> StoredMessage {
    StoredMessage {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos,
        retain,
        subscription_ids: subscription_ids.to_vec(),
        properties: properties.map(StoredProperties::from),
        expires_at_ms: expires_at.map(|at| time.to_unix_ms(at)),
    }
}

fn pending_of(message: StoredMessage, time: TimeBase) -> Pending {
    Pending {
        topic: Arc::from(message.topic.as_str()),
        payload: Bytes::from(message.payload),
        qos: message.qos.min(2),
        retain: message.retain,
        subscription_ids: message.subscription_ids,
        properties: message
            .properties
            .map(|p| Arc::new(PublishProperties::from(p))),
        expires_at: message.expires_at_ms.map(|ms| time.to_instant(ms)),
    }
}

/// Adds `subscriber` to the per-client deliveries: the highest QoS wins and every subscription
/// identifier is kept.
fn add_delivery(
    per_client: &mut HashMap<Arc<str>, (Subscriber, Vec<usize>)>,
    subscriber: Subscriber,
) {
    let id = subscriber.options.subscription_id;
    match per_client.get_mut(&subscriber.client) {
        Some((best, ids)) => {
            ids.extend(id);
            // The highest QoS; at equal QoS, Retain As Published if any of them asked for it:
            // the outcome must not depend on the order the subscription index lists them in.
            let (new, old) = (&subscriber.options, &best.options);
            if (new.qos, new.retain_as_published) > (old.qos, old.retain_as_published) {
                *best = subscriber;
            }
        }
        None => {
            per_client.insert(
                subscriber.client.clone(),
                (subscriber, id.into_iter().collect()),
            );
        }
    }
}

/// The trie entry of a session's subscription (equality ignores the options).
fn probe(key: &Arc<str>, parsed: &ParsedFilter) -> Subscriber {
    Subscriber {
        client: key.clone(),
        share: parsed.share_group.as_deref().map(Arc::from),
        filter: Arc::from(parsed.filter.as_str()),
        options: SubOptions {
            qos: 0,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        },
    }
}

/// Removes the subscriptions of `session` that `allowed` no longer permits; returns how many.
fn revoke_subscriptions(
    trie: &mut FilterTrie<Subscriber>,
    key: &Arc<str>,
    session: &mut Session,
    allowed: &dyn Fn(&Identity, &str) -> bool,
) -> usize {
    let denied: Vec<String> = session
        .subscriptions
        .iter()
        .filter(|(_, (parsed, _))| !allowed(&session.identity, &parsed.filter))
        .map(|(raw, _)| raw.clone())
        .collect();
    for raw in &denied {
        if let Some((parsed, _)) = session.subscriptions.remove(raw) {
            trie.remove(&parsed.filter, &probe(key, &parsed));
            tracing::info!(client_id = %key, filter = %raw, "subscription removed: no longer allowed");
        }
    }
    denied.len()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn limits() -> BrokerLimits {
        BrokerLimits {
            inflight_max: 2,
            session_queue_max: 3,
            session_queue_bytes_max: 1 << 20,
            outbound_bytes_max: 1 << 20,
            queued_bytes_max: 1 << 20,
            sessions_max: 100,
            user_sessions_max: 100,
            bootstrap_sessions_max: 100,
            session_subscriptions_max: 100,
            session_expiry_max: Duration::from_secs(3600),
            retained_max: 100,
            retained_bytes_max: 1 << 20,
        }
    }

    fn broker() -> Broker {
        Broker::new(limits())
    }

    fn options(qos: u8) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }

    fn message(topic: &str, qos: u8, retain: bool) -> Message {
        Message {
            topic: Arc::from(topic),
            payload: Bytes::from_static(b"x"),
            qos,
            retain,
            publisher: None,
            properties: None,
            expires_at: None,
        }
    }

    fn identity(client: &str, user: &str) -> Identity {
        Identity {
            client_id: client.into(),
            username: Some(user.into()),
            thing: None,
            superuser: false,
            bootstrap: false,
        }
    }

    /// A connection of `user` with client id `client` (expiry 0 = clean, non-persistent).
    struct Attached {
        registered: Registered,
        rx: mpsc::Receiver<Outbound>,
        link: Arc<Link>,
    }

    fn request(client: &str, user: &str, clean: bool, expiry_s: u64) -> ConnectRequest {
        ConnectRequest {
            identity: identity(client, user),
            clean_start: clean,
            expiry: Duration::from_secs(expiry_s),
            receive_maximum: None,
            will: None,
            verify: None,
        }
    }

    fn attach_with(broker: &Broker, request: ConnectRequest, capacity: usize) -> Attached {
        let (tx, rx) = mpsc::channel(capacity);
        let link = Arc::new(Link::default());
        let registered = broker
            .connect(request, tx, link.clone())
            .expect("connect accepted");
        Attached {
            registered,
            rx,
            link,
        }
    }

    fn attach(broker: &Broker, client: &str, clean: bool, expiry_s: u64) -> Attached {
        attach_with(broker, request(client, "u", clean, expiry_s), 16)
    }

    fn leave(broker: &Broker, client: &str, attached: &Attached) -> bool {
        broker.disconnect(
            client,
            attached.registered.connection_id,
            CloseReason::ConnectionLost,
        )
    }

    /// The live connection of `client` (tests act as that connection).
    fn live(broker: &Broker, client: &str) -> u64 {
        broker
            .lock()
            .sessions
            .get(client)
            .and_then(|s| s.connection.as_ref())
            .map(|c| c.id)
            .expect("connected")
    }

    fn subscribe(broker: &Broker, client: &str, filter: &str, qos: u8) {
        subscribe_with(broker, client, filter, options(qos));
    }

    fn subscribe_with(broker: &Broker, client: &str, filter: &str, options: SubOptions) {
        broker
            .subscribe(
                client,
                live(broker, client),
                filter,
                topic::parse_filter(filter).expect("filter"),
                options,
            )
            .expect("within the subscription bound");
    }

    fn drain(rx: &mut mpsc::Receiver<Outbound>) -> Vec<Outbound> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            out.push(o);
        }
        out
    }

    fn publishes(rx: &mut mpsc::Receiver<Outbound>) -> Vec<OutboundPublish> {
        drain(rx)
            .into_iter()
            .filter_map(|o| match o {
                Outbound::Publish(p) => Some(*p),
                Outbound::PubRel(_) => None,
            })
            .collect()
    }

    fn qos_pkid(outbound: &Outbound) -> (u8, u16, bool) {
        match outbound {
            Outbound::Publish(p) => (p.qos, p.pkid, p.dup),
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[test]
    fn a_session_holds_at_most_session_subscriptions_max_by_any_path() {
        let broker = broker();
        let _attached = attach(&broker, "c", true, 0);
        let max = limits().session_subscriptions_max;
        let parse = |f: &str| topic::parse_filter(f).expect("filter");
        for n in 0..max {
            subscribe(&broker, "c", &format!("t/{n}"), 0);
        }
        // Given a full session, a new filter is refused over MQTT and by the operator...
        let id = live(&broker, "c");
        assert_eq!(
            broker.subscribe("c", id, "new", parse("new"), options(0)),
            Err(ProxyRefusal::TooManySubscriptions(max))
        );
        assert_eq!(
            broker.proxy_subscribe("c", "new", parse("new"), options(0), &|_| true),
            Err(ProxyRefusal::TooManySubscriptions(max))
        );
        // ...while changing an existing one's options still works, and one freed makes room.
        assert_eq!(
            broker.subscribe("c", id, "t/0", parse("t/0"), options(1)),
            Ok(false)
        );
        assert!(broker.unsubscribe("c", id, "t/1"));
        assert_eq!(
            broker.subscribe("c", id, "new", parse("new"), options(0)),
            Ok(true)
        );
    }

    #[test]
    fn proxy_subscriptions_reach_offline_sessions_and_an_undo_restores_what_was_there() {
        let broker = broker();
        let offline = attach(&broker, "p", false, 60);
        subscribe(&broker, "p", "kept", 0);
        assert!(leave(&broker, "p", &offline));
        let parse = |f: &str| topic::parse_filter(f).expect("filter");
        // Given an offline persistent session: the owner's rights decide.
        assert_eq!(
            broker.proxy_subscribe("p", "t/#", parse("t/#"), options(1), &|_| false),
            Err(ProxyRefusal::NotAuthorized)
        );
        assert_eq!(
            broker.proxy_subscribe("nobody", "t/#", parse("t/#"), options(1), &|_| true),
            Err(ProxyRefusal::NoSession)
        );
        assert_eq!(
            broker.proxy_subscribe("p", "t/#", parse("t/#"), options(1), &|_| true),
            Ok((None, true))
        );
        assert_eq!(
            broker.publish(message("t/x", 1, false)),
            Ok(1),
            "queued for it"
        );
        // When a replacement is undone, the replaced options come back; a new one goes.
        assert_eq!(
            broker.proxy_subscribe("p", "kept", parse("kept"), options(2), &|_| true),
            Ok((Some(options(0)), true))
        );
        broker.proxy_undo("p", "kept", options(2), Some(options(0)));
        broker.proxy_undo("p", "t/#", options(1), None);
        let listed = broker.subscriptions(Some("p"), None, None, None, 10);
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!((listed[0].topic.as_str(), listed[0].qos), ("kept", 0));
        // An undo of a subscription the client changed since leaves it alone.
        broker
            .proxy_subscribe("p", "k2", parse("k2"), options(1), &|_| true)
            .expect("subscribed");
        broker
            .proxy_subscribe("p", "k2", parse("k2"), options(2), &|_| true)
            .expect("the client again");
        broker.proxy_undo("p", "k2", options(1), None);
        assert_eq!(
            broker
                .subscriptions(Some("p"), Some("k2"), None, None, 10)
                .len(),
            1
        );
        assert_eq!(broker.proxy_unsubscribe("p", "k2"), Ok((true, true)));
        assert_eq!(broker.proxy_unsubscribe("p", "k2"), Ok((false, true)));
    }

    #[test]
    fn expired_messages_are_not_queued_for_delivery_nor_kept_retained() {
        let broker = broker();
        let offline = attach(&broker, "p", false, 60);
        subscribe(&broker, "p", "t", 1);
        assert!(leave(&broker, "p", &offline));
        let soon = Instant::now() + Duration::from_millis(30);
        let mut short = message("t", 1, true);
        short.expires_at = Some(soon);
        broker.publish(short).expect("published");
        broker.publish(message("t", 1, false)).expect("published");
        while Instant::now() < soon + Duration::from_millis(5) {
            std::thread::yield_now();
        }
        let mut back = attach(&broker, "p", false, 60);
        assert_eq!(
            drain(&mut back.rx).len(),
            1,
            "only the message without expiry"
        );
        assert_eq!(broker.stats.messages_expired.load(Ordering::Relaxed), 1);
        let mut late = attach(&broker, "late", true, 0);
        subscribe(&broker, "late", "t", 1);
        assert!(
            drain(&mut late.rx).is_empty(),
            "the expired retained message is gone"
        );
        assert_eq!(broker.retained_counts(), (0, 0));
    }

    #[test]
    fn delivery_is_at_the_lower_qos_and_the_window_holds_the_rest() {
        let broker = broker();
        let mut c = attach(&broker, "c", true, 0);
        subscribe(&broker, "c", "t/#", 1);
        for qos in [2, 0, 1, 1] {
            broker
                .publish(message("t/a", qos, false))
                .expect("published");
        }
        let got: Vec<_> = drain(&mut c.rx).iter().map(qos_pkid).collect();
        assert_eq!(
            got,
            [(1, 1, false), (0, 0, false), (1, 2, false)],
            "window of 2 holds the 4th"
        );
        broker.acknowledged("c", c.registered.connection_id, 1);
        assert_eq!(
            drain(&mut c.rx).iter().map(qos_pkid).collect::<Vec<_>>(),
            [(1, 3, false)]
        );
    }

    #[test]
    fn a_persistent_session_queues_while_offline_and_resends_in_flight_with_dup() {
        let broker = broker();
        let mut first = attach(&broker, "p", false, 60);
        assert!(!first.registered.session_present);
        subscribe(&broker, "p", "t", 1);
        broker.publish(message("t", 1, false)).expect("published");
        assert_eq!(drain(&mut first.rx).len(), 1, "sent, not acknowledged");
        assert!(leave(&broker, "p", &first));
        for _ in 0..5 {
            broker.publish(message("t", 1, false)).expect("published");
        }
        let mut second = attach(&broker, "p", false, 60);
        assert!(second.registered.session_present);
        let got: Vec<_> = drain(&mut second.rx).iter().map(qos_pkid).collect();
        // pkid 1 again with DUP, then one more fills the window of 2; the queue kept the newest 3.
        assert_eq!(got, [(1, 1, true), (1, 2, false)]);
        assert_eq!(broker.stats.messages_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(broker.client("p").expect("session").dropped, 2);
    }

    #[test]
    fn a_clean_session_ends_at_disconnect_and_takeover_closes_the_old_connection() {
        let broker = broker();
        let first = attach(&broker, "c", true, 0);
        subscribe(&broker, "c", "t", 0);
        let second = attach(&broker, "c", false, 10);
        assert!(
            second.registered.session_present,
            "the session lives on across a takeover"
        );
        assert_eq!(first.link.reason(), Some(CloseReason::Takeover));
        assert!(
            !leave(&broker, "c", &first),
            "taken-over connection is stale"
        );
        assert!(leave(&broker, "c", &second));
        let third = attach(&broker, "c", true, 0);
        assert!(!third.registered.session_present);
    }

    #[test]
    fn a_session_belongs_to_its_owner_and_nobody_else_may_resume_or_kick_it() {
        let broker = broker();
        let mut owner = attach_with(&broker, request("dev-b", "user-b", false, 60), 16);
        subscribe(&broker, "dev-b", "inbox/b", 1);
        let (tx, _rx) = mpsc::channel(16);
        for clean in [false, true] {
            let thief = request("dev-b", "user-a", clean, 60);
            assert_eq!(
                broker
                    .connect(thief, tx.clone(), Arc::new(Link::default()))
                    .expect_err("refused"),
                ConnectRefusal::NotOwner
            );
        }
        assert_eq!(owner.link.reason(), None, "the owner stays connected");
        broker
            .publish(message("inbox/b", 1, false))
            .expect("published");
        assert_eq!(drain(&mut owner.rx).len(), 1, "and still gets its messages");
        // Offline too: the session waits for its owner only.
        assert!(leave(&broker, "dev-b", &owner));
        let anonymous = ConnectRequest {
            identity: Identity {
                username: None,
                ..identity("dev-b", "")
            },
            ..request("dev-b", "", false, 60)
        };
        assert_eq!(
            broker
                .connect(anonymous, tx, Arc::new(Link::default()))
                .expect_err("refused"),
            ConnectRefusal::NotOwner
        );
        let back = attach_with(&broker, request("dev-b", "user-b", false, 60), 16);
        assert!(back.registered.session_present);
    }

    #[test]
    fn retained_messages_reach_new_subscribers_and_an_empty_payload_clears_them() {
        let broker = broker();
        broker.publish(message("r/1", 1, true)).expect("published");
        broker.publish(message("r/2", 0, true)).expect("published");
        let mut c = attach(&broker, "c", true, 0);
        subscribe(&broker, "c", "r/+", 1);
        let out = drain(&mut c.rx);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|o| matches!(o, Outbound::Publish(p) if p.retain)));
        let mut clear = message("r/1", 0, true);
        clear.payload = Bytes::new();
        broker.publish(clear).expect("published");
        let mut d = attach(&broker, "d", true, 0);
        subscribe(&broker, "d", "r/+", 1);
        assert_eq!(drain(&mut d.rx).len(), 1);
        assert_eq!(broker.retained_counts(), (1, "r/2x".len()));
    }

    #[test]
    fn retained_bounds_refuse_new_topics_but_allow_replacing_and_clearing() {
        let broker = Broker::new(BrokerLimits {
            retained_max: 2,
            retained_bytes_max: 10,
            ..limits()
        });
        broker.publish(message("a", 0, true)).expect("2 bytes");
        broker.publish(message("b", 0, true)).expect("2 bytes");
        assert_eq!(
            broker.publish(message("c", 0, true)),
            Err(PublishRefusal::RetainedQuotaExceeded),
            "a third topic passes retained_max"
        );
        let mut big = message("a", 0, true);
        big.payload = Bytes::from_static(b"0123456789");
        assert_eq!(
            broker.publish(big),
            Err(PublishRefusal::RetainedQuotaExceeded),
            "replacing with 11 bytes passes retained_bytes_max"
        );
        let mut replaced = message("a", 0, true);
        replaced.payload = Bytes::from_static(b"0123456");
        broker.publish(replaced).expect("8 + 2 bytes fit");
        let mut clear = message("b", 0, true);
        clear.payload = Bytes::new();
        broker.publish(clear).expect("clearing always works");
        assert_eq!(broker.retained_counts(), (1, 8));
        assert_eq!(broker.stats.retained_refused.load(Ordering::Relaxed), 2);
        assert_eq!(broker.stats.retained_bytes.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn queued_bytes_are_bounded_per_session_and_in_total() {
        let broker = Broker::new(BrokerLimits {
            session_queue_max: 1000,
            session_queue_bytes_max: 30,
            queued_bytes_max: 50,
            ..limits()
        });
        let payload = Bytes::from(vec![b'x'; 9]);
        let publish = |topic: &str| {
            let mut m = message(topic, 1, false);
            m.payload = payload.clone();
            broker.publish(m).expect("published")
        };
        for client in ["s1", "s2"] {
            let offline = attach(&broker, client, false, 60);
            subscribe(&broker, client, client, 1);
            assert!(leave(&broker, client, &offline));
        }
        // 11 bytes each ("s1" + 9): the session bound keeps 2 of 5.
        for _ in 0..5 {
            publish("s1");
        }
        assert_eq!(broker.client("s1").expect("s1").queued, 2);
        assert_eq!(broker.client("s1").expect("s1").queued_bytes, 22);
        // s1 took the shared half (25 bytes); s2 still gets its fair share, 25 / 2 sessions =
        // 12 bytes: one message, however much s1 holds.
        for _ in 0..5 {
            publish("s2");
        }
        let s2 = broker.client("s2").expect("s2");
        assert_eq!((s2.queued, s2.dropped), (1, 4));
        assert_eq!(broker.stats.queued_bytes.load(Ordering::Relaxed), 33);
        // Delivery releases the bytes; a discarded session gives its bytes back.
        let mut back = attach(&broker, "s1", false, 60);
        for p in publishes(&mut back.rx) {
            broker.acknowledged("s1", back.registered.connection_id, p.pkid);
        }
        assert_eq!(broker.stats.queued_bytes.load(Ordering::Relaxed), 11);
        assert!(broker.kick("s2"));
        assert_eq!(broker.stats.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn sessions_past_the_bound_are_refused_but_existing_ones_resume() {
        let broker = Broker::new(BrokerLimits {
            sessions_max: 2,
            ..limits()
        });
        let a = attach(&broker, "a", false, 60);
        let _b = attach(&broker, "b", false, 60);
        let (tx, _rx) = mpsc::channel(4);
        assert_eq!(
            broker
                .connect(request("c", "u", true, 0), tx, Arc::new(Link::default()))
                .expect_err("refused"),
            ConnectRefusal::SessionsFull
        );
        assert!(leave(&broker, "a", &a));
        let again = attach(&broker, "a", false, 60);
        assert!(
            again.registered.session_present,
            "a resume is not a new session"
        );
        assert_eq!(broker.stats.sessions_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_outbound_channel_closes_the_slow_consumer_and_keeps_its_messages_in_flight() {
        let broker = Broker::new(BrokerLimits {
            inflight_max: 10,
            ..limits()
        });
        let slow = attach_with(&broker, request("slow", "u", false, 60), 2);
        subscribe(&broker, "slow", "t", 1);
        for _ in 0..3 {
            broker.publish(message("t", 1, false)).expect("published");
        }
        assert_eq!(slow.link.reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(broker.stats.slow_consumers.load(Ordering::Relaxed), 1);
        assert!(broker.disconnect(
            "slow",
            slow.registered.connection_id,
            CloseReason::SlowConsumer
        ));
        let mut back = attach(&broker, "slow", false, 60);
        assert_eq!(
            drain(&mut back.rx).iter().map(qos_pkid).collect::<Vec<_>>(),
            [(1, 1, true), (1, 2, true), (1, 3, true)],
            "all three come back: nothing was lost"
        );
    }

    #[test]
    fn a_connection_holding_too_many_unwritten_bytes_is_closed_as_slow() {
        let broker = Broker::new(BrokerLimits {
            outbound_bytes_max: 5,
            ..limits()
        });
        let mut c = attach_with(&broker, request("c", "u", true, 0), 64);
        subscribe(&broker, "c", "t", 0);
        broker.publish(message("t", 0, false)).expect("published");
        broker.publish(message("t", 0, false)).expect("published");
        assert_eq!(c.link.outbound_bytes(), 4, "two messages of 2 bytes");
        assert_eq!(c.link.reason(), None);
        broker.publish(message("t", 0, false)).expect("published");
        assert_eq!(
            c.link.reason(),
            Some(CloseReason::SlowConsumer),
            "6 > 5 bytes"
        );
        // What the connection takes out is given back.
        for outbound in drain(&mut c.rx) {
            broker.taken(&c.link, outbound.size());
        }
        assert_eq!(c.link.outbound_bytes(), 0);
        assert_eq!(broker.stats.outbound_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_thing_registered_later_takes_its_client_id_back_from_whoever_held_it() {
        let broker = broker();
        let squatter = attach_with(&broker, request("future-dev", "app", false, 3600), 16);
        assert!(broker.reserve_client_id("future-dev", "future-dev"));
        assert_eq!(squatter.link.reason(), Some(CloseReason::Revoked));
        assert!(broker.client("future-dev").is_none());
        let device = ConnectRequest {
            identity: Identity {
                thing: Some("future-dev".into()),
                ..identity("future-dev", "future-dev")
            },
            ..request("future-dev", "future-dev", false, 60)
        };
        let mut device = attach_with(&broker, device, 16);
        assert!(!device.registered.session_present);
        assert!(
            !broker.reserve_client_id("future-dev", "future-dev"),
            "its own session stays"
        );
        assert!(drain(&mut device.rx).is_empty());
    }

    #[test]
    fn a_message_carries_the_ids_of_every_matching_subscription() {
        let broker = broker();
        let mut c = attach(&broker, "c", true, 0);
        for (filter, id) in [("a/+", Some(1)), ("a/#", Some(7)), ("+/b", None)] {
            let mut opts = options(1);
            opts.subscription_id = id;
            subscribe_with(&broker, "c", filter, opts);
        }
        broker.publish(message("a/b", 1, false)).expect("published");
        let got = publishes(&mut c.rx);
        assert_eq!(got.len(), 1, "one delivery per client");
        let mut ids = got[0].subscription_ids.clone();
        ids.sort_unstable();
        assert_eq!(ids, [1, 7]);
    }

    #[test]
    fn overlapping_subscriptions_keep_retain_as_published_whatever_their_order() {
        // An exact filter and a wildcard one at the same QoS, in both roles and both orders:
        // the retained flag goes out when either subscription asked for it.
        for (exact_rap, subscribe_exact_first) in
            [(true, true), (true, false), (false, true), (false, false)]
        {
            let broker = broker();
            let mut c = attach(&broker, "c", true, 0);
            let mut exact = options(1);
            exact.retain_as_published = exact_rap;
            let mut wildcard = options(1);
            wildcard.retain_as_published = !exact_rap;
            if subscribe_exact_first {
                subscribe_with(&broker, "c", "a/b", exact);
                subscribe_with(&broker, "c", "a/#", wildcard);
            } else {
                subscribe_with(&broker, "c", "a/#", wildcard);
                subscribe_with(&broker, "c", "a/b", exact);
            }
            broker.publish(message("a/b", 1, true)).expect("published");
            let got = publishes(&mut c.rx);
            assert_eq!(got.len(), 1, "one delivery per client");
            assert!(
                got[0].retain,
                "retain as published (exact asked: {exact_rap}, exact first: {subscribe_exact_first})"
            );
        }
    }

    fn will(topic: &str, delay_s: u64) -> Will {
        Will {
            message: message(topic, 0, false),
            delay: Duration::from_secs(delay_s),
            expiry: None,
        }
    }

    #[test]
    fn a_delayed_will_waits_for_its_delay_is_cancelled_by_a_return_and_fires_when_the_session_ends()
    {
        let broker = broker();
        let mut watcher = attach(&broker, "w", true, 0);
        subscribe(&broker, "w", "will/#", 0);
        // Back within the delay: never published.
        let with_will = |client: &str, expiry_s: u64, delay_s: u64| ConnectRequest {
            will: Some(will(&format!("will/{client}"), delay_s)),
            ..request(client, "u", false, expiry_s)
        };
        let first = attach_with(&broker, with_will("back", 3600, 60), 16);
        assert!(leave(&broker, "back", &first));
        broker.expire_sessions();
        let _again = attach(&broker, "back", false, 3600);
        broker.expire_sessions();
        assert!(
            publishes(&mut watcher.rx).is_empty(),
            "cancelled by the return"
        );
        // The session ends (expiry 0 s) before the delay (60 s): published at once.
        let short = attach_with(&broker, with_will("short", 0, 60), 16);
        assert!(leave(&broker, "short", &short));
        let got = publishes(&mut watcher.rx);
        assert_eq!(got.len(), 1);
        assert_eq!(&*got[0].topic, "will/short");
        // A normal DISCONNECT discards the will.
        let normal = attach_with(&broker, with_will("normal", 60, 0), 16);
        assert!(broker.disconnect(
            "normal",
            normal.registered.connection_id,
            CloseReason::Normal
        ));
        assert!(publishes(&mut watcher.rx).is_empty());
    }

    #[test]
    fn a_session_expiry_shortened_at_disconnect_releases_the_pending_will() {
        let broker = broker();
        let mut watcher = attach(&broker, "w", true, 0);
        subscribe(&broker, "w", "will/#", 0);
        let gone = attach_with(
            &broker,
            ConnectRequest {
                will: Some(will("will/x", 3600)),
                ..request("x", "u", false, 3600)
            },
            16,
        );
        assert_eq!(
            broker.set_session_expiry("x", gone.registered.connection_id, Duration::ZERO),
            Some(Duration::ZERO)
        );
        assert!(leave(&broker, "x", &gone));
        assert_eq!(
            publishes(&mut watcher.rx).len(),
            1,
            "session over, will out"
        );
        assert!(broker.client("x").is_none());
    }

    #[test]
    fn a_revoked_user_loses_its_connections_sessions_and_subscriptions() {
        let broker = broker();
        let live = attach_with(&broker, request("d1", "dev", false, 60), 16);
        subscribe(&broker, "d1", "secret/#", 0);
        subscribe(&broker, "d1", "open/#", 0);
        let offline = attach_with(&broker, request("d2", "dev", false, 60), 16);
        subscribe(&broker, "d2", "secret/#", 0);
        assert!(leave(&broker, "d2", &offline));
        let other = attach_with(&broker, request("o", "other", false, 60), 16);

        let allowed = |_: &Identity, filter: &str| !filter.starts_with("secret");
        let closed = broker.revoke_user(
            "dev",
            UserChange::Updated {
                thing: None,
                superuser: false,
                allowed: &allowed,
            },
        );
        assert_eq!(closed, 1);
        assert_eq!(live.link.reason(), Some(CloseReason::Revoked));
        assert_eq!(other.link.reason(), None, "another user is untouched");
        assert_eq!(broker.client("d1").expect("kept").subscriptions, ["open/#"]);
        assert!(broker.client("d2").expect("kept").subscriptions.is_empty());
        assert!(!broker.has_subscribers("secret/x"));

        broker.revoke_user("dev", UserChange::Deleted);
        assert!(broker.client("d1").is_none() && broker.client("d2").is_none());
        assert!(broker.client("o").is_some());
    }

    #[test]
    fn shared_subscriptions_deliver_each_message_to_one_member() {
        let broker = broker();
        let mut members = Vec::new();
        for client in ["a", "b"] {
            let attached = attach(&broker, client, true, 0);
            subscribe(&broker, client, "$share/g/jobs/+", 0);
            members.push(attached);
        }
        for _ in 0..4 {
            broker
                .publish(message("jobs/x", 0, false))
                .expect("published");
        }
        let counts: Vec<usize> = members.iter_mut().map(|m| drain(&mut m.rx).len()).collect();
        assert_eq!(counts, [2, 2]);
    }

    #[test]
    fn an_unreleased_qos2_id_survives_a_reconnect_so_a_resend_is_not_delivered_twice() {
        let broker = broker();
        let first = attach(&broker, "q", false, 60);
        let id = first.registered.connection_id;
        assert_eq!(
            broker.qos2_arrived("q", id, 7),
            Some(1),
            "first arrival is delivered"
        );
        assert_eq!(broker.qos2_arrived("q", id, 7), None, "a resend is not");
        leave(&broker, "q", &first);
        let again = attach(&broker, "q", false, 60);
        assert_eq!(
            broker.qos2_arrived("q", id, 8),
            None,
            "the old connection no longer acts on the session"
        );
        let id = again.registered.connection_id;
        assert_eq!(
            broker.qos2_arrived("q", id, 7),
            None,
            "still pending after the reconnect"
        );
        assert!(broker.qos2_released("q", id, 7));
        assert!(!broker.qos2_released("q", id, 7));
        assert_eq!(
            broker.qos2_arrived("q", id, 7),
            Some(1),
            "a released id can be used again"
        );
    }

    #[test]
    fn no_local_skips_the_publishers_own_messages() {
        let broker = broker();
        let mut me = attach(&broker, "me", true, 0);
        let mut opts = options(0);
        opts.no_local = true;
        subscribe_with(&broker, "me", "t", opts);
        let mut own = message("t", 0, false);
        own.publisher = Some(Arc::from("me"));
        broker.publish(own).expect("published");
        assert!(drain(&mut me.rx).is_empty());
        broker.publish(message("t", 0, false)).expect("published");
        assert_eq!(drain(&mut me.rx).len(), 1);
    }

    #[test]
    fn close_reasons_round_trip_through_their_codes() {
        for reason in CloseReason::ALL {
            assert_eq!(CloseReason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(CloseReason::from_code(0), None);
    }

    fn keep_owner(stored: &StoredSession) -> Option<Identity> {
        Some(Identity {
            client_id: stored.client_id.clone(),
            username: stored.username.clone(),
            thing: stored.thing.clone(),
            superuser: stored.superuser,
            bootstrap: false,
        })
    }

    fn allow_all(_: &Identity, _: &str) -> bool {
        true
    }

    fn changed_sessions(broker: &Broker) -> Vec<(String, bool)> {
        let mut changes: Vec<(String, bool)> = broker
            .take_changes(TimeBase::now())
            .sessions
            .into_iter()
            .map(|(id, stored)| (id, stored.is_some()))
            .collect();
        changes.sort();
        changes
    }

    #[test]
    fn only_persistent_sessions_reach_storage_and_their_end_removes_them() {
        let broker = broker();
        let clean = attach(&broker, "clean", true, 0);
        subscribe(&broker, "clean", "a", 1);
        broker.publish(message("a", 1, false)).expect("published");
        assert_eq!(
            changed_sessions(&broker),
            [],
            "clean sessions are never stored"
        );
        leave(&broker, "clean", &clean);

        let kept = attach(&broker, "kept", false, 600);
        subscribe(&broker, "kept", "a", 1);
        assert_eq!(changed_sessions(&broker), [("kept".into(), true)]);
        assert_eq!(changed_sessions(&broker), [], "nothing changed since");
        leave(&broker, "kept", &kept);
        broker.publish(message("a", 1, false)).expect("published");
        let changes = broker.take_changes(TimeBase::now());
        let stored = changes.sessions[0].1.as_ref().expect("stored");
        assert_eq!(stored.queue.len(), 1, "the queued message is stored");
        assert!(stored.disconnected_at_ms.is_some());
        assert_eq!(stored.subscriptions[0].0, "a");

        assert!(broker.kick("kept"));
        assert_eq!(
            changed_sessions(&broker),
            [("kept".into(), false)],
            "removed"
        );
    }

    #[test]
    fn a_restored_session_resumes_with_its_queue_and_subscriptions_and_retained_survive() {
        let before = broker();
        let kept = attach(&before, "kept", false, 600);
        subscribe(&before, "kept", "a/+", 1);
        leave(&before, "kept", &kept);
        for _ in 0..2 {
            before.publish(message("a/1", 1, false)).expect("published");
        }
        before.publish(message("r", 1, true)).expect("retained");
        let changes = before.take_changes(TimeBase::now());
        let sessions: Vec<StoredSession> = changes
            .sessions
            .into_iter()
            .filter_map(|(_, s)| s)
            .collect();
        let retained: Vec<StoredMessage> = changes
            .retained
            .into_iter()
            .filter_map(|(_, m)| m)
            .collect();

        let after = broker();
        let report = after.restore(sessions, retained, &keep_owner, &allow_all, TimeBase::now());
        assert_eq!((report.sessions, report.retained), (1, 1), "{report:?}");
        let mut again = attach(&after, "kept", false, 600);
        assert!(again.registered.session_present);
        assert_eq!(publishes(&mut again.rx).len(), 2, "the two queued messages");
        after.publish(message("a/2", 1, false)).expect("published");
        assert_eq!(publishes(&mut again.rx).len(), 0, "window of 2 is full");
        let fresh = attach(&after, "fresh", true, 0);
        let mut fresh_rx = fresh.rx;
        subscribe(&after, "fresh", "r", 1);
        assert_eq!(publishes(&mut fresh_rx).len(), 1, "the retained message");
    }

    fn stored_session(client: &str, disconnected_ago_s: u64, expiry_s: u64) -> StoredSession {
        let now = TimeBase::now();
        StoredSession {
            client_id: client.into(),
            username: Some("u".into()),
            thing: None,
            superuser: false,
            expiry_s,
            disconnected_at_ms: Some(now.unix_now_ms - disconnected_ago_s * 1000),
            subscriptions: vec![
                ("ok/#".into(), StoredOptions::from(options(1))),
                ("secret/#".into(), StoredOptions::from(options(1))),
                ("bad/#/x".into(), StoredOptions::from(options(1))),
            ],
            inflight: Vec::new(),
            queue: (0..5)
                .map(|n| StoredMessage {
                    topic: "ok/1".into(),
                    payload: vec![n],
                    qos: 1,
                    retain: false,
                    subscription_ids: Vec::new(),
                    properties: None,
                    expires_at_ms: None,
                })
                .collect(),
            next_pkid: 1,
            incoming_qos2: Vec::new(),
            dropped: 0,
        }
    }

    #[test]
    fn restore_drops_what_expired_while_down_is_revoked_or_is_past_a_bound() {
        let broker = broker();
        let sessions = vec![
            stored_session("fresh", 10, 600),
            stored_session("expired-while-down", 700, 600),
            stored_session("revoked", 10, 600),
        ];
        let owner = |s: &StoredSession| (s.client_id != "revoked").then(|| keep_owner(s)).flatten();
        let allowed = |_: &Identity, filter: &str| !filter.starts_with("secret");
        let report = broker.restore(sessions, Vec::new(), &owner, &allowed, TimeBase::now());
        assert_eq!(report.sessions, 1);
        assert_eq!(
            report.sessions_expired, 1,
            "expiry counts while the server is down"
        );
        assert_eq!(report.sessions_revoked, 1);
        assert_eq!(report.subscriptions_dropped, 2, "not allowed, and invalid");
        assert_eq!(report.messages_dropped, 2, "the queue bound is 3");
        let view = broker.client("fresh").expect("restored");
        assert_eq!(view.subscriptions, ["ok/#"]);
        assert_eq!(view.queued, 3);
        let removed: Vec<(String, bool)> = changed_sessions(&broker)
            .into_iter()
            .filter(|(_, kept)| !kept)
            .collect();
        assert_eq!(
            removed,
            [
                ("expired-while-down".into(), false),
                ("revoked".into(), false)
            ],
            "what was not restored leaves storage at the first checkpoint"
        );
    }
}

#[cfg(test)]
mod durability_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use thinghub_storage::{Store, StoreConfig};
    use tokio::sync::mpsc;

    use super::*;
    use crate::mqtt::persist::Persistence;

    /// A SUBACK whose subscription an earlier checkpoint already stored and synced waits for
    /// the next checkpoint; when that one has nothing to write it must still answer it (it
    /// used to wait for some other change, or its whole bound, and then refuse).
    #[tokio::test]
    async fn a_durability_wait_is_answered_by_an_empty_checkpoint_after_a_synced_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let broker = Arc::new(Broker::new(super::tests::limits()));
        let persistence =
            Persistence::new(store.clone(), broker.clone(), Duration::from_secs(3600));
        let (tx, _rx) = mpsc::channel(16);
        let registered = broker
            .connect(
                ConnectRequest {
                    identity: Identity {
                        client_id: "c".into(),
                        username: Some("u".into()),
                        thing: None,
                        superuser: false,
                        bootstrap: false,
                    },
                    clean_start: false,
                    expiry: Duration::from_secs(3600),
                    receive_maximum: None,
                    will: None,
                    verify: None,
                },
                tx,
                Arc::new(Link::default()),
            )
            .expect("connect");
        assert!(broker
            .subscribe(
                "c",
                registered.connection_id,
                "a/b",
                topic::parse_filter("a/b").expect("filter"),
                SubOptions {
                    qos: 1,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                },
            )
            .expect("within the bound"));
        assert!(persistence.checkpoint().expect("checkpoint"), "wrote it");
        store.sync().await.expect("sync");
        persistence.synced();

        let wanted = broker.checkpoint_wanted();
        let started = wanted.notified();
        let waiting = tokio::spawn({
            let broker = broker.clone();
            async move { broker.wait_durable(Duration::from_secs(5)).await }
        });
        started.await;
        assert!(
            !persistence.checkpoint().expect("checkpoint"),
            "nothing new"
        );
        assert!(waiting.await.expect("join"), "answered by that checkpoint");
    }
}
