//! The broker tap: what happens in the broker that is in no Thing's log (subscriptions made and
//! removed, messages routed), handed to the integrations that asked for it.
//!
//! Each listener (one per webhook or sink that wants broker events) has its own queue, bounded
//! in bytes (`webhook_broker_queue_bytes_max`). An event that does not fit is dropped and
//! counted; a listener's queue lives in memory, so what it holds when the server stops is lost
//! (counted and logged). The guarantee is therefore: at least once while the server runs,
//! counted when dropped. With no listener, an event costs one atomic load.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::acl::Identity;
use super::topic;

/// The broker event kinds, as integration records name them.
pub const BROKER_KINDS: [&str; 3] = [
    "client.subscribed",
    "client.unsubscribed",
    "message.published",
];

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapKind {
    /// A session subscribed (its own SUBSCRIBE or an operator's proxy subscription).
    Subscribed,
    /// A session's subscription was removed (its own UNSUBSCRIBE or an operator's).
    Unsubscribed,
    /// A message was routed (a client's PUBLISH or an operator's HTTP publish).
    Published,
}

impl TapKind {
    /// The record kind.
    pub fn name(self) -> &'static str {
        match self {
            TapKind::Subscribed => BROKER_KINDS[0],
            TapKind::Unsubscribed => BROKER_KINDS[1],
            TapKind::Published => BROKER_KINDS[2],
        }
    }
}

/// One broker event.
#[derive(Debug, Clone)]
pub struct TapEvent {
    /// What happened.
    pub kind: TapKind,
    /// Its number since the server started (with the start time, the record's stable id).
    pub number: u64,
    /// Unix ms.
    pub at_ms: u64,
    /// The session's client id (None: an operator's HTTP publish).
    pub client_id: Option<String>,
    /// The session's user.
    pub username: Option<String>,
    /// The Thing the session acts as.
    pub thing: Option<String>,
    /// The filter (subscriptions) or topic name (messages).
    pub topic: Arc<str>,
    /// Subscription QoS or message QoS.
    pub qos: u8,
    /// The message's retain flag.
    pub retain: bool,
    /// The message's payload (empty for subscriptions).
    pub payload: Bytes,
    /// `mqtt` (the client itself), `operator` (the management API for the session) or `http`.
    pub via: &'static str,
}

impl TapEvent {
    fn size(&self) -> usize {
        // The record's fixed part is a few hundred bytes.
        256 + self.topic.len()
            + self.payload.len()
            + self.client_id.as_ref().map_or(0, String::len)
            + self.username.as_ref().map_or(0, String::len)
            + self.thing.as_ref().map_or(0, String::len)
    }

    /// The integration record (the same shape as a Thing event's, without a feed position).
    pub fn to_record(&self, boot_ms: u64) -> Value {
        let mut data = json!({
            "username": self.username,
            "qos": self.qos,
            "via": self.via,
        });
        let summary = match self.kind {
            TapKind::Subscribed | TapKind::Unsubscribed => {
                data["filter"] = json!(self.topic);
                format!(
                    "{} {} qos={}",
                    if self.kind == TapKind::Subscribed {
                        "subscribed"
                    } else {
                        "unsubscribed"
                    },
                    self.topic,
                    self.qos
                )
            }
            TapKind::Published => {
                data["topic"] = json!(self.topic);
                data["retain"] = json!(self.retain);
                match std::str::from_utf8(&self.payload) {
                    Ok(text) => {
                        data["payload"] = json!(text);
                        data["payloadEncoding"] = json!("utf8");
                    }
                    Err(_) => {
                        data["payload"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(&self.payload));
                        data["payloadEncoding"] = json!("base64");
                    }
                }
                format!(
                    "message on {} qos={} retain={} bytes={}",
                    self.topic,
                    self.qos,
                    self.retain,
                    self.payload.len()
                )
            }
        };
        let mut record = json!({
            "id": format!("mqtt:{boot_ms}:{}", self.number),
            "kind": self.kind.name(),
            "at": self.at_ms,
            "summary": summary,
            "data": data,
        });
        if let Some(thing) = &self.thing {
            record["thingName"] = json!(thing);
        }
        if let Some(client_id) = &self.client_id {
            record["clientId"] = json!(client_id);
        }
        record
    }
}

