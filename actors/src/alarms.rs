//! Offline alarm rules and the fleet-wide alarm listing.
//!
//! A rule (`kv` `alarmrule/{name}`, an envelope `AlarmRule` v1) says: a Thing (of this type, in
//! this group, or any) that stays offline `offlineForSeconds` gets an alarm of this severity,
//! with the rule's name as its type. The rules live in memory too ([`AlarmRuleSet`], shared with
//! every Thing actor through the context): a Thing's actor hands the rules that apply to it to
//! its pure `decide` when its connection ends and when its deadline fires (see
//! `thing::alarms`).
//!
//! A rule created while Things are already offline reaches them through a **sweep**: a
//! background task walks the Things the rule can apply to (the group's members, else the
//! registry listing filtered by type) and asks each to watch the rule. Its progress is a durable
//! cursor (`kv` `alarmsweep/{name}` = the last Thing done), so a sweep cut by a crash resumes at
//! start-up; watching is idempotent, so a Thing asked twice does nothing the second time.
//!
//! The alarms themselves are Thing state (events in the Thing's log); the storage `alarms`
//! index, kept by the Thing actors in the same commit as the events, lists them fleet-wide.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use thinghub_storage::{Envelope, StorageError, Store};
use tokio::task::JoinSet;

use crate::codec;
use crate::registry::Registry;
use crate::thing::alarms::{Alarm, AlarmSeverity, AlarmStatus, OfflineRule};
use crate::thing::{validate_thing_name, Rejection, RejectionKind, ThingCommand};
use crate::thing_actor::Request;

/// `kv` prefix of a stored rule.
pub const RULE_PREFIX: &str = "alarmrule/";
/// `kv` prefix of a sweep's cursor.
pub const SWEEP_PREFIX: &str = "alarmsweep/";
/// `event_type` of a stored rule.
pub const ALARM_RULE: &str = "AlarmRule";
/// `event_type` of an alarm in the fleet-wide index.
pub const ALARM_RECORD: &str = "AlarmRecord";
/// Longest rule name, bytes.
pub const RULE_NAME_BYTES_MAX: usize = 128;
/// Longest `offlineForSeconds`: one year.
pub const OFFLINE_FOR_SECONDS_MAX: u64 = 365 * 24 * 3600;
/// Things a sweep reads from storage at a time (its cursor moves once per page).
const SWEEP_PAGE: usize = 256;
/// Things a sweep asks at once.
const SWEEP_CONCURRENCY: usize = 32;
/// First wait before a sweep asks a page again whose Things could not all be asked.
const SWEEP_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest such wait.
const SWEEP_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// Tries per Thing before a sweep passes it (about four minutes of waits).
const SWEEP_ATTEMPTS_MAX: u32 = 8;

/// A stored rule.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlarmRule {
    /// Its name: the type of the alarms it raises.
    pub name: String,
    /// How long a Thing must stay offline.
    pub offline_for_seconds: u64,
    /// Only Things of this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    /// Only Things in this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_group: Option<String>,
    /// Severity of its alarms.
    pub severity: AlarmSeverity,
    /// Unix ms.
    #[serde(rename = "createdAt")]
    pub created_at_ms: u64,
}

impl AlarmRule {
    fn offline_rule(&self) -> OfflineRule {
        OfflineRule {
            name: self.name.clone(),
            offline_for_ms: self.offline_for_seconds.saturating_mul(1000),
            severity: self.severity,
        }
    }
}

/// The rules in force, shared by every Thing actor.
#[derive(Debug, Default)]
pub struct AlarmRuleSet {
    rules: RwLock<Arc<Vec<AlarmRule>>>,
    /// When the server started serving, Unix ms: offline time before it does not count.
    serving_since_ms: u64,
}

