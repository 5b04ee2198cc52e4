//! How the domain is stored: event and state shapes as versioned envelopes, and upcasting.
//!
//! Each event variant has a pinned `(event_type, event_version)`. A shipped shape is never
//! edited: a change adds version N+1, the writer writes N+1, and `decode_event` upcasts every
//! older version to the current type. Golden fixtures (`tests/fixtures/`) hold the bytes of
//! every shipped shape and must keep decoding.

use serde::{Deserialize, Serialize};
use thinghub_storage::{Envelope, RecordedEvent, StorageError};

use crate::thing::alarms::{
    AlarmAcknowledged, AlarmArmed, AlarmCleared, AlarmDisarmed, AlarmEvent, AlarmRaised,
    AlarmSeverityChanged,
};
use crate::thing::commands::{
    CommandEvent, CommandFinished, CommandResponded, CommandResponseRefused, CommandSent,
};
use crate::thing::jobs::{JobEvent, JobFinished, JobQueued, JobUpdated};
use crate::thing::{
    EventIngested, ShadowDeleted, ShadowUpdated, ThingConnected, ThingDeleted, ThingDisconnected,
    ThingEvent, ThingRegistered, ThingState,
};

/// `event_type` of a registration.
pub const THING_REGISTERED: &str = "ThingRegistered";
/// `event_type` of a deletion.
pub const THING_DELETED: &str = "ThingDeleted";
/// `event_type` of an accepted shadow update.
pub const SHADOW_UPDATED: &str = "ShadowUpdated";
/// `event_type` of a shadow deletion.
pub const SHADOW_DELETED: &str = "ShadowDeleted";
/// `event_type` of an accepted device event.
pub const EVENT_INGESTED: &str = "EventIngested";
/// `event_type` of a client connect.
pub const THING_CONNECTED: &str = "ThingConnected";
/// `event_type` of a client disconnect.
pub const THING_DISCONNECTED: &str = "ThingDisconnected";
/// `event_type` of a command sent to the device.
pub const COMMAND_SENT: &str = "CommandSent";
/// `event_type` of an accepted device answer to a command.
pub const COMMAND_RESPONDED: &str = "CommandResponded";
/// `event_type` of a command whose deadline passed.
pub const COMMAND_TIMED_OUT: &str = "CommandTimedOut";
/// `event_type` of a command canceled by an operator.
pub const COMMAND_CANCELED: &str = "CommandCanceled";
/// `event_type` of a device answer that was refused (recorded for the audit trail).
pub const COMMAND_RESPONSE_REFUSED: &str = "CommandResponseRefused";
/// `event_type` of a job execution queued on the Thing.
pub const JOB_QUEUED: &str = "JobQueued";
/// `event_type` of a job execution's status changed by the device (or `start-next`).
pub const JOB_EXECUTION_UPDATED: &str = "JobExecutionUpdated";
/// `event_type` of a job execution whose timer ran out.
pub const JOB_EXECUTION_TIMED_OUT: &str = "JobExecutionTimedOut";
/// `event_type` of a job execution ended because the job was canceled.
pub const JOB_EXECUTION_CANCELED: &str = "JobExecutionCanceled";
/// `event_type` of a job execution removed by an operator.
pub const JOB_EXECUTION_REMOVED: &str = "JobExecutionRemoved";
/// `event_type` of an offline watch that started.
pub const ALARM_ARMED: &str = "AlarmArmed";
/// `event_type` of an offline watch that ended without an alarm.
pub const ALARM_DISARMED: &str = "AlarmDisarmed";
/// `event_type` of a raised alarm.
pub const ALARM_RAISED: &str = "AlarmRaised";
/// `event_type` of an acknowledged alarm.
pub const ALARM_ACKNOWLEDGED: &str = "AlarmAcknowledged";
/// `event_type` of a cleared alarm.
pub const ALARM_CLEARED: &str = "AlarmCleared";
/// `event_type` of an alarm whose severity a device changed.
pub const ALARM_SEVERITY_CHANGED: &str = "AlarmSeverityChanged";
/// `event_type` of a stored measurement.
pub const MEASUREMENTS_RECORDED: &str = "MeasurementsRecorded";
/// `event_type` of a snapshot's state.
pub const THING_STATE: &str = "ThingState";
/// `event_type` of a registry index record.
pub const THING_INDEX_RECORD: &str = "ThingIndexRecord";

