//! The broker's shared state: sessions, subscriptions, retained messages, and delivery.
//!
//! Connections (see `connection.rs`) own sockets; this owns everything that outlives one:
//! a session's subscriptions, its outbound in-flight window (QoS 1/2 awaiting acknowledgement,
//! retransmitted with DUP on reconnect) and its bounded queue of messages waiting for the window
//! or for the client to come back. Delivery happens at min(publish QoS, subscription QoS).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;
use tokio::sync::mpsc;

use super::topic::{self, FilterTrie, ParsedFilter};

/// Broker bounds.
#[derive(Debug, Clone, Copy)]
pub struct BrokerLimits {
    /// Outbound QoS 1/2 messages in flight per session when the client sets no receive maximum.
    pub inflight_max: usize,
    /// Messages queued per session (offline, or beyond the window); the oldest is dropped past it.
    pub session_queue_max: usize,
    /// Longest a disconnected persistent session is kept.
    pub session_expiry_max: Duration,
    /// Most retained messages kept.
    pub retained_max: usize,
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
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
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
    /// v5 subscription identifier.
    pub subscription_id: Option<usize>,
    /// v5 properties to forward.
    pub properties: Option<Arc<PublishProperties>>,
    /// v5 message expiry (the remaining interval is sent).
    pub expires_at: Option<Instant>,
}

/// What a connection is told to write or do. Small on purpose (the publish is boxed): every
/// connection's channel allocates a block of 32 of these up front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Write a PUBLISH.
    Publish(Box<OutboundPublish>),
    /// Write a PUBREL (outbound QoS 2, after PUBREC).
    PubRel(u16),
    /// Close the connection.
    Close(CloseReason),
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
}

impl CloseReason {
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
        }
    }

    /// Whether the will message is published (everything but a normal DISCONNECT).
    pub fn publishes_will(self) -> bool {
        self != CloseReason::Normal
    }
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
    subscription_id: Option<usize>,
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
            subscription_id: self.subscription_id,
            properties: self.properties.clone(),
            expires_at: self.expires_at,
        }))
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

#[derive(Debug)]
struct Connection {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    info: Option<ConnectionInfo>,
}

/// Who is on a live connection (for the clients API).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionInfo {
    /// Authenticated username.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The Thing the client acts as.
    #[serde(rename = "thingName", skip_serializing_if = "Option::is_none")]
    pub thing: Option<String>,
    /// Remote address.
    pub peer: String,
    /// `3.1.1` or `5.0`.
    pub protocol: &'static str,
    /// Unix ms of the CONNECT.
    #[serde(rename = "connectedAt")]
    pub connected_at_ms: u64,
}

/// A session as the clients API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClientView {
    /// Client id.
    #[serde(rename = "clientId")]
    pub client_id: String,
    /// Whether a connection is live.
    pub connected: bool,
    /// The live connection's details.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionInfo>,
    /// Whether the session outlives the connection.
    pub persistent: bool,
    /// Subscribed filters.
    pub subscriptions: Vec<String>,
    /// Outbound QoS 1/2 messages awaiting acknowledgement.
    pub inflight: usize,
    /// Messages waiting (offline, or beyond the window).
    pub queued: usize,
}

fn view(client_id: &str, session: &Session) -> ClientView {
    let mut subscriptions: Vec<String> = session.subscriptions.keys().cloned().collect();
    subscriptions.sort();
    ClientView {
        client_id: client_id.to_owned(),
        connected: session.connection.is_some(),
        connection: session.connection.as_ref().and_then(|c| c.info.clone()),
        persistent: session.persistent,
        subscriptions,
        inflight: session.inflight.len(),
        queued: session.queue.len(),
    }
}

#[derive(Debug)]
struct Session {
    connection: Option<Connection>,
    persistent: bool,
    expiry: Duration,
    disconnected_at: Option<Instant>,
    subscriptions: HashMap<String, (ParsedFilter, SubOptions)>,
    /// Outbound QoS 1/2 awaiting PUBACK/PUBREC (value) or PUBCOMP (`None` payload after PUBREC).
    inflight: BTreeMap<u16, Option<Pending>>,
    queue: VecDeque<Pending>,
    window: usize,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids received but not yet released (PUBREL). Kept in the session so
    /// a PUBLISH resent after a reconnect is not delivered twice. Bounded by the u16 id space.
    incoming_qos2: HashSet<u16>,
}