impl AlarmRuleSet {
    /// The rules stored in `store` (one that cannot be read is logged and left out), for a
    /// server serving from `now_ms`.
    pub fn load(store: &Store, now_ms: u64) -> Result<AlarmRuleSet, StorageError> {
        let mut rules = Vec::new();
        for (key, bytes) in store.kv_scan_prefix(RULE_PREFIX, usize::MAX)? {
            match decode_rule(&bytes) {
                Ok(rule) => rules.push(rule),
                Err(e) => tracing::error!(key, error = %e, "alarm rule cannot be read; ignored"),
            }
        }
        tracing::info!(rules = rules.len(), "alarm rules loaded");
        Ok(AlarmRuleSet {
            rules: RwLock::new(Arc::new(rules)),
            serving_since_ms: now_ms,
        })
    }

    /// When the server started serving, Unix ms.
    pub fn serving_since_ms(&self) -> u64 {
        self.serving_since_ms
    }

    fn all(&self) -> Arc<Vec<AlarmRule>> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn change(&self, f: impl FnOnce(&mut Vec<AlarmRule>)) {
        let mut guard = self.rules.write().unwrap_or_else(|p| p.into_inner());
        let mut rules = guard.as_ref().clone();
        f(&mut rules);
        *guard = Arc::new(rules);
    }

    /// The rules that apply to `thing` (of `thing_type`) now. Reads group membership only for
    /// rules that name a group; fails if it cannot be read.
    pub fn applicable(
        &self,
        store: &Store,
        thing: &str,
        thing_type: Option<&str>,
    ) -> Result<Vec<OfflineRule>, StorageError> {
        let rules = self.all();
        let mut applicable = Vec::new();
        for rule in rules.iter() {
            if rule
                .thing_type
                .as_deref()
                .is_some_and(|wanted| Some(wanted) != thing_type)
            {
                continue;
            }
            if let Some(group) = &rule.thing_group {
                if !crate::groups::is_member(store, group, thing)? {
                    continue;
                }
            }
            applicable.push(rule.offline_rule());
        }
        Ok(applicable)
    }

    /// Like [`AlarmRuleSet::applicable`], but when membership cannot be read the group rules
    /// count as applying: a watch too many is dropped when it fires (which checks again), a
    /// watch too few would be an alarm never raised.
    pub fn applicable_or_more(
        &self,
        store: &Store,
        thing: &str,
        thing_type: Option<&str>,
    ) -> Vec<OfflineRule> {
        self.applicable(store, thing, thing_type)
            .unwrap_or_else(|e| {
                tracing::warn!(thing, error = %e, "cannot read group membership for the alarm rules; watching every group rule");
                self.all()
                    .iter()
                    .filter(|rule| {
                        rule.thing_type
                            .as_deref()
                            .is_none_or(|wanted| Some(wanted) == thing_type)
                    })
                    .map(AlarmRule::offline_rule)
                    .collect()
            })
    }
}

/// An alarm in the fleet-wide listing.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedAlarm {
    /// The Thing.
    pub thing_name: String,
    /// The alarm.
    #[serde(flatten)]
    pub alarm: Alarm,
}

/// Encodes an alarm for the storage index.
pub fn encode_alarm_record(alarm: &Alarm, at_ms: u64) -> Result<Vec<u8>, StorageError> {
    Ok(Envelope::new(ALARM_RECORD, 1, at_ms, alarm)?.to_bytes()?)
}

/// Decodes an alarm of the storage index.
pub fn decode_alarm_record(bytes: &[u8]) -> Result<Alarm, String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    match (envelope.event_type.as_str(), envelope.event_version) {
        (ALARM_RECORD, 1) => envelope.payload_as().map_err(|e| e.0),
        (other, version) => Err(format!("unknown record {other} v{version}")),
    }
}

/// `thinghub check`: a stored rule decodes.
pub fn decode_rule(bytes: &[u8]) -> Result<AlarmRule, String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    match (envelope.event_type.as_str(), envelope.event_version) {
        (ALARM_RULE, 1) => envelope.payload_as().map_err(|e| e.0),
        (other, version) => Err(format!("unknown record {other} v{version}")),
    }
}

/// A page of the fleet-wide listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmPage {
    /// The alarms.
    pub alarms: Vec<ListedAlarm>,
    /// Where the next page starts (`None`: the end).
    pub next_cursor: Option<String>,
}