/// Encodes an event at its current shape version.
pub fn encode_event(event: &ThingEvent, recorded_at_ms: u64) -> Result<Envelope, StorageError> {
    let envelope = match event {
        ThingEvent::Registered(e) => Envelope::new(THING_REGISTERED, 1, recorded_at_ms, e),
        ThingEvent::Deleted(e) => Envelope::new(THING_DELETED, 1, recorded_at_ms, e),
        // v3: v2's fields as a positional array, a third smaller (the most frequent event).
        ThingEvent::ShadowUpdated(e) => {
            Envelope::new_positional(SHADOW_UPDATED, 3, recorded_at_ms, e)
        }
        ThingEvent::ShadowDeleted(e) => Envelope::new(SHADOW_DELETED, 1, recorded_at_ms, e),
        ThingEvent::EventIngested(e) => Envelope::new(EVENT_INGESTED, 1, recorded_at_ms, e),
        ThingEvent::Connected(e) => Envelope::new(THING_CONNECTED, 1, recorded_at_ms, e),
        ThingEvent::Disconnected(e) => Envelope::new(THING_DISCONNECTED, 1, recorded_at_ms, e),
        ThingEvent::Command(command) => match command {
            CommandEvent::Sent(e) => Envelope::new(COMMAND_SENT, 1, recorded_at_ms, e),
            CommandEvent::Responded(e) => Envelope::new(COMMAND_RESPONDED, 1, recorded_at_ms, e),
            CommandEvent::TimedOut(e) => Envelope::new(COMMAND_TIMED_OUT, 1, recorded_at_ms, e),
            CommandEvent::Canceled(e) => Envelope::new(COMMAND_CANCELED, 1, recorded_at_ms, e),
            CommandEvent::ResponseRefused(e) => {
                Envelope::new(COMMAND_RESPONSE_REFUSED, 1, recorded_at_ms, e)
            }
        },
        ThingEvent::Job(job) => match job {
            JobEvent::Queued(e) => Envelope::new(JOB_QUEUED, 1, recorded_at_ms, e),
            JobEvent::Updated(e) => Envelope::new(JOB_EXECUTION_UPDATED, 1, recorded_at_ms, e),
            JobEvent::TimedOut(e) => Envelope::new(JOB_EXECUTION_TIMED_OUT, 1, recorded_at_ms, e),
            JobEvent::Canceled(e) => Envelope::new(JOB_EXECUTION_CANCELED, 1, recorded_at_ms, e),
            JobEvent::Removed(e) => Envelope::new(JOB_EXECUTION_REMOVED, 1, recorded_at_ms, e),
        },
        ThingEvent::MeasurementsRecorded(e) => {
            Envelope::new(MEASUREMENTS_RECORDED, 1, recorded_at_ms, e)
        }
        ThingEvent::Alarm(alarm) => match alarm {
            AlarmEvent::Armed(e) => Envelope::new(ALARM_ARMED, 1, recorded_at_ms, e),
            AlarmEvent::Disarmed(e) => Envelope::new(ALARM_DISARMED, 1, recorded_at_ms, e),
            AlarmEvent::Raised(e) => Envelope::new(ALARM_RAISED, 1, recorded_at_ms, e),
            AlarmEvent::Acknowledged(e) => Envelope::new(ALARM_ACKNOWLEDGED, 1, recorded_at_ms, e),
            AlarmEvent::Cleared(e) => Envelope::new(ALARM_CLEARED, 1, recorded_at_ms, e),
            AlarmEvent::SeverityChanged(e) => {
                Envelope::new(ALARM_SEVERITY_CHANGED, 1, recorded_at_ms, e)
            }
        },
    };
    Ok(envelope?)
}

