//! Webhooks: the Things' durable events POSTed to the operator's own web service, in change-feed
//! order, each webhook a consumer of the feed with its own durable cursor.
//!
//! Delivery is at least once: the cursor moves only after the receiver answered 2xx (and is
//! durable with the next group commit), so a crash or a failed request sends a batch again;
//! every record carries a stable `id` to drop duplicates. One request is in flight per
//! webhook. Connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff
//! and jitter for as long as the webhook exists; any other 4xx is a permanent failure: the
//! batch goes to the webhook's bounded dead-letter list and delivery goes on. A slow or dead
//! receiver never slows device traffic (the feed is read behind the writers), but it holds the
//! feed from being trimmed until it catches up or is deleted (a disabled one keeps its cursor,
//! so it resumes without loss, and holds the feed too).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use thinghub_actors::integration::{self, Record, KINDS};
use thinghub_storage::{StorageError, Store};
use tokio::sync::watch;

use crate::mqtt::tap::{BrokerTap, Listener, TapFilter, TapKind, BROKER_KINDS};

/// The bounds of webhook delivery.
#[derive(Debug, Clone, Copy)]
pub struct WebhookLimits {
    /// Longest a delivery request may take.
    pub request_timeout: Duration,
    /// First retry delay (doubles per failure, with jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Most records one POST carries (a webhook's `batchMax` is at most this).
    pub batch_max: usize,
    /// Failed batches kept per webhook; the oldest goes past it.
    pub dead_letters_max: usize,
    /// Webhooks in all.
    pub webhooks_max: usize,
    /// Feed entries read per round.
    pub feed_batch_max: usize,
    /// Bytes of broker events queued per webhook; past it they are dropped (counted).
    pub broker_queue_bytes_max: usize,
}

/// A webhook as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    /// `w-` and 16 hex digits.
    pub id: String,
    /// http(s) URL the batches are POSTed to.
    pub url: String,
    /// Record kinds delivered (None: every kind).
    pub kinds: Option<Vec<String>>,
    /// Things whose records are delivered (None: every Thing).
    pub thing_names: Option<Vec<String>>,
    /// Topic filters of the messages delivered as `message.published` (None: no messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_filters: Option<Vec<String>>,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// HMAC-SHA256 key of `X-Thinghub-Signature` (never shown again).
    pub secret: Option<String>,
    /// Records per POST.
    pub batch_max: usize,
    /// Whether it delivers.
    pub enabled: bool,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Set for a PostgreSQL sink: the records go into this table instead of to `url` (which
    /// is empty, as are the headers and the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresTarget>,
}

/// A PostgreSQL table that receives the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostgresTarget {
    /// libpq-style connection string or URL (holds the password: never shown again).
    pub connection: String,
    /// Table name (created if absent).
    pub table: String,
}

/// Which kind of integration a request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An HTTP receiver.
    Webhook,
    /// A PostgreSQL table.
    Postgres,
}

impl Webhook {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        if self.postgres.is_some() {
            Kind::Postgres
        } else {
            Kind::Webhook
        }
    }

    /// The API's view of a PostgreSQL sink (the connection string's password is never shown).
    fn postgres_json(&self, target: &PostgresTarget) -> Value {
        let shown = target
            .connection
            .parse::<tokio_postgres::Config>()
            .map(|config| {
                let hosts: Vec<String> = config
                    .get_hosts()
                    .iter()
                    .map(|host| match host {
                        tokio_postgres::config::Host::Tcp(name) => name.clone(),
                        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                    })
                    .collect();
                json!({
                    "hosts": hosts,
                    "ports": config.get_ports(),
                    "dbname": config.get_dbname(),
                    "user": config.get_user(),
                })
            })
            .unwrap_or(Value::Null);
        json!({
            "id": self.id,
            "table": target.table,
            "connection": shown,
            "kinds": self.kinds,
            "thingNames": self.thing_names,
            "topicFilters": self.topic_filters,
            "batchMax": self.batch_max,
            "enabled": self.enabled,
            "createdAt": self.created_at_ms,
        })
    }

    /// The API's view (the secret is never shown).
    pub fn to_json(&self) -> Value {
        if let Some(target) = &self.postgres {
            return self.postgres_json(target);
        }
        let headers: BTreeMap<&str, &str> = self
            .headers
            .keys()
            .map(|name| (name.as_str(), "(hidden)"))
            .collect();
        json!({
            "id": self.id,
            "url": redacted(&self.url),
            "kinds": self.kinds,
            "thingNames": self.thing_names,
            "topicFilters": self.topic_filters,
            "headers": headers,
            "hasSecret": self.secret.is_some(),
            "batchMax": self.batch_max,
            "enabled": self.enabled,
            "createdAt": self.created_at_ms,
        })
    }

    /// Whether it delivers records of `thing` (checked per feed entry, before reading it).
    fn wants_thing(&self, thing: &str) -> bool {
        self.thing_names
            .as_ref()
            .is_none_or(|names| names.iter().any(|name| name == thing))
    }

    /// Whether it delivers records of this kind.
    fn wants_kind(&self, record: &Record) -> bool {
        self.wants_kind_named(record.kind)
    }

    fn wants_kind_named(&self, kind: &str) -> bool {
        self.kinds
            .as_ref()
            .is_none_or(|kinds| kinds.iter().any(|k| k == kind))
    }

    /// The broker events it wants: subscriptions only when `kinds` names them (absent
    /// `kinds` means every Thing event kind), messages when it has `topicFilters`.
    fn tap_filter(&self) -> TapFilter {
        let named = |kind: TapKind| {
            self.kinds
                .as_ref()
                .is_some_and(|kinds| kinds.iter().any(|k| k == kind.name()))
        };
        let topic_filters = if self.wants_kind_named(TapKind::Published.name()) {
            self.topic_filters.clone().unwrap_or_default()
        } else {
            Vec::new()
        };
        TapFilter {
            subscribed: named(TapKind::Subscribed),
            unsubscribed: named(TapKind::Unsubscribed),
            topic_filters,
            thing_names: self.thing_names.clone(),
        }
    }
}