/// Which alarms a listing keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmFilter {
    /// Only this status.
    pub status: Option<AlarmStatus>,
    /// Only this severity.
    pub severity: Option<AlarmSeverity>,
}

/// The rules, their sweeps and the alarm listing.
#[derive(Clone)]
pub struct Alarms {
    store: Store,
    registry: Registry,
    set: Arc<AlarmRuleSet>,
    rules_max: usize,
    scan_max: usize,
    sweeps: Arc<tokio::sync::Mutex<()>>,
}

fn storage(e: StorageError) -> Rejection {
    Rejection::new(RejectionKind::Unavailable, format!("storage: {e}"))
}

fn rule_not_found(name: &str) -> Rejection {
    Rejection::new(
        RejectionKind::ExecutionNotFound,
        format!("alarm rule '{name}' not found"),
    )
}

/// Checks a rule or alarm type name: 1..=128 of `[a-zA-Z0-9:_.-]`.
pub fn validate_rule_name(name: &str) -> Result<(), Rejection> {
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-' | b'.'));
    if name.is_empty() || name.len() > RULE_NAME_BYTES_MAX || !valid {
        return Err(Rejection::bad_request(format!(
            "invalid alarm rule name '{}': 1..={RULE_NAME_BYTES_MAX} characters of [a-zA-Z0-9:_.-]",
            name.chars()
                .take(RULE_NAME_BYTES_MAX + 1)
                .collect::<String>()
        )));
    }
    Ok(())
}

/// A rule as an operator asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRule {
    /// Name.
    pub name: String,
    /// Seconds offline.
    pub offline_for_seconds: u64,
    /// Only this type.
    pub thing_type: Option<String>,
    /// Only this group.
    pub thing_group: Option<String>,
    /// Severity.
    pub severity: AlarmSeverity,
}

impl Alarms {
    /// The service over `set` (the rules the Thing actors share, loaded from `store`); resumes
    /// the sweeps a crash cut short. `rules_max` bounds the rules; `scan_max` the index entries
    /// one listing page reads.
    pub fn start(
        store: Store,
        registry: Registry,
        set: Arc<AlarmRuleSet>,
        rules_max: usize,
        scan_max: usize,
    ) -> Result<Alarms, StorageError> {
        let alarms = Alarms {
            store,
            registry,
            set,
            rules_max,
            scan_max,
            sweeps: Arc::default(),
        };
        for (key, after) in alarms.store.kv_scan_prefix(SWEEP_PREFIX, usize::MAX)? {
            let name = &key[SWEEP_PREFIX.len()..];
            let Some(rule) = alarms.set.all().iter().find(|r| r.name == name).cloned() else {
                tracing::warn!(rule = %name, "a sweep cursor without its rule; removed");
                alarms.store.kv_apply_behind(vec![(key.clone(), None)])?;
                continue;
            };
            let after = String::from_utf8(after).ok().filter(|a| !a.is_empty());
            tracing::info!(rule = %name, after = ?after, "resuming an alarm rule sweep");
            alarms.spawn_sweep(rule, after);
        }
        Ok(alarms)
    }

    /// The rules, in name order.
    pub fn rules(&self) -> Vec<AlarmRule> {
        let mut rules = self.set.all().as_ref().clone();
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        rules
    }

    /// One rule.
    pub fn rule(&self, name: &str) -> Result<AlarmRule, Rejection> {
        validate_rule_name(name)?;
        self.set
            .all()
            .iter()
            .find(|r| r.name == name)
            .cloned()
            .ok_or_else(|| rule_not_found(name))
    }