/// Decodes (and upcasts) a stored event; errors name the Thing and seq.
pub fn decode_event(thing: &str, recorded: &RecordedEvent) -> Result<ThingEvent, StorageError> {
    let envelope = &recorded.envelope;
    let corrupt = |reason: String| StorageError::Corrupt {
        thing: thing.to_owned(),
        seq: recorded.seq,
        reason,
    };
    let decoded = match (envelope.event_type.as_str(), envelope.event_version) {
        (THING_REGISTERED, 1) => envelope
            .payload_as::<ThingRegistered>()
            .map(ThingEvent::Registered),
        (THING_DELETED, 1) => envelope
            .payload_as::<ThingDeleted>()
            .map(ThingEvent::Deleted),
        // v2 added `delta` (absent in v1: None).
        // v3 is v2 as a positional array; rmp-serde reads either form into the struct.
        (SHADOW_UPDATED, 1..=3) => envelope
            .payload_as::<ShadowUpdated>()
            .map(ThingEvent::ShadowUpdated),
        (SHADOW_DELETED, 1) => envelope
            .payload_as::<ShadowDeleted>()
            .map(ThingEvent::ShadowDeleted),
        (EVENT_INGESTED, 1) => envelope
            .payload_as::<EventIngested>()
            .map(ThingEvent::EventIngested),
        (THING_CONNECTED, 1) => envelope
            .payload_as::<ThingConnected>()
            .map(ThingEvent::Connected),
        (THING_DISCONNECTED, 1) => envelope
            .payload_as::<ThingDisconnected>()
            .map(ThingEvent::Disconnected),
        (COMMAND_SENT, 1) => envelope
            .payload_as::<CommandSent>()
            .map(|e| ThingEvent::Command(CommandEvent::Sent(e))),
        (COMMAND_RESPONDED, 1) => envelope
            .payload_as::<CommandResponded>()
            .map(|e| ThingEvent::Command(CommandEvent::Responded(e))),
        (COMMAND_TIMED_OUT, 1) => envelope
            .payload_as::<CommandFinished>()
            .map(|e| ThingEvent::Command(CommandEvent::TimedOut(e))),
        (COMMAND_CANCELED, 1) => envelope
            .payload_as::<CommandFinished>()
            .map(|e| ThingEvent::Command(CommandEvent::Canceled(e))),
        (COMMAND_RESPONSE_REFUSED, 1) => envelope
            .payload_as::<CommandResponseRefused>()
            .map(|e| ThingEvent::Command(CommandEvent::ResponseRefused(e))),
        (JOB_QUEUED, 1) => envelope
            .payload_as::<JobQueued>()
            .map(|e| ThingEvent::Job(JobEvent::Queued(e))),
        (JOB_EXECUTION_UPDATED, 1) => envelope
            .payload_as::<JobUpdated>()
            .map(|e| ThingEvent::Job(JobEvent::Updated(e))),
        (JOB_EXECUTION_TIMED_OUT, 1) => envelope
            .payload_as::<JobFinished>()
            .map(|e| ThingEvent::Job(JobEvent::TimedOut(e))),
        (JOB_EXECUTION_CANCELED, 1) => envelope
            .payload_as::<JobFinished>()
            .map(|e| ThingEvent::Job(JobEvent::Canceled(e))),
        (JOB_EXECUTION_REMOVED, 1) => envelope
            .payload_as::<JobFinished>()
            .map(|e| ThingEvent::Job(JobEvent::Removed(e))),
        (ALARM_ARMED, 1) => envelope
            .payload_as::<AlarmArmed>()
            .map(|e| ThingEvent::Alarm(AlarmEvent::Armed(e))),
        (ALARM_DISARMED, 1) => envelope
            .payload_as::<AlarmDisarmed>()
            .map(|e| ThingEvent::Alarm(AlarmEvent::Disarmed(e))),
        (ALARM_RAISED, 1) => envelope
            .payload_as::<AlarmRaised>()
            .map(|e| ThingEvent::Alarm(AlarmEvent::Raised(e))),
        (ALARM_ACKNOWLEDGED, 1) => envelope
            .payload_as::<AlarmAcknowledged>()
            .map(|e| ThingEvent::Alarm(AlarmEvent::Acknowledged(e))),
        (ALARM_CLEARED, 1) => envelope
            .payload_as::<AlarmCleared>()
            .map(|e| ThingEvent::Alarm(AlarmEvent::Cleared(e))),
        (MEASUREMENTS_RECORDED, 1) => envelope
            .payload_as::<crate::thing::measurements::MeasurementsRecorded>()
            .map(ThingEvent::MeasurementsRecorded),
        (ALARM_SEVERITY_CHANGED, 1) => envelope
            .payload_as::<AlarmSeverityChanged>()
            .map(|e| ThingEvent::Alarm(AlarmEvent::SeverityChanged(e))),
        (other, version) => {
            return Err(corrupt(format!(
                "unknown event type {other} v{version} (written by a newer thinghub?)"
            )))
        }
    };
    decoded.map_err(|e| {
        corrupt(format!(
            "{} v{}: {}",
            envelope.event_type, envelope.event_version, e.0
        ))
    })
}

/// The snapshot shape written now. v2 added `commands`, v3 `jobs`, v4 `alarms`; an older one is upcast by
/// decoding it with none, which is what a Thing of that era had.
pub const THING_STATE_VERSION: u16 = 4;

/// Encodes a snapshot state.
pub fn encode_state(state: &ThingState, recorded_at_ms: u64) -> Result<Envelope, StorageError> {
    Ok(Envelope::new(
        THING_STATE,
        THING_STATE_VERSION,
        recorded_at_ms,
        state,
    )?)
}

/// Decodes a snapshot state.
pub fn decode_state(thing: &str, envelope: &Envelope) -> Result<ThingState, StorageError> {
    match (envelope.event_type.as_str(), envelope.event_version) {
        (THING_STATE, 1..=4) => envelope.payload_as().map_err(|e| StorageError::Corrupt {
            thing: thing.to_owned(),
            seq: 0,
            reason: format!("snapshot state: {}", e.0),
        }),
        (other, version) => Err(StorageError::Corrupt {
            thing: thing.to_owned(),
            seq: 0,
            reason: format!("unknown snapshot type {other} v{version}"),
        }),
    }
}

