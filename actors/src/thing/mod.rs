//! The Thing domain: pure `decide` and `apply` over a Thing's state.
//!
//! `decide(&state, command, now_ms, limits)` holds all the rules and returns the events to append
//! plus the reply they will produce; `apply(&mut state, &event)` only folds an event in. No IO,
//! no clock, no async: the actor shell (`crate::thing_actor`) persists events before applying
//! them and replying.
//!
//! **Architecture invariant:** nothing under `thing/` imports tokio, ractor, sled, rumqttd or axum.

pub mod alarms;
pub mod commands;
pub mod effects;
pub mod events;
pub mod jobs;
pub mod measurements;
pub mod shadow;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use alarms::{Alarm, AlarmEvent, AlarmSeverity, AlarmStatus, OfflineRule};
pub use commands::{
    CommandEvent, CommandExecution, CommandLimits, CommandOutcome, CommandResponse, CommandStatus,
    Commands, SendCommand,
};
pub use events::{EventIngested, EventLimits, IngestEvent, Severity};
pub use shadow::{Origin, Shadow, ShadowDeleted, ShadowLimits, ShadowUpdate, ShadowUpdated};

/// Longest Thing name, in bytes (as AWS IoT).
pub const THING_NAME_BYTES_MAX: usize = 128;
/// Longest MQTT client id bound to a Thing, in bytes.
pub const CLIENT_ID_BYTES_MAX: usize = 128;
/// Most attributes on one Thing.
pub const ATTRIBUTES_COUNT_MAX: usize = 50;
/// Longest attribute name, in bytes.
pub const ATTRIBUTE_NAME_BYTES_MAX: usize = 128;
/// Longest attribute value, in bytes.
pub const ATTRIBUTE_VALUE_BYTES_MAX: usize = 800;

/// The contract's error codes (the same numbers on MQTT `rejected` payloads and HTTP statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request is malformed.
    BadRequest,
    /// 401: missing or wrong credentials.
    Unauthorized,
    /// 403: authenticated, but not allowed.
    Forbidden,
    /// 404: no such Thing or shadow.
    NotFound,
    /// 409: version conflict or the resource already exists.
    Conflict,
    /// 413: the document or payload is too large.
    PayloadTooLarge,
    /// 415: the payload is not UTF-8.
    UnsupportedEncoding,
    /// 429: too many requests in flight.
    TooManyRequests,
    /// 500: the server failed; details are logged, not returned.
    Internal,
    /// 503: the Thing cannot be served right now (e.g. its log failed to replay).
    Unavailable,
}

impl ErrorCode {
    /// The numeric code of the contract.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedEncoding => 415,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// A refused request: a reply value, never an actor error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {message}", kind.code().as_u16())]
pub struct Rejection {
    /// What went wrong; the contract's code (HTTP status, MQTT `code`) follows from it.
    pub kind: RejectionKind,
    /// Human-readable, specific message.
    pub message: String,
    /// The request's client token, echoed back.
    pub client_token: Option<String>,
}

/// Why a request was refused: frontends map it to their protocol's codes and names (HTTP
/// status, the shadow `code`, AWS IoT `RejectedErrorCode`), never the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    /// The request is malformed or breaks a rule of the contract.
    InvalidRequest,
    /// The payload is not valid JSON.
    InvalidJson,
    /// The document or payload is too large.
    PayloadTooLarge,
    /// The payload is not UTF-8.
    UnsupportedEncoding,
    /// No such Thing.
    ThingNotFound,
    /// The Thing has no shadow document.
    ShadowNotFound,
    /// No such command or job execution.
    ExecutionNotFound,
    /// The request named a version that is not the current one.
    VersionConflict,
    /// What the request would create exists (a Thing, an execution id, a client id).
    AlreadyExists,
    /// The command or job execution already ended.
    TerminalStateReached,
    /// The execution's current status does not allow the change asked for (a device setting a
    /// service-only status, canceling a job in progress without force).
    InvalidStateTransition,
    /// Too many requests in flight, or too many pending commands.
    TooManyRequests,
    /// The Thing did not answer in time.
    Timeout,
    /// The Thing cannot be served right now (its log cannot be read or replayed).
    Unavailable,
    /// The server failed; details are logged, not returned.
    Internal,
}

