//! A Thing's alarms: offline alarms raised by durable deadlines, acknowledged and cleared.
//!
//! One alarm per type per Thing (as Cumulocity de-duplicates by type): the alarm of an offline
//! rule has the rule's name as its type. A rule is fleet configuration, not Thing state; the shell
//! hands `decide` the rules that apply to the Thing ([`OfflineRule`]) with each request that can
//! need them, so the domain stays pure.
//!
//! The life of an offline alarm, every step an event in the Thing's log:
//! - `Armed`: the Thing's connection ended (or a rule was created while it was offline); the
//!   rule's deadline is `offline since + offlineFor`, kept in the deadline index like a command's.
//! - `Raised`: the deadline fired and the Thing is still offline and the rule still applies.
//! - `Disarmed`: the watch ended without an alarm (the Thing came back, the rule went away).
//! - `Acknowledged`: an operator saw it (it stays until cleared).
//! - `Cleared`: the Thing reconnected, or an operator cleared it.
//!
//! A Cumulocity device's required interval (its 117: `c8y_RequiredAvailability` in the
//! shadow's `reported`) is a watch of its own, on data rather than on the connection: the
//! Thing's state says it, so the domain needs no rule for it. Device data (a reported shadow
//! update, an event, measurements, a device alarm) arms it when it is not armed; its deadline
//! checks when the last data came, and either waits again or raises
//! `c8y_UnavailabilityAlarm`; the next data clears that alarm. Connections do not touch it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Rejection, RejectionKind};

/// How serious an alarm is (Cumulocity's four levels).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AlarmSeverity {
    /// Service is down.
    Critical,
    /// Service is degraded.
    Major,
    /// Worth a look.
    Minor,
    /// Informational.
    Warning,
}

impl AlarmSeverity {
    /// Parses the API's name (`CRITICAL`, `MAJOR`, `MINOR`, `WARNING`).
    pub fn parse(text: &str) -> Option<AlarmSeverity> {
        match text {
            "CRITICAL" => Some(AlarmSeverity::Critical),
            "MAJOR" => Some(AlarmSeverity::Major),
            "MINOR" => Some(AlarmSeverity::Minor),
            "WARNING" => Some(AlarmSeverity::Warning),
            _ => None,
        }
    }

    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmSeverity::Critical => "CRITICAL",
            AlarmSeverity::Major => "MAJOR",
            AlarmSeverity::Minor => "MINOR",
            AlarmSeverity::Warning => "WARNING",
        }
    }
}

/// Where an alarm is in its life.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AlarmStatus {
    /// Raised, nobody has looked.
    Active,
    /// An operator has seen it; the condition still holds.
    Acknowledged,
    /// Over (the Thing came back, or an operator cleared it).
    Cleared,
}

impl AlarmStatus {
    /// Parses the API's name (`ACTIVE`, `ACKNOWLEDGED`, `CLEARED`).
    pub fn parse(text: &str) -> Option<AlarmStatus> {
        match text {
            "ACTIVE" => Some(AlarmStatus::Active),
            "ACKNOWLEDGED" => Some(AlarmStatus::Acknowledged),
            "CLEARED" => Some(AlarmStatus::Cleared),
            _ => None,
        }
    }

    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmStatus::Active => "ACTIVE",
            AlarmStatus::Acknowledged => "ACKNOWLEDGED",
            AlarmStatus::Cleared => "CLEARED",
        }
    }
}

/// An offline rule as it applies to one Thing (the shell has matched its type and group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineRule {
    /// The rule's name: the type of the alarms it raises.
    pub name: String,
    /// How long the Thing must stay offline, ms.
    pub offline_for_ms: u64,
    /// The severity of its alarms.
    pub severity: AlarmSeverity,
}

/// A Thing's alarm: the latest of each type (a cleared one stays until the type is raised again).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alarm {
    /// Its type (an offline rule's name).
    #[serde(rename = "type")]
    pub alarm_type: String,
    /// How serious.
    pub severity: AlarmSeverity,
    /// Where it is in its life.
    pub status: AlarmStatus,
    /// What happened, for people.
    pub text: String,
    /// When it was raised, Unix ms.
    #[serde(rename = "raisedAt")]
    pub raised_at_ms: u64,
    /// When the Thing went offline, Unix ms (offline alarms).
    #[serde(
        rename = "offlineSince",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub offline_since_ms: Option<u64>,
    /// When an operator acknowledged it, Unix ms.
    #[serde(
        rename = "acknowledgedAt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub acknowledged_at_ms: Option<u64>,
    /// Who acknowledged it (the API key id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    /// When it was cleared, Unix ms.
    #[serde(rename = "clearedAt", default, skip_serializing_if = "Option::is_none")]
    pub cleared_at_ms: Option<u64>,
    /// Why it was cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_reason: Option<String>,
}

