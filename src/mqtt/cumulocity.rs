//! Cumulocity devices on the MQTT port (`--cumulocity`): their `s/...` topics are per
//! connection, not per topic name. A device's `s/ds` and `s/e` live in the broker as
//! `$c8y/{device}/s/ds` and `$c8y/{device}/s/e` (a namespace no client may publish in and only
//! superusers may read), a subscription to `s/ds` is a subscription to its own, and its
//! connection sees those messages under the plain name. Rows on `s/us` (and `s/us/{child}` for
//! a child created with 101) are decoded (`crate::cumulocity::templates`) and sent to the
//! device's Thing; every row that cannot be served is answered on `s/e`.
//!
//! Built: identity (the user's Thing, or for a superuser the client id, `d:` prefix allowed),
//! the credential bootstrap (`s/ucr` -> `s/dcr`, see `crate::cumulocity::registrations`), 100,
//! 101 (children, linked in `crate::cumulocity::children`), 105 (`106,...` on `s/ds`),
//! inventory 110-117 into the shadow's `reported`, events 400-402, auto-creation for a
//! superuser's device, operations (a command whose action is `c8y_...` goes down as its row on
//! the `s/ds` of the device, or for a child of the device above it, see `super::effects`; 500
//! sends the pending ones again; 501-506 answer them), alarms 301-307 (the alarm model
//! operators list, acknowledge and clear; one open alarm per type), measurements 200-212
//! (stored in the log, `GET /api/v1/things/{name}/measurements`), errors on `s/e`.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use thinghub_actors::thing::commands::StatusReason;
use thinghub_actors::thing::measurements::{MeasurementValue, RecordMeasurements};
use thinghub_actors::thing::{
    validate_thing_name, AlarmSeverity, CommandExecution, CommandResponse, CommandStatus,
    EventLimits, IngestEvent, Origin, RegisterThing, RejectionKind, ShadowLimits, ShadowUpdate,
    ThingCommand,
};
use thinghub_actors::Things;

use super::acl::{Acl, Identity, BOOTSTRAP_CLIENT_PREFIX, C8Y_NAMESPACE};
use super::broker::{Broker, Message};
use crate::cumulocity::children::{Child, Children};
use crate::cumulocity::registrations::{Registrations, Request};
use crate::cumulocity::smartrest;
use crate::cumulocity::templates::{self, OperationRef, OperationStatus, RowError, Upstream};
use crate::users::{MqttUsers, UserError};

/// The per-connection topics a device may subscribe to.
const DOWN_TOPICS: [&str; 2] = ["s/ds", "s/e"];
/// The attribute a child Thing names its parent device with.
pub const PARENT_ATTRIBUTE: &str = "c8y_parent";
/// Pending executions read to find the one a status row is about (a Thing holds at most
/// `command_pending_max` pending ones).
const PENDING_READ_MAX: usize = 1000;
/// The type a device created without one gets (as Cumulocity's).
const DEFAULT_TYPE: &str = "c8y_MQTTDevice";
/// Length of a password issued to a bootstrapped device (alphanumeric from the OS's CSPRNG:
/// about 190 bits).
const ISSUED_PASSWORD_CHARS: usize = 32;

/// Who asks for credentials on `s/ucr`.
pub struct Asking<'a> {
    /// The connection's address.
    pub peer: &'a str,
    /// Whether this very connection (not a successor under its client id) holds its `s/dcr`
    /// subscription: only then can the answer reach it.
    pub subscribed: bool,
    /// The client's Maximum Packet Size (MQTT 5), if it set one.
    pub packet_bytes_max: Option<usize>,
    /// Whether the asking connection still holds its session (asked again once the
    /// issuance lock is held: a takeover meanwhile would lose the answer).
    pub current: &'a (dyn Fn() -> bool + Sync),
}