/// Why a webhook request was refused.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// No such webhook.
    #[error("webhook '{0}' not found")]
    NotFound(String),
    /// `webhooks_max` reached.
    #[error("at most {0} webhooks (webhooks_max)")]
    TooMany(usize),
    /// Storage failed.
    #[error("webhooks cannot be stored or read right now: {0}")]
    Storage(#[from] StorageError),
}

/// Counters of one webhook since start.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Records delivered (2xx).
    pub delivered: AtomicU64,
    /// Requests retried.
    pub retried: AtomicU64,
    /// Records that failed for good (dead-lettered).
    pub failed: AtomicU64,
    /// Unix ms of the oldest record not delivered yet (0: none pending).
    pending_since_ms: AtomicU64,
    last_error: Mutex<Option<(u64, String)>>,
}

impl WebhookStats {
    fn error(&self, message: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((now_ms(), message));
    }
}

/// Counters over every webhook (metrics).
#[derive(Debug, Default)]
pub struct WebhookTotals {
    /// Records delivered.
    pub delivered: AtomicU64,
    /// Requests retried.
    pub retried: AtomicU64,
    /// Records dead-lettered.
    pub failed: AtomicU64,
}

struct Running {
    stop: watch::Sender<bool>,
    stats: Arc<WebhookStats>,
    task: tokio::task::JoinHandle<()>,
    broker: Option<Arc<Listener>>,
}

/// The webhooks and their delivery tasks.
pub struct Webhooks {
    store: Store,
    tap: Arc<BrokerTap>,
    limits: WebhookLimits,
    client: reqwest::Client,
    running: Mutex<HashMap<String, Running>>,
    /// Held across a change (create, update, delete): one at a time, so the stored definition
    /// and the running task always agree.
    changes: tokio::sync::Mutex<()>,
    /// Held by a dead-letter replay.
    replays: tokio::sync::Mutex<()>,
    /// Counters over every webhook.
    pub totals: Arc<WebhookTotals>,
}

/// `kv` prefix of a stored webhook or sink.
pub(crate) const PREFIX: &str = "webhook/";
/// How much of a refusing receiver's answer is kept (status, logs, dead letters).
const ERROR_BODY_SHOWN_BYTES: usize = 512;
/// `kv` prefix of a dead letter.
pub(crate) const DEAD_PREFIX: &str = "webhook-dead/";