/// An offline watch waiting for its deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Armed {
    /// When the alarm is due, Unix ms.
    pub due_at_ms: u64,
    /// When the Thing went offline, Unix ms.
    pub offline_since_ms: u64,
}

/// A Thing's alarms and offline watches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarms {
    /// Offline watches by rule name.
    #[serde(default)]
    pub armed: BTreeMap<String, Armed>,
    /// The latest alarm of each type.
    #[serde(default)]
    pub alarms: BTreeMap<String, Alarm>,
}

/// `AlarmArmed`: an offline watch started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmArmed {
    /// The rule.
    pub rule: String,
    /// When the alarm is due, Unix ms.
    pub due_at_ms: u64,
    /// When the Thing went offline, Unix ms.
    pub offline_since_ms: u64,
    /// Unix ms.
    pub at_ms: u64,
}

/// `AlarmDisarmed`: an offline watch ended without an alarm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmDisarmed {
    /// The rule.
    pub rule: String,
    /// Why (`reconnected`, `rule no longer applies`, `thing deleted`).
    pub reason: String,
    /// Unix ms.
    pub at_ms: u64,
}

/// `AlarmRaised`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmRaised {
    /// The alarm's type.
    pub alarm_type: String,
    /// How serious.
    pub severity: AlarmSeverity,
    /// What happened.
    pub text: String,
    /// When the Thing went offline, Unix ms (offline alarms).
    #[serde(default)]
    pub offline_since_ms: Option<u64>,
    /// Unix ms.
    pub at_ms: u64,
}

/// `AlarmAcknowledged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmAcknowledged {
    /// The alarm's type.
    pub alarm_type: String,
    /// Who (API key id).
    pub by: String,
    /// Unix ms.
    pub at_ms: u64,
}

/// `AlarmCleared`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmCleared {
    /// The alarm's type.
    pub alarm_type: String,
    /// Why (`reconnected`, `cleared by {key}`).
    pub reason: String,
    /// Unix ms.
    pub at_ms: u64,
}

/// `AlarmSeverityChanged`: a device changed an open alarm's severity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmSeverityChanged {
    /// The alarm's type.
    pub alarm_type: String,
    /// The new severity.
    pub severity: AlarmSeverity,
    /// Unix ms.
    pub at_ms: u64,
}

/// The alarm a device's required interval raises (and the name of its watch).
pub const REQUIRED_AVAILABILITY_ALARM: &str = "c8y_UnavailabilityAlarm";
/// The `reported` fragment holding the required interval (`responseInterval`, minutes).
pub const REQUIRED_AVAILABILITY_FRAGMENT: &str = "c8y_RequiredAvailability";

/// The required interval `reported` names, ms (`responseInterval` minutes; 0 or less, or
/// none: not watched).
pub fn required_interval_ms(reported: &Map<String, Value>) -> Option<u64> {
    reported
        .get(REQUIRED_AVAILABILITY_FRAGMENT)?
        .get("responseInterval")?
        .as_u64()
        .filter(|m| *m > 0)
        .map(|m| m.saturating_mul(60_000))
}

/// Longest alarm text a device may send, bytes.
pub const ALARM_TEXT_BYTES_MAX: usize = 1024;
/// Most alarm types one Thing keeps (each its latest alarm): a device raising ever new types
/// must not grow its Thing's state without bound.
pub const ALARM_TYPES_MAX: usize = 100;

/// Everything that happens to alarms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlarmEvent {
    /// An offline watch started.
    Armed(AlarmArmed),
    /// An offline watch ended without an alarm.
    Disarmed(AlarmDisarmed),
    /// An alarm was raised.
    Raised(AlarmRaised),
    /// An operator acknowledged an alarm.
    Acknowledged(AlarmAcknowledged),
    /// An alarm ended.
    Cleared(AlarmCleared),
    /// A device changed an open alarm's severity.
    SeverityChanged(AlarmSeverityChanged),
}

