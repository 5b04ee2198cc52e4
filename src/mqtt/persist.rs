//! MQTT state that outlives the process: persistent sessions and retained messages.
//!
//! The broker marks what changed ([`Broker::take_changes`]); [`Persistence::checkpoint`] writes
//! those records (`sessions` by client id, `retained` by topic, rmp-serde) and the caller makes
//! them durable with one group commit. The outbox keeper checkpoints every round, before it
//! moves the effects cursor, so a command request or delta queued for an offline device is
//! durable before the change feed forgets it. Messages that devices publish to each other are
//! written behind the same way (a crash loses at most one round of them).
//!
//! Times are stored as Unix ms, so a session's expiry keeps counting while the server is down;
//! a session still connected when the server died counts from the last "server alive" mark
//! (written with every checkpoint and at least every `mqtt_alive_mark_interval_ms`) plus that
//! interval: never early, late by at most the interval.
//! At start-up [`Persistence::restore`] loads everything back within the current bounds,
//! verifying each session's owner against the users and the registry, and its subscriptions
//! against the ACL: a session whose user is
//! gone, or whose Thing no longer holds the client id, is not restored. Not stored: live
//! connections and their wills (a restart ends every connection; wills are not published for
//! it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;
use serde::{Deserialize, Serialize};
use thinghub_storage::{RecordChange, RecordSet, StorageError, Store};

use super::acl::Identity;
use super::broker::{Broker, RestoreReport, SubOptions};

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    /// Client id.
    pub client_id: String,
    /// Owner.
    pub username: Option<String>,
    /// The Thing it acts as.
    pub thing: Option<String>,
    /// Superuser when stored (checked again at restore).
    pub superuser: bool,
    /// Session expiry, seconds (`u64::MAX`: never).
    pub expiry_s: u64,
    /// Unix ms of the disconnect (`None`: connected when stored).
    pub disconnected_at_ms: Option<u64>,
    /// Raw filter and options.
    pub subscriptions: Vec<(String, StoredOptions)>,
    /// Outbound QoS 1/2 awaiting acknowledgement (`None`: PUBREC received, PUBCOMP awaited).
    pub inflight: Vec<(u16, Option<StoredMessage>)>,
    /// Waiting messages, oldest first.
    pub queue: Vec<StoredMessage>,
    /// Next packet id to try.
    pub next_pkid: u16,
    /// Inbound QoS 2 ids received and not released.
    pub incoming_qos2: Vec<u16>,
    /// Messages dropped by a bound.
    pub dropped: u64,
}

/// Subscription options as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredOptions {
    /// Granted QoS.
    pub qos: u8,
    /// v5 no local.
    pub no_local: bool,
    /// v5 retain as published.
    pub retain_as_published: bool,
    /// v5 retain handling.
    pub retain_handling: u8,
    /// v5 subscription identifier.
    pub subscription_id: Option<usize>,
}

impl From<SubOptions> for StoredOptions {
    fn from(o: SubOptions) -> Self {
        StoredOptions {
            qos: o.qos,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            retain_handling: o.retain_handling,
            subscription_id: o.subscription_id,
        }
    }
}

impl From<StoredOptions> for SubOptions {
    fn from(o: StoredOptions) -> Self {
        SubOptions {
            qos: o.qos.min(2),
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            retain_handling: o.retain_handling.min(2),
            subscription_id: o.subscription_id,
        }
    }
}

/// A message as stored (queued, in flight, or retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Topic.
    pub topic: String,
    /// Payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// v5 subscription identifiers (queued messages).
    pub subscription_ids: Vec<usize>,
    /// v5 properties forwarded.
    pub properties: Option<StoredProperties>,
    /// Unix ms after which it is not delivered.
    pub expires_at_ms: Option<u64>,
}

/// The v5 properties a message carries to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProperties {
    /// Payload format indicator.
    pub payload_format_indicator: Option<u8>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    #[serde(with = "serde_bytes")]
    pub correlation_data: Option<Vec<u8>>,
    /// User properties.
    pub user_properties: Vec<(String, String)>,
    /// Content type.
    pub content_type: Option<String>,
}

impl From<&PublishProperties> for StoredProperties {
    fn from(p: &PublishProperties) -> Self {
        StoredProperties {
            payload_format_indicator: p.payload_format_indicator,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
            user_properties: p.user_properties.clone(),
            content_type: p.content_type.clone(),
        }
    }
}

impl From<StoredProperties> for PublishProperties {
    fn from(p: StoredProperties) -> Self {
        PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data.map(Bytes::from),
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        }
    }
}

/// Converts between the broker's monotonic instants and stored Unix ms.
#[derive(Debug, Clone, Copy)]
pub struct TimeBase {
    /// Now, monotonic.
    pub now: Instant,
    /// Now, Unix ms.
    pub unix_now_ms: u64,
}

