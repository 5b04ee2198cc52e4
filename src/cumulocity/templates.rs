//! Cumulocity's static templates: a CSV row from a device (`s/us`) decoded into what it asks
//! for, or the error row it is answered with on `s/e`; and the operation rows sent down on
//! `s/ds`. Pure: rows in, typed requests and rows out.
//!
//! Error rows are `{code},{template},{message}` with these codes:
//!
//! | code | meaning |
//! |---|---|
//! | 40 | unknown template id |
//! | 41 | the row is invalid: wrong number of fields, a number, time or severity that does not parse |
//! | 42 | the server failed (the row may be sent again) |
//! | 43 | not allowed (a child of another device, a device that is not this connection's) |
//! | 44 | the message is not valid CSV (template `0`: no row could be read) |
//! | 45 | not found (a child device that does not exist, an operation that is not pending) |

use serde_json::{json, Map, Value};

/// A row the device could not have meant: answered on `s/e`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// The error code (see the module's table).
    pub code: u16,
    /// The template id of the row (`0` when it has none).
    pub template: String,
    /// What is wrong, for people.
    pub message: String,
}

impl RowError {
    fn invalid(template: &str, message: impl Into<String>) -> RowError {
        RowError {
            code: 41,
            template: template.to_owned(),
            message: message.into(),
        }
    }

    /// The `s/e` row.
    pub fn to_row(&self) -> String {
        super::smartrest::write_row(&[
            self.code.to_string(),
            self.template.clone(),
            self.message.clone(),
        ])
    }
}

/// Alarm severities of templates 301-304 and 305.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// 301.
    Critical,
    /// 302.
    Major,
    /// 303.
    Minor,
    /// 304.
    Warning,
}

impl Severity {
    fn parse(text: &str) -> Option<Severity> {
        match text.to_ascii_uppercase().as_str() {
            "CRITICAL" => Some(Severity::Critical),
            "MAJOR" => Some(Severity::Major),
            "MINOR" => Some(Severity::Minor),
            "WARNING" => Some(Severity::Warning),
            _ => None,
        }
    }
}

/// One measurement value.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Fragment (`c8y_Temperature`).
    pub fragment: String,
    /// Series (`T`).
    pub series: String,
    /// The value.
    pub value: f64,
    /// Unit, if given.
    pub unit: Option<String>,
}

/// What a device's row asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// 100: create this device if it is absent.
    CreateDevice {
        /// Its name (default: the device id).
        name: Option<String>,
        /// Its type (default `c8y_MQTTDevice`).
        device_type: Option<String>,
    },
    /// 101: create a child of this device if it is absent.
    CreateChild {
        /// The child's unique id.
        id: String,
        /// Its name.
        name: Option<String>,
        /// Its type.
        device_type: Option<String>,
    },
    /// 105: send the children list on `s/ds`.
    ListChildren,
    /// 110-117: an inventory fragment for the device's reported state.
    Inventory {
        /// Fragment name (`c8y_Hardware`, ...).
        fragment: &'static str,
        /// Its value.
        value: Value,
    },
    /// 200, 201, 210-212: measurements at `time` (None: now).
    Measurements {
        /// Measurement type (201; else the first fragment).
        measurement_type: String,
        /// The values.
        values: Vec<Measurement>,
        /// ISO 8601 time, as given.
        time: Option<String>,
    },
    /// 301-304: raise an alarm of `alarm_type`.
    RaiseAlarm {
        /// Severity.
        severity: Severity,
        /// Type.
        alarm_type: String,
        /// Text.
        text: Option<String>,
        /// ISO 8601 time.
        time: Option<String>,
    },
    /// 305: change an alarm's severity.
    AlarmSeverity {
        /// Type.
        alarm_type: String,
        /// The new severity.
        severity: Severity,
    },
    /// 306: clear the alarm of a type.
    ClearAlarm {
        /// Type.
        alarm_type: String,
    },
    /// 307: remove a fragment from an alarm.
    ClearAlarmFragment {
        /// Type.
        alarm_type: String,
        /// Fragment.
        fragment: String,
    },
    /// 400-402: an event.
    Event {
        /// Type.
        event_type: String,
        /// Text.
        text: Option<String>,
        /// ISO 8601 time.
        time: Option<String>,
        /// Fragments (401/402 location).
        data: Map<String, Value>,
    },
    /// 500: send the pending operations again.
    PendingOperations,
    /// 501-506: an operation's status.
    OperationStatus {
        /// Which operation: the oldest pending of a fragment, or one by id.
        target: OperationRef,
        /// The new status.
        status: OperationStatus,
    },
}

