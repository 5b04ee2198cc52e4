//! Measurements a device sends (Cumulocity 200-212): values of named series, stored in the
//! Thing's log as they came, read back newest first like events. Bounded like events.

use serde::{Deserialize, Serialize};

use super::events::{validate_event_type, EventLimits};
use super::Rejection;

/// Most values in one measurement.
pub const MEASUREMENT_VALUES_MAX: usize = 64;
/// Longest unit, bytes.
pub const UNIT_BYTES_MAX: usize = 16;

/// One value of a series.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasurementValue {
    /// Fragment (`c8y_Temperature`).
    pub fragment: String,
    /// Series (`T`).
    pub series: String,
    /// The value (finite).
    pub value: f64,
    /// Unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// A measurement to record.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordMeasurements {
    /// Its type.
    pub measurement_type: String,
    /// Its values.
    pub values: Vec<MeasurementValue>,
    /// Device time, Unix ms (None: when it is recorded).
    pub time_ms: Option<u64>,
}

/// `MeasurementsRecorded` v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasurementsRecorded {
    /// Its type.
    pub measurement_type: String,
    /// Its values.
    pub values: Vec<MeasurementValue>,
    /// When it was measured (device time, else when recorded), Unix ms.
    pub time_ms: u64,
    /// When it was recorded, Unix ms.
    pub at_ms: u64,
}

impl RecordMeasurements {
    /// Checks names, values and bounds.
    pub fn validate(&self, limits: &EventLimits) -> Result<(), Rejection> {
        validate_event_type(&self.measurement_type, limits)
            .map_err(|_| label_error("measurement type", &self.measurement_type, limits))?;
        if self.values.is_empty() || self.values.len() > MEASUREMENT_VALUES_MAX {
            return Err(Rejection::bad_request(format!(
                "a measurement holds 1..={MEASUREMENT_VALUES_MAX} values"
            )));
        }
        for value in &self.values {
            validate_event_type(&value.fragment, limits)
                .map_err(|_| label_error("fragment", &value.fragment, limits))?;
            validate_event_type(&value.series, limits)
                .map_err(|_| label_error("series", &value.series, limits))?;
            if !value.value.is_finite() {
                return Err(Rejection::bad_request("a measurement value must be finite"));
            }
            if value
                .unit
                .as_ref()
                .is_some_and(|u| u.len() > UNIT_BYTES_MAX)
            {
                return Err(Rejection::bad_request(format!(
                    "a unit is at most {UNIT_BYTES_MAX} bytes"
                )));
            }
        }
        Ok(())
    }

    /// The event recording it at `now_ms`.
    pub fn recorded(&self, now_ms: u64) -> MeasurementsRecorded {
        MeasurementsRecorded {
            measurement_type: self.measurement_type.clone(),
            values: self.values.clone(),
            time_ms: self.time_ms.unwrap_or(now_ms),
            at_ms: now_ms,
        }
    }
}

fn label_error(what: &str, value: &str, limits: &EventLimits) -> Rejection {
    Rejection::bad_request(format!(
        "invalid {what} '{value}': 1..={} characters of [A-Za-z0-9_.-]",
        limits.event_type_bytes_max
    ))
}