    /// Creates a rule (409 if the name is taken) and starts its sweep.
    pub async fn create(&self, new: NewRule, now_ms: u64) -> Result<AlarmRule, Rejection> {
        validate_rule_name(&new.name)?;
        // Only new rules: the alarm itself stays acknowledgeable and clearable under its type.
        if new.name == crate::thing::alarms::REQUIRED_AVAILABILITY_ALARM {
            return Err(Rejection::bad_request(format!(
                "'{}' is reserved: it is the alarm of a device's own required interval (Cumulocity 117)",
                new.name
            )));
        }
        if new.offline_for_seconds == 0 || new.offline_for_seconds > OFFLINE_FOR_SECONDS_MAX {
            return Err(Rejection::bad_request(format!(
                "offlineForSeconds must be 1..={OFFLINE_FOR_SECONDS_MAX}"
            )));
        }
        if let Some(thing_type) = &new.thing_type {
            validate_rule_name(thing_type).map_err(|_| {
                Rejection::bad_request(format!(
                    "invalid thingType '{thing_type}': 1..=128 characters of [a-zA-Z0-9:_.-]"
                ))
            })?;
        }
        if let Some(group) = &new.thing_group {
            crate::groups::validate_group_name(group)?;
        }
        let _one_change = self.sweeps.lock().await;
        if self.set.all().len() >= self.rules_max {
            return Err(Rejection::new(
                RejectionKind::AlreadyExists,
                format!(
                    "at most {} alarm rules (alarm_rules_max); delete one first",
                    self.rules_max
                ),
            ));
        }
        let rule = AlarmRule {
            name: new.name,
            offline_for_seconds: new.offline_for_seconds,
            thing_type: new.thing_type,
            thing_group: new.thing_group,
            severity: new.severity,
            created_at_ms: now_ms,
        };
        if self.set.all().iter().any(|r| r.name == rule.name) {
            return Err(Rejection::new(
                RejectionKind::AlreadyExists,
                format!("alarm rule '{}' already exists", rule.name),
            ));
        }
        let bytes = Envelope::new(ALARM_RULE, 1, now_ms, &rule)
            .and_then(|e| e.to_bytes())
            .map_err(|e| Rejection::new(RejectionKind::Internal, e.0))?;
        // The sweep's cursor goes in with the rule: a crash before the sweep ends resumes it.
        self.store
            .kv_apply_behind(vec![
                (format!("{SWEEP_PREFIX}{}", rule.name), Some(Vec::new())),
                (format!("{RULE_PREFIX}{}", rule.name), Some(bytes)),
            ])
            .map_err(storage)?;
        self.store.sync().await.map_err(storage)?;
        self.set.change(|all| all.push(rule.clone()));
        tracing::info!(rule = %rule.name, "alarm rule created");
        self.spawn_sweep(rule.clone(), None);
        Ok(rule)
    }

    /// Deletes a rule: no new alarm comes from it (watches end when they come due); its raised
    /// alarms stay until cleared.
    pub async fn delete(&self, name: &str) -> Result<(), Rejection> {
        self.rule(name)?;
        let _one_change = self.sweeps.lock().await;
        self.store
            .kv_apply_behind(vec![
                (format!("{RULE_PREFIX}{name}"), None),
                (format!("{SWEEP_PREFIX}{name}"), None),
            ])
            .map_err(storage)?;
        self.store.sync().await.map_err(storage)?;
        self.set.change(|all| all.retain(|r| r.name != name));
        tracing::info!(rule = %name, "alarm rule deleted");
        Ok(())
    }

    /// Whether `rule` is still in force (the same one: not deleted and created again).
    fn is_current(&self, rule: &AlarmRule) -> bool {
        self.set
            .all()
            .iter()
            .any(|r| r.name == rule.name && r.created_at_ms == rule.created_at_ms)
    }

    fn spawn_sweep(&self, rule: AlarmRule, after: Option<String>) {
        let alarms = self.clone();
        tokio::spawn(async move {
            match alarms.sweep(&rule, after).await {
                Ok(things) => tracing::info!(rule = %rule.name, things, "alarm rule sweep done"),
                Err(e) => {
                    tracing::error!(rule = %rule.name, error = %e, "alarm rule sweep stopped; it resumes at the next start")
                }
            }
        });
    }