impl AlarmEvent {
    /// The alarm type (or rule) the event is about.
    pub fn alarm_type(&self) -> &str {
        match self {
            AlarmEvent::Armed(e) => &e.rule,
            AlarmEvent::Disarmed(e) => &e.rule,
            AlarmEvent::Raised(e) => &e.alarm_type,
            AlarmEvent::Acknowledged(e) => &e.alarm_type,
            AlarmEvent::Cleared(e) => &e.alarm_type,
            AlarmEvent::SeverityChanged(e) => &e.alarm_type,
        }
    }
}

impl Alarms {
    /// The earliest offline deadline.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.armed.values().map(|a| a.due_at_ms).min()
    }

    /// Whether an alarm of `alarm_type` is open (active or acknowledged).
    pub fn is_open(&self, alarm_type: &str) -> bool {
        self.alarms
            .get(alarm_type)
            .is_some_and(|a| a.status != AlarmStatus::Cleared)
    }

    /// The open alarms.
    pub fn open(&self) -> impl Iterator<Item = &Alarm> + '_ {
        self.alarms
            .values()
            .filter(|a| a.status != AlarmStatus::Cleared)
    }

    /// Folds one event in.
    pub fn apply(&mut self, event: &AlarmEvent) {
        match event {
            AlarmEvent::Armed(armed) => {
                self.armed.insert(
                    armed.rule.clone(),
                    Armed {
                        due_at_ms: armed.due_at_ms,
                        offline_since_ms: armed.offline_since_ms,
                    },
                );
            }
            AlarmEvent::Disarmed(disarmed) => {
                self.armed.remove(&disarmed.rule);
            }
            AlarmEvent::Raised(raised) => {
                self.armed.remove(&raised.alarm_type);
                self.alarms.insert(
                    raised.alarm_type.clone(),
                    Alarm {
                        alarm_type: raised.alarm_type.clone(),
                        severity: raised.severity,
                        status: AlarmStatus::Active,
                        text: raised.text.clone(),
                        raised_at_ms: raised.at_ms,
                        offline_since_ms: raised.offline_since_ms,
                        acknowledged_at_ms: None,
                        acknowledged_by: None,
                        cleared_at_ms: None,
                        cleared_reason: None,
                    },
                );
            }
            AlarmEvent::Acknowledged(acknowledged) => {
                if let Some(alarm) = self.alarms.get_mut(&acknowledged.alarm_type) {
                    alarm.status = AlarmStatus::Acknowledged;
                    alarm.acknowledged_at_ms = Some(acknowledged.at_ms);
                    alarm.acknowledged_by = Some(acknowledged.by.clone());
                }
            }
            AlarmEvent::Cleared(cleared) => {
                if let Some(alarm) = self.alarms.get_mut(&cleared.alarm_type) {
                    alarm.status = AlarmStatus::Cleared;
                    alarm.cleared_at_ms = Some(cleared.at_ms);
                    alarm.cleared_reason = Some(cleared.reason.clone());
                }
            }
            AlarmEvent::SeverityChanged(changed) => {
                if let Some(alarm) = self.alarms.get_mut(&changed.alarm_type) {
                    alarm.severity = changed.severity;
                }
            }
        }
    }
}

/// The Thing has been offline since `offline_since_ms`: watch every applicable rule that has
/// no open alarm and has not already raised one for this same offline period (an operator may
/// have cleared it: asking again must not raise it again).
pub fn decide_arm(
    alarms: &Alarms,
    rules: &[OfflineRule],
    offline_since_ms: u64,
    now_ms: u64,
) -> Vec<AlarmEvent> {
    rules
        .iter()
        // An open offline alarm of the rule already says it (a device's own alarm of the
        // same type does not stop the watch: the offline alarm replaces it when it fires).
        .filter(|rule| {
            !alarms
                .alarms
                .get(&rule.name)
                .is_some_and(|a| a.status != AlarmStatus::Cleared && a.offline_since_ms.is_some())
        })
        .filter(|rule| {
            alarms
                .alarms
                .get(&rule.name)
                .and_then(|a| a.offline_since_ms)
                != Some(offline_since_ms)
        })
        .filter(|rule| {
            // Already watching with the same deadline (a sweep sent again): nothing new.
            alarms.armed.get(&rule.name).map(|a| a.due_at_ms)
                != Some(offline_since_ms.saturating_add(rule.offline_for_ms))
        })
        .map(|rule| {
            AlarmEvent::Armed(AlarmArmed {
                rule: rule.name.clone(),
                due_at_ms: offline_since_ms.saturating_add(rule.offline_for_ms),
                offline_since_ms,
                at_ms: now_ms,
            })
        })
        .collect()
}

