//! Integration records: what a Thing's durable events look like to the operator's own systems
//! (webhooks), one JSON shape for every kind, read from the change feed. Pure: events in,
//! records out.

use serde::Serialize;
use serde_json::Value;
use thinghub_storage::{FeedEntry, RecordedEvent, StorageError, Store};

use crate::codec;
use crate::thing::{AlarmEvent, CommandEvent, ThingEvent};

/// One event as an integration record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Stable across redeliveries: `{thingName}:{seq}` (one event of one Thing's log, also if
    /// a failed append left its feed entry and the events came again under a later one); use
    /// it to drop duplicates (delivery is at least once).
    pub id: String,
    /// The change feed position (commit order across Things).
    pub position: u64,
    /// What happened, e.g. `shadow.updated` (see [`kind_of`]).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub kind: &'static str,
    /// The Thing.
    pub thing_name: String,
    /// The MQTT client id the event names (connections), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Unix ms the event was recorded.
    pub at: u64,
    /// Its sequence number in the Thing's log.
    pub seq: u64,
    /// One line for people.
    pub summary: String,
    /// The event as stored (the history API's shape: tagged by variant, snake_case fields).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: Value,
}

/// Every kind a record can have.
pub const KINDS: [&str; 20] = [
    "thing.registered",
    "thing.deleted",
    "thing.connected",
    "thing.disconnected",
    "shadow.updated",
    "shadow.deleted",
    "event.ingested",
    "command.sent",
    "command.answered",
    "command.timed_out",
    "command.canceled",
    "command.response_refused",
    "job.execution",
    "alarm.watch_started",
    "alarm.watch_ended",
    "alarm.raised",
    "alarm.acknowledged",
    "alarm.cleared",
    "alarm.severity_changed",
    "measurement.recorded",
];

/// The kind of an event.
pub fn kind_of(event: &ThingEvent) -> &'static str {
    match event {
        ThingEvent::Registered(_) => "thing.registered",
        ThingEvent::Deleted(_) => "thing.deleted",
        ThingEvent::Connected(_) => "thing.connected",
        ThingEvent::Disconnected(_) => "thing.disconnected",
        ThingEvent::ShadowUpdated(_) => "shadow.updated",
        ThingEvent::ShadowDeleted(_) => "shadow.deleted",
        ThingEvent::EventIngested(_) => "event.ingested",
        ThingEvent::Command(CommandEvent::Sent(_)) => "command.sent",
        ThingEvent::Command(CommandEvent::Responded(_)) => "command.answered",
        ThingEvent::Command(CommandEvent::TimedOut(_)) => "command.timed_out",
        ThingEvent::Command(CommandEvent::Canceled(_)) => "command.canceled",
        ThingEvent::Command(CommandEvent::ResponseRefused(_)) => "command.response_refused",
        ThingEvent::Job(_) => "job.execution",
        ThingEvent::Alarm(AlarmEvent::Armed(_)) => "alarm.watch_started",
        ThingEvent::Alarm(AlarmEvent::Disarmed(_)) => "alarm.watch_ended",
        ThingEvent::Alarm(AlarmEvent::Raised(_)) => "alarm.raised",
        ThingEvent::Alarm(AlarmEvent::Acknowledged(_)) => "alarm.acknowledged",
        ThingEvent::Alarm(AlarmEvent::Cleared(_)) => "alarm.cleared",
        ThingEvent::Alarm(AlarmEvent::SeverityChanged(_)) => "alarm.severity_changed",
        ThingEvent::MeasurementsRecorded(_) => "measurement.recorded",
    }
}

/// The records of one feed entry's events, in order.
pub fn records_of(
    entry: &FeedEntry,
    events: &[RecordedEvent],
) -> Result<Vec<Record>, StorageError> {
    events
        .iter()
        .map(|recorded| {
            let event = codec::decode_event(&entry.thing, recorded)?;
            let client_id = match &event {
                ThingEvent::Connected(e) => Some(e.client_id.clone()),
                ThingEvent::Disconnected(e) => Some(e.client_id.clone()),
                ThingEvent::Registered(e) => Some(e.mqtt_client_id.clone()),
                _ => None,
            };
            Ok(Record {
                id: format!("{}:{}", entry.thing, recorded.seq),
                position: entry.position,
                kind: kind_of(&event),
                thing_name: entry.thing.clone(),
                client_id,
                at: recorded.envelope.recorded_at_ms,
                seq: recorded.seq,
                summary: codec::summarize(&event),
                data: serde_json::to_value(&event).unwrap_or(Value::Null),
            })
        })
        .collect()
}

/// Reads the records of `entry` from the log.
pub fn read_records(store: &Store, entry: &FeedEntry) -> Result<Vec<Record>, StorageError> {
    let events = store.read_events(&entry.thing, entry.first_seq, entry.count as usize)?;
    records_of(entry, &events)
}