impl TimeBase {
    /// The current time on both clocks.
    pub fn now() -> TimeBase {
        TimeBase {
            now: Instant::now(),
            unix_now_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// An instant as Unix ms.
    pub fn to_unix_ms(&self, at: Instant) -> u64 {
        if at >= self.now {
            self.unix_now_ms
                .saturating_add(at.duration_since(self.now).as_millis() as u64)
        } else {
            self.unix_now_ms
                .saturating_sub(self.now.duration_since(at).as_millis() as u64)
        }
    }

    /// Unix ms as an instant (clamped to what the monotonic clock can represent).
    pub fn to_instant(&self, unix_ms: u64) -> Instant {
        if unix_ms >= self.unix_now_ms {
            let ahead = Duration::from_millis(unix_ms - self.unix_now_ms);
            self.now.checked_add(ahead).unwrap_or(self.now)
        } else {
            let behind = Duration::from_millis(self.unix_now_ms - unix_ms);
            self.now.checked_sub(behind).unwrap_or(self.now)
        }
    }
}

/// What changed in the broker since the last checkpoint (`None`: remove the record).
#[derive(Debug, Default)]
pub struct Changes {
    /// Which checkpoint this is (they are numbered from 1).
    pub generation: u64,
    /// Sessions by client id.
    pub sessions: Vec<(String, Option<StoredSession>)>,
    /// Retained messages by topic.
    pub retained: Vec<(String, Option<StoredMessage>)>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.retained.is_empty()
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct PersistStats {
    /// Checkpoints that wrote something.
    pub checkpoints_written: AtomicU64,
    /// Checkpoints that may have taken the broker's changes and not yet written them (so a
    /// reader of the unstored count never sees 0 for changes that are neither in the broker
    /// nor written).
    pub checkpointing: AtomicU64,
    /// Session records written (put or removed).
    pub sessions_written: AtomicU64,
    /// Retained records written (put or removed).
    pub retained_written: AtomicU64,
    /// Checkpoints that failed (the changes are retried at the next one).
    pub failures: AtomicU64,
    /// Sessions restored at start-up.
    pub sessions_restored: AtomicU64,
    /// Sessions, queued messages and retained messages not restored at start-up.
    pub restore_dropped: AtomicU64,
}

/// Where the last "server alive at" Unix ms is stored (`kv`).
pub const ALIVE_MARK_KEY: &str = "mqtt/alive_at_ms";

/// `thinghub check`: the stored alive mark is a big-endian u64.
pub fn check_alive_mark(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() == 8 {
        Ok(())
    } else {
        Err(format!("{} bytes, not a u64 timestamp", bytes.len()))
    }
}

/// Writes and restores the broker's durable state.
pub struct Persistence {
    store: Store,
    broker: Arc<Broker>,
    /// The last checkpoint written (durable at the next sync).
    written: AtomicU64,
    /// Something was written that no sync has covered yet (a sync failed, or is to come).
    unsynced: std::sync::atomic::AtomicBool,
    /// How stale the stored "server alive at" mark may get while nothing else is written.
    alive_mark_interval: Duration,
    /// When the mark was last written.
    alive_marked_at: Mutex<Option<Instant>>,
    /// Counters.
    pub stats: PersistStats,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(value).map_err(|e| e.to_string())
}

impl Persistence {
    /// Persistence of `broker`'s state in `store`.
    /// `alive_mark_interval`: see `mqtt_alive_mark_interval_ms`.
    pub fn new(store: Store, broker: Arc<Broker>, alive_mark_interval: Duration) -> Persistence {
        Persistence {
            store,
            broker,
            written: AtomicU64::new(0),
            unsynced: std::sync::atomic::AtomicBool::new(false),
            alive_mark_interval,
            alive_marked_at: Mutex::new(None),
            stats: PersistStats::default(),
        }
    }

    /// Writes what changed since the last checkpoint (durable with the next group commit).
    /// Returns whether anything was written. On failure the changes are kept for the next one.
    ///
    /// Every write also stores when the server was last known alive: a session still connected
    /// when the server died counts its expiry from then, not from the restart. The mark alone
    /// is written when it is `alive_mark_interval` old.
    pub fn checkpoint(&self) -> Result<bool, String> {
        self.stats.checkpointing.fetch_add(1, Ordering::SeqCst);
        let outcome = self.checkpoint_taken();
        self.stats.checkpointing.fetch_sub(1, Ordering::SeqCst);
        outcome
    }

    fn checkpoint_taken(&self) -> Result<bool, String> {
        let time = TimeBase::now();
        let changes = self.broker.take_changes(time);
        let mark_due = {
            let marked_at = self
                .alive_marked_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            marked_at.is_none_or(|at| time.now.duration_since(at) >= self.alive_mark_interval)
        };
        if changes.is_empty() && !mark_due {
            // Nothing to store: this checkpoint is durable once the earlier ones are; at once
            // if they are (a SUBACK waiting for it must not wait for some other change).
            self.written.fetch_max(changes.generation, Ordering::AcqRel);
            if !self.unsynced() {
                self.broker.checkpoints_durable_to(changes.generation);
            }
            return Ok(false);
        }
        let written = self.write(&changes).and_then(|()| {
            self.store
                .kv_put_behind(ALIVE_MARK_KEY, time.unix_now_ms.to_be_bytes().to_vec())
                .map_err(|e| e.to_string())
        });
        if written.is_ok() {
            *self
                .alive_marked_at
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(time.now);
            self.unsynced.store(true, Ordering::Release);
            self.written.fetch_max(changes.generation, Ordering::AcqRel);
        }
        if let Err(e) = &written {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot store MQTT sessions; retrying at the next checkpoint");
            self.broker.mark_changed(
                changes.sessions.iter().map(|(k, _)| k.as_str()),
                changes.retained.iter().map(|(k, _)| k.as_str()),
            );
        }
        written.map(|()| true)
    }

    /// Everything written by the checkpoints so far is durable now.
    pub fn synced(&self) {
        self.unsynced.store(false, Ordering::Release);
        self.broker
            .checkpoints_durable_to(self.written.load(Ordering::Acquire));
    }

    /// Whether a checkpoint wrote something no sync has covered yet.
    pub fn unsynced(&self) -> bool {
        self.unsynced.load(Ordering::Acquire)
    }

    fn write(&self, changes: &Changes) -> Result<(), String> {
        let mut sessions: Vec<RecordChange> = Vec::with_capacity(changes.sessions.len());
        for (client_id, session) in &changes.sessions {
            let value = session.as_ref().map(encode).transpose()?;
            sessions.push((client_id.as_bytes().to_vec(), value));
        }
        let mut retained: Vec<RecordChange> = Vec::with_capacity(changes.retained.len());
        for (topic, message) in &changes.retained {
            let value = message.as_ref().map(encode).transpose()?;
            retained.push((topic.as_bytes().to_vec(), value));
        }
        let (s, r) = (sessions.len() as u64, retained.len() as u64);
        self.store
            .write_records(RecordSet::MqttSessions, sessions)
            .and_then(|()| self.store.write_records(RecordSet::MqttRetained, retained))
            .map_err(|e| e.to_string())?;
        self.stats.sessions_written.fetch_add(s, Ordering::Relaxed);
        self.stats
            .checkpoints_written
            .fetch_add(1, Ordering::Relaxed);
        self.stats.retained_written.fetch_add(r, Ordering::Relaxed);
        Ok(())
    }

    /// Loads the stored sessions and retained messages into the (empty) broker. `owner_holds`
    /// says whether a stored session's identity is still valid (its user exists and, for a
    /// Thing's session, the Thing still holds the client id); it returns the identity to
    /// restore (rights re-read) or `None` to drop the session.
    pub fn restore(
        &self,
        owner_holds: &dyn Fn(&StoredSession) -> Option<Identity>,
        allowed: &dyn Fn(&Identity, &str) -> bool,
    ) -> Result<RestoreReport, StorageError> {
        // When the server stopped, at the latest: it was alive at the mark and would have
        // written the next one within the interval (never early; late by at most the interval).
        let time = TimeBase::now();
        let stopped_by_ms = self
            .store
            .kv_get(ALIVE_MARK_KEY)?
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map(|mark| {
                u64::from_be_bytes(mark)
                    .saturating_add(self.alive_mark_interval.as_millis() as u64)
                    .min(time.unix_now_ms)
            });
        let mut sessions = Vec::new();
        let mut unreadable = 0;
        for (key, value) in self.store.read_records(RecordSet::MqttSessions)? {
            match rmp_serde::from_slice::<StoredSession>(&value) {
                Ok(mut session) => {
                    // Connected when the server stopped: disconnected since then.
                    if session.disconnected_at_ms.is_none() {
                        session.disconnected_at_ms = stopped_by_ms;
                    }
                    sessions.push(session)
                }
                Err(e) => {
                    unreadable += 1;
                    tracing::error!(client_id = %String::from_utf8_lossy(&key), error = %e, "stored MQTT session unreadable; dropped");
                }
            }
        }
        let mut retained = Vec::new();
        for (key, value) in self.store.read_records(RecordSet::MqttRetained)? {
            match rmp_serde::from_slice::<StoredMessage>(&value) {
                Ok(message) => retained.push(message),
                Err(e) => {
                    unreadable += 1;
                    tracing::error!(topic = %String::from_utf8_lossy(&key), error = %e, "stored retained message unreadable; dropped");
                }
            }
        }
        let mut report = self
            .broker
            .restore(sessions, retained, owner_holds, allowed, time);
        report.unreadable = unreadable;
        let dropped = report.sessions_expired
            + report.sessions_revoked
            + report.sessions_over_bound
            + report.messages_dropped
            + report.retained_dropped
            + report.unreadable;
        self.stats
            .sessions_restored
            .store(report.sessions as u64, Ordering::Relaxed);
        self.stats
            .restore_dropped
            .store(dropped as u64, Ordering::Relaxed);
        // What was not restored (dropped, expired, unreadable) goes from storage at the first
        // checkpoint: the broker marked it.
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_through_unix_ms_within_a_millisecond() {
        let base = TimeBase::now();
        for offset in [0u64, 1, 1_500, 3_600_000] {
            let later = base.now + Duration::from_millis(offset);
            assert_eq!(base.to_unix_ms(later), base.unix_now_ms + offset);
            assert_eq!(base.to_instant(base.unix_now_ms + offset), later);
        }
        let earlier = base.unix_now_ms - 2_000;
        let instant = base.to_instant(earlier);
        assert_eq!(
            base.now.duration_since(instant),
            Duration::from_millis(2_000)
        );
    }

    #[test]
    fn stored_records_decode_as_written() {
        let session = StoredSession {
            client_id: "c1".into(),
            username: Some("u".into()),
            thing: Some("t1".into()),
            superuser: false,
            expiry_s: 3600,
            disconnected_at_ms: Some(1_700_000_000_000),
            subscriptions: vec![(
                "$share/g/a/+".into(),
                StoredOptions {
                    qos: 1,
                    no_local: true,
                    retain_as_published: false,
                    retain_handling: 2,
                    subscription_id: Some(7),
                },
            )],
            inflight: vec![(3, None)],
            queue: vec![StoredMessage {
                topic: "a/b".into(),
                payload: b"\x00\xff".to_vec(),
                qos: 1,
                retain: false,
                subscription_ids: vec![7],
                properties: Some(StoredProperties {
                    payload_format_indicator: Some(1),
                    response_topic: Some("r".into()),
                    correlation_data: Some(vec![1, 2]),
                    user_properties: vec![("k".into(), "v".into())],
                    content_type: None,
                }),
                expires_at_ms: Some(1),
            }],
            next_pkid: 4,
            incoming_qos2: vec![9],
            dropped: 2,
        };
        let bytes = encode(&session).expect("encode");
        assert_eq!(
            rmp_serde::from_slice::<StoredSession>(&bytes).expect("decode"),
            session
        );
    }

    fn connected_session(client_id: &str, expiry_s: u64) -> StoredSession {
        StoredSession {
            client_id: client_id.into(),
            username: Some("u".into()),
            thing: None,
            superuser: false,
            expiry_s,
            disconnected_at_ms: None,
            subscriptions: Vec::new(),
            inflight: Vec::new(),
            queue: Vec::new(),
            next_pkid: 1,
            incoming_qos2: Vec::new(),
            dropped: 0,
        }
    }

    /// A session connected when the server died counts its expiry from the last "alive" mark:
    /// with the server down longer than its expiry, it is gone at the restart (it used to be
    /// restored and count from the restart, living the downtime longer).
    #[tokio::test]
    async fn a_session_connected_at_the_crash_expires_counting_from_the_last_alive_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&thinghub_storage::StoreConfig::new(dir.path())).expect("open");
        let sessions = ["short", "long"]
            .into_iter()
            .zip([60, 3600])
            .map(|(id, expiry)| {
                let bytes = encode(&connected_session(id, expiry)).expect("encode");
                (id.as_bytes().to_vec(), Some(bytes))
            })
            .collect();
        store
            .write_records(RecordSet::MqttSessions, sessions)
            .expect("write");
        let down_since_ms = TimeBase::now().unix_now_ms - 600_000;
        store
            .kv_put_behind(ALIVE_MARK_KEY, down_since_ms.to_be_bytes().to_vec())
            .expect("mark");
        store.sync().await.expect("sync");

        let broker = Arc::new(Broker::new(crate::mqtt::broker::tests::limits()));
        let persistence = Persistence::new(store, broker, Duration::from_secs(1));
        let owner = |stored: &StoredSession| {
            Some(Identity {
                client_id: stored.client_id.clone(),
                username: stored.username.clone(),
                thing: None,
                superuser: false,
                bootstrap: false,
            })
        };
        let report = persistence.restore(&owner, &|_, _| true).expect("restore");
        assert_eq!(report.sessions_expired, 1, "down 10 minutes: the 60 s one");
        assert_eq!(report.sessions, 1, "the one-hour one stays");
    }
}