/// The Thing reconnected: end every offline watch and clear every open offline alarm (the
/// required-interval watch is about data, not the connection: it stays).
pub fn decide_back(alarms: &Alarms, reason: &str, now_ms: u64) -> Vec<AlarmEvent> {
    decide_ended(alarms, reason, now_ms, |name| {
        name != REQUIRED_AVAILABILITY_ALARM
    })
}

/// The Thing is gone: end every watch and clear every open server alarm.
pub fn decide_gone(alarms: &Alarms, reason: &str, now_ms: u64) -> Vec<AlarmEvent> {
    decide_ended(alarms, reason, now_ms, |_| true)
}

fn decide_ended(
    alarms: &Alarms,
    reason: &str,
    now_ms: u64,
    ends: impl Fn(&str) -> bool,
) -> Vec<AlarmEvent> {
    let disarmed = alarms.armed.keys().filter(|rule| ends(rule)).map(|rule| {
        AlarmEvent::Disarmed(AlarmDisarmed {
            rule: rule.clone(),
            reason: reason.to_owned(),
            at_ms: now_ms,
        })
    });
    let cleared = alarms
        .open()
        .filter(|alarm| alarm.offline_since_ms.is_some() && ends(&alarm.alarm_type))
        .map(|alarm| {
            AlarmEvent::Cleared(AlarmCleared {
                alarm_type: alarm.alarm_type.clone(),
                reason: reason.to_owned(),
                at_ms: now_ms,
            })
        });
    disarmed.chain(cleared).collect()
}

/// Device data arrived at `now_ms`; `interval_ms` is the Thing's required interval with it.
/// Clears an open unavailability alarm, and arms the watch when it is not armed (or is due
/// later than this data requires); otherwise nothing: the armed deadline looks at the last
/// data when it fires, so a device sending often costs no write per message.
pub fn decide_data(alarms: &Alarms, interval_ms: Option<u64>, now_ms: u64) -> Vec<AlarmEvent> {
    let name = REQUIRED_AVAILABILITY_ALARM;
    let mut events = Vec::new();
    if alarms
        .alarms
        .get(name)
        .is_some_and(|a| a.status != AlarmStatus::Cleared && a.offline_since_ms.is_some())
    {
        events.push(AlarmEvent::Cleared(AlarmCleared {
            alarm_type: name.to_owned(),
            reason: "data received".into(),
            at_ms: now_ms,
        }));
    }
    match (interval_ms, alarms.armed.get(name)) {
        (Some(interval), armed) => {
            let due_at_ms = now_ms.saturating_add(interval);
            if armed.is_none_or(|a| a.due_at_ms > due_at_ms) {
                events.push(AlarmEvent::Armed(AlarmArmed {
                    rule: name.to_owned(),
                    due_at_ms,
                    offline_since_ms: now_ms,
                    at_ms: now_ms,
                }));
            }
        }
        (None, Some(_)) => events.push(AlarmEvent::Disarmed(AlarmDisarmed {
            rule: name.to_owned(),
            reason: "no required interval".into(),
            at_ms: now_ms,
        })),
        (None, None) => {}
    }
    events
}