/// What the registry listing stores per Thing (so listing needs no actor activation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingIndexRecord {
    /// MQTT client id.
    pub mqtt_client_id: String,
    /// Type label.
    #[serde(default)]
    pub thing_type: Option<String>,
    /// Unix ms of registration.
    pub created_at_ms: u64,
}

/// Encodes an index record.
pub fn encode_index_record(record: &ThingIndexRecord) -> Result<Vec<u8>, StorageError> {
    Ok(Envelope::new(THING_INDEX_RECORD, 1, record.created_at_ms, record)?.to_bytes()?)
}

/// Decodes an index record.
pub fn decode_index_record(thing: &str, bytes: &[u8]) -> Result<ThingIndexRecord, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        thing: thing.to_owned(),
        seq: 0,
        reason: format!("registry index: {reason}"),
    };
    let envelope = Envelope::from_bytes(bytes).map_err(|e| corrupt(e.0))?;
    match (envelope.event_type.as_str(), envelope.event_version) {
        (THING_INDEX_RECORD, 1) => envelope.payload_as().map_err(|e| corrupt(e.0)),
        (other, version) => Err(corrupt(format!("unknown record {other} v{version}"))),
    }
}

/// A one-line human summary of an event, for `thinghub audit`.
pub fn summarize(event: &ThingEvent) -> String {
    match event {
        ThingEvent::Registered(e) => format!(
            "registered clientId={} type={}",
            e.mqtt_client_id,
            e.thing_type.as_deref().unwrap_or("-")
        ),
        ThingEvent::Deleted(_) => "thing deleted".into(),
        ThingEvent::ShadowUpdated(e) => {
            let section = |p: &Option<crate::thing::shadow::SectionPatch>| {
                p.as_ref().map(|p| p.to_json().to_string())
            };
            let mut parts = vec![format!("v{} by {:?}", e.version, e.origin).to_lowercase()];
            if let Some(d) = section(&e.desired) {
                parts.push(format!("desired={d}"));
            }
            if let Some(r) = section(&e.reported) {
                parts.push(format!("reported={r}"));
            }
            if let Some(t) = &e.client_token {
                parts.push(format!("clientToken={t}"));
            }
            if let Some(delta) = &e.delta {
                parts.push(format!(
                    "delta={}",
                    serde_json::Value::Object(delta.clone())
                ));
            }
            format!("shadow updated {}", parts.join(" "))
        }
        ThingEvent::ShadowDeleted(e) => format!("shadow deleted at v{}", e.version),
        ThingEvent::EventIngested(e) => format!(
            "event {} severity={} data={}",
            e.event_type,
            serde_json::to_value(e.severity)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            serde_json::Value::Object(e.data.clone())
        ),
        ThingEvent::Connected(e) => format!(
            "connected clientId={} connection={}",
            e.client_id, e.connection_id
        ),
        ThingEvent::Disconnected(e) => format!(
            "disconnected clientId={} connection={} reason={}",
            e.client_id, e.connection_id, e.reason
        ),
        ThingEvent::Command(command) => match command {
            CommandEvent::Sent(e) => format!(
                "command sent execution={} command={} action={} ttl={}s params={}",
                e.execution_id,
                e.command_id,
                e.action,
                e.ttl_s,
                serde_json::Value::Object(e.params.clone().unwrap_or_default())
            ),
            CommandEvent::Responded(e) => format!(
                "command answered execution={} status={}{}",
                e.execution_id,
                e.status.as_str(),
                e.result
                    .as_ref()
                    .map(|r| format!(" result={}", serde_json::Value::Object(r.clone())))
                    .unwrap_or_default()
            ),
            CommandEvent::TimedOut(e) => format!("command timed out execution={}", e.execution_id),
            CommandEvent::Canceled(e) => format!("command canceled execution={}", e.execution_id),
            CommandEvent::ResponseRefused(e) => format!(
                "command answer refused execution={} status={} reason={}",
                e.execution_id, e.status, e.reason
            ),
        },
        ThingEvent::Job(job) => match job {
            JobEvent::Queued(e) => format!(
                "job queued job={} execution={} document={}",
                e.job_id,
                e.execution_number,
                serde_json::Value::Object((*e.document).clone())
            ),
            JobEvent::Updated(e) => format!(
                "job execution updated job={} status={}{}",
                e.job_id,
                e.status.as_str(),
                e.status_details
                    .as_ref()
                    .map(|d| format!(" details={}", serde_json::json!(d)))
                    .unwrap_or_default()
            ),
            JobEvent::TimedOut(e) => format!("job execution timed out job={}", e.job_id),
            JobEvent::Canceled(e) => format!("job execution canceled job={}", e.job_id),
            JobEvent::Removed(e) => format!("job execution removed job={}", e.job_id),
        },
        ThingEvent::MeasurementsRecorded(e) => format!(
            "measurement {} time={} values={}",
            e.measurement_type,
            e.time_ms,
            e.values
                .iter()
                .map(|v| format!(
                    "{}.{}={}{}",
                    v.fragment,
                    v.series,
                    v.value,
                    v.unit.as_deref().unwrap_or("")
                ))
                .collect::<Vec<_>>()
                .join(",")
        ),
        ThingEvent::Alarm(alarm) => match alarm {
            AlarmEvent::Armed(e) => format!(
                "offline watch started rule={} due={} offlineSince={}",
                e.rule, e.due_at_ms, e.offline_since_ms
            ),
            AlarmEvent::Disarmed(e) => {
                format!("offline watch ended rule={} reason={}", e.rule, e.reason)
            }
            AlarmEvent::Raised(e) => format!(
                "alarm raised type={} severity={} text={}",
                e.alarm_type,
                e.severity.as_str(),
                e.text
            ),
            AlarmEvent::Acknowledged(e) => {
                format!("alarm acknowledged type={} by={}", e.alarm_type, e.by)
            }
            AlarmEvent::Cleared(e) => {
                format!("alarm cleared type={} reason={}", e.alarm_type, e.reason)
            }
            AlarmEvent::SeverityChanged(e) => format!(
                "alarm severity changed type={} severity={}",
                e.alarm_type,
                e.severity.as_str()
            ),
        },
    }
}