/// `thinghub check`: a stored webhook decodes.
pub(crate) fn check_stored_webhook(bytes: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<Webhook>(bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `thinghub check`: a dead letter is a JSON object with its records.
pub(crate) fn check_dead_letter(bytes: &[u8]) -> Result<(), String> {
    let letter: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if letter["records"].is_array() {
        Ok(())
    } else {
        Err("a dead letter without records".into())
    }
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

fn consumer(id: &str) -> String {
    format!("webhook/{id}")
}

fn dead_prefix(id: &str) -> String {
    format!("{DEAD_PREFIX}{id}/")
}

/// `url` without its password (shown and logged).
fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("hidden"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Parses and checks a PostgreSQL sink's target.
fn parse_postgres(
    object: &serde_json::Map<String, Value>,
    current: Option<&Webhook>,
) -> Result<PostgresTarget, WebhookError> {
    let invalid = |m: String| WebhookError::Invalid(m);
    let current = current.and_then(|c| c.postgres.as_ref());
    let connection = match object.get("connection") {
        Some(Value::String(connection)) => connection.clone(),
        Some(_) => return Err(invalid("connection must be a string".into())),
        None => match current {
            Some(current) => current.connection.clone(),
            None => return Err(invalid("Missing required field: connection".into())),
        },
    };
    let config = connection.parse::<tokio_postgres::Config>().map_err(|e| {
        invalid(format!(
            "connection is not a PostgreSQL connection string: {e}"
        ))
    })?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(invalid(
            "sslmode=require: TLS to PostgreSQL is not supported yet (use a loopback or private network)".into(),
        ));
    }
    let table = match object.get("table") {
        Some(Value::String(table)) => table.clone(),
        Some(_) => return Err(invalid("table must be a string".into())),
        None => match current {
            Some(current) => current.table.clone(),
            None => return Err(invalid("Missing required field: table".into())),
        },
    };
    let valid_table = (1..=63).contains(&table.len())
        && table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && table
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid_table {
        return Err(invalid(format!(
            "table '{table}' must be 1..=63 of [a-z0-9_], starting with a letter or _"
        )));
    }
    Ok(PostgresTarget { connection, table })
}

/// Parses and checks a webhook or sink body (`current`: the one it replaces).
fn parse(
    body: &Value,
    current: Option<&Webhook>,
    limits: &WebhookLimits,
    kind: Kind,
) -> Result<Webhook, WebhookError> {
    let invalid = |m: String| WebhookError::Invalid(m);
    let object = body
        .as_object()
        .ok_or_else(|| invalid("the body must be a JSON object".into()))?;
    let (fields, what): (&[&str], &str) = match kind {
        Kind::Webhook => (
            &[
                "url",
                "kinds",
                "thingNames",
                "topicFilters",
                "headers",
                "secret",
                "batchMax",
                "enabled",
            ],
            "a webhook",
        ),
        Kind::Postgres => (
            &[
                "connection",
                "table",
                "kinds",
                "thingNames",
                "topicFilters",
                "batchMax",
                "enabled",
            ],
            "a PostgreSQL sink",
        ),
    };
    for key in object.keys() {
        if !fields.contains(&key.as_str()) {
            return Err(invalid(format!(
                "'{key}' is not a field of {what} ({})",
                fields.join(", ")
            )));
        }
    }
    let postgres = match kind {
        Kind::Postgres => Some(parse_postgres(object, current)?),
        Kind::Webhook => None,
    };
    let url = match object.get("url") {
        _ if postgres.is_some() => String::new(),
        Some(Value::String(url)) => url.clone(),
        Some(_) => return Err(invalid("url must be a string".into())),
        None => match current {
            Some(current) => current.url.clone(),
            None => return Err(invalid("Missing required field: url".into())),
        },
    };
    if postgres.is_none() {
        let parsed = reqwest::Url::parse(&url).map_err(|e| invalid(format!("url '{url}': {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid(format!(
                "url '{url}' must be an http or https URL with a host"
            )));
        }
    }
    let strings = |field: &str| -> Result<Option<Vec<String>>, WebhookError> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| invalid(format!("{field} must be an array of strings")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(invalid(format!(
                "{field} must be a non-empty array of strings or null"
            ))),
        }
    };
    let kinds = match object.get("kinds") {
        Some(_) => strings("kinds")?,
        None => current.and_then(|c| c.kinds.clone()),
    };
    for kind in kinds.iter().flatten() {
        if !KINDS.contains(&kind.as_str()) && !BROKER_KINDS.contains(&kind.as_str()) {
            return Err(invalid(format!(
                "unknown kind '{kind}': one of {}, {}",
                KINDS.join(", "),
                BROKER_KINDS.join(", ")
            )));
        }
    }
    let published = TapKind::Published.name();
    let topic_filters = match object.get("topicFilters") {
        Some(_) => strings("topicFilters")?,
        // New kinds without messages: the stored filters go with them.
        None if kinds
            .as_ref()
            .is_some_and(|kinds| !kinds.iter().any(|k| k == published)) =>
        {
            None
        }
        None => current.and_then(|c| c.topic_filters.clone()),
    };
    for filter in topic_filters.iter().flatten() {
        match crate::mqtt::topic::parse_filter(filter) {
            Ok(parsed) if parsed.share_group.is_none() => {}
            Ok(_) => {
                return Err(invalid(format!(
                    "topic filter '{filter}': a shared subscription is not a filter here"
                )))
            }
            Err(e) => return Err(invalid(format!("topic filter '{filter}': {e}"))),
        }
    }
    let wants_messages = kinds
        .as_ref()
        .is_none_or(|kinds| kinds.iter().any(|k| k == published));
    match (&topic_filters, wants_messages) {
        (None, true) if kinds.is_some() => {
            return Err(invalid(format!(
                "kind '{published}' needs topicFilters (the topics whose messages are delivered)"
            )))
        }
        (Some(_), false) => {
            return Err(invalid(format!(
                "topicFilters select messages: add '{published}' to kinds (or leave kinds out)"
            )))
        }
        _ => {}
    }
    let thing_names = match object.get("thingNames") {
        Some(_) => strings("thingNames")?,
        None => current.and_then(|c| c.thing_names.clone()),
    };
    let headers = match object.get("headers") {
        None => current.map(|c| c.headers.clone()).unwrap_or_default(),
        Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(map)) => {
            let mut headers = BTreeMap::new();
            for (name, value) in map {
                let value = value
                    .as_str()
                    .ok_or_else(|| invalid(format!("header '{name}' must be a string")))?;
                reqwest::header::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| invalid(format!("'{name}' is not a valid header name")))?;
                reqwest::header::HeaderValue::from_str(value)
                    .map_err(|_| invalid(format!("the value of header '{name}' is not valid")))?;
                if [
                    "content-type",
                    "content-length",
                    "host",
                    "x-thinghub-signature",
                ]
                .contains(&name.to_ascii_lowercase().as_str())
                {
                    return Err(invalid(format!("header '{name}' is set by the server")));
                }
                headers.insert(name.clone(), value.to_owned());
            }
            headers
        }
        Some(_) => return Err(invalid("headers must be an object of strings".into())),
    };
    let secret = match object.get("secret") {
        None => current.and_then(|c| c.secret.clone()),
        Some(Value::Null) => None,
        Some(Value::String(secret)) if !secret.is_empty() => Some(secret.clone()),
        Some(_) => return Err(invalid("secret must be a non-empty string or null".into())),
    };
    let batch_max = match object.get("batchMax") {
        None | Some(Value::Null) => current.map_or(limits.batch_max, |c| c.batch_max),
        Some(value) => match value.as_u64() {
            Some(n) if (1..=limits.batch_max as u64).contains(&n) => n as usize,
            _ => {
                return Err(invalid(format!(
                    "batchMax must be 1..={} (webhook_batch_max)",
                    limits.batch_max
                )))
            }
        },
    };
    let enabled = match object.get("enabled") {
        None | Some(Value::Null) => current.is_none_or(|c| c.enabled),
        Some(Value::Bool(enabled)) => *enabled,
        Some(_) => return Err(invalid("enabled must be true or false".into())),
    };
    Ok(Webhook {
        topic_filters,
        id: current.map_or_else(
            || format!("w-{:016x}", rand::thread_rng().gen::<u64>()),
            |c| c.id.clone(),
        ),
        url,
        kinds,
        thing_names,
        headers,
        secret,
        batch_max,
        enabled,
        created_at_ms: current.map_or_else(now_ms, |c| c.created_at_ms),
        postgres,
    })
}