impl Session {
    fn new(persistent: bool, expiry: Duration, window: usize) -> Session {
        Session {
            connection: None,
            persistent,
            expiry,
            disconnected_at: None,
            subscriptions: HashMap::new(),
            inflight: BTreeMap::new(),
            queue: VecDeque::new(),
            window,
            next_pkid: 1,
            incoming_qos2: HashSet::new(),
        }
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

/// Counters since start.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// PUBLISH packets received from clients.
    pub messages_in: AtomicU64,
    /// PUBLISH packets handed to connections.
    pub messages_out: AtomicU64,
    /// Messages dropped (full queues, QoS 0 to a busy connection).
    pub messages_dropped: AtomicU64,
    /// Publishes or subscriptions refused by the ACL.
    pub acl_denied: AtomicU64,
    /// Messages not delivered because their v5 expiry passed.
    pub messages_expired: AtomicU64,
}

struct State {
    sessions: HashMap<Arc<str>, Session>,
    trie: FilterTrie<Subscriber>,
    retained: HashMap<Arc<str>, Message>,
    share_cursor: HashMap<(Arc<str>, Arc<str>), usize>,
    next_connection_id: u64,
}

/// The broker. Shared by every connection.
pub struct Broker {
    state: Mutex<State>,
    limits: BrokerLimits,
    /// Counters.
    pub stats: BrokerStats,
}

/// What registering a connection produced.
#[derive(Debug)]
pub struct Registered {
    /// Identifies this connection to later calls.
    pub connection_id: u64,
    /// Whether a previous session was resumed.
    pub session_present: bool,
}

impl Broker {
    /// An empty broker.
    pub fn new(limits: BrokerLimits) -> Broker {
        Broker {
            state: Mutex::new(State {
                sessions: HashMap::new(),
                trie: FilterTrie::default(),
                retained: HashMap::new(),
                share_cursor: HashMap::new(),
                next_connection_id: 1,
            }),
            limits,
            stats: BrokerStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a connection to the client's session, taking over any live one. A persistent
    /// session is resumed: unacknowledged messages are resent (DUP), then the queue drains.
    pub fn connect(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: Duration,
        receive_maximum: Option<usize>,
        tx: mpsc::Sender<Outbound>,
    ) -> Registered {
        let mut state = self.lock();
        let connection_id = state.next_connection_id;
        state.next_connection_id += 1;
        let window = receive_maximum
            .unwrap_or(self.limits.inflight_max)
            .clamp(1, self.limits.inflight_max.max(1));
        let expiry = expiry.min(self.limits.session_expiry_max);
        let persistent = !expiry.is_zero();
        let key: Arc<str> = Arc::from(client_id);
        if let Some(old) = state.sessions.get_mut(&key) {
            if let Some(connection) = old.connection.take() {
                let _ = connection
                    .tx
                    .try_send(Outbound::Close(CloseReason::Takeover));
            }
        }
        if clean_start {
            if let Some(old) = state.sessions.remove(&key) {
                remove_subscriptions(&mut state.trie, &key, &old);
            }
        }
        let session_present = state.sessions.contains_key(&key);
        let session = state
            .sessions
            .entry(key.clone())
            .or_insert_with(|| Session::new(persistent, expiry, window));
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
            let _ = tx.try_send(outbound);
        }
        session.connection = Some(Connection {
            id: connection_id,
            tx,
            info: None,
        });
        self.drain_queue(session);
        Registered {
            connection_id,
            session_present,
        }
    }

    /// Detaches a connection. A clean session ends here; a persistent one waits for its client.
    /// Returns false if this connection had already been taken over.
    pub fn disconnect(&self, client_id: &str, connection_id: u64) -> bool {
        let mut state = self.lock();
        let State { sessions, trie, .. } = &mut *state;
        let Some(session) = sessions.get_mut(client_id) else {
            return false;
        };
        if session.connection.as_ref().map(|c| c.id) != Some(connection_id) {
            return false;
        }
        session.connection = None;
        if session.persistent {
            session.disconnected_at = Some(Instant::now());
        } else if let Some((key, session)) = sessions.remove_entry(client_id) {
            remove_subscriptions(trie, &key, &session);
        }
        true
    }

    /// An inbound QoS 2 PUBLISH arrived: true the first time for `pkid` (deliver it), false for
    /// a resend of one not yet released (do not deliver again).
    pub fn qos2_arrived(&self, client_id: &str, pkid: u16) -> bool {
        let mut state = self.lock();
        state
            .sessions
            .get_mut(client_id)
            .is_some_and(|s| s.incoming_qos2.insert(pkid))
    }

    /// PUBREL: the client releases `pkid`; true if it was pending.
    pub fn qos2_released(&self, client_id: &str, pkid: u16) -> bool {
        let mut state = self.lock();
        state
            .sessions
            .get_mut(client_id)
            .is_some_and(|s| s.incoming_qos2.remove(&pkid))
    }

    /// Records who is on a connection (shown by the clients API).
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

    /// One session.
    pub fn client(&self, client_id: &str) -> Option<ClientView> {
        let state = self.lock();
        state.sessions.get(client_id).map(|s| view(client_id, s))
    }

    /// Disconnects a client (reason "kicked") and discards its session. False if unknown.
    pub fn kick(&self, client_id: &str) -> bool {
        let mut state = self.lock();
        let State { sessions, trie, .. } = &mut *state;
        let Some(session) = sessions.get_mut(client_id) else {
            return false;
        };
        match &session.connection {
            Some(connection) => {
                // The connection's own disconnect then removes the (no longer persistent) session.
                session.persistent = false;
                let _ = connection.tx.try_send(Outbound::Close(CloseReason::Kicked));
            }
            None => {
                if let Some((key, session)) = sessions.remove_entry(client_id) {
                    remove_subscriptions(trie, &key, &session);
                }
            }
        }
        true
    }

    /// Whether any subscription matches `topic`.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        let mut matched = Vec::new();
        self.lock().trie.matching(topic, &mut matched);
        !matched.is_empty()
    }