/// Which operation a status row is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationRef {
    /// 501-503: the oldest pending execution of this fragment (`c8y_Restart`).
    Fragment(String),
    /// 504-506: by id.
    Id(String),
}

/// Operation statuses the device reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationStatus {
    /// 501/504.
    Executing,
    /// 502/505, with the reason.
    Failed(String),
    /// 503/506, with the result's parameters.
    Successful(Vec<String>),
}

/// Decodes one row of `s/us`.
pub fn decode(row: &[String]) -> Result<Upstream, RowError> {
    let Some((template, fields)) = row.split_first() else {
        return Err(RowError::invalid("0", "an empty row"));
    };
    let t = template.as_str();
    let field = |i: usize| fields.get(i).map(String::as_str).filter(|f| !f.is_empty());
    // Empty trailing fields do not count against a template's most: a device may pad a row
    // with commas (Cumulocity reads `100,,` as `100`).
    let given = fields.len() - fields.iter().rev().take_while(|f| f.is_empty()).count();
    let needs = |min: usize, max: usize| -> Result<(), RowError> {
        if fields.len() < min || given > max {
            let expected = if min == max {
                min.to_string()
            } else if max == usize::MAX {
                format!("at least {min}")
            } else {
                format!("{min} to {max}")
            };
            return Err(RowError::invalid(
                t,
                format!(
                    "template {t} takes {expected} fields after the id, not {}",
                    if given > max { given } else { fields.len() }
                ),
            ));
        }
        Ok(())
    };
    let required = |i: usize, what: &str| -> Result<String, RowError> {
        field(i)
            .map(str::to_owned)
            .ok_or_else(|| RowError::invalid(t, format!("template {t}: {what} is required")))
    };
    let number = |i: usize, what: &str| -> Result<Option<f64>, RowError> {
        match field(i) {
            None => Ok(None),
            Some(text) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    RowError::invalid(t, format!("template {t}: {what} '{text}' is not a number"))
                }),
        }
    };
    let time = |i: usize| -> Result<Option<String>, RowError> {
        match field(i) {
            None => Ok(None),
            Some(text) if is_iso8601(text) => Ok(Some(text.to_owned())),
            Some(text) => Err(RowError::invalid(
                t,
                format!("template {t}: time '{text}' is not an ISO 8601 date and time"),
            )),
        }
    };
    let text_of = |i: usize| field(i).map(str::to_owned);
    let inventory = |fragment: &'static str, names: &[&str]| -> Result<Upstream, RowError> {
        needs(0, names.len())?;
        let mut value = Map::new();
        for (i, name) in names.iter().enumerate() {
            if let Some(text) = field(i) {
                value.insert((*name).to_owned(), json!(text));
            }
        }
        Ok(Upstream::Inventory {
            fragment,
            value: Value::Object(value),
        })
    };
    let single =
        |fragment: &str, series: &str, unit: &str, i: usize| -> Result<Measurement, RowError> {
            Ok(Measurement {
                fragment: fragment.to_owned(),
                series: series.to_owned(),
                value: number(i, "value")?.ok_or_else(|| {
                    RowError::invalid(t, format!("template {t}: a value is required"))
                })?,
                unit: Some(unit.to_owned()),
            })
        };
    match t {
        "100" => {
            needs(0, 2)?;
            Ok(Upstream::CreateDevice {
                name: text_of(0),
                device_type: text_of(1),
            })
        }
        "101" => {
            needs(1, 3)?;
            let id = required(0, "the child's id")?;
            Ok(Upstream::CreateChild {
                id,
                name: text_of(1),
                device_type: text_of(2),
            })
        }
        "105" => {
            needs(0, 0)?;
            Ok(Upstream::ListChildren)
        }
        "110" => inventory("c8y_Hardware", &["serialNumber", "model", "revision"]),
        "111" => inventory(
            "c8y_Mobile",
            &["imei", "iccid", "imsi", "mcc", "mnc", "lac", "cellId"],
        ),
        "112" => {
            needs(0, 4)?;
            let mut value = Map::new();
            for (i, name) in ["lat", "lng", "alt", "accuracy"].iter().enumerate() {
                if let Some(n) = number(i, name)? {
                    value.insert((*name).to_owned(), json!(n));
                }
            }
            Ok(Upstream::Inventory {
                fragment: "c8y_Position",
                value: Value::Object(value),
            })
        }
        "113" => {
            needs(1, 1)?;
            Ok(Upstream::Inventory {
                fragment: "c8y_Configuration",
                value: json!({"config": fields[0]}),
            })
        }
        "114" => {
            needs(1, usize::MAX)?;
            Ok(Upstream::Inventory {
                fragment: "c8y_SupportedOperations",
                value: json!(fields[..given]),
            })
        }
        "115" => inventory("c8y_Firmware", &["name", "version", "url"]),
        "116" => {
            // name,version,url triples; the last one's url (or version) may be left off.
            let mut list = Vec::new();
            for (i, c) in fields[..given].chunks(3).enumerate() {
                let name = c.first().filter(|n| !n.is_empty()).ok_or_else(|| {
                    RowError::invalid(t, format!("template 116: software {} has no name", i + 1))
                })?;
                let part = |k: usize| c.get(k).map_or("", String::as_str);
                list.push(json!({"name": name, "version": part(1), "url": part(2)}));
            }
            Ok(Upstream::Inventory {
                fragment: "c8y_SoftwareList",
                value: Value::Array(list),
            })
        }
        "117" => {
            needs(1, 1)?;
            let minutes = field(0)
                .and_then(|m| m.trim().parse::<u32>().ok())
                .ok_or_else(|| {
                    RowError::invalid(t, "template 117: the interval is a whole number of minutes")
                })?;
            Ok(Upstream::Inventory {
                fragment: "c8y_RequiredAvailability",
                value: json!({"responseInterval": minutes}),
            })
        }
        "200" => {
            needs(3, 5)?;
            let fragment = required(0, "the fragment")?;
            let series = required(1, "the series")?;
            let value = number(2, "value")?
                .ok_or_else(|| RowError::invalid(t, "template 200: a value is required"))?;
            Ok(Upstream::Measurements {
                measurement_type: fragment.clone(),
                values: vec![Measurement {
                    fragment,
                    series,
                    value,
                    unit: text_of(3),
                }],
                time: time(4)?,
            })
        }
        "201" => {
            // type, time, then (fragment, series, value, unit) groups; the last unit may be
            // left off.
            if given < 5 || (given - 2) % 4 == 1 || (given - 2) % 4 == 2 {
                return Err(RowError::invalid(
                    t,
                    "template 201 takes type,time and then fragment,series,value,unit groups",
                ));
            }
            let measurement_type = required(0, "the type")?;
            let mut values = Vec::new();
            for (g, group) in fields[2..given].chunks(4).enumerate() {
                let i = 2 + g * 4;
                values.push(Measurement {
                    fragment: required(i, "a fragment")?,
                    series: required(i + 1, "a series")?,
                    value: number(i + 2, "value")?
                        .ok_or_else(|| RowError::invalid(t, "template 201: a value is required"))?,
                    unit: group.get(3).filter(|u| !u.is_empty()).cloned(),
                });
            }
            Ok(Upstream::Measurements {
                measurement_type,
                values,
                time: time(1)?,
            })
        }
        "210" => {
            needs(1, 3)?;
            let mut values = vec![single("c8y_SignalStrength", "rssi", "dBm", 0)?];
            if field(1).is_some() {
                values.push(single("c8y_SignalStrength", "ber", "%", 1)?);
            }
            Ok(Upstream::Measurements {
                measurement_type: "c8y_SignalStrength".into(),
                values,
                time: time(2)?,
            })
        }
        "211" => {
            needs(1, 2)?;
            Ok(Upstream::Measurements {
                measurement_type: "c8y_TemperatureMeasurement".into(),
                values: vec![single("c8y_TemperatureMeasurement", "T", "C", 0)?],
                time: time(1)?,
            })
        }
        "212" => {
            needs(1, 2)?;
            Ok(Upstream::Measurements {
                measurement_type: "c8y_Battery".into(),
                values: vec![single("c8y_Battery", "level", "%", 0)?],
                time: time(1)?,
            })
        }
        "301" | "302" | "303" | "304" => {
            needs(1, 3)?;
            let severity = match t {
                "301" => Severity::Critical,
                "302" => Severity::Major,
                "303" => Severity::Minor,
                _ => Severity::Warning,
            };
            Ok(Upstream::RaiseAlarm {
                severity,
                alarm_type: required(0, "the alarm type")?,
                text: text_of(1),
                time: time(2)?,
            })
        }
        "305" => {
            needs(2, 2)?;
            let alarm_type = required(0, "the alarm type")?;
            let severity = field(1).and_then(Severity::parse).ok_or_else(|| {
                RowError::invalid(
                    t,
                    "template 305: the severity is CRITICAL, MAJOR, MINOR or WARNING",
                )
            })?;
            Ok(Upstream::AlarmSeverity {
                alarm_type,
                severity,
            })
        }
        "306" => {
            needs(1, 1)?;
            Ok(Upstream::ClearAlarm {
                alarm_type: required(0, "the alarm type")?,
            })
        }
        "307" => {
            // The alarm type and the fragments to remove (one or more).
            needs(2, usize::MAX)?;
            Ok(Upstream::ClearAlarmFragment {
                alarm_type: required(0, "the alarm type")?,
                fragment: required(1, "the fragment")?,
            })
        }
        "400" => {
            needs(2, 3)?;
            Ok(Upstream::Event {
                event_type: required(0, "the event type")?,
                text: text_of(1),
                time: time(2)?,
                data: Map::new(),
            })
        }
        "401" | "402" => {
            needs(2, 5)?;
            let mut position = Map::new();
            for (i, name) in ["lat", "lng", "alt", "accuracy"].iter().enumerate() {
                if let Some(n) = number(i, name)? {
                    position.insert((*name).to_owned(), json!(n));
                }
            }
            if !(position.contains_key("lat") && position.contains_key("lng")) {
                return Err(RowError::invalid(
                    t,
                    format!("template {t}: latitude and longitude are required"),
                ));
            }
            let mut data = Map::new();
            data.insert("c8y_Position".into(), Value::Object(position));
            Ok(Upstream::Event {
                event_type: "c8y_LocationUpdate".into(),
                text: Some("Location updated".into()),
                time: time(4)?,
                data,
            })
        }
        "500" => {
            needs(0, 0)?;
            Ok(Upstream::PendingOperations)
        }
        "501" | "504" => {
            needs(1, 1)?;
            Ok(Upstream::OperationStatus {
                target: operation_ref(t, required(0, "the operation")?),
                status: OperationStatus::Executing,
            })
        }
        "502" | "505" => {
            needs(1, 2)?;
            Ok(Upstream::OperationStatus {
                target: operation_ref(t, required(0, "the operation")?),
                status: OperationStatus::Failed(text_of(1).unwrap_or_default()),
            })
        }
        "503" | "506" => {
            needs(1, usize::MAX)?;
            Ok(Upstream::OperationStatus {
                target: operation_ref(t, required(0, "the operation")?),
                status: OperationStatus::Successful(fields[1..given.max(1)].to_vec()),
            })
        }
        other => Err(RowError {
            code: 40,
            template: other.chars().take(16).collect(),
            message: format!(
                "unknown template '{}'",
                other.chars().take(16).collect::<String>()
            ),
        }),
    }
}