impl RejectionKind {
    /// The AWS IoT error code (`RejectedErrorCode` of Commands; Jobs use the same names but
    /// [`RejectionKind::aws_jobs_error_code`] for a version conflict).
    pub fn aws_error_code(self) -> &'static str {
        match self {
            RejectionKind::InvalidJson => "InvalidJson",
            RejectionKind::InvalidRequest
            | RejectionKind::PayloadTooLarge
            | RejectionKind::UnsupportedEncoding => "InvalidRequest",
            RejectionKind::ThingNotFound
            | RejectionKind::ShadowNotFound
            | RejectionKind::ExecutionNotFound => "ResourceNotFound",
            RejectionKind::TerminalStateReached => "TerminalStateReached",
            RejectionKind::VersionConflict
            | RejectionKind::AlreadyExists
            | RejectionKind::InvalidStateTransition => "InvalidStateTransition",
            RejectionKind::TooManyRequests => "RequestThrottled",
            RejectionKind::Timeout | RejectionKind::Unavailable | RejectionKind::Internal => {
                "InternalError"
            }
        }
    }

    /// The AWS IoT Jobs error code: a version conflict is a `VersionMismatch`.
    pub fn aws_jobs_error_code(self) -> &'static str {
        match self {
            RejectionKind::VersionConflict => "VersionMismatch",
            other => other.aws_error_code(),
        }
    }

    /// The contract's code.
    pub fn code(self) -> ErrorCode {
        match self {
            RejectionKind::InvalidRequest | RejectionKind::InvalidJson => ErrorCode::BadRequest,
            RejectionKind::PayloadTooLarge => ErrorCode::PayloadTooLarge,
            RejectionKind::UnsupportedEncoding => ErrorCode::UnsupportedEncoding,
            RejectionKind::ThingNotFound
            | RejectionKind::ShadowNotFound
            | RejectionKind::ExecutionNotFound => ErrorCode::NotFound,
            RejectionKind::VersionConflict
            | RejectionKind::AlreadyExists
            | RejectionKind::TerminalStateReached
            | RejectionKind::InvalidStateTransition => ErrorCode::Conflict,
            RejectionKind::TooManyRequests => ErrorCode::TooManyRequests,
            RejectionKind::Timeout | RejectionKind::Unavailable => ErrorCode::Unavailable,
            RejectionKind::Internal => ErrorCode::Internal,
        }
    }
}

impl Rejection {
    /// A rejection without a client token.
    pub fn new(kind: RejectionKind, message: impl Into<String>) -> Rejection {
        Rejection {
            kind,
            message: message.into(),
            client_token: None,
        }
    }

    /// An invalid request with `message`.
    pub fn bad_request(message: impl Into<String>) -> Rejection {
        Rejection::new(RejectionKind::InvalidRequest, message)
    }

    /// The contract's code.
    pub fn code(&self) -> ErrorCode {
        self.kind.code()
    }

    /// The same rejection carrying `token`.
    pub fn with_token(mut self, token: Option<String>) -> Rejection {
        self.client_token = token;
        self
    }
}

/// Checks a Thing name: 1..=128 bytes of `[a-zA-Z0-9:_-]` (safe inside MQTT topics and URLs).
pub fn validate_thing_name(name: &str) -> Result<(), Rejection> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if name.is_empty() || name.len() > THING_NAME_BYTES_MAX || !valid_chars {
        return Err(Rejection::new(
            RejectionKind::InvalidRequest,
            format!(
                "invalid thingName '{}': 1..={THING_NAME_BYTES_MAX} characters of [a-zA-Z0-9:_-]",
                name.chars()
                    .take(THING_NAME_BYTES_MAX + 1)
                    .collect::<String>()
            ),
        ));
    }
    Ok(())
}

/// All the bounds the domain enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Shadow document bounds.
    pub shadow: ShadowLimits,
    /// Event bounds.
    pub events: EventLimits,
    /// Command bounds.
    pub commands: CommandLimits,
    /// Job execution bounds.
    pub jobs: jobs::JobLimits,
}

/// A Thing's registry record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The MQTT client id the device connects with (defaults to the Thing name).
    pub mqtt_client_id: String,
    /// Optional type label.
    #[serde(default)]
    pub thing_type: Option<String>,
    /// Free-form string attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Unix ms of registration.
    pub created_at_ms: u64,
}

/// Everything a Thing actor owns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThingState {
    /// The Thing's name (its identity in topics and URLs).
    pub name: String,
    /// `Some` while registered; `None` before registration and after deletion.
    #[serde(default)]
    pub registration: Option<Registration>,
    /// The device shadow.
    #[serde(default)]
    pub shadow: Shadow,
    /// Sequence number of the last event applied.
    #[serde(default)]
    pub last_seq: u64,
    /// MQTT connection status.
    #[serde(default)]
    pub connection: ConnectionStatus,
    /// Unix ms of the last accepted device event.
    #[serde(default)]
    pub last_event_at_ms: Option<u64>,
    /// Unix ms of the device's last data (a shadow update, an event, measurements, a device
    /// alarm): what a required interval watches. A shadow update counts from the start of its
    /// second (its event keeps seconds): the watch may fire under a second early.
    #[serde(default)]
    pub last_data_at_ms: Option<u64>,
    /// Command executions: pending (with deadlines) and recently finished. Added in snapshot
    /// shape v2; a v1 snapshot decodes with none.
    #[serde(default)]
    pub commands: Commands,
    /// Job executions: pending (with timers) and recently finished. Added in snapshot shape
    /// v3; an older snapshot decodes with none.
    #[serde(default)]
    pub jobs: jobs::JobExecutions,
    /// Offline watches and alarms.
    #[serde(default)]
    pub alarms: alarms::Alarms,
}