/// What the Cumulocity surface works with.
pub struct CumulocityParts {
    /// The broker (rows out).
    pub broker: Arc<Broker>,
    /// The Things.
    pub things: Things,
    /// MQTT users (credentials issued by the bootstrap).
    pub users: Arc<MqttUsers>,
    /// The ACL (a re-issued user's sessions are re-authorized).
    pub acl: Acl,
    /// Device registrations (the bootstrap).
    pub registrations: Arc<Registrations>,
    /// Which device created which child.
    pub children: Children,
    /// The alarm listing (307 looks the alarm up).
    pub alarms: thinghub_actors::alarms::Alarms,
    /// The tenant (`cumulocity_tenant`).
    pub tenant: String,
    /// `cumulocity_children_max`.
    pub children_max: usize,
    /// Shadow bounds (inventory rows).
    pub shadow_limits: ShadowLimits,
    /// Event bounds (event rows).
    pub event_limits: EventLimits,
}

/// The Cumulocity surface's shared state.
pub struct Cumulocity {
    broker: Arc<Broker>,
    things: Things,
    users: Arc<MqttUsers>,
    acl: Acl,
    registrations: Arc<Registrations>,
    children: Children,
    alarms: thinghub_actors::alarms::Alarms,
    tenant: String,
    children_max: usize,
    shadow_limits: ShadowLimits,
    event_limits: EventLimits,
    /// One credentials request served at a time (they are rare; two devices polling with the
    /// same id must not both be issued credentials).
    issuing: tokio::sync::Mutex<()>,
}

impl Cumulocity {
    /// The surface.
    pub fn new(parts: CumulocityParts) -> Cumulocity {
        Cumulocity {
            broker: parts.broker,
            things: parts.things,
            users: parts.users,
            acl: parts.acl,
            registrations: parts.registrations,
            children: parts.children,
            alarms: parts.alarms,
            tenant: parts.tenant,
            children_max: parts.children_max,
            shadow_limits: parts.shadow_limits,
            event_limits: parts.event_limits,
            issuing: tokio::sync::Mutex::new(()),
        }
    }