fn operation_ref(template: &str, id: String) -> OperationRef {
    if matches!(template, "504" | "505" | "506") {
        OperationRef::Id(id)
    } else {
        OperationRef::Fragment(id)
    }
}

/// A strict enough ISO 8601 check: `YYYY-MM-DDTHH:MM:SS` with optional fraction and a `Z` or
/// `±HH:MM` offset.
fn is_iso8601(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_digit))
    };
    if bytes.len() < 20
        || !digits(0..4)
        || bytes[4] != b'-'
        || !digits(5..7)
        || bytes[7] != b'-'
        || !digits(8..10)
        || bytes[10] != b'T'
        || !digits(11..13)
        || bytes[13] != b':'
        || !digits(14..16)
        || bytes[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    match rest {
        "Z" => true,
        offset => {
            let b = offset.as_bytes();
            b.len() == 6
                && (b[0] == b'+' || b[0] == b'-')
                && b[1..3].iter().all(u8::is_ascii_digit)
                && b[3] == b':'
                && b[4..6].iter().all(u8::is_ascii_digit)
        }
    }
}

/// Unix ms of an ISO 8601 time [`decode`] accepted (`None` for anything else, or before 1970).
pub fn iso8601_ms(text: &str) -> Option<u64> {
    if !is_iso8601(text) {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits: String = fraction.chars().take_while(char::is_ascii_digit).collect();
        millis = format!("{:0<3}", &digits[..digits.len().min(3)])
            .parse()
            .ok()?;
        rest = &fraction[digits.len()..];
    }
    let offset_s = match rest {
        "Z" => 0,
        offset => {
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let hours = offset.get(1..3)?.parse::<i64>().ok()?;
            let minutes = offset.get(4..6)?.parse::<i64>().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = (month + 9) % 12;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    u64::try_from(seconds * 1000 + millis).ok()
}

/// The `s/ds` row of an operation (a command whose action is a Cumulocity fragment) for the
/// device `device`, or why it has none. `params` are the command's parameters.
pub fn operation_row(
    device: &str,
    action: &str,
    params: &Map<String, Value>,
) -> Result<String, String> {
    let text = |name: &str| -> Result<String, String> {
        match params.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Ok(other.to_string()),
            None => Err(format!("operation {action} needs the parameter '{name}'")),
        }
    };
    let row: Vec<String> = match action {
        "c8y_Restart" => vec!["510".into(), device.into()],
        "c8y_Command" => vec!["511".into(), device.into(), text("text")?],
        "c8y_Configuration" => vec!["513".into(), device.into(), text("config")?],
        "c8y_Firmware" => vec![
            "515".into(),
            device.into(),
            text("name")?,
            text("version")?,
            text("url")?,
        ],
        "c8y_SoftwareList" => {
            let Some(Value::Array(list)) = params.get("softwareList") else {
                return Err(
                    "operation c8y_SoftwareList needs 'softwareList': [{name,version,url}]".into(),
                );
            };
            let mut row = vec!["516".into(), device.into()];
            for item in list {
                for key in ["name", "version", "url"] {
                    row.push(item[key].as_str().unwrap_or_default().to_owned());
                }
            }
            row
        }
        "c8y_MeasurementRequestOperation" => {
            vec!["517".into(), device.into(), text("requestName")?]
        }
        "c8y_UploadConfigFile" => vec!["520".into(), device.into()],
        "c8y_DownloadConfigFile" => vec!["521".into(), device.into(), text("url")?],
        "c8y_LogfileRequest" => vec![
            "522".into(),
            device.into(),
            text("logFile")?,
            text("dateFrom")?,
            text("dateTo")?,
            text("searchText").unwrap_or_default(),
            text("maximumLines").unwrap_or_default(),
        ],
        other => {
            return Err(format!(
                "'{other}' is not an operation a Cumulocity device understands"
            ))
        }
    };
    if let Some(value) = row.iter().find(|f| !super::smartrest::representable(f)) {
        return Err(format!(
            "operation {action}: the value '{}' needs quotes and ends with a backslash, which SmartREST cannot carry",
            value.chars().take(64).collect::<String>()
        ));
    }
    Ok(super::smartrest::write_row(&row))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(text: &str) -> Vec<String> {
        super::super::smartrest::parse(text)
            .expect("csv")
            .pop()
            .expect("a row")
    }

    fn ok(text: &str) -> Upstream {
        decode(&row(text)).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    fn err(text: &str) -> RowError {
        decode(&row(text)).expect_err(text)
    }

    #[test]
    fn inventory_templates_become_fragments() {
        assert_eq!(
            ok("100,Pump 7,c8y_Pump"),
            Upstream::CreateDevice {
                name: Some("Pump 7".into()),
                device_type: Some("c8y_Pump".into())
            }
        );
        assert_eq!(
            ok("100"),
            Upstream::CreateDevice {
                name: None,
                device_type: None
            }
        );
        assert_eq!(
            ok("101,child-1,Child"),
            Upstream::CreateChild {
                id: "child-1".into(),
                name: Some("Child".into()),
                device_type: None
            }
        );
        assert_eq!(
            ok("110,SN-1,M1,r2"),
            Upstream::Inventory {
                fragment: "c8y_Hardware",
                value: json!({"serialNumber": "SN-1", "model": "M1", "revision": "r2"})
            }
        );
        assert_eq!(
            ok("114,c8y_Restart,c8y_Command"),
            Upstream::Inventory {
                fragment: "c8y_SupportedOperations",
                value: json!(["c8y_Restart", "c8y_Command"])
            }
        );
        assert_eq!(
            ok("117,60"),
            Upstream::Inventory {
                fragment: "c8y_RequiredAvailability",
                value: json!({"responseInterval": 60})
            }
        );
        assert_eq!(
            ok("110,SN-1,,,,"),
            Upstream::Inventory {
                fragment: "c8y_Hardware",
                value: json!({"serialNumber": "SN-1"})
            },
            "trailing commas pad a row"
        );
        assert_eq!(
            ok("116,a,1.0,http://x,b,2.0"),
            Upstream::Inventory {
                fragment: "c8y_SoftwareList",
                value: json!([{"name":"a","version":"1.0","url":"http://x"},{"name":"b","version":"2.0","url":""}])
            },
            "the last url left off"
        );
        assert_eq!(
            ok("116,a,1.0,http://x,b,2.0,"),
            Upstream::Inventory {
                fragment: "c8y_SoftwareList",
                value: json!([{"name":"a","version":"1.0","url":"http://x"},{"name":"b","version":"2.0","url":""}])
            }
        );
    }

    #[test]
    fn measurements_alarms_events_and_operation_statuses() {
        assert_eq!(
            ok("200,c8y_Temperature,T,25.5,C,2026-12-03T10:00:00.123+01:00"),
            Upstream::Measurements {
                measurement_type: "c8y_Temperature".into(),
                values: vec![Measurement {
                    fragment: "c8y_Temperature".into(),
                    series: "T".into(),
                    value: 25.5,
                    unit: Some("C".into())
                }],
                time: Some("2026-12-03T10:00:00.123+01:00".into())
            }
        );
        let Upstream::Measurements { values, .. } =
            ok("201,S,2026-12-03T10:00:00Z,c8y_T,T,1,C,c8y_H,H,40,%")
        else {
            panic!()
        };
        assert_eq!(values.len(), 2);
        let Upstream::Measurements { values, .. } = ok("201,S,,c8y_T,T,1,C,c8y_H,H,40") else {
            panic!()
        };
        assert_eq!(
            (values.len(), values[1].unit.as_deref()),
            (2, None),
            "the last unit may be left off"
        );
        assert!(matches!(
            ok("307,c8y_Fire,c8y_A,c8y_B"),
            Upstream::ClearAlarmFragment { .. }
        ));
        assert!(matches!(
            ok("302,c8y_Overheat,Too hot"),
            Upstream::RaiseAlarm {
                severity: Severity::Major,
                ..
            }
        ));
        assert!(matches!(
            ok("305,c8y_Overheat,critical"),
            Upstream::AlarmSeverity {
                severity: Severity::Critical,
                ..
            }
        ));
        assert!(matches!(ok("401,52.1,13.4"), Upstream::Event { .. }));
        assert_eq!(
            ok("503,c8y_Restart,done"),
            Upstream::OperationStatus {
                target: OperationRef::Fragment("c8y_Restart".into()),
                status: OperationStatus::Successful(vec!["done".into()])
            }
        );
        assert_eq!(
            ok("505,op-7,disk full"),
            Upstream::OperationStatus {
                target: OperationRef::Id("op-7".into()),
                status: OperationStatus::Failed("disk full".into())
            }
        );
    }

    #[test]
    fn wrong_rows_get_the_documented_code_and_a_clear_message() {
        let e = err("999,x");
        assert_eq!((e.code, e.template.as_str()), (40, "999"));
        assert_eq!(e.to_row(), "40,999,unknown template '999'");
        let e = err("200,c8y_T,T,warm");
        assert_eq!(e.code, 41);
        assert!(e.message.contains("'warm' is not a number"), "{e:?}");
        let e = err("200,c8y_T,T,1,C,yesterday");
        assert!(e.message.contains("ISO 8601"), "{e:?}");
        let e = err("101");
        assert!(e.message.contains("takes 1 to 3 fields"), "{e:?}");
        let e = err("305,c8y_X,LOUD");
        assert!(e.message.contains("CRITICAL, MAJOR"), "{e:?}");
        assert_eq!(err("200,c8y_T,T,NaN").code, 41, "not finite");
        assert_eq!(err("117,soon").code, 41);
        assert_eq!(err("401,52.1").code, 41);
        assert!(
            err("110,a,b,c,d").message.contains("not 4"),
            "a real fourth field"
        );
        assert!(err("116,a,1,u,,2")
            .message
            .contains("software 2 has no name"));
        assert_eq!(err("201,S,,c8y_T,T").code, 41, "a group without its value");
    }

    #[test]
    fn iso_times_become_unix_milliseconds() {
        assert_eq!(iso8601_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            iso8601_ms("2026-12-03T10:00:00.5Z"),
            Some(1_796_292_000_500)
        );
        assert_eq!(
            iso8601_ms("2026-12-03T11:00:00.500+01:00"),
            iso8601_ms("2026-12-03T10:00:00.5Z")
        );
        assert_eq!(
            iso8601_ms("2024-02-29T23:59:59-00:30"),
            Some(1_709_252_999_000)
        );
        assert_eq!(iso8601_ms("2026-13-01T00:00:00Z"), None);
        assert_eq!(iso8601_ms("yesterday"), None);
        assert_eq!(iso8601_ms("1969-12-31T23:59:59Z"), None);
    }

    #[test]
    fn operations_go_down_as_their_rows() {
        let params = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(
            operation_row("dev-1", "c8y_Restart", &Map::new()),
            Ok("510,dev-1".into())
        );
        assert_eq!(
            operation_row(
                "dev-1",
                "c8y_Command",
                &params(json!({"text": "echo \"a,b\""}))
            ),
            Ok("511,dev-1,\"echo \\\"a,b\\\"\"".into())
        );
        assert!(operation_row("dev-1", "c8y_Command", &Map::new())
            .expect_err("text needed")
            .contains("'text'"));
        assert!(operation_row("dev-1", "blink", &Map::new()).is_err());
    }
}