/// Whether the Thing's MQTT client is connected, and since when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// A client is connected as this Thing now.
    #[serde(default)]
    pub online: bool,
    /// The client id of the current (or last) connection.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The broker's id of the current (or last) connection.
    #[serde(default)]
    pub connection_id: u64,
    /// Unix ms of the last connect.
    #[serde(default)]
    pub connected_at_ms: Option<u64>,
    /// Unix ms of the last disconnect.
    #[serde(default)]
    pub disconnected_at_ms: Option<u64>,
    /// Why the last connection ended.
    #[serde(default)]
    pub disconnect_reason: Option<String>,
}

impl ThingState {
    /// The device's required interval (Cumulocity's 117), ms, if it has one.
    pub fn required_interval_ms(&self) -> Option<u64> {
        alarms::required_interval_ms(&self.shadow.reported)
    }

    /// The empty state of a Thing that has no history.
    pub fn new(name: impl Into<String>) -> ThingState {
        ThingState {
            name: name.into(),
            ..ThingState::default()
        }
    }

    /// The Thing's earliest deadline (a command's or a job execution's): its deadline index entry.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        [
            self.commands.next_deadline_ms(),
            self.jobs.next_deadline_ms(),
            self.alarms.next_deadline_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The earliest deadline once `decision`'s events are applied (not applied yet).
    pub fn next_deadline_after(&self, decision: &Decision) -> Option<u64> {
        let commands = self.commands.next_deadline_after(decision.command_events());
        let jobs = if decision.job_events().next().is_some() {
            let mut jobs = self.jobs.clone();
            for event in decision.job_events() {
                jobs.apply(event);
            }
            jobs.next_deadline_ms()
        } else {
            self.jobs.next_deadline_ms()
        };
        let alarms = if decision.alarm_events().next().is_some() {
            let mut alarms = self.alarms.clone();
            for event in decision.alarm_events() {
                alarms.apply(event);
            }
            alarms.next_deadline_ms()
        } else {
            self.alarms.next_deadline_ms()
        };
        [commands, jobs, alarms].into_iter().flatten().min()
    }
}

/// Register a Thing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterThing {
    /// MQTT client id; defaults to the Thing name.
    pub mqtt_client_id: Option<String>,
    /// Optional type label.
    pub thing_type: Option<String>,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A request that may change a Thing.
#[derive(Debug, Clone, PartialEq)]
pub enum ThingCommand {
    /// Register the Thing (409 if it is registered).
    Register(RegisterThing),
    /// Delete the Thing (its history stays in the log).
    Delete,
    /// Update the shadow.
    UpdateShadow {
        /// The validated request.
        update: ShadowUpdate,
        /// Who asks.
        origin: Origin,
        /// Render `update/documents` (previous and current) in the reply.
        want_documents: bool,
    },
    /// Delete the shadow document (the version is kept).
    DeleteShadow {
        /// Echoed back.
        client_token: Option<String>,
        /// Who asks.
        origin: Origin,
    },
    /// Store a device event.
    IngestEvent(IngestEvent),
    /// The Thing's MQTT client connected.
    RecordConnected {
        /// MQTT client id.
        client_id: String,
        /// The broker's id of this connection.
        connection_id: u64,
    },
    /// The Thing's MQTT client disconnected.
    RecordDisconnected {
        /// MQTT client id.
        client_id: String,
        /// The broker's id of the connection that ended.
        connection_id: u64,
        /// normal, keepalive_timeout, takeover, kicked, protocol_error, server_shutdown, ...
        reason: String,
        /// The offline rules that apply to the Thing (filled in by the actor shell).
        offline_rules: Vec<OfflineRule>,
    },
    /// An offline rule was created: watch it if the Thing is offline now.
    ArmOfflineAlarms {
        /// The new rules that apply to the Thing.
        offline_rules: Vec<OfflineRule>,
    },
    /// Store a device's measurement.
    RecordMeasurements(measurements::RecordMeasurements),
    /// A device raises an alarm (Cumulocity 301-304).
    RaiseAlarm {
        /// Its type.
        alarm_type: String,
        /// How serious.
        severity: AlarmSeverity,
        /// What happened.
        text: Option<String>,
    },
    /// A device changes an open alarm's severity (Cumulocity 305).
    ChangeAlarmSeverity {
        /// Its type.
        alarm_type: String,
        /// The new severity.
        severity: AlarmSeverity,
    },
    /// A device clears its own alarm (Cumulocity 306).
    ClearDeviceAlarm {
        /// Its type.
        alarm_type: String,
    },
    /// An operator acknowledges an alarm.
    AcknowledgeAlarm {
        /// Its type.
        alarm_type: String,
        /// Who (API key id).
        by: String,
    },
    /// An operator clears an alarm.
    ClearAlarm {
        /// Its type.
        alarm_type: String,
        /// Who (API key id).
        by: String,
    },
    /// Queue a job execution (from the job entity).
    QueueJob(jobs::QueueJob),
    /// The device asks for its next job (`start-next`).
    StartNextJob(jobs::StartNext),
    /// The device reports on a job execution.
    UpdateJob(jobs::JobUpdate),
    /// The job was canceled: end its execution here (one in progress only with `force`).
    CancelJob {
        /// Which job.
        job_id: String,
        /// End it even in progress.
        force: bool,
    },
    /// An operator removes the job's execution here.
    RemoveJob {
        /// Which job.
        job_id: String,
        /// Remove it even in progress.
        force: bool,
    },
    /// Send a command to the device.
    SendCommand(SendCommand),
    /// The device answered a command.
    RespondCommand(CommandResponse),
    /// An operator cancels an execution.
    CancelCommand {
        /// Which execution.
        execution_id: String,
    },
    /// The deadline index says a deadline of this Thing is due: time out what has expired.
    /// Works on deleted Things too, so every deadline ends.
    FireDeadlines {
        /// The offline rules that apply to the Thing now (filled in by the actor shell).
        offline_rules: Vec<OfflineRule>,
        /// When the server started serving, Unix ms (filled in by the actor shell): offline
        /// time before it does not count.
        serving_since_ms: u64,
    },
}