/// The required-interval watch's deadline fired: the device's last data was at
/// `last_data_ms`. Waits again until `last data + interval` (from when the server started
/// serving, at the earliest: time it was down does not count), or raises the alarm.
fn fire_silence(
    armed: &Armed,
    interval_ms: Option<u64>,
    last_data_ms: Option<u64>,
    now_ms: u64,
    serving_since_ms: u64,
) -> AlarmEvent {
    let name = REQUIRED_AVAILABILITY_ALARM.to_owned();
    let Some(interval) = interval_ms else {
        return AlarmEvent::Disarmed(AlarmDisarmed {
            rule: name,
            reason: "no required interval".into(),
            at_ms: now_ms,
        });
    };
    let since = last_data_ms
        .unwrap_or(armed.offline_since_ms)
        .max(armed.offline_since_ms);
    let due_at_ms = since.max(serving_since_ms).saturating_add(interval);
    if due_at_ms > now_ms {
        return AlarmEvent::Armed(AlarmArmed {
            rule: name,
            due_at_ms,
            offline_since_ms: since,
            at_ms: now_ms,
        });
    }
    AlarmEvent::Raised(AlarmRaised {
        alarm_type: name,
        severity: AlarmSeverity::Major,
        text: format!(
            "no data for {} min (required interval {} min)",
            now_ms.saturating_sub(since) / 60_000,
            interval / 60_000
        ),
        offline_since_ms: Some(since),
        at_ms: now_ms,
    })
}

/// Deadlines fired at `now_ms`: raise what is due and still applies, drop what no longer does.
///
/// A watch is due `offlineFor` after the later of when the Thing went offline and
/// `serving_since_ms` (when the server started serving): time the server was down does not
/// count, so a restart after maintenance gives every device the rule's time to come back
/// instead of raising the whole fleet's alarms at once. The rule as it is now decides (one
/// deleted and created again with another time moves the deadline).
#[allow(clippy::too_many_arguments)]
pub fn decide_fire(
    alarms: &Alarms,
    rules: &[OfflineRule],
    online: bool,
    now_ms: u64,
    serving_since_ms: u64,
    interval_ms: Option<u64>,
    last_data_ms: Option<u64>,
) -> Vec<AlarmEvent> {
    let mut events = Vec::new();
    for (name, armed) in &alarms.armed {
        if armed.due_at_ms > now_ms {
            continue;
        }
        if name == REQUIRED_AVAILABILITY_ALARM {
            events.push(fire_silence(
                armed,
                interval_ms,
                last_data_ms,
                now_ms,
                serving_since_ms,
            ));
            continue;
        }
        let rule = rules.iter().find(|rule| rule.name == *name);
        let due = rule.map(|rule| {
            armed
                .offline_since_ms
                .max(serving_since_ms)
                .saturating_add(rule.offline_for_ms)
        });
        match (rule, due) {
            (Some(_), Some(due)) if !online && due > now_ms => {
                events.push(AlarmEvent::Armed(AlarmArmed {
                    rule: name.clone(),
                    due_at_ms: due,
                    offline_since_ms: armed.offline_since_ms,
                    at_ms: now_ms,
                }));
            }
            (Some(rule), _) if !online => {
                let minutes = (now_ms.saturating_sub(armed.offline_since_ms)) / 60_000;
                events.push(AlarmEvent::Raised(AlarmRaised {
                    alarm_type: name.clone(),
                    severity: rule.severity,
                    text: format!(
                        "offline for {minutes} min (rule '{name}': offline for {} s)",
                        rule.offline_for_ms / 1000
                    ),
                    offline_since_ms: Some(armed.offline_since_ms),
                    at_ms: now_ms,
                }));
            }
            (_, _) => events.push(AlarmEvent::Disarmed(AlarmDisarmed {
                rule: name.clone(),
                reason: if online {
                    "online".into()
                } else {
                    "rule no longer applies".into()
                },
                at_ms: now_ms,
            })),
        }
    }
    events
}

/// The Thing's alarm of `alarm_type`, or 404.
fn find<'a>(alarms: &'a Alarms, alarm_type: &str) -> Result<&'a Alarm, Rejection> {
    alarms.alarms.get(alarm_type).ok_or_else(|| {
        Rejection::new(
            RejectionKind::ExecutionNotFound,
            format!("no alarm of type '{alarm_type}'"),
        )
    })
}