/// Every `event_type` [`event_type`] gives (what a Thing's log holds), for filters that must
/// refuse a type that cannot match.
pub const EVENT_TYPES: &[&str] = &[
    THING_REGISTERED,
    THING_DELETED,
    SHADOW_UPDATED,
    SHADOW_DELETED,
    EVENT_INGESTED,
    THING_CONNECTED,
    THING_DISCONNECTED,
    COMMAND_SENT,
    COMMAND_RESPONDED,
    COMMAND_TIMED_OUT,
    COMMAND_CANCELED,
    COMMAND_RESPONSE_REFUSED,
    JOB_QUEUED,
    JOB_EXECUTION_UPDATED,
    JOB_EXECUTION_TIMED_OUT,
    JOB_EXECUTION_CANCELED,
    JOB_EXECUTION_REMOVED,
    ALARM_ARMED,
    ALARM_DISARMED,
    ALARM_RAISED,
    ALARM_ACKNOWLEDGED,
    ALARM_CLEARED,
    ALARM_SEVERITY_CHANGED,
    MEASUREMENTS_RECORDED,
];

/// The `event_type` string of an event.
pub fn event_type(event: &ThingEvent) -> &'static str {
    match event {
        ThingEvent::Registered(_) => THING_REGISTERED,
        ThingEvent::Deleted(_) => THING_DELETED,
        ThingEvent::ShadowUpdated(_) => SHADOW_UPDATED,
        ThingEvent::ShadowDeleted(_) => SHADOW_DELETED,
        ThingEvent::EventIngested(_) => EVENT_INGESTED,
        ThingEvent::Connected(_) => THING_CONNECTED,
        ThingEvent::Disconnected(_) => THING_DISCONNECTED,
        ThingEvent::Command(CommandEvent::Sent(_)) => COMMAND_SENT,
        ThingEvent::Command(CommandEvent::Responded(_)) => COMMAND_RESPONDED,
        ThingEvent::Command(CommandEvent::TimedOut(_)) => COMMAND_TIMED_OUT,
        ThingEvent::Command(CommandEvent::Canceled(_)) => COMMAND_CANCELED,
        ThingEvent::Command(CommandEvent::ResponseRefused(_)) => COMMAND_RESPONSE_REFUSED,
        ThingEvent::Job(JobEvent::Queued(_)) => JOB_QUEUED,
        ThingEvent::Job(JobEvent::Updated(_)) => JOB_EXECUTION_UPDATED,
        ThingEvent::Job(JobEvent::TimedOut(_)) => JOB_EXECUTION_TIMED_OUT,
        ThingEvent::Job(JobEvent::Canceled(_)) => JOB_EXECUTION_CANCELED,
        ThingEvent::Job(JobEvent::Removed(_)) => JOB_EXECUTION_REMOVED,
        ThingEvent::Alarm(AlarmEvent::Armed(_)) => ALARM_ARMED,
        ThingEvent::Alarm(AlarmEvent::Disarmed(_)) => ALARM_DISARMED,
        ThingEvent::Alarm(AlarmEvent::Raised(_)) => ALARM_RAISED,
        ThingEvent::Alarm(AlarmEvent::Acknowledged(_)) => ALARM_ACKNOWLEDGED,
        ThingEvent::Alarm(AlarmEvent::Cleared(_)) => ALARM_CLEARED,
        ThingEvent::Alarm(AlarmEvent::SeverityChanged(_)) => ALARM_SEVERITY_CHANGED,
        ThingEvent::MeasurementsRecorded(_) => MEASUREMENTS_RECORDED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thing::shadow::{Origin, SectionPatch};
    use std::collections::BTreeMap;

    /// One instance of every shipped shape, with fixed values.
    fn shipped() -> Vec<(&'static str, ThingEvent)> {
        let mut attributes = BTreeMap::new();
        attributes.insert("site".to_string(), "lab-1".to_string());
        let merge = serde_json::json!({"temp": 21.5, "n": -3, "big": u64::MAX, "on": true,
            "list": [1, "two"], "nested": {"x": null}});
        vec![
            (
                "ThingRegistered.v1",
                ThingEvent::Registered(ThingRegistered {
                    mqtt_client_id: "dev-1".into(),
                    thing_type: Some("sensor".into()),
                    attributes,
                    created_at_ms: 1_700_000_000_123,
                }),
            ),
            (
                "ThingDeleted.v1",
                ThingEvent::Deleted(ThingDeleted {
                    deleted_at_ms: 1_700_000_000_456,
                }),
            ),
            (
                "ShadowUpdated.v1",
                ThingEvent::ShadowUpdated(ShadowUpdated {
                    desired: Some(SectionPatch::Clear),
                    reported: Some(SectionPatch::Merge(
                        merge.as_object().cloned().unwrap_or_default(),
                    )),
                    version: 7,
                    timestamp_s: 1_700_000_000,
                    client_token: Some("tok".into()),
                    origin: Origin::Device,
                    delta: None,
                }),
            ),
            (
                "ShadowUpdated.v2",
                ThingEvent::ShadowUpdated(ShadowUpdated {
                    desired: Some(SectionPatch::Merge(
                        serde_json::json!({"speed": 3})
                            .as_object()
                            .cloned()
                            .unwrap_or_default(),
                    )),
                    reported: None,
                    version: 8,
                    timestamp_s: 1_700_000_002,
                    client_token: None,
                    origin: Origin::Operator,
                    delta: serde_json::json!({"speed": 3}).as_object().cloned(),
                }),
            ),
            (
                "ShadowUpdated.v3",
                ThingEvent::ShadowUpdated(ShadowUpdated {
                    desired: Some(SectionPatch::Merge(
                        serde_json::json!({"speed": 4, "mode": {"eco": true}})
                            .as_object()
                            .cloned()
                            .unwrap_or_default(),
                    )),
                    reported: Some(SectionPatch::Clear),
                    version: 9,
                    timestamp_s: 1_700_000_003,
                    client_token: Some("tok-3".into()),
                    origin: Origin::Operator,
                    delta: serde_json::json!({"speed": 4, "mode": {"eco": true}})
                        .as_object()
                        .cloned(),
                }),
            ),
            (
                // v3 with no delta: the last element is left out, and reads back as none.
                "ShadowUpdated.v3-no-delta",
                ThingEvent::ShadowUpdated(ShadowUpdated {
                    desired: None,
                    reported: Some(SectionPatch::Merge(
                        serde_json::json!({"t": 21.5})
                            .as_object()
                            .cloned()
                            .unwrap_or_default(),
                    )),
                    version: 10,
                    timestamp_s: 1_700_000_004,
                    client_token: None,
                    origin: Origin::Device,
                    delta: None,
                }),
            ),
            (
                "ShadowDeleted.v1",
                ThingEvent::ShadowDeleted(ShadowDeleted {
                    version: 7,
                    timestamp_s: 1_700_000_001,
                    client_token: None,
                    origin: Origin::Operator,
                }),
            ),
            (
                "EventIngested.v1",
                ThingEvent::EventIngested(EventIngested {
                    event_type: "highTemperature".into(),
                    severity: crate::thing::Severity::Warn,
                    data: serde_json::json!({"currentTemp": 45.2})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    timestamp_ms: 1_700_000_004_000,
                    ingested_at_ms: 1_700_000_004_100,
                }),
            ),
            (
                "ThingConnected.v1",
                ThingEvent::Connected(ThingConnected {
                    client_id: "dev-1".into(),
                    connection_id: 42,
                    at_ms: 1_700_000_002_000,
                }),
            ),
            (
                "CommandSent.v1",
                ThingEvent::Command(CommandEvent::Sent(CommandSent {
                    execution_id: "ex-1".into(),
                    command_id: "cmd-1".into(),
                    action: "setTemperature".into(),
                    params: serde_json::json!({"value": 24}).as_object().cloned(),
                    ttl_s: 30,
                    created_at_ms: 1_700_000_005_000,
                    expires_at_ms: 1_700_000_035_000,
                })),
            ),
            (
                "CommandResponded.v1",
                ThingEvent::Command(CommandEvent::Responded(CommandResponded {
                    execution_id: "ex-1".into(),
                    status: crate::thing::CommandStatus::Failed,
                    result: serde_json::json!({"currentTemperature": 22})
                        .as_object()
                        .cloned(),
                    status_reason: Some(crate::thing::commands::StatusReason {
                        reason_code: "DEVICE_TOO_BUSY".into(),
                        reason_description: Some("busy".into()),
                    }),
                    at_ms: 1_700_000_006_000,
                    finished_kept_max: 100,
                })),
            ),
            (
                "CommandTimedOut.v1",
                ThingEvent::Command(CommandEvent::TimedOut(CommandFinished {
                    execution_id: "ex-2".into(),
                    at_ms: 1_700_000_036_000,
                    finished_kept_max: 100,
                })),
            ),
            (
                "CommandCanceled.v1",
                ThingEvent::Command(CommandEvent::Canceled(CommandFinished {
                    execution_id: "ex-3".into(),
                    at_ms: 1_700_000_007_000,
                    finished_kept_max: 100,
                })),
            ),
            (
                "CommandResponseRefused.v1",
                ThingEvent::Command(CommandEvent::ResponseRefused(CommandResponseRefused {
                    execution_id: "ex-2".into(),
                    status: "SUCCEEDED".into(),
                    reason: "execution 'ex-2' is already TIMED_OUT".into(),
                    at_ms: 1_700_000_037_000,
                })),
            ),
            (
                "JobQueued.v1",
                ThingEvent::Job(JobEvent::Queued(JobQueued {
                    job_id: "fw-2".into(),
                    execution_number: 1,
                    document: serde_json::json!({"operation": "update", "url": "https://x/fw.bin"})
                        .as_object()
                        .cloned()
                        .unwrap_or_default()
                        .into(),
                    in_progress_timeout_s: Some(3600),
                    at_ms: 1_700_000_040_000,
                })),
            ),
            (
                "JobExecutionUpdated.v1",
                ThingEvent::Job(JobEvent::Updated(JobUpdated {
                    job_id: "fw-2".into(),
                    status: crate::thing::jobs::JobExecutionStatus::InProgress,
                    status_details: Some(BTreeMap::from([("progress".into(), "10%".into())])),
                    step_deadline_ms: Some(1_700_000_100_000),
                    at_ms: 1_700_000_041_000,
                    finished_kept_max: 50,
                })),
            ),
            (
                "JobExecutionTimedOut.v1",
                ThingEvent::Job(JobEvent::TimedOut(JobFinished {
                    job_id: "fw-2".into(),
                    at_ms: 1_700_000_100_000,
                    finished_kept_max: 50,
                })),
            ),
            (
                "JobExecutionCanceled.v1",
                ThingEvent::Job(JobEvent::Canceled(JobFinished {
                    job_id: "fw-3".into(),
                    at_ms: 1_700_000_101_000,
                    finished_kept_max: 50,
                })),
            ),
            (
                "JobExecutionRemoved.v1",
                ThingEvent::Job(JobEvent::Removed(JobFinished {
                    job_id: "fw-4".into(),
                    at_ms: 1_700_000_102_000,
                    finished_kept_max: 50,
                })),
            ),
            (
                "ThingDisconnected.v1",
                ThingEvent::Disconnected(ThingDisconnected {
                    client_id: "dev-1".into(),
                    connection_id: 42,
                    reason: "keepalive_timeout".into(),
                    at_ms: 1_700_000_003_000,
                }),
            ),
            (
                "AlarmArmed.v1",
                ThingEvent::Alarm(AlarmEvent::Armed(AlarmArmed {
                    rule: "offline-10m".into(),
                    due_at_ms: 1_700_000_603_000,
                    offline_since_ms: 1_700_000_003_000,
                    at_ms: 1_700_000_003_000,
                })),
            ),
            (
                "AlarmRaised.v1",
                ThingEvent::Alarm(AlarmEvent::Raised(AlarmRaised {
                    alarm_type: "offline-10m".into(),
                    severity: crate::thing::AlarmSeverity::Major,
                    text: "offline for 10 min (rule 'offline-10m': offline for 600 s)".into(),
                    offline_since_ms: Some(1_700_000_003_000),
                    at_ms: 1_700_000_603_000,
                })),
            ),
            (
                "AlarmAcknowledged.v1",
                ThingEvent::Alarm(AlarmEvent::Acknowledged(AlarmAcknowledged {
                    alarm_type: "offline-10m".into(),
                    by: "ops".into(),
                    at_ms: 1_700_000_700_000,
                })),
            ),
            (
                "AlarmCleared.v1",
                ThingEvent::Alarm(AlarmEvent::Cleared(AlarmCleared {
                    alarm_type: "offline-10m".into(),
                    reason: "reconnected".into(),
                    at_ms: 1_700_000_800_000,
                })),
            ),
            (
                "MeasurementsRecorded.v1",
                ThingEvent::MeasurementsRecorded(
                    crate::thing::measurements::MeasurementsRecorded {
                        measurement_type: "c8y_Temperature".into(),
                        values: vec![crate::thing::measurements::MeasurementValue {
                            fragment: "c8y_Temperature".into(),
                            series: "T".into(),
                            value: 21.5,
                            unit: Some("C".into()),
                        }],
                        time_ms: 1_700_000_950_000,
                        at_ms: 1_700_000_951_000,
                    },
                ),
            ),
            (
                "AlarmSeverityChanged.v1",
                ThingEvent::Alarm(AlarmEvent::SeverityChanged(AlarmSeverityChanged {
                    alarm_type: "c8y_Overheat".into(),
                    severity: crate::thing::AlarmSeverity::Critical,
                    at_ms: 1_700_000_900_000,
                })),
            ),
            (
                "AlarmDisarmed.v1",
                ThingEvent::Alarm(AlarmEvent::Disarmed(AlarmDisarmed {
                    rule: "offline-1h".into(),
                    reason: "reconnected".into(),
                    at_ms: 1_700_000_800_000,
                })),
            ),
        ]
    }

    fn fixture_path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(format!("{name}.msgpack"))
    }

    /// Every shipped shape's stored bytes keep decoding to the same event. Run with
    /// `THINGHUB_WRITE_FIXTURES=1` once when adding a new shape version (never to rewrite one).
    #[test]
    fn golden_fixtures_keep_decoding() {
        for (name, event) in shipped() {
            let path = fixture_path(name);
            let envelope = encode_event(&event, 1_700_000_000_999).expect("encode");
            let bytes = envelope.to_bytes().expect("bytes");
            if std::env::var_os("THINGHUB_WRITE_FIXTURES").is_some() && !path.exists() {
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                std::fs::write(&path, &bytes).expect("write fixture");
            }
            let stored = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
            let recorded = RecordedEvent {
                seq: 1,
                envelope: Envelope::from_bytes(&stored).expect("envelope decodes"),
            };
            assert_eq!(recorded.envelope.recorded_at_ms, 1_700_000_000_999);
            assert_eq!(
                decode_event("fixture", &recorded).expect(name),
                event,
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_versions_and_garbage_name_the_thing_and_seq() {
        let recorded = RecordedEvent {
            seq: 42,
            envelope: Envelope::new("ShadowUpdated", 99, 0, &()).expect("env"),
        };
        let err = decode_event("pump-7", &recorded).expect_err("unknown version");
        let text = err.to_string();
        assert!(text.contains("pump-7") && text.contains("seq 42"), "{text}");

        let recorded = RecordedEvent {
            seq: 3,
            envelope: Envelope::new("ShadowUpdated", 1, 0, &"not a struct").expect("env"),
        };
        let err = decode_event("pump-7", &recorded).expect_err("bad payload");
        assert!(err.to_string().contains("seq 3"));
    }

    /// A v1 snapshot (written before commands existed) decodes with no commands.
    #[test]
    fn a_v1_snapshot_upcasts_to_no_commands() {
        let mut state = ThingState::new("s");
        for (_, event) in shipped() {
            if !matches!(event, ThingEvent::Command(_) | ThingEvent::Job(_)) {
                crate::thing::apply(&mut state, &event);
            }
        }
        let mut v1 = serde_json::to_value(&state).expect("to value");
        v1.as_object_mut().expect("object").remove("commands");
        v1.as_object_mut().expect("object").remove("jobs");
        let envelope = Envelope::new(THING_STATE, 1, 5, &v1).expect("encode v1");
        let bytes = envelope.to_bytes().expect("bytes");
        let back = decode_state("s", &Envelope::from_bytes(&bytes).expect("env")).expect("decode");
        assert_eq!(back, state);
        assert!(back.commands.pending.is_empty());
    }

    #[test]
    fn state_round_trips_through_a_snapshot_envelope() {
        let mut state = ThingState::new("s");
        for (_, event) in shipped() {
            crate::thing::apply(&mut state, &event);
        }
        let envelope = encode_state(&state, 5).expect("encode");
        let bytes = envelope.to_bytes().expect("bytes");
        let back = decode_state("s", &Envelope::from_bytes(&bytes).expect("env")).expect("decode");
        assert_eq!(back, state);
    }
}