/// Something that happened to a Thing: the unit of its log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ThingEvent {
    /// The Thing was registered.
    Registered(ThingRegistered),
    /// The Thing was deleted.
    Deleted(ThingDeleted),
    /// A shadow update was accepted.
    ShadowUpdated(ShadowUpdated),
    /// The shadow document was deleted.
    ShadowDeleted(ShadowDeleted),
    /// A device event was accepted.
    EventIngested(EventIngested),
    /// The Thing's MQTT client connected.
    Connected(ThingConnected),
    /// The Thing's MQTT client disconnected.
    Disconnected(ThingDisconnected),
    /// A command execution changed (or a device answer was refused).
    Command(CommandEvent),
    /// A job execution changed.
    Job(jobs::JobEvent),
    /// Something happened to an alarm or an offline watch.
    Alarm(AlarmEvent),
    /// A device's measurement was stored.
    MeasurementsRecorded(measurements::MeasurementsRecorded),
}

/// Payload of `ThingConnected` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingConnected {
    /// MQTT client id.
    pub client_id: String,
    /// The broker's id of this connection.
    pub connection_id: u64,
    /// Unix ms.
    pub at_ms: u64,
}

/// Payload of `ThingDisconnected` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingDisconnected {
    /// MQTT client id.
    pub client_id: String,
    /// The broker's id of the connection that ended.
    pub connection_id: u64,
    /// Why it ended.
    pub reason: String,
    /// Unix ms.
    pub at_ms: u64,
}

/// Payload of `ThingRegistered` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingRegistered {
    /// MQTT client id.
    pub mqtt_client_id: String,
    /// Type label.
    #[serde(default)]
    pub thing_type: Option<String>,
    /// Attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Unix ms of registration.
    pub created_at_ms: u64,
}

/// Payload of `ThingDeleted` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingDeleted {
    /// Unix ms of deletion.
    pub deleted_at_ms: u64,
}

/// What a command produced, for the caller to render.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The Thing is registered; its description.
    Registered(ThingDescription),
    /// The Thing was deleted; the MQTT client id it held.
    Deleted {
        /// Free again from now on.
        mqtt_client_id: String,
    },
    /// A shadow update was accepted.
    ShadowUpdated(Box<shadow::ShadowUpdateResult>),
    /// The shadow was deleted: `{version, timestamp, clientToken}`.
    ShadowDeleted(serde_json::Value),
    /// A connect or disconnect was recorded.
    Recorded,
    /// An event was stored: its JSON (`seq` is filled in by the caller).
    EventStored(EventIngested),
    /// A command request's outcome (a refused device answer is recorded, then reported here).
    Command(CommandOutcome),
    /// A job request's outcome.
    Job(jobs::JobOutcome),
    /// The alarm as it is after the request.
    Alarm(Option<Alarm>),
}

/// The events to append and the reply to send once they are durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Events, in order (may be empty for an idempotent no-op).
    pub events: Vec<ThingEvent>,
    /// The reply.
    pub reply: Reply,
    /// The shadow as the decision's `ShadowUpdated` event leaves it, which deciding had to
    /// compute anyway: [`apply_decision`] moves it in rather than merging the update again.
    pub shadow: Option<Box<shadow::Shadow>>,
}

/// A Thing as the registry API shows it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingDescription {
    /// Thing name.
    #[serde(rename = "thingName")]
    pub name: String,
    /// MQTT client id.
    #[serde(rename = "mqttClientId")]
    pub mqtt_client_id: String,
    /// Type label.
    #[serde(rename = "thingType", skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// Unix ms of registration.
    #[serde(rename = "createdAt")]
    pub created_at_ms: u64,
    /// Current shadow version (0 = never updated).
    #[serde(rename = "shadowVersion")]
    pub shadow_version: u64,
    /// Whether its MQTT client is connected.
    pub online: bool,
    /// Unix ms of the last connect.
    #[serde(rename = "lastConnectedAt", skip_serializing_if = "Option::is_none")]
    pub last_connected_at_ms: Option<u64>,
    /// Unix ms of the last disconnect.
    #[serde(rename = "lastDisconnectedAt", skip_serializing_if = "Option::is_none")]
    pub last_disconnected_at_ms: Option<u64>,
    /// Why the last connection ended.
    #[serde(
        rename = "lastDisconnectReason",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_disconnect_reason: Option<String>,
    /// Unix ms the Thing was last seen (connect or disconnect).
    #[serde(rename = "lastSeenAt", skip_serializing_if = "Option::is_none")]
    pub last_seen_at_ms: Option<u64>,
}