    /// Asks every Thing `rule` can apply to to watch it; returns how many were asked. Things
    /// that could not be asked (busy, timed out) are asked again with a growing wait before
    /// the cursor passes them (watching is idempotent); one that still fails after
    /// `SWEEP_ATTEMPTS_MAX` tries (a Thing whose log cannot be read) is logged and passed, so
    /// one broken Thing cannot stop the rule for the rest of the fleet. Stops when the rule is
    /// deleted (or replaced by one of the same name, whose own sweep takes over).
    async fn sweep(
        &self,
        rule: &AlarmRule,
        mut after: Option<String>,
    ) -> Result<u64, StorageError> {
        let mut asked = 0u64;
        loop {
            if !self.is_current(rule) {
                return Ok(asked);
            }
            let (page, last) = self.sweep_page(rule, after.as_deref())?;
            asked += page.len() as u64;
            let mut pending = page;
            let mut wait = SWEEP_RETRY_FIRST;
            for attempt in 1.. {
                let failed = self.ask_to_watch(rule, pending).await;
                if failed.is_empty() {
                    break;
                }
                if attempt >= SWEEP_ATTEMPTS_MAX {
                    tracing::error!(rule = %rule.name, failed = failed.len(), things = ?failed.iter().take(10).collect::<Vec<_>>(), "Things that could not be asked to watch an alarm rule; passed (they are watched from their next disconnection)");
                    break;
                }
                tracing::warn!(rule = %rule.name, failed = failed.len(), retry_in_ms = wait.as_millis() as u64, "some Things could not be asked to watch an alarm rule; asking them again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(SWEEP_RETRY_MAX);
                if !self.is_current(rule) {
                    return Ok(asked);
                }
                pending = failed;
            }
            let key = format!("{SWEEP_PREFIX}{}", rule.name);
            // Under the lock, and only for this rule: a rule deleted and created again has its
            // own cursor, which this sweep must not move or remove.
            let _one_change = self.sweeps.lock().await;
            if !self.is_current(rule) {
                return Ok(asked);
            }
            match last {
                None => {
                    self.store.kv_apply_behind(vec![(key, None)])?;
                    self.store.sync().await?;
                    return Ok(asked);
                }
                Some(last) => {
                    self.store.kv_put_behind(&key, last.clone().into_bytes())?;
                    after = Some(last);
                }
            }
        }
    }

    /// Asks `things` to watch `rule`, `SWEEP_CONCURRENCY` at a time; returns those that could
    /// not be asked (a Thing that does not exist any more is not one).
    async fn ask_to_watch(&self, rule: &AlarmRule, things: Vec<String>) -> Vec<String> {
        let mut asking = JoinSet::new();
        let mut failed = Vec::new();
        for thing in things {
            while asking.len() >= SWEEP_CONCURRENCY {
                if let Some(Ok(Some(thing))) = asking.join_next().await {
                    failed.push(thing);
                }
            }
            let registry = self.registry.clone();
            let rules = vec![rule.offline_rule()];
            asking.spawn(async move {
                let command = ThingCommand::ArmOfflineAlarms {
                    offline_rules: rules,
                };
                // Background work: not refused because clients keep the Thing busy.
                match registry.ask(&thing, Request::Command(command)).await {
                    Ok(_) => None,
                    Err(e) if e.kind == RejectionKind::ThingNotFound => None,
                    Err(e) => {
                        tracing::debug!(thing, error = %e, "a Thing could not be asked to watch an alarm rule");
                        Some(thing)
                    }
                }
            });
        }
        while let Some(done) = asking.join_next().await {
            if let Ok(Some(thing)) = done {
                failed.push(thing);
            }
        }
        failed
    }

    /// `thing` joined `group`: the group's rules watch it now if it is offline (else from its
    /// next disconnection).
    pub async fn thing_joined(&self, group: &str, thing: &str) -> Result<(), Rejection> {
        let thing_type = self
            .store
            .get_thing(thing)
            .map_err(storage)?
            .and_then(|bytes| codec::decode_index_record(thing, &bytes).ok())
            .and_then(|record| record.thing_type);
        let rules: Vec<OfflineRule> = self
            .set
            .all()
            .iter()
            .filter(|r| r.thing_group.as_deref() == Some(group))
            .filter(|r| {
                r.thing_type
                    .as_deref()
                    .is_none_or(|wanted| thing_type.as_deref() == Some(wanted))
            })
            .map(AlarmRule::offline_rule)
            .collect();
        if rules.is_empty() {
            return Ok(());
        }
        let command = ThingCommand::ArmOfflineAlarms {
            offline_rules: rules,
        };
        match self
            .registry
            .request(thing, Request::Command(command))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == RejectionKind::ThingNotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The next Things a rule's sweep asks, and where the page ended (`None`: the last page).
    fn sweep_page(
        &self,
        rule: &AlarmRule,
        after: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), StorageError> {
        if let Some(group) = &rule.thing_group {
            let members = crate::groups::members_after(&self.store, group, after, SWEEP_PAGE)?;
            let last = (members.len() == SWEEP_PAGE)
                .then(|| members.last().cloned())
                .flatten();
            let Some(wanted) = &rule.thing_type else {
                return Ok((members, last));
            };
            let mut things = Vec::with_capacity(members.len());
            for member in members {
                let record = self.store.get_thing(&member)?;
                let of_type = record
                    .and_then(|bytes| codec::decode_index_record(&member, &bytes).ok())
                    .is_some_and(|r| r.thing_type.as_deref() == Some(wanted.as_str()));
                if of_type {
                    things.push(member);
                }
            }
            return Ok((things, last));
        }
        let listed = self.store.list_things(after, SWEEP_PAGE)?;
        let last = (listed.len() == SWEEP_PAGE)
            .then(|| listed.last().map(|(name, _)| name.clone()))
            .flatten();
        let things = listed
            .into_iter()
            .filter(|(name, bytes)| match &rule.thing_type {
                None => true,
                Some(wanted) => codec::decode_index_record(name, bytes)
                    .is_ok_and(|r| r.thing_type.as_deref() == Some(wanted.as_str())),
            })
            .map(|(name, _)| name)
            .collect();
        Ok((things, last))
    }

    /// A page of the fleet-wide listing, in `{thing}/{type}` order after `cursor`. A page reads
    /// at most `alarm_list_scan_max` index entries, so with a selective filter it may hold
    /// fewer than `limit` alarms and still have a next cursor.
    pub fn list(
        &self,
        filter: AlarmFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<AlarmPage, Rejection> {
        let keep = |bytes: &[u8]| match decode_alarm_record(bytes) {
            Ok(alarm) => {
                filter.status.is_none_or(|s| s == alarm.status)
                    && filter.severity.is_none_or(|s| s == alarm.severity)
            }
            Err(_) => false,
        };
        let (page, next) = self
            .store
            .scan_alarms(None, cursor, self.scan_max, limit, keep)
            .map_err(storage)?;
        Ok(AlarmPage {
            alarms: listed(page),
            next_cursor: next,
        })
    }

    /// The alarms of one Thing (every type, cleared ones too).
    pub fn of_thing(&self, thing: &str) -> Result<Vec<ListedAlarm>, Rejection> {
        validate_thing_name(thing)?;
        let (page, _) = self
            .store
            .scan_alarms(
                Some(&format!("{thing}/")),
                None,
                usize::MAX,
                usize::MAX,
                |_| true,
            )
            .map_err(storage)?;
        Ok(listed(page))
    }
}

fn listed(page: Vec<(String, Vec<u8>)>) -> Vec<ListedAlarm> {
    page.into_iter()
        .filter_map(|(key, bytes)| {
            let thing = key.split('/').next()?.to_owned();
            match decode_alarm_record(&bytes) {
                Ok(alarm) => Some(ListedAlarm {
                    thing_name: thing,
                    alarm,
                }),
                Err(e) => {
                    tracing::warn!(key, error = %e, "alarm index record cannot be read; skipped");
                    None
                }
            }
        })
        .collect()
}