    /// Whether a connection with this client id is live.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.lock()
            .sessions
            .get(client_id)
            .is_some_and(|s| s.connection.is_some())
    }

    /// Adds (or replaces) a subscription; returns the granted QoS and whether it is new.
    /// Retained messages are delivered per the retain handling option.
    pub fn subscribe(&self, client_id: &str, raw: &str, parsed: ParsedFilter, options: SubOptions) {
        let mut state = self.lock();
        let key: Arc<str> = Arc::from(client_id);
        let State {
            sessions,
            trie,
            retained,
            ..
        } = &mut *state;
        let Some(session) = sessions.get_mut(&key) else {
            return;
        };
        let subscriber = Subscriber {
            client: key.clone(),
            share: parsed.share_group.as_deref().map(Arc::from),
            filter: Arc::from(parsed.filter.as_str()),
            options,
        };
        let is_new = !session.subscriptions.contains_key(raw);
        if !is_new {
            trie.remove(&parsed.filter, &subscriber);
        }
        trie.insert(&parsed.filter, subscriber);
        session
            .subscriptions
            .insert(raw.to_owned(), (parsed.clone(), options));
        let send_retained = parsed.share_group.is_none()
            && (options.retain_handling == 0 || (options.retain_handling == 1 && is_new));
        if send_retained {
            let now = Instant::now();
            retained.retain(|_, message| !message.expired(now));
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
                    subscription_id: options.subscription_id,
                    properties: message.properties.clone(),
                    expires_at: message.expires_at,
                };
                self.enqueue(session, pending);
            }
        }
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, client_id: &str, raw: &str) -> bool {
        let mut state = self.lock();
        let State { sessions, trie, .. } = &mut *state;
        let Some(key) = sessions.get_key_value(client_id).map(|(k, _)| k.clone()) else {
            return false;
        };
        let Some((parsed, _)) = sessions
            .get_mut(&key)
            .and_then(|session| session.subscriptions.remove(raw))
        else {
            return false;
        };
        let probe = Subscriber {
            client: key,
            share: parsed.share_group.as_deref().map(Arc::from),
            filter: Arc::from(parsed.filter.as_str()),
            options: SubOptions {
                qos: 0,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
                subscription_id: None,
            },
        };
        trie.remove(&parsed.filter, &probe)
    }

    /// Routes a message to every matching subscription and updates retained messages.
    /// Returns the number of sessions it was delivered or queued to.
    pub fn publish(&self, message: Message) -> usize {
        if message.expired(Instant::now()) {
            self.stats.messages_expired.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let mut state = self.lock();
        if message.retain {
            if message.payload.is_empty() {
                state.retained.remove(&message.topic);
            } else if state.retained.len() < self.limits.retained_max
                || state.retained.contains_key(&message.topic)
            {
                state
                    .retained
                    .insert(message.topic.clone(), message.clone());
            } else {
                tracing::warn!(topic = %message.topic, "retained message store is full; not retained");
            }
        }
        let mut matched = Vec::new();
        state.trie.matching(&message.topic, &mut matched);
        // One delivery per client (highest QoS among its matching subscriptions), one member per
        // share group.
        let mut per_client: HashMap<Arc<str>, Subscriber> = HashMap::new();
        let mut groups: HashMap<(Arc<str>, Arc<str>), Vec<Subscriber>> = HashMap::new();
        for subscriber in matched {
            if subscriber.options.no_local && message.publisher.as_ref() == Some(&subscriber.client)
            {
                continue;
            }
            match &subscriber.share {
                Some(group) => groups
                    .entry((group.clone(), subscriber.filter.clone()))
                    .or_default()
                    .push(subscriber),
                None => {
                    let entry = per_client
                        .entry(subscriber.client.clone())
                        .or_insert(subscriber.clone());
                    if subscriber.options.qos > entry.options.qos {
                        *entry = subscriber;
                    }
                }
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
            per_client.entry(chosen.client.clone()).or_insert(chosen);
        }
        let mut delivered = 0;
        for (client, subscriber) in per_client {
            let Some(session) = state.sessions.get_mut(&client) else {
                continue;
            };
            let pending = Pending {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos: message.qos.min(subscriber.options.qos),
                retain: message.retain && subscriber.options.retain_as_published,
                subscription_id: subscriber.options.subscription_id,
                properties: message.properties.clone(),
                expires_at: message.expires_at,
            };
            self.enqueue(session, pending);
            delivered += 1;
        }
        delivered
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client: the slot frees and the queue drains.
    pub fn acknowledged(&self, client_id: &str, pkid: u16) {
        let mut state = self.lock();
        if let Some(session) = state.sessions.get_mut(client_id) {
            if session.inflight.remove(&pkid).is_some() {
                self.drain_queue(session);
            }
        }
    }

    /// PUBREC from the client (QoS 2): the message is kept as released and PUBREL goes out.
    pub fn received(&self, client_id: &str, pkid: u16) {
        let mut state = self.lock();
        if let Some(session) = state.sessions.get_mut(client_id) {
            if let Some(slot) = session.inflight.get_mut(&pkid) {
                *slot = None;
            }
            if let Some(connection) = &session.connection {
                let _ = connection.tx.try_send(Outbound::PubRel(pkid));
            }
        }
    }

    /// Drops persistent sessions whose client stayed away longer than their expiry.
    pub fn expire_sessions(&self) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        let expired: Vec<Arc<str>> = state
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.connection.is_none()
                    && s.disconnected_at
                        .is_some_and(|at| now.duration_since(at) >= s.expiry)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &expired {
            if let Some(session) = state.sessions.remove(key) {
                remove_subscriptions(&mut state.trie, key, &session);
            }
        }
        expired.len()
    }

    /// Asks every live connection to close (shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        let state = self.lock();
        for session in state.sessions.values() {
            if let Some(connection) = &session.connection {
                let _ = connection.tx.try_send(Outbound::Close(reason));
            }
        }
    }

    /// Sessions (connected or not) and live connections.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let connected = state
            .sessions
            .values()
            .filter(|s| s.connection.is_some())
            .count();
        (state.sessions.len(), connected)
    }

    fn enqueue(&self, session: &mut Session, pending: Pending) {
        if session.connection.is_none() && !session.persistent {
            return;
        }
        if pending.qos == 0 {
            if let Some(connection) = &session.connection {
                let sent = connection.tx.try_send(pending.outbound(0, false));
                match sent {
                    Ok(()) => self.stats.messages_out.fetch_add(1, Ordering::Relaxed),
                    Err(_) => self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed),
                };
                return;
            }
        }
        if session.queue.len() >= self.limits.session_queue_max {
            session.queue.pop_front();
            self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
        }
        session.queue.push_back(pending);
        self.drain_queue(session);
    }

    /// Moves queued messages into the in-flight window of a connected session.
    fn drain_queue(&self, session: &mut Session) {
        let Some(connection) = &session.connection else {
            return;
        };
        let tx = connection.tx.clone();
        while let Some(front) = session.queue.front() {
            let needs_slot = front.qos > 0;
            if needs_slot && session.inflight.len() >= session.window {
                break;
            }
            let Some(pending) = session.queue.pop_front() else {
                break;
            };
            if pending.expired(Instant::now()) {
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
            }
            if tx.try_send(outbound).is_err() {
                // The connection cannot keep up: close it; in-flight messages are resent on
                // reconnect, so nothing acknowledged-by-us is lost.
                let _ = tx.try_send(Outbound::Close(CloseReason::SlowConsumer));
                break;
            }
            self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn remove_subscriptions(trie: &mut FilterTrie<Subscriber>, key: &Arc<str>, session: &Session) {
    for (parsed, options) in session.subscriptions.values() {
        let probe = Subscriber {
            client: key.clone(),
            share: parsed.share_group.as_deref().map(Arc::from),
            filter: Arc::from(parsed.filter.as_str()),
            options: *options,
        };
        trie.remove(&parsed.filter, &probe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker() -> Broker {
        Broker::new(BrokerLimits {
            inflight_max: 2,
            session_queue_max: 3,
            session_expiry_max: Duration::from_secs(3600),
            retained_max: 100,
        })
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

    #[test]
    fn expired_messages_are_not_queued_for_delivery_nor_kept_retained() {
        let broker = broker();
        let (tx, first) = mpsc::channel(16);
        let offline = broker.connect("p", false, Duration::from_secs(60), None, tx);
        subscribe(&broker, "p", "t", 1);
        drop(first);
        assert!(broker.disconnect("p", offline.connection_id));
        let soon = Instant::now() + Duration::from_millis(30);
        let mut short = message("t", 1, true);
        short.expires_at = Some(soon);
        broker.publish(short);
        broker.publish(message("t", 1, false));
        while Instant::now() < soon + Duration::from_millis(5) {
            std::thread::yield_now();
        }
        let (tx, mut rx) = mpsc::channel(16);
        broker.connect("p", false, Duration::from_secs(60), None, tx);
        assert_eq!(drain(&mut rx).len(), 1, "only the message without expiry");
        assert_eq!(broker.stats.messages_expired.load(Ordering::Relaxed), 1);
        let (tx, mut rx) = mpsc::channel(16);
        broker.connect("late", true, Duration::ZERO, None, tx);
        subscribe(&broker, "late", "t", 1);
        assert!(
            drain(&mut rx).is_empty(),
            "the expired retained message is gone"
        );
    }

    fn subscribe(broker: &Broker, client: &str, filter: &str, qos: u8) {
        broker.subscribe(
            client,
            filter,
            topic::parse_filter(filter).expect("filter"),
            options(qos),
        );
    }

    fn drain(rx: &mut mpsc::Receiver<Outbound>) -> Vec<Outbound> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            out.push(o);
        }
        out
    }

    fn qos_pkid(outbound: &Outbound) -> (u8, u16, bool) {
        match outbound {
            Outbound::Publish(p) => (p.qos, p.pkid, p.dup),
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[test]
    fn delivery_is_at_the_lower_qos_and_the_window_holds_the_rest() {
        let broker = broker();
        let (tx, mut rx) = mpsc::channel(16);
        broker.connect("c", true, Duration::ZERO, None, tx);
        subscribe(&broker, "c", "t/#", 1);
        broker.publish(message("t/a", 2, false));
        broker.publish(message("t/a", 0, false));
        broker.publish(message("t/a", 1, false));
        broker.publish(message("t/a", 1, false));
        let out = drain(&mut rx);
        let got: Vec<_> = out.iter().map(qos_pkid).collect();
        assert_eq!(
            got,
            [(1, 1, false), (0, 0, false), (1, 2, false)],
            "window of 2 holds the 4th"
        );
        broker.acknowledged("c", 1);
        assert_eq!(
            drain(&mut rx).iter().map(qos_pkid).collect::<Vec<_>>(),
            [(1, 3, false)]
        );
    }

    #[test]
    fn a_persistent_session_queues_while_offline_and_resends_in_flight_with_dup() {
        let broker = broker();
        let (tx, mut rx) = mpsc::channel(16);
        let first = broker.connect("p", false, Duration::from_secs(60), None, tx);
        assert!(!first.session_present);
        subscribe(&broker, "p", "t", 1);
        broker.publish(message("t", 1, false));
        assert_eq!(drain(&mut rx).len(), 1, "sent, not acknowledged");
        assert!(broker.disconnect("p", first.connection_id));
        for _ in 0..5 {
            broker.publish(message("t", 1, false));
        }
        let (tx, mut rx) = mpsc::channel(16);
        let second = broker.connect("p", false, Duration::from_secs(60), None, tx);
        assert!(second.session_present);
        let got: Vec<_> = drain(&mut rx).iter().map(qos_pkid).collect();
        // pkid 1 again with DUP, then one more fills the window of 2; the queue kept the newest 3.
        assert_eq!(got, [(1, 1, true), (1, 2, false)]);
        assert_eq!(broker.stats.messages_dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_clean_session_ends_at_disconnect_and_takeover_closes_the_old_connection() {
        let broker = broker();
        let (tx1, mut rx1) = mpsc::channel(16);
        let first = broker.connect("c", true, Duration::ZERO, None, tx1);
        subscribe(&broker, "c", "t", 0);
        let (tx2, _rx2) = mpsc::channel(16);
        let second = broker.connect("c", false, Duration::from_secs(10), None, tx2);
        assert!(
            second.session_present,
            "the session lives on across a takeover"
        );
        assert_eq!(drain(&mut rx1), [Outbound::Close(CloseReason::Takeover)]);
        assert!(
            !broker.disconnect("c", first.connection_id),
            "taken-over connection is stale"
        );
        assert!(broker.disconnect("c", second.connection_id));
        let (tx3, _rx3) = mpsc::channel(16);
        assert!(
            !broker
                .connect("c", true, Duration::ZERO, None, tx3)
                .session_present
        );
    }

    #[test]
    fn retained_messages_reach_new_subscribers_and_an_empty_payload_clears_them() {
        let broker = broker();
        broker.publish(message("r/1", 1, true));
        broker.publish(message("r/2", 0, true));
        let (tx, mut rx) = mpsc::channel(16);
        broker.connect("c", true, Duration::ZERO, None, tx);
        subscribe(&broker, "c", "r/+", 1);
        let out = drain(&mut rx);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|o| matches!(o, Outbound::Publish(p) if p.retain)));
        let mut clear = message("r/1", 0, true);
        clear.payload = Bytes::new();
        broker.publish(clear);
        let (tx, mut rx) = mpsc::channel(16);
        broker.connect("d", true, Duration::ZERO, None, tx);
        subscribe(&broker, "d", "r/+", 1);
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn shared_subscriptions_deliver_each_message_to_one_member() {
        let broker = broker();
        let mut receivers = Vec::new();
        for client in ["a", "b"] {
            let (tx, rx) = mpsc::channel(16);
            broker.connect(client, true, Duration::ZERO, None, tx);
            subscribe(&broker, client, "$share/g/jobs/+", 0);
            receivers.push(rx);
        }
        for _ in 0..4 {
            broker.publish(message("jobs/x", 0, false));
        }
        let counts: Vec<usize> = receivers.iter_mut().map(|rx| drain(rx).len()).collect();
        assert_eq!(counts, [2, 2]);
    }

    #[test]
    fn an_unreleased_qos2_id_survives_a_reconnect_so_a_resend_is_not_delivered_twice() {
        let broker = broker();
        let (tx, _rx) = mpsc::channel(16);
        let first = broker.connect("q", false, Duration::from_secs(60), None, tx);
        assert!(broker.qos2_arrived("q", 7), "first arrival is delivered");
        assert!(!broker.qos2_arrived("q", 7), "a resend is not");
        broker.disconnect("q", first.connection_id);
        let (tx, _rx) = mpsc::channel(16);
        broker.connect("q", false, Duration::from_secs(60), None, tx);
        assert!(
            !broker.qos2_arrived("q", 7),
            "still pending after the reconnect"
        );
        assert!(broker.qos2_released("q", 7));
        assert!(!broker.qos2_released("q", 7));
        assert!(
            broker.qos2_arrived("q", 7),
            "a released id can be used again"
        );
    }

    #[test]
    fn no_local_skips_the_publishers_own_messages() {
        let broker = broker();
        let (tx, mut rx) = mpsc::channel(16);
        broker.connect("me", true, Duration::ZERO, None, tx);
        let mut opts = options(0);
        opts.no_local = true;
        broker.subscribe("me", "t", topic::parse_filter("t").expect("filter"), opts);
        let mut own = message("t", 0, false);
        own.publisher = Some(Arc::from("me"));
        broker.publish(own);
        assert!(drain(&mut rx).is_empty());
        broker.publish(message("t", 0, false));
        assert_eq!(drain(&mut rx).len(), 1);
    }
}