impl ThingState {
    /// The registry view, if registered.
    pub fn describe(&self) -> Option<ThingDescription> {
        let registration = self.registration.as_ref()?;
        Some(ThingDescription {
            name: self.name.clone(),
            mqtt_client_id: registration.mqtt_client_id.clone(),
            thing_type: registration.thing_type.clone(),
            attributes: registration.attributes.clone(),
            created_at_ms: registration.created_at_ms,
            shadow_version: self.shadow.version,
            online: self.connection.online,
            last_connected_at_ms: self.connection.connected_at_ms,
            last_disconnected_at_ms: self.connection.disconnected_at_ms,
            last_disconnect_reason: self.connection.disconnect_reason.clone(),
            last_seen_at_ms: self
                .connection
                .connected_at_ms
                .max(self.connection.disconnected_at_ms),
        })
    }

    /// The 404 of an unregistered Thing.
    pub fn not_found(&self) -> Rejection {
        Rejection::new(
            RejectionKind::ThingNotFound,
            format!("Thing '{}' not found", self.name),
        )
    }
}

fn validate_label(what: &str, value: &str, bytes_max: usize) -> Result<(), Rejection> {
    let valid = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-' | b'.'));
    if value.is_empty() || value.len() > bytes_max || !valid {
        return Err(Rejection::new(
            RejectionKind::InvalidRequest,
            format!("invalid {what} '{value}': 1..={bytes_max} characters of [a-zA-Z0-9:_.-]"),
        ));
    }
    Ok(())
}

fn validate_registration(command: &RegisterThing) -> Result<(), Rejection> {
    if let Some(client_id) = &command.mqtt_client_id {
        if client_id.is_empty() || client_id.len() > CLIENT_ID_BYTES_MAX {
            return Err(Rejection::new(
                RejectionKind::InvalidRequest,
                format!("mqttClientId must be 1..={CLIENT_ID_BYTES_MAX} bytes"),
            ));
        }
        if client_id.chars().any(|c| c.is_control()) {
            return Err(Rejection::new(
                RejectionKind::InvalidRequest,
                "mqttClientId must not contain control characters",
            ));
        }
    }
    if let Some(thing_type) = &command.thing_type {
        validate_label("thingType", thing_type, THING_NAME_BYTES_MAX)?;
    }
    if command.attributes.len() > ATTRIBUTES_COUNT_MAX {
        return Err(Rejection::new(
            RejectionKind::InvalidRequest,
            format!("at most {ATTRIBUTES_COUNT_MAX} attributes"),
        ));
    }
    for (name, value) in &command.attributes {
        validate_label("attribute name", name, ATTRIBUTE_NAME_BYTES_MAX)?;
        if value.len() > ATTRIBUTE_VALUE_BYTES_MAX {
            return Err(Rejection::new(
                RejectionKind::InvalidRequest,
                format!(
                    "attribute '{name}' value must be at most {ATTRIBUTE_VALUE_BYTES_MAX} bytes"
                ),
            ));
        }
    }
    Ok(())
}