    /// The username without its tenant prefix (`{tenant}/{user}`), or `None` for another tenant.
    /// The bootstrap user may also come as Cumulocity's `management/{user}`, which devices
    /// are built with.
    pub fn strip_tenant<'u>(&self, username: &'u str) -> Option<&'u str> {
        match username.split_once('/') {
            Some((tenant, user)) if tenant == self.tenant => Some(user),
            Some(("management", user)) if self.users.is_bootstrap(user) => Some(user),
            Some(_) => None,
            None => Some(username),
        }
    }

    /// The device a connection acts as: its user's Thing, or (a superuser's connection, which
    /// Cumulocity identifies by client id) the client id without its `d:` prefix.
    pub fn device_of(identity: &Identity) -> Option<String> {
        if let Some(thing) = &identity.thing {
            return Some(thing.clone());
        }
        if identity.superuser {
            let id = identity
                .client_id
                .strip_prefix("d:")
                .unwrap_or(&identity.client_id);
            return validate_thing_name(id).is_ok().then(|| id.to_owned());
        }
        None
    }

    /// The device a connection with the bootstrap user asks credentials for.
    pub fn bootstrap_device(identity: &Identity) -> Option<&str> {
        identity
            .bootstrap
            .then(|| identity.client_id.strip_prefix(BOOTSTRAP_CLIENT_PREFIX))
            .flatten()
    }

    /// The broker filter a connection's subscription to `filter` stands for, if it is one of
    /// its per-connection topics: a device's `s/ds` and `s/e`, a bootstrap connection's
    /// `s/dcr`.
    pub fn own_subscription(identity: &Identity, filter: &str) -> Option<String> {
        if let Some(device) = Cumulocity::bootstrap_device(identity) {
            return (filter == "s/dcr").then(|| format!("{C8Y_NAMESPACE}/{device}/s/dcr"));
        }
        let device = Cumulocity::device_of(identity)?;
        DOWN_TOPICS
            .contains(&filter)
            .then(|| format!("{C8Y_NAMESPACE}/{device}/{filter}"))
    }

    /// What a connection's own topics start with inside the broker (stripped on the way out).
    pub fn own_prefix_of(identity: &Identity) -> Option<String> {
        Cumulocity::bootstrap_device(identity)
            .map(str::to_owned)
            .or_else(|| Cumulocity::device_of(identity))
            .map(|device| Cumulocity::own_prefix(&device))
    }

    fn own_prefix(device: &str) -> String {
        format!("{C8Y_NAMESPACE}/{device}/")
    }

    /// A bootstrap connection from `peer` published on `s/ucr`: asks for `device`'s
    /// credentials. Nothing is answered until an operator accepted its registration; then the
    /// next request from a connection subscribed to its `s/dcr` gets, once, the row
    /// `70,{tenant},{username},{password}` to write to that connection: a new MQTT user bound
    /// to the device's Thing (registered now if absent).
    pub async fn credentials_requested(&self, device: &str, asking: &Asking<'_>) -> Option<String> {
        let peer = asking.peer;
        let _issuing = self.issuing.lock().await;
        let now = self.things.now_ms();
        match self
            .registrations
            .requested(device, now, peer, asking.subscribed)
            .await
        {
            Ok(Request::Unknown) => {
                tracing::info!(%device, %peer, "credentials requested for a device that is not registered; nothing sent");
            }
            Ok(Request::Pending) => {
                tracing::debug!(%device, %peer, "credentials requested; waiting for an operator to accept the device");
            }
            Ok(Request::Issued) => {
                tracing::info!(%device, %peer, "credentials requested again; they were issued once already, nothing sent");
            }
            Ok(Request::Moved) => {
                tracing::warn!(%device, %peer, "credentials requested from another address than the one accepted; pending acceptance again");
            }
            Ok(Request::Issue) if !asking.subscribed || !(asking.current)() => {
                tracing::info!(%device, %peer, "credentials requested by a connection not subscribed to s/dcr (or no longer current); nothing issued");
            }
            Ok(Request::Issue) => match self.issue(device, asking, now).await {
                Ok(row) => {
                    if row.is_some() {
                        tracing::info!(%device, %peer, "device credentials issued on s/dcr");
                    }
                    return row;
                }
                Err(e) => {
                    tracing::error!(%device, error = %e, "device credentials could not be issued; the next request tries again");
                }
            },
            Err(e) => tracing::error!(%device, error = %e, "device registration unreadable"),
        }
        None
    }

    /// Makes `device`'s credentials: checks what they will be bound to and that their row
    /// fits the connection, records them issued (durably, so they are issued once), then
    /// writes the Thing and the user; a failure there takes the issuance back. The `70` row,
    /// `None` if the registration went away or was served meanwhile.
    async fn issue(
        &self,
        device: &str,
        asking: &Asking<'_>,
        now: u64,
    ) -> Result<Option<String>, String> {
        match self.things.describe(device).await {
            Ok(thing) if thing.mqtt_client_id != device => {
                return Err(format!(
                    "Thing '{device}' connects with client id '{}', not its name: its device cannot use bootstrapped credentials",
                    thing.mqtt_client_id
                ));
            }
            Ok(thing) if thing.attributes.contains_key(PARENT_ATTRIBUTE) => {
                // A child is its gateway's to speak for: credentials of its own would let
                // the gateway's device and this one both act as it.
                return Err(format!(
                    "Thing '{device}' is a child of '{}': a child device gets no credentials of its own",
                    thing.attributes[PARENT_ATTRIBUTE]
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind == RejectionKind::ThingNotFound => {
                if let Ok(Some(owner)) = self.users.client_id_reserved_by(device) {
                    return Err(format!(
                        "client id '{device}' belongs to Thing '{owner}': the device's Thing cannot be registered"
                    ));
                }
            }
            Err(e) => return Err(e.message),
        }
        let username = format!("device_{device}");
        let replace = match self.users.get(&username) {
            Ok(user) if user.thing_name.as_deref() == Some(device) && !user.superuser => true,
            Ok(_) => {
                return Err(format!(
                    "MQTT user '{username}' exists and is not a plain user bound to Thing '{device}': delete it to bootstrap this device"
                ))
            }
            Err(UserError::NotFound(_)) => false,
            Err(e) => return Err(e.to_string()),
        };
        use rand::distributions::Alphanumeric;
        use rand::Rng;
        let password: String = rand::rngs::OsRng
            .sample_iter(&Alphanumeric)
            .take(ISSUED_PASSWORD_CHARS)
            .map(char::from)
            .collect();
        let row = smartrest::write_row(&[
            "70",
            self.tenant.as_str(),
            username.as_str(),
            password.as_str(),
        ]);
        // The PUBLISH: a fixed header of at most 5 bytes, the topic `s/dcr` with its length.
        let packet_bytes = 5 + 2 + "s/dcr".len() + row.len();
        if asking
            .packet_bytes_max
            .is_some_and(|max| packet_bytes > max)
        {
            return Err(format!(
                "the credentials ({packet_bytes} bytes) exceed the connection's Maximum Packet Size"
            ));
        }
        if !(asking.current)() {
            return Ok(None);
        }
        if !self
            .registrations
            .issued(device, &username, asking.peer, now)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(None);
        }
        if let Err(e) = self
            .make_credentials(device, &username, &password, replace, now)
            .await
        {
            if let Err(undo) = self.registrations.unissue(device, now).await {
                tracing::error!(%device, error = %undo, "an issuance that failed could not be taken back");
            }
            return Err(e);
        }
        if replace {
            // A device bootstrapped again: its old password stops working now.
            super::revoke_user(&self.broker, &self.acl, &self.users, &username);
        }
        Ok(Some(row))
    }

    /// The credentials row for `device` could not be written to its connection: the issuance
    /// is taken back so its next request gets new ones.
    pub async fn credentials_lost(&self, device: &str) {
        let _issuing = self.issuing.lock().await;
        tracing::warn!(%device, "the credentials row could not be written; the issuance is taken back");
        if let Err(e) = self
            .registrations
            .unissue(device, self.things.now_ms())
            .await
        {
            tracing::error!(%device, error = %e, "an issuance that was not delivered could not be taken back");
        }
    }

    /// Whether `device` has a registration (a bootstrap connection for any other id is
    /// refused: it could only hold a connection slot).
    pub fn is_registered(&self, device: &str) -> bool {
        self.registrations.get(device).is_ok()
    }

    /// Registers `device`'s Thing if absent and writes its user (every field, so a change made
    /// to the user since it was checked is not inherited).
    async fn make_credentials(
        &self,
        device: &str,
        username: &str,
        password: &str,
        replace: bool,
        now: u64,
    ) -> Result<(), String> {
        if self.things.ensure_registered(device).is_err() {
            self.register(device, None, None, None)
                .await
                .map_err(|e| e.message)?;
        }
        let users = self.users.clone();
        let (username, password, device) =
            (username.to_owned(), password.to_owned(), device.to_owned());
        // argon2 hashing: off the async workers.
        tokio::task::spawn_blocking(move || {
            tokio::runtime::Handle::current().block_on(async {
                if replace {
                    users
                        .update(&username, Some(&password), Some(Some(device)), Some(false))
                        .await
                        .map(|_| ())
                } else {
                    users
                        .create(&username, &password, Some(device), false, now)
                        .await
                        .map(|_| ())
                }
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Whether `topic` is in Cumulocity's namespace (`s/...`).
    pub fn is_c8y_topic(topic: &str) -> bool {
        topic == "s" || topic.starts_with("s/")
    }

    fn send(&self, device: &str, topic: &str, rows: &[String]) {
        send_rows(&self.broker, device, topic, rows);
    }

    /// A device published `payload` on `topic` (`s/us` or `s/us/{child}`; other `s/` topics
    /// are refused before). Rows are served in order; the errors go to its `s/e`.
    pub async fn upstream(&self, identity: &Identity, topic: &str, payload: &[u8]) {
        let Some(device) = Cumulocity::device_of(identity) else {
            return;
        };
        let errors = self.serve(identity, &device, topic, payload).await;
        if !errors.is_empty() {
            tracing::info!(%device, errors = errors.len(), "SmartREST rows refused; answered on s/e");
        }
        let rows: Vec<String> = errors.iter().map(RowError::to_row).collect();
        self.send(&device, "s/e", &rows);
    }

    async fn serve(
        &self,
        identity: &Identity,
        device: &str,
        topic: &str,
        payload: &[u8],
    ) -> Vec<RowError> {
        let text = match std::str::from_utf8(payload) {
            Ok(text) => text,
            Err(_) => return vec![error(44, "0", "the message is not UTF-8")],
        };
        let rows = match smartrest::parse(text) {
            Ok(rows) => rows,
            Err(e) => return vec![error(44, "0", e.to_string())],
        };
        let target = match topic.strip_prefix("s/us") {
            Some("") => device.to_owned(),
            Some(rest) => match rest.strip_prefix('/') {
                Some(child) => match self.child_of(device, child).await {
                    Ok(child) => child,
                    Err(e) => {
                        let template = rows.first().and_then(|r| r.first()).cloned();
                        return vec![RowError {
                            template: template.unwrap_or_else(|| "0".into()),
                            ..e
                        }];
                    }
                },
                None => {
                    return vec![error(
                        43,
                        "0",
                        format!("'{topic}' is not a topic to publish on"),
                    )]
                }
            },
            None => {
                return vec![error(
                    43,
                    "0",
                    format!("'{topic}' is not a topic to publish on"),
                )]
            }
        };
        let mut errors = Vec::new();
        for row in &rows {
            let template: String = row
                .first()
                .map(|t| t.chars().take(16).collect())
                .unwrap_or_default();
            let outcome = match templates::decode(row) {
                Ok(request) => self.act(identity, device, &target, request).await,
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                errors.push(RowError { template, ..e });
            }
        }
        errors
    }

    /// The Thing of `device`'s child `child`, if it is one (created by 101 from this device).
    async fn child_of(&self, device: &str, child: &str) -> Result<String, RowError> {
        let name = child_name(device, child)?;
        match self.things.describe(&name).await {
            Ok(description) => {
                let parent = description.attributes.get(PARENT_ATTRIBUTE);
                if parent.map(String::as_str) == Some(device) {
                    Ok(name)
                } else {
                    Err(error(
                        43,
                        "0",
                        format!("'{child}' is not a child of '{device}'"),
                    ))
                }
            }
            Err(e) if e.kind == RejectionKind::ThingNotFound => Err(error(
                45,
                "0",
                format!("no child device '{child}' (create it with 101 first)"),
            )),
            Err(e) => Err(error(42, "0", e.message)),
        }
    }

    async fn act(
        &self,
        identity: &Identity,
        device: &str,
        target: &str,
        request: Upstream,
    ) -> Result<(), RowError> {
        match request {
            Upstream::CreateDevice { name, device_type } => {
                // As Cumulocity: an existing device is answered `41,100,Device already
                // existing` (agents wait for that row).
                if self.things.ensure_registered(target).is_ok() {
                    return Err(error(41, "100", "Device already existing"));
                }
                self.ensure(identity, target, name, device_type, None).await
            }
            Upstream::CreateChild {
                id,
                name,
                device_type,
            } => {
                // Children of children cannot be addressed here (`s/us/{child}` is one level),
                // so they are not made.
                if target != device {
                    return Err(error(
                        43,
                        "101",
                        "a child device cannot have children of its own here: send 101 on s/us",
                    ));
                }
                // A child's Thing is named under its parent's (`{parent}:{child}`): a device
                // can never take a name that is not its own.
                let child = child_name(target, &id)?;
                self.ensure(identity, target, None, None, None).await?;
                match self.things.describe(&child).await {
                    Ok(existing) => {
                        let parent = existing.attributes.get(PARENT_ATTRIBUTE);
                        if parent.map(String::as_str) != Some(target) {
                            return Err(error(
                                43,
                                "101",
                                format!("'{child}' exists and is not a child of '{target}'"),
                            ));
                        }
                        // Its link, if a crash came between its registration and the link (or
                        // it predates the links): gateways send 101 at every start.
                        match self.children.parent_of(&child) {
                            Ok(Some(_)) => Ok(()),
                            Ok(None) => self.link(target, &id, &child).await,
                            Err(e) => Err(error(42, "101", e.to_string())),
                        }
                    }
                    Err(e) if e.kind == RejectionKind::ThingNotFound => {
                        self.check_children_bound(target, &id)?;
                        self.register(&child, name, device_type, Some(target))
                            .await?;
                        self.link(target, &id, &child).await
                    }
                    Err(e) => Err(error(42, "101", e.message)),
                }
            }
            Upstream::Inventory { fragment, value } => {
                self.ensure(identity, target, None, None, None).await?;
                let body = json!({"state": {"reported": {fragment: value}}});
                let update = ShadowUpdate::from_value(body, &self.shadow_limits)
                    .map_err(|e| error(41, "0", e.message))?;
                self.things
                    .update_shadow(target, update, Origin::Device)
                    .await
                    .map(|_| ())
                    .map_err(row_error)
            }
            Upstream::Event {
                event_type,
                text,
                time,
                data,
            } => {
                self.ensure(identity, target, None, None, None).await?;
                let mut data = data;
                if let Some(text) = text {
                    data.insert("text".into(), Value::String(text));
                }
                let body = json!({"eventType": event_type, "severity": "info", "data": data});
                let mut event = IngestEvent::from_json(&body, None, &self.event_limits)
                    .map_err(|e| error(41, "0", e.message))?;
                event.timestamp_ms = time.as_deref().and_then(templates::iso8601_ms);
                self.things
                    .ingest_event(target, event)
                    .await
                    .map(|_| ())
                    .map_err(row_error)
            }
            Upstream::OperationStatus {
                target: which,
                status,
            } => self.operation_status(target, which, status).await,
            Upstream::PendingOperations => {
                let pending = self.pending(target).await?;
                let (_, id) = route(&self.children, target);
                let rows: Vec<String> = pending
                    .iter()
                    .filter_map(|execution| operation_row(&id, execution))
                    .filter_map(Result::ok)
                    .collect();
                self.send(device, "s/ds", &rows);
                Ok(())
            }
            Upstream::RaiseAlarm {
                severity,
                alarm_type,
                text,
                time: _,
            } => {
                self.ensure(identity, target, None, None, None).await?;
                let command = ThingCommand::RaiseAlarm {
                    alarm_type,
                    severity: alarm_severity(severity),
                    text,
                };
                self.things
                    .device_alarm(target, command)
                    .await
                    .map(|_| ())
                    .map_err(row_error)
            }
            Upstream::AlarmSeverity {
                alarm_type,
                severity,
            } => {
                let command = ThingCommand::ChangeAlarmSeverity {
                    alarm_type,
                    severity: alarm_severity(severity),
                };
                self.things
                    .device_alarm(target, command)
                    .await
                    .map(|_| ())
                    .map_err(row_error)
            }
            Upstream::ClearAlarm { alarm_type } => self
                .things
                .device_alarm(target, ThingCommand::ClearDeviceAlarm { alarm_type })
                .await
                .map(|_| ())
                .map_err(row_error),
            Upstream::Measurements {
                measurement_type,
                values,
                time,
            } => {
                self.ensure(identity, target, None, None, None).await?;
                let record = RecordMeasurements {
                    measurement_type,
                    values: values
                        .into_iter()
                        .map(|v| MeasurementValue {
                            fragment: v.fragment,
                            series: v.series,
                            value: v.value,
                            unit: v.unit,
                        })
                        .collect(),
                    time_ms: time.as_deref().and_then(templates::iso8601_ms),
                };
                self.things
                    .record_measurements(target, record)
                    .await
                    .map_err(row_error)
            }
            Upstream::ListChildren => {
                self.ensure(identity, target, None, None, None).await?;
                let mut row = vec!["106".to_owned()];
                row.extend(self.live_children(target)?.into_iter().map(|c| c.id));
                self.send(device, "s/ds", &[smartrest::write_row(&row)]);
                Ok(())
            }
            Upstream::ClearAlarmFragment {
                alarm_type,
                fragment,
            } => {
                // Alarms here carry no custom fragments (301-304 give type, text and time),
                // so removing one from an open alarm leaves it as it is.
                let open = self
                    .alarms
                    .of_thing(target)
                    .map_err(row_error)?
                    .into_iter()
                    .any(|a| {
                        a.alarm.alarm_type == alarm_type
                            && a.alarm.status != thinghub_actors::thing::AlarmStatus::Cleared
                    });
                if open {
                    tracing::debug!(%target, %alarm_type, %fragment, "307: the alarm has no such fragment");
                    Ok(())
                } else {
                    Err(error(
                        45,
                        "307",
                        format!("no open alarm of type '{alarm_type}'"),
                    ))
                }
            }
        }
    }

    async fn link(&self, parent: &str, id: &str, child: &str) -> Result<(), RowError> {
        self.children
            .link(parent, id, child)
            .await
            .map_err(|e| error(42, "101", e.to_string()))
    }

    /// `parent`'s children whose Thing is the one linked; a link whose Thing was deleted (or
    /// replaced) is dropped on the way.
    fn live_children(&self, parent: &str) -> Result<Vec<Child>, RowError> {
        let links = self
            .children
            .of(parent, usize::MAX)
            .map_err(|e| error(42, "0", e.to_string()))?;
        let mut live = Vec::with_capacity(links.len());
        for child in links {
            if child.live {
                live.push(child);
            } else if let Err(e) = self.children.unlink(parent, &child.id, &child.thing) {
                tracing::warn!(%parent, child = %child.thing, error = %e, "stale child link not dropped");
            }
        }
        Ok(live)
    }

    /// Refuses a new child `id` past `cumulocity_children_max` for `parent`.
    fn check_children_bound(&self, parent: &str, id: &str) -> Result<(), RowError> {
        let live = self.live_children(parent)?;
        if live.len() >= self.children_max && !live.iter().any(|known| known.id == id) {
            return Err(error(
                43,
                "101",
                format!(
                    "'{parent}' has {} children already (cumulocity_children_max)",
                    self.children_max
                ),
            ));
        }
        Ok(())
    }

    /// `target`'s pending executions (SENT or IN_PROGRESS), oldest first.
    async fn pending(&self, target: &str) -> Result<Vec<CommandExecution>, RowError> {
        let mut pending = Vec::new();
        for status in [CommandStatus::Sent, CommandStatus::InProgress] {
            let page = self
                .things
                .list_commands(target, Some(status), None, PENDING_READ_MAX)
                .await
                .map_err(row_error)?;
            pending.extend(page.items);
        }
        pending.sort_by_key(|e| (e.created_at_ms, e.execution_id.clone()));
        Ok(pending)
    }

    /// 501-506: moves the oldest pending execution of a fragment (or the one named) like a
    /// command answer: EXECUTING is IN_PROGRESS, FAILED and SUCCESSFUL end it.
    async fn operation_status(
        &self,
        target: &str,
        which: OperationRef,
        status: OperationStatus,
    ) -> Result<(), RowError> {
        let execution_id = match which {
            OperationRef::Id(id) => id,
            OperationRef::Fragment(fragment) => self
                .pending(target)
                .await?
                .into_iter()
                .find(|e| e.action == fragment)
                .map(|e| e.execution_id)
                .ok_or_else(|| error(45, "0", format!("no pending operation '{fragment}'")))?,
        };
        let (status, result, status_reason) = match status {
            OperationStatus::Executing => ("IN_PROGRESS", None, None),
            OperationStatus::Failed(reason) => (
                "FAILED",
                None,
                Some(StatusReason {
                    reason_code: "DEVICE_FAILED".into(),
                    reason_description: (!reason.is_empty()).then_some(reason),
                }),
            ),
            OperationStatus::Successful(parameters) => (
                "SUCCEEDED",
                (!parameters.is_empty()).then(|| {
                    let mut result = Map::new();
                    result.insert("parameters".into(), json!(parameters));
                    result
                }),
                None,
            ),
        };
        self.things
            .respond_command(
                target,
                CommandResponse {
                    execution_id,
                    status: status.into(),
                    result,
                    status_reason,
                },
            )
            .await
            .map(|_| ())
            .map_err(row_error)
    }

    /// Makes sure `target`'s Thing exists: a superuser's device is created on its first row
    /// (auto-creation, as Cumulocity does); a Thing's user always has its Thing.
    async fn ensure(
        &self,
        identity: &Identity,
        target: &str,
        name: Option<String>,
        device_type: Option<String>,
        parent: Option<&str>,
    ) -> Result<(), RowError> {
        match self.things.ensure_registered(target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind == RejectionKind::ThingNotFound && identity.superuser => {
                self.register(target, name, device_type, parent).await
            }
            Err(e) => Err(error(code_of(e.kind), "0", e.message)),
        }
    }

    async fn register(
        &self,
        name: &str,
        display: Option<String>,
        device_type: Option<String>,
        parent: Option<&str>,
    ) -> Result<(), RowError> {
        let mut attributes = std::collections::BTreeMap::new();
        if let Some(display) = display {
            attributes.insert("name".to_owned(), display);
        }
        if let Some(parent) = parent {
            attributes.insert(PARENT_ATTRIBUTE.to_owned(), parent.to_owned());
        }
        let registered = self
            .things
            .register(
                name,
                RegisterThing {
                    // The plain id: the Thing's own user may then connect with it or its `d:`
                    // form, and a superuser's connection in the `d:` form (the one creating
                    // it) is not taken over by the reservation.
                    mqtt_client_id: Some(name.to_owned()),
                    thing_type: Some(device_type.unwrap_or_else(|| DEFAULT_TYPE.to_owned())),
                    attributes,
                },
            )
            .await;
        match registered {
            Ok(_) => {
                tracing::info!(device = %name, parent = ?parent, "Cumulocity device created");
                Ok(())
            }
            // Created meanwhile by another row or request: it exists, which is what was asked
            // (any other conflict, such as a client id another Thing holds, is an error).
            Err(e)
                if e.kind == RejectionKind::AlreadyExists
                    && self.things.ensure_registered(name).is_ok() =>
            {
                Ok(())
            }
            Err(e) => Err(error(code_of(e.kind), "0", e.message)),
        }
    }
}

/// Publishes `rows` on `device`'s own `topic` (`s/ds`, `s/e`), QoS 1 (a persistent session
/// keeps them while the device is away).
pub fn send_rows(broker: &Broker, device: &str, topic: &str, rows: &[String]) {
    if rows.is_empty() {
        return;
    }
    let _ = broker.publish(Message {
        topic: Arc::from(format!("{}{topic}", Cumulocity::own_prefix(device))),
        payload: Bytes::from(rows.join("\n")),
        qos: 1,
        retain: false,
        publisher: None,
        properties: None,
        expires_at: None,
    });
}

/// Where `thing`'s operations go: (the device whose `s/ds` carries them, the id its rows name);
/// itself when the links cannot be read (logged).
pub fn route(children: &Children, thing: &str) -> (String, String) {
    children.route(thing).unwrap_or_else(|e| {
        tracing::warn!(%thing, error = %e, "child links unreadable; the operation goes on the Thing's own s/ds");
        (thing.to_owned(), thing.to_owned())
    })
}

/// The `s/ds` row of a command to a Cumulocity device, if its action is an operation
/// (`c8y_...`) this surface renders.
pub fn operation_row(device: &str, execution: &CommandExecution) -> Option<Result<String, String>> {
    execution.action.starts_with("c8y_").then(|| {
        templates::operation_row(
            device,
            &execution.action,
            execution.params.as_ref().unwrap_or(&Map::new()),
        )
    })
}

/// The Thing name of `parent`'s child `child`.
fn child_name(parent: &str, child: &str) -> Result<String, RowError> {
    let name = format!("{parent}:{child}");
    if validate_thing_name(child).is_err() || validate_thing_name(&name).is_err() {
        return Err(error(
            41,
            "0",
            format!(
                "'{}' is not a valid child id (its Thing '{parent}:{{id}}' must be a valid Thing name)",
                child.chars().take(64).collect::<String>()
            ),
        ));
    }
    Ok(name)
}

fn error(code: u16, template: &str, message: impl Into<String>) -> RowError {
    RowError {
        code,
        template: template.to_owned(),
        message: message.into(),
    }
}

fn alarm_severity(severity: templates::Severity) -> AlarmSeverity {
    match severity {
        templates::Severity::Critical => AlarmSeverity::Critical,
        templates::Severity::Major => AlarmSeverity::Major,
        templates::Severity::Minor => AlarmSeverity::Minor,
        templates::Severity::Warning => AlarmSeverity::Warning,
    }
}

/// A Thing's refusal as an `s/e` row.
fn row_error(e: thinghub_actors::thing::Rejection) -> RowError {
    error(code_of(e.kind), "0", e.message)
}

/// The `s/e` code of a Thing's refusal.
fn code_of(kind: RejectionKind) -> u16 {
    match kind {
        RejectionKind::ThingNotFound | RejectionKind::ExecutionNotFound => 45,
        RejectionKind::InvalidRequest
        | RejectionKind::InvalidJson
        | RejectionKind::PayloadTooLarge
        | RejectionKind::UnsupportedEncoding
        | RejectionKind::VersionConflict
        | RejectionKind::AlreadyExists
        | RejectionKind::TerminalStateReached
        | RejectionKind::InvalidStateTransition
        | RejectionKind::ShadowNotFound => 41,
        _ => 42,
    }
}