/// A device raises an alarm of `alarm_type` (Cumulocity 301-304). One already open stays as it
/// is (alarms are de-duplicated by type); a cleared one is raised anew.
pub fn decide_raise(
    alarms: &Alarms,
    alarm_type: &str,
    severity: AlarmSeverity,
    text: Option<&str>,
    now_ms: u64,
) -> Result<Vec<AlarmEvent>, Rejection> {
    if text.is_some_and(|t| t.len() > ALARM_TEXT_BYTES_MAX) {
        return Err(Rejection::bad_request(format!(
            "the alarm text is longer than {ALARM_TEXT_BYTES_MAX} bytes"
        )));
    }
    if is_server_alarm(alarms, alarm_type) {
        return Err(server_alarm(alarm_type));
    }
    if alarms.is_open(alarm_type) {
        return Ok(Vec::new());
    }
    if !alarms.alarms.contains_key(alarm_type) && alarms.alarms.len() >= ALARM_TYPES_MAX {
        return Err(Rejection::new(
            RejectionKind::TooManyRequests,
            format!("at most {ALARM_TYPES_MAX} alarm types per Thing"),
        ));
    }
    Ok(vec![AlarmEvent::Raised(AlarmRaised {
        alarm_type: alarm_type.to_owned(),
        severity,
        text: text.unwrap_or(alarm_type).to_owned(),
        offline_since_ms: None,
        at_ms: now_ms,
    })])
}

/// A device changes an open alarm's severity (Cumulocity 305).
pub fn decide_severity(
    alarms: &Alarms,
    alarm_type: &str,
    severity: AlarmSeverity,
    now_ms: u64,
) -> Result<Vec<AlarmEvent>, Rejection> {
    let alarm = find(alarms, alarm_type)?;
    if is_server_alarm(alarms, alarm_type) {
        return Err(server_alarm(alarm_type));
    }
    if alarm.status == AlarmStatus::Cleared {
        return Err(Rejection::new(
            RejectionKind::TerminalStateReached,
            format!("the alarm '{alarm_type}' is cleared"),
        ));
    }
    if alarm.severity == severity {
        return Ok(Vec::new());
    }
    Ok(vec![AlarmEvent::SeverityChanged(AlarmSeverityChanged {
        alarm_type: alarm_type.to_owned(),
        severity,
        at_ms: now_ms,
    })])
}

/// Whether `alarm_type` is the server's (an offline alarm or watch): a device may not raise,
/// change or clear it.
fn is_server_alarm(alarms: &Alarms, alarm_type: &str) -> bool {
    alarms.armed.contains_key(alarm_type)
        || alarms
            .alarms
            .get(alarm_type)
            .is_some_and(|a| a.offline_since_ms.is_some())
}

fn server_alarm(alarm_type: &str) -> Rejection {
    Rejection::new(
        RejectionKind::InvalidStateTransition,
        format!("'{alarm_type}' is an offline alarm of the server's; a device cannot change it"),
    )
}

/// A device clears its own alarm (Cumulocity 306); the server's offline alarms are not its.
pub fn decide_device_clear(
    alarms: &Alarms,
    alarm_type: &str,
    now_ms: u64,
) -> Result<Vec<AlarmEvent>, Rejection> {
    if is_server_alarm(alarms, alarm_type) {
        return Err(server_alarm(alarm_type));
    }
    decide_clear(alarms, alarm_type, "device", now_ms)
}

/// An operator acknowledges an open alarm (again: nothing changes).
pub fn decide_acknowledge(
    alarms: &Alarms,
    alarm_type: &str,
    by: &str,
    now_ms: u64,
) -> Result<Vec<AlarmEvent>, Rejection> {
    let alarm = find(alarms, alarm_type)?;
    match alarm.status {
        AlarmStatus::Active => Ok(vec![AlarmEvent::Acknowledged(AlarmAcknowledged {
            alarm_type: alarm_type.to_owned(),
            by: by.to_owned(),
            at_ms: now_ms,
        })]),
        AlarmStatus::Acknowledged => Ok(Vec::new()),
        AlarmStatus::Cleared => Err(Rejection::new(
            RejectionKind::TerminalStateReached,
            format!("the alarm '{alarm_type}' is already cleared"),
        )),
    }
}

/// An operator clears an open alarm (again: nothing changes).
pub fn decide_clear(
    alarms: &Alarms,
    alarm_type: &str,
    by: &str,
    now_ms: u64,
) -> Result<Vec<AlarmEvent>, Rejection> {
    let alarm = find(alarms, alarm_type)?;
    if alarm.status == AlarmStatus::Cleared {
        return Ok(Vec::new());
    }
    Ok(vec![AlarmEvent::Cleared(AlarmCleared {
        alarm_type: alarm_type.to_owned(),
        reason: format!("cleared by {by}"),
        at_ms: now_ms,
    })])
}