/// Decides a command against the current state.
pub fn decide(
    state: &ThingState,
    command: &ThingCommand,
    now_ms: u64,
    limits: &Limits,
) -> Result<Decision, Rejection> {
    match command {
        ThingCommand::Register(register) => {
            if state.registration.is_some() {
                return Err(Rejection::new(
                    RejectionKind::AlreadyExists,
                    format!("Thing '{}' already exists", state.name),
                ));
            }
            validate_registration(register)?;
            let event = ThingRegistered {
                mqtt_client_id: register
                    .mqtt_client_id
                    .clone()
                    .unwrap_or_else(|| state.name.clone()),
                thing_type: register.thing_type.clone(),
                attributes: register.attributes.clone(),
                created_at_ms: now_ms,
            };
            let mut next = state.clone();
            let event = ThingEvent::Registered(event);
            apply(&mut next, &event);
            let description = next.describe().ok_or_else(|| {
                Rejection::new(RejectionKind::Internal, "registration did not register")
            })?;
            Ok(Decision {
                shadow: None,
                events: vec![event],
                reply: Reply::Registered(description),
            })
        }
        ThingCommand::Delete => {
            let Some(registration) = &state.registration else {
                return Err(state.not_found());
            };
            // Its pending job executions end with it (their jobs can complete; a Thing
            // registered again under the name does not inherit them).
            let mut events: Vec<ThingEvent> = state
                .jobs
                .pending
                .keys()
                .map(|job_id| {
                    ThingEvent::Job(jobs::JobEvent::Removed(jobs::JobFinished {
                        job_id: job_id.clone(),
                        at_ms: now_ms,
                        finished_kept_max: limits.jobs.finished_kept_max,
                    }))
                })
                .collect();
            // Its connection ends with it (the broker closes it; that close is refused as the
            // Thing is gone): a Thing registered again under the name starts offline.
            if state.connection.online {
                events.push(ThingEvent::Disconnected(ThingDisconnected {
                    client_id: state.connection.client_id.clone().unwrap_or_default(),
                    connection_id: state.connection.connection_id,
                    reason: "thing_deleted".into(),
                    at_ms: now_ms,
                }));
            }
            events.extend(
                alarms::decide_gone(&state.alarms, "thing deleted", now_ms)
                    .into_iter()
                    .map(ThingEvent::Alarm),
            );
            events.push(ThingEvent::Deleted(ThingDeleted {
                deleted_at_ms: now_ms,
            }));
            Ok(Decision {
                shadow: None,
                events,
                reply: Reply::Deleted {
                    mqtt_client_id: registration.mqtt_client_id.clone(),
                },
            })
        }
        ThingCommand::UpdateShadow {
            update,
            origin,
            want_documents,
        } => {
            if state.registration.is_none() {
                return Err(state.not_found().with_token(update.client_token.clone()));
            }
            let (event, result, next) = shadow::decide_update(
                &state.shadow,
                update,
                *origin,
                now_ms,
                &limits.shadow,
                *want_documents,
            )?;
            let mut events = vec![ThingEvent::ShadowUpdated(event)];
            if *origin == Origin::Device {
                // The interval as this update leaves it (a 117 sets it).
                let interval = alarms::required_interval_ms(&next.reported);
                events.extend(data_events(state, interval, now_ms));
            }
            Ok(Decision {
                events,
                reply: Reply::ShadowUpdated(Box::new(result)),
                shadow: Some(Box::new(next)),
            })
        }
        ThingCommand::DeleteShadow {
            client_token,
            origin,
        } => {
            if state.registration.is_none() {
                return Err(state.not_found().with_token(client_token.clone()));
            }
            let event = shadow::decide_delete(
                &state.shadow,
                client_token.clone(),
                *origin,
                now_ms,
                &state.name,
            )?;
            Ok(Decision {
                shadow: None,
                reply: Reply::ShadowDeleted(shadow::deleted_of(&event)),
                events: vec![ThingEvent::ShadowDeleted(event)],
            })
        }
        ThingCommand::IngestEvent(event) => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let ingested = event.ingested(now_ms);
            let mut events = vec![ThingEvent::EventIngested(ingested.clone())];
            events.extend(data_events(state, state.required_interval_ms(), now_ms));
            Ok(Decision {
                shadow: None,
                events,
                reply: Reply::EventStored(ingested),
            })
        }
        ThingCommand::RecordConnected {
            client_id,
            connection_id,
        } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let mut events = vec![ThingEvent::Connected(ThingConnected {
                client_id: client_id.clone(),
                connection_id: *connection_id,
                at_ms: now_ms,
            })];
            events.extend(
                alarms::decide_back(&state.alarms, "reconnected", now_ms)
                    .into_iter()
                    .map(ThingEvent::Alarm),
            );
            Ok(Decision {
                shadow: None,
                events,
                reply: Reply::Recorded,
            })
        }
        ThingCommand::RecordDisconnected {
            client_id,
            connection_id,
            reason,
            offline_rules,
        } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            // Always recorded (the audit trail); it changes the status only if it ends the
            // current connection (a taken-over connection may report after its successor).
            let mut events = vec![ThingEvent::Disconnected(ThingDisconnected {
                client_id: client_id.clone(),
                connection_id: *connection_id,
                reason: reason.clone(),
                at_ms: now_ms,
            })];
            let ends_current =
                state.connection.online && *connection_id == state.connection.connection_id;
            if ends_current {
                events.extend(
                    alarms::decide_arm(&state.alarms, offline_rules, now_ms, now_ms)
                        .into_iter()
                        .map(ThingEvent::Alarm),
                );
            }
            Ok(Decision {
                shadow: None,
                events,
                reply: Reply::Recorded,
            })
        }
        ThingCommand::ArmOfflineAlarms { offline_rules } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            // Only a Thing that has been online and is not now: one never connected has not
            // gone offline.
            let events = match state.connection.disconnected_at_ms {
                Some(since) if !state.connection.online => {
                    alarms::decide_arm(&state.alarms, offline_rules, since, now_ms)
                }
                _ => Vec::new(),
            };
            Ok(Decision {
                shadow: None,
                events: events.into_iter().map(ThingEvent::Alarm).collect(),
                reply: Reply::Recorded,
            })
        }
        ThingCommand::RecordMeasurements(record) => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            record.validate(&limits.events)?;
            let mut events = vec![ThingEvent::MeasurementsRecorded(record.recorded(now_ms))];
            events.extend(data_events(state, state.required_interval_ms(), now_ms));
            Ok(Decision {
                shadow: None,
                events,
                reply: Reply::Recorded,
            })
        }
        ThingCommand::RaiseAlarm {
            alarm_type,
            severity,
            text,
        } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let mut events = alarms::decide_raise(
                &state.alarms,
                alarm_type,
                *severity,
                text.as_deref(),
                now_ms,
            )?;
            device_alarm_data(state, &mut events, now_ms);
            Ok(alarm_decision(state, alarm_type, events))
        }
        ThingCommand::ChangeAlarmSeverity {
            alarm_type,
            severity,
        } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let mut events = alarms::decide_severity(&state.alarms, alarm_type, *severity, now_ms)?;
            device_alarm_data(state, &mut events, now_ms);
            Ok(alarm_decision(state, alarm_type, events))
        }
        ThingCommand::ClearDeviceAlarm { alarm_type } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let events = alarms::decide_device_clear(&state.alarms, alarm_type, now_ms)?;
            Ok(alarm_decision(state, alarm_type, events))
        }
        ThingCommand::AcknowledgeAlarm { alarm_type, by } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let events = alarms::decide_acknowledge(&state.alarms, alarm_type, by, now_ms)?;
            Ok(alarm_decision(state, alarm_type, events))
        }
        ThingCommand::ClearAlarm { alarm_type, by } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let events = alarms::decide_clear(&state.alarms, alarm_type, by, now_ms)?;
            Ok(alarm_decision(state, alarm_type, events))
        }
        ThingCommand::SendCommand(send) => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let decision = commands::decide_send(&state.commands, send, now_ms, &limits.commands)?;
            Ok(command_decision(decision))
        }
        ThingCommand::RespondCommand(response) => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let decision =
                commands::decide_respond(&state.commands, response, now_ms, &limits.commands);
            Ok(command_decision(decision))
        }
        ThingCommand::CancelCommand { execution_id } => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            let decision =
                commands::decide_cancel(&state.commands, execution_id, now_ms, &limits.commands)?;
            Ok(command_decision(decision))
        }
        ThingCommand::QueueJob(queue) => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            Ok(job_decision(jobs::decide_queue(
                &state.jobs,
                queue,
                now_ms,
                &limits.jobs,
            )?))
        }
        ThingCommand::StartNextJob(request) => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            Ok(job_decision(jobs::decide_start_next(
                &state.jobs,
                request,
                now_ms,
                &limits.jobs,
            )))
        }
        ThingCommand::UpdateJob(update) => {
            if state.registration.is_none() {
                return Err(state.not_found());
            }
            Ok(job_decision(jobs::decide_update(
                &state.jobs,
                update,
                now_ms,
                &limits.jobs,
            )))
        }
        // Job cancels and removals work on deleted Things too, so every execution can end.
        ThingCommand::CancelJob { job_id, force } => Ok(job_decision(jobs::decide_cancel(
            &state.jobs,
            job_id,
            *force,
            now_ms,
            &limits.jobs,
        ))),
        ThingCommand::RemoveJob { job_id, force } => Ok(job_decision(jobs::decide_remove(
            &state.jobs,
            job_id,
            *force,
            now_ms,
            &limits.jobs,
        ))),
        ThingCommand::FireDeadlines {
            offline_rules,
            serving_since_ms,
        } => {
            let fired = commands::decide_fire(&state.commands, now_ms, &limits.commands);
            let jobs_fired = jobs::decide_fire(&state.jobs, now_ms, &limits.jobs);
            let timed_out = fired.events.len() + jobs_fired.events.len();
            let mut decision = command_decision(fired);
            decision
                .events
                .extend(jobs_fired.events.into_iter().map(ThingEvent::Job));
            decision.events.extend(
                alarms::decide_fire(
                    &state.alarms,
                    offline_rules,
                    state.connection.online,
                    now_ms,
                    *serving_since_ms,
                    state.required_interval_ms(),
                    state.last_data_at_ms,
                )
                .into_iter()
                .map(ThingEvent::Alarm),
            );
            decision.reply = Reply::Command(CommandOutcome::TimedOut(timed_out));
            Ok(decision)
        }
    }
}