/// Which broker events a listener wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapFilter {
    /// Subscriptions made.
    pub subscribed: bool,
    /// Subscriptions removed.
    pub unsubscribed: bool,
    /// Messages on these topic filters (empty: none).
    pub topic_filters: Vec<String>,
    /// Only events of these Things (None: any, including sessions that are no Thing).
    pub thing_names: Option<Vec<String>>,
}

impl TapFilter {
    fn wants(&self, kind: TapKind, thing: Option<&str>, topic: &str) -> bool {
        let kind = match kind {
            TapKind::Subscribed => self.subscribed,
            TapKind::Unsubscribed => self.unsubscribed,
            TapKind::Published => self
                .topic_filters
                .iter()
                .any(|filter| topic::matches(filter, topic)),
        };
        kind && self
            .thing_names
            .as_ref()
            .is_none_or(|names| thing.is_some_and(|thing| names.iter().any(|name| name == thing)))
    }

    /// Whether it wants anything at all.
    pub fn is_empty(&self) -> bool {
        !self.subscribed && !self.unsubscribed && self.topic_filters.is_empty()
    }
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Arc<TapEvent>>,
    bytes: usize,
    /// Taken for delivery and not settled yet (delivered, dead-lettered or dropped).
    in_flight: usize,
    /// Stopped: what arrives now is dropped (and counted).
    closed: bool,
}

/// One integration's queue of broker events.
pub struct Listener {
    id: String,
    filter: TapFilter,
    bytes_max: usize,
    queue: Mutex<Queue>,
    ready: Notify,
    /// Events dropped because the queue was full, or still queued when the listener stopped.
    pub dropped: AtomicU64,
}

impl Listener {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn offer(&self, event: &Arc<TapEvent>, tap: &BrokerTap) {
        let size = event.size();
        let mut queue = self.lock();
        if queue.closed || queue.bytes + size > self.bytes_max {
            drop(queue);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tap.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.bytes += size;
        queue.events.push_back(event.clone());
        drop(queue);
        self.ready.notify_one();
    }

    /// Takes up to `max` events, oldest first; they count as in flight until
    /// [`Listener::settled`] (a stop meanwhile counts them as dropped).
    pub fn take(&self, max: usize) -> Vec<Arc<TapEvent>> {
        let mut queue = self.lock();
        let n = max.min(queue.events.len());
        let taken: Vec<Arc<TapEvent>> = queue.events.drain(..n).collect();
        queue.bytes -= taken.iter().map(|e| e.size()).sum::<usize>();
        queue.in_flight = taken.len();
        taken
    }

    /// The events taken last are delivered or dead-lettered.
    pub fn settled(&self) {
        self.lock().in_flight = 0;
    }

    /// Delivery of the events taken last was cut short: they count as dropped.
    pub fn abandon_in_flight(&self, tap: &BrokerTap) {
        let left = std::mem::take(&mut self.lock().in_flight) as u64;
        if left > 0 {
            self.dropped.fetch_add(left, Ordering::Relaxed);
            tap.dropped.fetch_add(left, Ordering::Relaxed);
        }
    }

    /// Events waiting.
    pub fn queued(&self) -> usize {
        self.lock().events.len()
    }

    /// Resolves when an event may be waiting.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// The broker's tap: the listeners and the event counter.
pub struct BrokerTap {
    listeners: RwLock<Arc<Vec<Arc<Listener>>>>,
    active: AtomicBool,
    next: AtomicU64,
    /// When this process started, Unix ms (part of every record id).
    pub boot_ms: u64,
    /// Events dropped over every listener (queue full or stopped).
    pub dropped: AtomicU64,
}

impl BrokerTap {
    /// A tap with no listener.
    pub fn new(boot_ms: u64) -> BrokerTap {
        BrokerTap {
            listeners: RwLock::new(Arc::new(Vec::new())),
            active: AtomicBool::new(false),
            next: AtomicU64::new(0),
            boot_ms,
            dropped: AtomicU64::new(0),
        }
    }

