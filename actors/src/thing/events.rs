//! Device events: `{"eventType","severity":"info|warn|error","data":{...},"timestamp"?}`.
//!
//! An event is validated here and, if accepted, appended to the Thing's log (`EventIngested`),
//! so it is durable, auditable and queryable. Invalid events are rejected and never stored.
//! `timestamp` is Unix milliseconds (the seed's rule for events); a missing one is the
//! ingestion time.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Rejection;

/// Bounds on events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// Largest `data` (compact JSON), bytes.
    pub data_bytes_max: usize,
    /// Longest `eventType`, bytes.
    pub event_type_bytes_max: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            data_bytes_max: 4 * 1024,
            event_type_bytes_max: 64,
        }
    }
}

/// How serious an event is.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    /// Informational.
    #[serde(rename = "info")]
    Info,
    /// Needs attention.
    #[serde(rename = "warn")]
    Warn,
    /// Something failed.
    #[serde(rename = "error")]
    Error,
}

/// A validated event to ingest.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestEvent {
    /// The event type.
    pub event_type: String,
    /// Severity.
    pub severity: Severity,
    /// Payload data (an object).
    pub data: Map<String, Value>,
    /// Device time, Unix ms, if given.
    pub timestamp_ms: Option<u64>,
}

/// Payload of `EventIngested` v1: an accepted device event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventIngested {
    /// The event type.
    pub event_type: String,
    /// Severity.
    pub severity: Severity,
    /// Payload data.
    #[serde(default)]
    pub data: Map<String, Value>,
    /// Event time, Unix ms (the device's, or the ingestion time).
    pub timestamp_ms: u64,
    /// When the server accepted it, Unix ms.
    pub ingested_at_ms: u64,
}

/// Checks an event type: 1..=max bytes of `[A-Za-z0-9_.-]` (one MQTT topic level).
pub fn validate_event_type(event_type: &str, limits: &EventLimits) -> Result<(), Rejection> {
    let valid = event_type
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if event_type.is_empty() || event_type.len() > limits.event_type_bytes_max || !valid {
        return Err(Rejection::bad_request(format!(
            "invalid eventType '{event_type}': 1..={} characters of [A-Za-z0-9_.-]",
            limits.event_type_bytes_max
        )));
    }
    Ok(())
}

impl IngestEvent {
    /// Validates an event body. `topic_type` is the `{eventType}` topic segment (MQTT); the
    /// body's `eventType` must equal it.
    pub fn from_json(
        body: &Value,
        topic_type: Option<&str>,
        limits: &EventLimits,
    ) -> Result<IngestEvent, Rejection> {
        let Some(body) = body.as_object() else {
            return Err(Rejection::bad_request("Payload must be a JSON object"));
        };
        let event_type = match body.get("eventType") {
            Some(Value::String(t)) => t.clone(),
            Some(_) => return Err(Rejection::bad_request("eventType must be a string")),
            None => return Err(Rejection::bad_request("Missing required field: eventType")),
        };
        validate_event_type(&event_type, limits)?;
        if let Some(topic_type) = topic_type {
            if topic_type != event_type {
                return Err(Rejection::bad_request(format!(
                    "eventType '{event_type}' does not match the topic's '{topic_type}'"
                )));
            }
        }
        let severity = match body.get("severity") {
            Some(Value::String(s)) => match s.as_str() {
                "info" => Severity::Info,
                "warn" => Severity::Warn,
                "error" => Severity::Error,
                other => {
                    return Err(Rejection::bad_request(format!(
                        "severity must be info, warn or error, not '{other}'"
                    )))
                }
            },
            Some(_) => return Err(Rejection::bad_request("severity must be a string")),
            None => return Err(Rejection::bad_request("Missing required field: severity")),
        };
        let data = match body.get("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(data)) => data.clone(),
            Some(_) => return Err(Rejection::bad_request("data must be a JSON object")),
        };
        let data_bytes = serde_json::to_vec(&data)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if data_bytes > limits.data_bytes_max {
            return Err(Rejection::bad_request(format!(
                "data is {data_bytes} bytes; the maximum is {}",
                limits.data_bytes_max
            )));
        }
        let timestamp_ms = match body.get("timestamp") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
                Rejection::bad_request(
                    "timestamp must be Unix milliseconds (a non-negative integer)",
                )
            })?),
            Some(_) => {
                return Err(Rejection::bad_request(
                    "timestamp must be Unix milliseconds (a non-negative integer)",
                ))
            }
        };
        Ok(IngestEvent {
            event_type,
            severity,
            data,
            timestamp_ms,
        })
    }

    /// The stored event, stamped with the ingestion time.
    pub fn ingested(&self, now_ms: u64) -> EventIngested {
        EventIngested {
            event_type: self.event_type.clone(),
            severity: self.severity,
            data: self.data.clone(),
            timestamp_ms: self.timestamp_ms.unwrap_or(now_ms),
            ingested_at_ms: now_ms,
        }
    }
}

impl EventIngested {
    /// The event as the API shows it (`seq` when known).
    pub fn to_json(&self, seq: Option<u64>) -> Value {
        serde_json::json!({
            "seq": seq,
            "eventType": self.event_type,
            "severity": self.severity,
            "data": self.data,
            "timestamp": self.timestamp_ms,
            "ingestedAt": self.ingested_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: Value, topic: Option<&str>) -> Result<IngestEvent, String> {
        IngestEvent::from_json(&body, topic, &EventLimits::default()).map_err(|r| r.message)
    }

    #[test]
    fn a_valid_event_is_accepted_and_stamped() {
        let event = check(
            json!({"eventType":"highTemperature","severity":"warn","data":{"t":45.2}}),
            Some("highTemperature"),
        )
        .expect("valid");
        let stored = event.ingested(1_000);
        assert_eq!((stored.timestamp_ms, stored.ingested_at_ms), (1_000, 1_000));
        let with_time = check(
            json!({"eventType":"boot","severity":"info","timestamp":500}),
            None,
        )
        .expect("valid");
        assert_eq!(with_time.ingested(1_000).timestamp_ms, 500);
    }

    #[test]
    fn invalid_events_are_rejected_with_a_specific_reason() {
        let cases = [
            (
                json!({"severity":"info"}),
                None,
                "Missing required field: eventType",
            ),
            (
                json!({"eventType":"a","severity":"info"}),
                Some("b"),
                "does not match",
            ),
            (
                json!({"eventType":"a","severity":"fatal"}),
                None,
                "severity must be info, warn or error",
            ),
            (
                json!({"eventType":"a"}),
                None,
                "Missing required field: severity",
            ),
            (
                json!({"eventType":"a","severity":"info","data":[1]}),
                None,
                "data must be a JSON object",
            ),
            (
                json!({"eventType":"a b","severity":"info"}),
                None,
                "invalid eventType",
            ),
            (
                json!({"eventType":"a","severity":"info","timestamp":-1}),
                None,
                "timestamp must be",
            ),
            (
                json!({"eventType":"a","severity":"info","data":{"x":"y".repeat(5000)}}),
                None,
                "maximum is 4096",
            ),
            (json!([1]), None, "Payload must be a JSON object"),
        ];
        for (body, topic, reason) in cases {
            let message = check(body.clone(), topic).expect_err("rejected");
            assert!(message.contains(reason), "{body}: {message}");
        }
    }
}