fn alarm_decision(state: &ThingState, alarm_type: &str, events: Vec<AlarmEvent>) -> Decision {
    let mut alarms = state.alarms.clone();
    for event in &events {
        alarms.apply(event);
    }
    Decision {
        shadow: None,
        events: events.into_iter().map(ThingEvent::Alarm).collect(),
        reply: Reply::Alarm(alarms.alarms.get(alarm_type).cloned()),
    }
}

fn job_decision(decision: jobs::JobDecision) -> Decision {
    Decision {
        shadow: None,
        events: decision.events.into_iter().map(ThingEvent::Job).collect(),
        reply: Reply::Job(decision.outcome),
    }
}

fn command_decision(decision: commands::CommandDecision) -> Decision {
    Decision {
        shadow: None,
        events: decision
            .events
            .into_iter()
            .map(ThingEvent::Command)
            .collect(),
        reply: Reply::Command(decision.outcome),
    }
}

impl Decision {
    /// The command events among `events` (for the deadline index).
    pub fn command_events(&self) -> impl Iterator<Item = &CommandEvent> + '_ {
        self.events.iter().filter_map(|e| match e {
            ThingEvent::Command(c) => Some(c),
            _ => None,
        })
    }

    /// The alarm events of the decision.
    pub fn alarm_events(&self) -> impl Iterator<Item = &AlarmEvent> + '_ {
        self.events.iter().filter_map(|e| match e {
            ThingEvent::Alarm(a) => Some(a),
            _ => None,
        })
    }

    /// The job events among `events` (for the deadline index and the notifications).
    pub fn job_events(&self) -> impl Iterator<Item = &jobs::JobEvent> + '_ {
        self.events.iter().filter_map(|e| match e {
            ThingEvent::Job(j) => Some(j),
            _ => None,
        })
    }
}