    fn change(&self, f: impl FnOnce(&mut Vec<Arc<Listener>>)) {
        let mut guard = self.listeners.write().unwrap_or_else(|p| p.into_inner());
        let mut listeners = guard.as_ref().clone();
        f(&mut listeners);
        self.active.store(!listeners.is_empty(), Ordering::Release);
        *guard = Arc::new(listeners);
    }

    /// Adds the listener `id` (or keeps the one it has, with its queue, when the filter and the
    /// bound are the same; a different one replaces it, and the old queue counts as dropped);
    /// returns it.
    pub fn listen(&self, id: &str, filter: TapFilter, bytes_max: usize) -> Arc<Listener> {
        if let Some(current) = self.listener(id) {
            if current.filter == filter && current.bytes_max == bytes_max {
                return current;
            }
            self.stop(id);
        }
        let listener = Arc::new(Listener {
            id: id.to_owned(),
            filter,
            bytes_max,
            queue: Mutex::default(),
            ready: Notify::new(),
            dropped: AtomicU64::new(0),
        });
        let added = listener.clone();
        self.change(|all| {
            all.retain(|l| l.id != id);
            all.push(added);
        });
        listener
    }

    /// The listener `id`, if it listens.
    pub fn listener(&self, id: &str) -> Option<Arc<Listener>> {
        self.listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|l| l.id == id)
            .cloned()
    }

    /// Removes the listener `id`; what it still held (queued or being delivered) is counted as
    /// dropped, and so is anything offered to it afterwards.
    pub fn stop(&self, id: &str) {
        let mut removed = None;
        self.change(|all| {
            if let Some(i) = all.iter().position(|l| l.id == id) {
                removed = Some(all.remove(i));
            }
        });
        if let Some(listener) = removed {
            let left = {
                let mut queue = listener.lock();
                queue.closed = true;
                let left = queue.events.len() + queue.in_flight;
                queue.events.clear();
                queue.bytes = 0;
                queue.in_flight = 0;
                left as u64
            };
            if left > 0 {
                listener.dropped.fetch_add(left, Ordering::Relaxed);
                self.dropped.fetch_add(left, Ordering::Relaxed);
                tracing::warn!(integration = %id, events = left, "broker events not delivered when the integration stopped");
            }
        }
    }

    /// A subscription made or removed.
    pub fn subscription(
        &self,
        kind: TapKind,
        identity: &Identity,
        filter: &str,
        qos: u8,
        via: &'static str,
    ) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        self.emit(kind, Some(identity), filter, || TapEvent {
            kind,
            number: 0,
            at_ms: 0,
            client_id: Some(identity.client_id.clone()),
            username: identity.username.clone(),
            thing: identity.thing.clone(),
            topic: Arc::from(filter),
            qos,
            retain: false,
            payload: Bytes::new(),
            via,
        });
    }