/// How one delivery attempt ended.
enum Attempt {
    Delivered,
    Retry(String),
    Permanent(u16, String),
}

impl Webhooks {
    /// The webhooks of `store`, their delivery not started yet ([`Webhooks::start`]).
    pub fn new(
        store: Store,
        tap: Arc<BrokerTap>,
        limits: WebhookLimits,
    ) -> Result<Arc<Webhooks>, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(limits.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Arc::new(Webhooks {
            store,
            tap,
            limits,
            client,
            running: Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            replays: tokio::sync::Mutex::new(()),
            totals: Arc::new(WebhookTotals::default()),
        }))
    }

    fn load_all(&self) -> Result<Vec<Webhook>, StorageError> {
        Ok(self
            .store
            .kv_scan_prefix(PREFIX, self.limits.webhooks_max + 1)?
            .into_iter()
            .filter_map(|(key, bytes)| match serde_json::from_slice::<Webhook>(&bytes) {
                Ok(webhook) => Some(webhook),
                Err(e) => {
                    tracing::error!(%key, error = %e, "a stored webhook cannot be read; skipped");
                    None
                }
            })
            .collect())
    }

    /// Starts delivery for every enabled webhook (at server start).
    pub fn start(self: &Arc<Self>) -> Result<(), StorageError> {
        for webhook in self.load_all()? {
            if webhook.enabled {
                self.run(webhook);
            }
        }
        Ok(())
    }

    /// Stops every delivery task.
    pub fn stop_all(&self) {
        for (id, running) in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = running.stop.send(true);
            running.task.abort();
            if running.broker.is_some() {
                self.tap.stop(&id);
            }
        }
    }

    fn run(self: &Arc<Self>, webhook: Webhook) {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(WebhookStats::default());
        let id = webhook.id.clone();
        let me = self.clone();
        let filter = webhook.tap_filter();
        let broker = (!filter.is_empty()).then(|| {
            self.tap
                .listen(&id, filter, self.limits.broker_queue_bytes_max)
        });
        let task = tokio::spawn({
            let stats = stats.clone();
            let broker = broker.clone();
            async move { me.deliver_loop(webhook, stats, broker, stopped).await }
        });
        let previous = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Running {
                    stop,
                    stats,
                    task,
                    broker,
                },
            );
        if let Some(previous) = previous {
            let _ = previous.stop.send(true);
            previous.task.abort();
        }
    }

    /// Stops a webhook's task and waits until it is gone (an aborted request leaves the
    /// cursor where it was: the batch is sent again later, never skipped). Broker events it was
    /// delivering count as dropped; its queue of them is kept when `keep_broker_queue` (a
    /// change that keeps the same broker filter goes on with it) and dropped (counted)
    /// otherwise.
    async fn halt(&self, id: &str, keep_broker_queue: bool) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(running) = running {
            let _ = running.stop.send(true);
            running.task.abort();
            let _ = running.task.await;
            if let Some(broker) = &running.broker {
                broker.abandon_in_flight(&self.tap);
                if !keep_broker_queue {
                    self.tap.stop(id);
                }
            }
        }
    }

    /// Creates a webhook; it delivers what is committed from now on.
    pub async fn create(
        self: &Arc<Self>,
        kind: Kind,
        body: &Value,
    ) -> Result<Webhook, WebhookError> {
        let webhook = parse(body, None, &self.limits, kind)?;
        let _change = self.changes.lock().await;
        if self.load_all()?.len() >= self.limits.webhooks_max {
            return Err(WebhookError::TooMany(self.limits.webhooks_max));
        }
        self.store.set_cursor(
            &consumer(&webhook.id),
            self.store.feed_durable_end().saturating_sub(1),
        )?;
        let stored = match serde_json::to_vec(&webhook) {
            Ok(bytes) => self.store.kv_put(&key(&webhook.id), bytes).await,
            Err(e) => Err(StorageError::Db(e.to_string())),
        };
        if let Err(e) = stored {
            // A cursor without its webhook would hold the feed from trimming for good.
            let _ = self.store.remove_cursor(&consumer(&webhook.id));
            return Err(e.into());
        }
        tracing::info!(webhook = %webhook.id, url = %redacted(&webhook.url), "webhook created");
        if webhook.enabled {
            self.run(webhook.clone());
        }
        Ok(webhook)
    }

    /// One webhook.
    pub fn get(&self, kind: Kind, id: &str) -> Result<Webhook, WebhookError> {
        let webhook = self.get_any(id)?;
        if webhook.kind() != kind {
            return Err(WebhookError::NotFound(id.to_owned()));
        }
        Ok(webhook)
    }

    fn get_any(&self, id: &str) -> Result<Webhook, WebhookError> {
        let bytes = self
            .store
            .kv_get(&key(id))?
            .ok_or_else(|| WebhookError::NotFound(id.to_owned()))?;
        serde_json::from_slice(&bytes).map_err(|e| StorageError::Db(e.to_string()).into())
    }

    /// Every webhook.
    pub fn list(&self, kind: Kind) -> Result<Vec<Webhook>, WebhookError> {
        Ok(self
            .load_all()?
            .into_iter()
            .filter(|w| w.kind() == kind)
            .collect())
    }

    /// Replaces the fields given; delivery restarts from the webhook's cursor.
    pub async fn update(
        self: &Arc<Self>,
        kind: Kind,
        id: &str,
        body: &Value,
    ) -> Result<Webhook, WebhookError> {
        let _change = self.changes.lock().await;
        let current = self.get(kind, id)?;
        let webhook = parse(body, Some(&current), &self.limits, kind)?;
        let bytes = serde_json::to_vec(&webhook).map_err(|e| StorageError::Db(e.to_string()))?;
        let keep = webhook.enabled && webhook.tap_filter() == current.tap_filter();
        self.halt(id, keep).await;
        self.store.kv_put(&key(id), bytes).await?;
        if webhook.enabled {
            self.run(webhook.clone());
        }
        Ok(webhook)
    }

    /// Deletes a webhook, its cursor and its dead letters.
    pub async fn delete(&self, kind: Kind, id: &str) -> Result<(), WebhookError> {
        let _change = self.changes.lock().await;
        self.get(kind, id)?;
        self.halt(id, false).await;
        let dead = self
            .store
            .kv_keys_prefix(&dead_prefix(id), self.limits.dead_letters_max + 1)?;
        let mut changes: Vec<(String, Option<Vec<u8>>)> =
            dead.into_iter().map(|key| (key, None)).collect();
        changes.push((key(id), None));
        self.store.kv_apply_behind(changes)?;
        self.store.remove_cursor(&consumer(id))?;
        self.store.sync().await?;
        tracing::info!(webhook = %id, "webhook deleted");
        Ok(())
    }

    /// Delivery status of a webhook.
    pub fn status(&self, kind: Kind, id: &str) -> Result<Value, WebhookError> {
        self.view(&self.get(kind, id)?)
    }

    /// `webhook` as the API shows it, with its delivery status.
    pub fn view(&self, webhook: &Webhook) -> Result<Value, WebhookError> {
        let id = webhook.id.as_str();
        let cursor = self.store.cursor(&consumer(id))?;
        let end = self.store.feed_durable_end();
        let dead = self
            .store
            .kv_keys_prefix(&dead_prefix(id), self.limits.dead_letters_max + 1)?
            .len();
        let stats = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|r| r.stats.clone());
        let mut status = json!({
            "running": stats.is_some(),
            "cursor": cursor,
            "lagEntries": end.saturating_sub(1).saturating_sub(cursor),
            "deadLetters": dead,
        });
        if let Some(stats) = stats {
            let pending = stats.pending_since_ms.load(Ordering::Relaxed);
            status["lagSeconds"] = json!(if pending == 0 {
                0.0
            } else {
                now_ms().saturating_sub(pending) as f64 / 1000.0
            });
            status["delivered"] = json!(stats.delivered.load(Ordering::Relaxed));
            status["retried"] = json!(stats.retried.load(Ordering::Relaxed));
            status["failed"] = json!(stats.failed.load(Ordering::Relaxed));
            if let Some(broker) = self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .and_then(|r| r.broker.clone())
            {
                status["brokerQueued"] = json!(broker.queued());
                status["brokerDropped"] = json!(broker.dropped.load(Ordering::Relaxed));
            }
            if let Some((at, message)) = stats
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                status["lastError"] = json!({"at": at, "message": message});
            }
        }
        let mut view = webhook.to_json();
        view["status"] = status;
        Ok(view)
    }

    /// A page of a webhook's dead letters, oldest first, after the letter `after` (its `id`);
    /// the next page's cursor when the page is full.
    pub fn dead_letters(
        &self,
        kind: Kind,
        id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Value>, Option<String>), WebhookError> {
        self.get(kind, id)?;
        let page = self.store.kv_page(&dead_prefix(id), after, limit)?;
        let next = page.next;
        let items = page
            .items
            .into_iter()
            .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
            .collect();
        Ok((items, next))
    }

    /// Sends the dead letters again, oldest first, removing each one delivered; stops at the
    /// first that fails. Returns (replayed, left).
    pub async fn replay(&self, kind: Kind, id: &str) -> Result<(usize, usize), WebhookError> {
        let webhook = self.get(kind, id)?;
        // One replay at a time: two would send the same letters twice.
        let _replay = self.replays.lock().await;
        let mut pg = None;
        let keys = self
            .store
            .kv_keys_prefix(&dead_prefix(id), self.limits.dead_letters_max + 1)?;
        let total = keys.len();
        let mut replayed = 0;
        // One letter in memory at a time (each holds up to a batch of records).
        for key in keys {
            let Some(letter) = self
                .store
                .kv_get(&key)?
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            else {
                continue;
            };
            let records = letter["records"].as_array().cloned().unwrap_or_default();
            match self.attempt(&webhook, &mut pg, &records).await {
                Attempt::Delivered => {
                    self.store.kv_remove(&key).await?;
                    replayed += 1;
                }
                Attempt::Retry(why) | Attempt::Permanent(_, why) => {
                    tracing::warn!(webhook = %id, error = %why, "dead letter replay stopped");
                    break;
                }
            }
        }
        Ok((replayed, total - replayed))
    }

    async fn attempt(
        &self,
        webhook: &Webhook,
        pg: &mut Option<tokio_postgres::Client>,
        records: &[Value],
    ) -> Attempt {
        if let Some(target) = &webhook.postgres {
            // Bounded like an HTTP delivery: a database that accepts the connection and then
            // says nothing must not hold the sink (dropping the client rolls the batch back).
            let written = tokio::time::timeout(
                self.limits.request_timeout,
                write_postgres(target, pg, records),
            )
            .await;
            let Ok(written) = written else {
                *pg = None;
                return Attempt::Retry(format!(
                    "PostgreSQL: no answer within {} ms (webhook_request_timeout_ms)",
                    self.limits.request_timeout.as_millis()
                ));
            };
            return match written {
                Ok(()) => Attempt::Delivered,
                Err(e) => {
                    let data_error = e
                        .code()
                        .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"));
                    if pg.as_ref().is_some_and(tokio_postgres::Client::is_closed) {
                        *pg = None;
                    }
                    let why = match e.as_db_error() {
                        Some(db) => format!("PostgreSQL: {} ({})", db.message(), db.code().code()),
                        None => format!("PostgreSQL: {e}"),
                    };
                    if data_error {
                        Attempt::Permanent(422, why)
                    } else {
                        *pg = None;
                        Attempt::Retry(why)
                    }
                }
            };
        }
        let body = serde_json::to_vec(records).unwrap_or_default();
        let mut request = self
            .client
            .post(&webhook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in &webhook.headers {
            request = request.header(name, value);
        }
        if let Some(secret) = &webhook.secret {
            if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
                mac.update(&body);
                let hex: String = mac
                    .finalize()
                    .into_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                request = request.header("X-Thinghub-Signature", format!("sha256={hex}"));
            }
        }
        match request.body(body).send().await {
            Ok(response) if response.status().is_success() => Attempt::Delivered,
            Ok(response) => {
                let status = response.status();
                let mut response = response;
                let mut text = Vec::new();
                while text.len() < ERROR_BODY_SHOWN_BYTES {
                    match response.chunk().await {
                        Ok(Some(chunk)) => text.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                text.truncate(ERROR_BODY_SHOWN_BYTES);
                let text = String::from_utf8_lossy(&text);
                let why = format!("{status}: {text}");
                if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
                    Attempt::Retry(why)
                } else {
                    Attempt::Permanent(status.as_u16(), why)
                }
            }
            // Without the URL: it may carry credentials.
            Err(e) => Attempt::Retry(e.without_url().to_string()),
        }
    }

    /// Reads the feed after the webhook's cursor and delivers, until stopped.
    async fn deliver_loop(
        self: Arc<Self>,
        webhook: Webhook,
        stats: Arc<WebhookStats>,
        broker: Option<Arc<Listener>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let name = consumer(&webhook.id);
        let mut pg = None;
        tracing::info!(webhook = %webhook.id, "webhook delivery started");
        // Broker events and feed records take turns, so neither can starve the other (a
        // starved feed would also hold the feed from trimming).
        let mut broker_turn = true;
        loop {
            if *stop.borrow() {
                return;
            }
            if let Some(broker) = broker.as_ref().filter(|_| broker_turn) {
                let events = broker.take(webhook.batch_max);
                if let Some(first) = events.first() {
                    let boot = self.tap.boot_ms;
                    let letter = format!("mqtt-{boot}-{:020}", first.number);
                    let records: Vec<Value> = events.iter().map(|e| e.to_record(boot)).collect();
                    if self
                        .deliver(&webhook, &stats, &records, &letter, &mut pg, &mut stop)
                        .await
                        .is_none()
                    {
                        // Stopped while retrying: counted as not delivered.
                        broker.abandon_in_flight(&self.tap);
                        return;
                    }
                    broker.settled();
                    broker_turn = false;
                    continue;
                }
            }
            broker_turn = true;
            let cursor = match self.store.cursor(&name) {
                Ok(cursor) => cursor,
                Err(e) => {
                    tracing::error!(webhook = %webhook.id, error = %e, "cannot read the webhook's cursor");
                    stats.error(e.to_string());
                    if wait_or_stop(&mut stop, self.limits.retry_max).await {
                        return;
                    }
                    continue;
                }
            };
            let end = self.store.feed_durable_end();
            if cursor.saturating_add(1) >= end {
                stats.pending_since_ms.store(0, Ordering::Relaxed);
                tokio::select! {
                    () = self.store.feed_grown(end) => {}
                    () = broker_ready(broker.as_deref()) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            // A long catch-up over filtered-out records must not hold the thread.
            tokio::task::yield_now().await;
            let (batch, through) = match self.next_batch(&webhook, cursor, end) {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(webhook = %webhook.id, error = %e, "cannot read the change feed");
                    stats.error(e.to_string());
                    if wait_or_stop(&mut stop, self.limits.retry_max).await {
                        return;
                    }
                    continue;
                }
            };
            if !batch.is_empty() {
                let first_at = batch.first().map_or(0, |r| r.at);
                if stats.pending_since_ms.load(Ordering::Relaxed) == 0 {
                    stats
                        .pending_since_ms
                        .store(first_at.max(1), Ordering::Relaxed);
                }
                // Delivered or dead-lettered: either way delivery goes on after it.
                let letter = format!("{:020}", batch.first().map_or(0, |r| r.position));
                let records: Vec<Value> = batch
                    .iter()
                    .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
                    .collect();
                if self
                    .deliver(&webhook, &stats, &records, &letter, &mut pg, &mut stop)
                    .await
                    .is_none()
                {
                    return;
                }
                stats.pending_since_ms.store(0, Ordering::Relaxed);
            }
            if let Err(e) = self.store.set_cursor(&name, through) {
                tracing::error!(webhook = %webhook.id, error = %e, "cannot move the webhook's cursor");
                stats.error(e.to_string());
            }
        }
    }

    /// The records after `cursor` this webhook wants, whole feed entries up to its batch size,
    /// and the position they run through.
    fn next_batch(
        &self,
        webhook: &Webhook,
        cursor: u64,
        end: u64,
    ) -> Result<(Vec<Record>, u64), StorageError> {
        let entries = self.store.read_feed(cursor, self.limits.feed_batch_max)?;
        let mut batch = Vec::new();
        let mut through = cursor;
        for entry in &entries {
            if !webhook.wants_thing(&entry.thing) {
                through = entry.position;
                continue;
            }
            match integration::read_records(&self.store, entry) {
                Ok(records) => batch.extend(records.into_iter().filter(|r| webhook.wants_kind(r))),
                // A damaged record is skipped (one must not stop the webhook for good); any
                // other failure is retried: nothing readable is skipped.
                Err(e @ StorageError::Corrupt { .. }) => {
                    tracing::error!(webhook = %webhook.id, thing = %entry.thing, first_seq = entry.first_seq, error = %e, "webhook skips events that cannot be decoded");
                }
                Err(e) => return Err(e),
            }
            through = entry.position;
            if batch.len() >= webhook.batch_max {
                return Ok((batch, through));
            }
        }
        if entries.len() < self.limits.feed_batch_max {
            // Everything durable below `end` was read: positions without an entry (an append
            // that failed) are passed too, so they cannot stall the webhook.
            through = through.max(end.saturating_sub(1));
        }
        Ok((batch, through))
    }

    /// Delivers one batch: `Some(true)` delivered, `Some(false)` dead-lettered (the cursor
    /// moves on either way), `None` stopped while retrying.
    async fn deliver(
        &self,
        webhook: &Webhook,
        stats: &WebhookStats,
        batch: &[Value],
        letter: &str,
        pg: &mut Option<tokio_postgres::Client>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<bool> {
        let records = batch;
        let mut delay = self.limits.retry_base;
        loop {
            match self.attempt(webhook, pg, records).await {
                Attempt::Delivered => {
                    stats
                        .delivered
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.totals
                        .delivered
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return Some(true);
                }
                Attempt::Retry(why) => {
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    self.totals.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(webhook = %webhook.id, error = %why, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; will retry");
                    stats.error(why);
                    let jittered = delay.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                    if wait_or_stop(stop, jittered).await {
                        return None;
                    }
                    delay = (delay * 2).min(self.limits.retry_max);
                }
                Attempt::Permanent(status, why) => {
                    tracing::warn!(webhook = %webhook.id, %status, error = %why, records = batch.len(), "webhook refused a batch; dead-lettered");
                    stats.error(why.clone());
                    match self.dead_letter(webhook, status, &why, letter, batch) {
                        Ok(()) => {
                            stats
                                .failed
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                            self.totals
                                .failed
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                            return Some(false);
                        }
                        Err(e) => {
                            // Not stored: the batch is not passed over (it would be lost).
                            tracing::error!(webhook = %webhook.id, error = %e, "cannot store a dead letter; retrying the batch");
                            if wait_or_stop(stop, self.limits.retry_max).await {
                                return None;
                            }
                        }
                    }
                }
            }
        }
    }

    fn dead_letter(
        &self,
        webhook: &Webhook,
        status: u16,
        why: &str,
        id: &str,
        batch: &[Value],
    ) -> Result<(), StorageError> {
        let prefix = dead_prefix(&webhook.id);
        let letter = json!({
            "id": id,
            "at": now_ms(),
            "status": status,
            "error": why,
            "records": batch,
        });
        let mut changes = vec![(
            format!("{prefix}{id}"),
            Some(serde_json::to_vec(&letter).map_err(|e| StorageError::Db(e.to_string()))?),
        )];
        let held = self
            .store
            .kv_keys_prefix(&prefix, self.limits.dead_letters_max + 1)?;
        let new_key = format!("{prefix}{id}");
        let kept = held.iter().filter(|key| **key != new_key).count();
        let over = (kept + 1).saturating_sub(self.limits.dead_letters_max.max(1));
        for key in held.into_iter().filter(|key| *key != new_key).take(over) {
            tracing::warn!(webhook = %webhook.id, %key, "dead-letter list full; the oldest is dropped");
            changes.push((key, None));
        }
        self.store.kv_apply_behind(changes)
    }
}

/// Resolves when broker events may be waiting (never, without a listener).
async fn broker_ready(broker: Option<&Listener>) {
    match broker {
        Some(broker) => broker.ready().await,
        None => std::future::pending().await,
    }
}

/// Sleeps `delay` unless stopped first; true when stopped.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    let stopped = tokio::select! {
        () = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// Writes `records` into the sink's table in one transaction, each once (`id` is the key):
/// connects (and creates the table) when there is no live connection.
async fn write_postgres(
    target: &PostgresTarget,
    pg: &mut Option<tokio_postgres::Client>,
    records: &[Value],
) -> Result<(), tokio_postgres::Error> {
    if pg.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
        let (client, connection) =
            tokio_postgres::connect(&target.connection, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::info!(error = %e, "PostgreSQL sink connection ended");
            }
        });
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS \"{}\" (id text PRIMARY KEY, position bigint NOT NULL, \
                 kind text NOT NULL, thing_name text NOT NULL, client_id text, \
                 at_ms bigint NOT NULL, seq bigint NOT NULL, summary text NOT NULL, \
                 data jsonb NOT NULL)",
                target.table
            ))
            .await?;
        *pg = Some(client);
    }
    let Some(client) = pg.as_mut() else {
        return Ok(());
    };
    let transaction = client.transaction().await?;
    let insert = transaction
        .prepare(&format!(
            "INSERT INTO \"{}\" (id, position, kind, thing_name, client_id, at_ms, seq, summary, data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
            target.table
        ))
        .await?;
    for record in records {
        let text = |field: &str| record[field].as_str().map(str::to_owned);
        let number = |field: &str| record[field].as_u64().map_or(0, |n| n as i64);
        transaction
            .execute(
                &insert,
                &[
                    &text("id").unwrap_or_default(),
                    &number("position"),
                    &text("kind").unwrap_or_default(),
                    &text("thingName").unwrap_or_default(),
                    &text("clientId"),
                    &number("at"),
                    &number("seq"),
                    &text("summary").unwrap_or_default(),
                    &record["data"],
                ],
            )
            .await?;
    }
    transaction.commit().await
}