/// What device data at `now_ms` does to the required-interval watch (`interval`: the one the
/// data leaves the Thing with).
fn data_events(state: &ThingState, interval: Option<u64>, now_ms: u64) -> Vec<ThingEvent> {
    alarms::decide_data(&state.alarms, interval, now_ms)
        .into_iter()
        .map(ThingEvent::Alarm)
        .collect()
}

/// A device's alarm row is data for the required-interval watch only when it changed
/// something (`apply` sees only what is recorded).
fn device_alarm_data(state: &ThingState, events: &mut Vec<alarms::AlarmEvent>, now_ms: u64) {
    if !events.is_empty() {
        events.extend(alarms::decide_data(
            &state.alarms,
            state.required_interval_ms(),
            now_ms,
        ));
    }
}

/// Folds a decision's events into the state it was decided on, as [`apply`] of each event
/// does, except that the shadow a shadow update's decision computed is moved in instead of
/// merged again (the replay law checks that the two agree). That shadow is what the update,
/// the decision's first event, leaves; anything else is folded with [`apply`].
pub fn apply_decision(state: &mut ThingState, decision: &mut Decision) {
    let decided = decision.shadow.take();
    let mut events = decision.events.iter();
    if let (Some(next), Some(ThingEvent::ShadowUpdated(updated))) =
        (decided, decision.events.first())
    {
        shadow_data(state, updated);
        state.shadow = *next;
        events.next();
    }
    for event in events {
        apply(state, event);
    }
}

/// An update from the device is data from it (the required-interval watch).
fn shadow_data(state: &mut ThingState, updated: &ShadowUpdated) {
    if updated.origin == Origin::Device {
        state.last_data_at_ms = Some(updated.timestamp_s.saturating_mul(1000));
    }
}

/// Folds one event into the state. Holds no rules: every check happened in [`decide`].
pub fn apply(state: &mut ThingState, event: &ThingEvent) {
    match event {
        ThingEvent::Registered(registered) => {
            state.registration = Some(Registration {
                mqtt_client_id: registered.mqtt_client_id.clone(),
                thing_type: registered.thing_type.clone(),
                attributes: registered.attributes.clone(),
                created_at_ms: registered.created_at_ms,
            });
        }
        ThingEvent::Deleted(deleted) => {
            state.registration = None;
            // A Thing registered again under the name starts with no alarms.
            state.alarms = alarms::Alarms::default();
            // The document goes with the Thing; the version continues if it is re-registered.
            state.shadow.apply_deleted(&ShadowDeleted {
                version: state.shadow.version,
                timestamp_s: deleted.deleted_at_ms / 1000,
                client_token: None,
                origin: Origin::Operator,
            });
        }
        ThingEvent::ShadowUpdated(updated) => {
            shadow_data(state, updated);
            state.shadow.apply_updated(updated)
        }
        ThingEvent::ShadowDeleted(deleted) => state.shadow.apply_deleted(deleted),
        ThingEvent::EventIngested(event) => {
            state.last_event_at_ms = Some(event.ingested_at_ms);
            state.last_data_at_ms = Some(event.ingested_at_ms);
        }
        ThingEvent::Connected(connected) => {
            state.connection.online = true;
            state.connection.client_id = Some(connected.client_id.clone());
            state.connection.connection_id = connected.connection_id;
            state.connection.connected_at_ms = Some(connected.at_ms);
        }
        ThingEvent::Disconnected(disconnected) => {
            if disconnected.connection_id == state.connection.connection_id {
                state.connection.online = false;
                state.connection.disconnected_at_ms = Some(disconnected.at_ms);
                state.connection.disconnect_reason = Some(disconnected.reason.clone());
            }
        }
        ThingEvent::Command(event) => state.commands.apply(event),
        ThingEvent::Job(event) => state.jobs.apply(event),
        ThingEvent::Alarm(event) => {
            // A device's own alarm (raised or changed) is data from it.
            match event {
                alarms::AlarmEvent::Raised(raised) if raised.offline_since_ms.is_none() => {
                    state.last_data_at_ms = Some(raised.at_ms);
                }
                alarms::AlarmEvent::SeverityChanged(changed) => {
                    state.last_data_at_ms = Some(changed.at_ms);
                }
                _ => {}
            }
            state.alarms.apply(event)
        }
        ThingEvent::MeasurementsRecorded(recorded) => {
            state.last_data_at_ms = Some(recorded.at_ms);
        }
    }
}

#[cfg(test)]
mod tests;