    /// A message routed (`identity`: its publisher's session; None for the HTTP publish).
    pub fn message(
        &self,
        identity: Option<&Identity>,
        topic: &Arc<str>,
        qos: u8,
        retain: bool,
        payload: &Bytes,
        via: &'static str,
    ) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        self.emit(TapKind::Published, identity, topic, || TapEvent {
            kind: TapKind::Published,
            number: 0,
            at_ms: 0,
            client_id: identity.map(|i| i.client_id.clone()),
            username: identity.and_then(|i| i.username.clone()),
            thing: identity.and_then(|i| i.thing.clone()),
            topic: topic.clone(),
            qos,
            retain,
            // A copy: the payload may be a slice of the connection's read buffer, which a
            // queued event must not keep alive.
            payload: Bytes::copy_from_slice(payload),
            via,
        });
    }

    /// Hands an event to every listener that wants it; the event is built (once, shared) only
    /// if one does.
    fn emit(
        &self,
        kind: TapKind,
        identity: Option<&Identity>,
        topic: &str,
        build: impl FnOnce() -> TapEvent,
    ) {
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let thing = identity.and_then(|i| i.thing.as_deref());
        let mut wanting = listeners
            .iter()
            .filter(|l| l.filter.wants(kind, thing, topic))
            .peekable();
        if wanting.peek().is_none() {
            return;
        }
        let mut event = build();
        event.number = self.next.fetch_add(1, Ordering::Relaxed);
        event.at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let event = Arc::new(event);
        for listener in wanting {
            listener.offer(&event, self);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(thing: Option<&str>) -> Identity {
        Identity {
            client_id: "c1".into(),
            username: Some("u1".into()),
            thing: thing.map(str::to_owned),
            superuser: false,
            bootstrap: false,
        }
    }

    #[test]
    fn listeners_get_what_they_asked_for_within_their_byte_bound() {
        let tap = BrokerTap::new(7);
        let topic: Arc<str> = Arc::from("plant/1/temp");
        let payload = Bytes::from_static(b"21.5");
        // Nobody listens: nothing is built.
        tap.message(None, &topic, 1, false, &payload, "http");
        let messages = tap.listen(
            "w1",
            TapFilter {
                subscribed: false,
                unsubscribed: false,
                topic_filters: vec!["plant/+/temp".into()],
                thing_names: None,
            },
            1 << 20,
        );
        let subscriptions = tap.listen(
            "w2",
            TapFilter {
                subscribed: true,
                unsubscribed: true,
                topic_filters: Vec::new(),
                thing_names: Some(vec!["pump".into()]),
            },
            300,
        );
        let who = identity(Some("pump"));
        tap.message(Some(&who), &topic, 1, true, &payload, "mqtt");
        tap.message(
            Some(&who),
            &Arc::from("plant/1/hum"),
            0,
            false,
            &payload,
            "mqtt",
        );
        tap.subscription(TapKind::Subscribed, &who, &topic, 1, "mqtt");
        tap.subscription(TapKind::Subscribed, &identity(None), &topic, 1, "mqtt");
        // Past the 300-byte bound: dropped and counted.
        tap.subscription(TapKind::Unsubscribed, &who, &topic, 0, "mqtt");

        let got = messages.take(10);
        assert_eq!(got.len(), 1);
        let record = got[0].to_record(tap.boot_ms);
        assert_eq!(record["kind"], "message.published");
        assert_eq!(record["thingName"], "pump");
        assert_eq!(record["data"]["payload"], "21.5");
        assert_eq!(record["data"]["retain"], true);
        assert_eq!(record["id"], format!("mqtt:7:{}", got[0].number));

        let got = subscriptions.take(10);
        assert_eq!(got.len(), 1, "only pump's, within the bound");
        assert_eq!(got[0].to_record(7)["data"]["filter"], "plant/1/temp");
        assert_eq!(subscriptions.dropped.load(Ordering::Relaxed), 1);

        // Binary payloads are base64.
        tap.message(
            None,
            &topic,
            0,
            false,
            &Bytes::from_static(&[0xff, 0x00]),
            "http",
        );
        let record = messages.take(1)[0].to_record(7);
        messages.settled();
        assert_eq!(record["data"]["payloadEncoding"], "base64");
        assert_eq!(record["data"]["payload"], "/wA=");
        assert!(record.get("clientId").is_none());

        // One queued and one taken but not settled when it stops: both count as dropped.
        tap.message(None, &topic, 0, false, &payload, "http");
        tap.message(None, &topic, 0, false, &payload, "http");
        assert_eq!(messages.take(1).len(), 1);
        tap.stop("w1");
        assert_eq!(
            messages.dropped.load(Ordering::Relaxed),
            2,
            "left when stopped"
        );
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn listening_again_with_the_same_filter_keeps_the_queue_and_another_filter_drops_it() {
        let tap = BrokerTap::new(1);
        let filter = TapFilter {
            topic_filters: vec!["a/#".into()],
            ..TapFilter::default()
        };
        let first = tap.listen("w", filter.clone(), 1 << 20);
        tap.message(None, &Arc::from("a/1"), 0, false, &Bytes::new(), "http");
        let again = tap.listen("w", filter, 1 << 20);
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(again.queued(), 1);
        let other = tap.listen("w", TapFilter::default(), 1 << 20);
        assert_eq!(other.queued(), 0);
        assert_eq!(first.dropped.load(Ordering::Relaxed), 1, "counted");
    }
}
