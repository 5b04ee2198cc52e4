//! Commands: cloud-to-device requests with a durable time-to-live.
//!
//! An operator sends a command; it becomes an *execution* in `SENT` with an absolute deadline
//! (`created_at + ttl`). The device answers with one status; the first terminal one wins.
//! With no terminal answer by the deadline the execution is `TIMED_OUT`; an operator may cancel
//! it (`CANCELED`). `IN_PROGRESS` (the AWS IoT Commands progress status) keeps it pending.
//!
//! Every transition is an event in the Thing's log, and so is every response that was refused
//! (late, duplicate, unknown execution, unknown status): auditors see what the device said even
//! when it changed nothing. The deadline lives in the state (so in the log); the actor shell
//! keeps the storage `deadlines` index in step with [`Commands::next_deadline_ms`].
//!
//! Deadlines are exact regardless of timer lag: a response or cancel that arrives after the
//! deadline, before the timer fired, first records the time-out and is then refused.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Rejection, RejectionKind};

/// Bounds on commands (all config values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLimits {
    /// Longest `action`, bytes.
    pub action_bytes_max: usize,
    /// Largest `params` (compact JSON), bytes.
    pub params_bytes_max: usize,
    /// Largest device `result` (compact JSON), bytes.
    pub result_bytes_max: usize,
    /// TTL when the request names none, seconds.
    pub ttl_s_default: u64,
    /// Shortest TTL accepted, seconds.
    pub ttl_s_min: u64,
    /// Longest TTL accepted, seconds.
    pub ttl_s_max: u64,
    /// Executions one Thing may have pending at once.
    pub pending_max: usize,
    /// Finished executions kept in the state (all of them stay in the log).
    pub finished_kept_max: u32,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            action_bytes_max: 128,
            params_bytes_max: 8 * 1024,
            result_bytes_max: 8 * 1024,
            ttl_s_default: 60,
            ttl_s_min: 1,
            ttl_s_max: 7 * 24 * 3600,
            pending_max: 100,
            finished_kept_max: 100,
        }
    }
}

/// Longest execution or command id, bytes.
pub const COMMAND_ID_BYTES_MAX: usize = 64;
/// Longest `statusReason.reasonCode`, bytes (as AWS IoT).
pub const REASON_CODE_BYTES_MAX: usize = 64;
/// Longest `statusReason.reasonDescription`, bytes (as AWS IoT).
pub const REASON_DESCRIPTION_BYTES_MAX: usize = 1024;

/// Where an execution is.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandStatus {
    /// Sent, awaiting the device.
    #[serde(rename = "SENT")]
    Sent,
    /// The device said it is working on it (AWS IoT Commands); still pending.
    #[serde(rename = "IN_PROGRESS")]
    InProgress,
    /// The device executed it.
    #[serde(rename = "SUCCEEDED")]
    Succeeded,
    /// The device tried and failed.
    #[serde(rename = "FAILED")]
    Failed,
    /// The device refused it.
    #[serde(rename = "REJECTED")]
    Rejected,
    /// No terminal answer before the deadline (or the device said so).
    #[serde(rename = "TIMED_OUT")]
    TimedOut,
    /// Canceled by an operator (or the device said so).
    #[serde(rename = "CANCELED")]
    Canceled,
}

impl CommandStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Sent => "SENT",
            CommandStatus::InProgress => "IN_PROGRESS",
            CommandStatus::Succeeded => "SUCCEEDED",
            CommandStatus::Failed => "FAILED",
            CommandStatus::Rejected => "REJECTED",
            CommandStatus::TimedOut => "TIMED_OUT",
            CommandStatus::Canceled => "CANCELED",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<CommandStatus> {
        Some(match text {
            "SENT" => CommandStatus::Sent,
            "IN_PROGRESS" => CommandStatus::InProgress,
            "SUCCEEDED" => CommandStatus::Succeeded,
            "FAILED" => CommandStatus::Failed,
            "REJECTED" => CommandStatus::Rejected,
            "TIMED_OUT" => CommandStatus::TimedOut,
            "CANCELED" => CommandStatus::Canceled,
            _ => return None,
        })
    }

    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        !matches!(self, CommandStatus::Sent | CommandStatus::InProgress)
    }
}

/// The device's explanation of a status (AWS IoT `statusReason`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReason {
    /// `[A-Z0-9_-]{1,64}`.
    pub reason_code: String,
    /// Free text, at most 1024 bytes.
    #[serde(default)]
    pub reason_description: Option<String>,
}

/// One execution of a command on this Thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandExecution {
    /// Unique per Thing.
    pub execution_id: String,
    /// The command it executes.
    pub command_id: String,
    /// What to do.
    pub action: String,
    /// Input parameters.
    #[serde(default)]
    pub params: Option<Map<String, Value>>,
    /// Time-to-live, seconds.
    pub ttl_s: u64,
    /// Unix ms of creation.
    pub created_at_ms: u64,
    /// Unix ms of the deadline (`created_at_ms + ttl_s * 1000`).
    pub expires_at_ms: u64,
    /// Where it is.
    pub status: CommandStatus,
    /// The device's result, if it sent one.
    #[serde(default)]
    pub result: Option<Map<String, Value>>,
    /// The device's reason, if it sent one.
    #[serde(default)]
    pub status_reason: Option<StatusReason>,
    /// Unix ms of the last change.
    pub updated_at_ms: u64,
    /// Unix ms it reached a terminal status.
    #[serde(default)]
    pub completed_at_ms: Option<u64>,
}

impl CommandExecution {
    /// The management API's view.
    pub fn to_json(&self, thing: &str) -> Value {
        let mut body = serde_json::json!({
            "executionId": self.execution_id,
            "commandId": self.command_id,
            "thingName": thing,
            "action": self.action,
            "params": self.params,
            "ttl": self.ttl_s,
            "status": self.status.as_str(),
            "createdAt": self.created_at_ms,
            "expiresAt": self.expires_at_ms,
            "updatedAt": self.updated_at_ms,
        });
        if let Some(result) = &self.result {
            body["result"] = Value::Object(result.clone());
        }
        if let Some(reason) = &self.status_reason {
            body["statusReason"] = reason_json(reason);
        }
        if let Some(completed) = self.completed_at_ms {
            body["completedAt"] = completed.into();
        }
        body
    }

    /// The request the device receives: `{commandId, action, params, timestamp (s), ttl}`.
    pub fn request_json(&self) -> Value {
        serde_json::json!({
            "commandId": self.command_id,
            "action": self.action,
            "params": self.params.clone().unwrap_or_default(),
            "timestamp": self.created_at_ms / 1000,
            "ttl": self.ttl_s,
        })
    }
}

fn reason_json(reason: &StatusReason) -> Value {
    let mut body = serde_json::json!({ "reasonCode": reason.reason_code });
    if let Some(description) = &reason.reason_description {
        body["reasonDescription"] = description.clone().into();
    }
    body
}

/// A Thing's executions: the pending ones (with deadlines) and a bounded recent history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Commands {
    /// Executions awaiting a terminal status, by execution id.
    #[serde(default)]
    pub pending: BTreeMap<String, CommandExecution>,
    /// Finished executions, oldest first (bounded; the log keeps all).
    #[serde(default)]
    pub finished: VecDeque<CommandExecution>,
}

impl Commands {
    /// The earliest deadline of a pending execution (what the deadline index holds).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.pending.values().map(|e| e.expires_at_ms).min()
    }

    /// An execution, pending or recently finished.
    pub fn get(&self, execution_id: &str) -> Option<&CommandExecution> {
        self.pending.get(execution_id).or_else(|| {
            self.finished
                .iter()
                .find(|e| e.execution_id == execution_id)
        })
    }

    /// Every execution in the state, newest first (by creation, then id).
    pub fn newest_first(&self) -> Vec<&CommandExecution> {
        let mut all: Vec<&CommandExecution> =
            self.pending.values().chain(self.finished.iter()).collect();
        all.sort_by(|a, b| {
            (b.created_at_ms, &b.execution_id).cmp(&(a.created_at_ms, &a.execution_id))
        });
        all
    }

    /// A page of executions, newest first, optionally of one status, continuing after
    /// `cursor` (the previous page's `next_cursor`).
    pub fn page(
        &self,
        status: Option<CommandStatus>,
        cursor: Option<&PageCursor>,
        limit: usize,
    ) -> CommandPage {
        let mut items = Vec::new();
        let mut next_cursor = None;
        for execution in self.newest_first() {
            let position = PageCursor::of(execution);
            if cursor.is_some_and(|c| position >= *c) {
                continue;
            }
            if status.is_some_and(|s| s != execution.status) {
                continue;
            }
            if items.len() == limit {
                next_cursor = items.last().map(PageCursor::of);
                break;
            }
            items.push(execution.clone());
        }
        CommandPage { items, next_cursor }
    }

    /// The earliest deadline after these (not yet applied) events.
    pub fn next_deadline_after<'e>(
        &self,
        events: impl IntoIterator<Item = &'e CommandEvent>,
    ) -> Option<u64> {
        let mut deadlines: BTreeMap<&str, u64> = self
            .pending
            .values()
            .map(|e| (e.execution_id.as_str(), e.expires_at_ms))
            .collect();
        for event in events {
            match event {
                CommandEvent::Sent(sent) => {
                    deadlines.insert(&sent.execution_id, sent.expires_at_ms);
                }
                CommandEvent::Responded(r) if r.status.is_terminal() => {
                    deadlines.remove(r.execution_id.as_str());
                }
                CommandEvent::TimedOut(f) | CommandEvent::Canceled(f) => {
                    deadlines.remove(f.execution_id.as_str());
                }
                CommandEvent::Responded(_) | CommandEvent::ResponseRefused(_) => {}
            }
        }
        deadlines.values().copied().min()
    }

    /// Folds one command event in. Holds no rules.
    pub fn apply(&mut self, event: &CommandEvent) {
        self.apply_trimming(event, true);
    }

    fn apply_trimming(&mut self, event: &CommandEvent, trim: bool) {
        let kept_max = match event {
            CommandEvent::Responded(r) => r.finished_kept_max,
            CommandEvent::TimedOut(f) | CommandEvent::Canceled(f) => f.finished_kept_max,
            CommandEvent::Sent(_) | CommandEvent::ResponseRefused(_) => u32::MAX,
        };
        match event {
            CommandEvent::Sent(sent) => {
                self.pending.insert(
                    sent.execution_id.clone(),
                    CommandExecution {
                        execution_id: sent.execution_id.clone(),
                        command_id: sent.command_id.clone(),
                        action: sent.action.clone(),
                        params: sent.params.clone(),
                        ttl_s: sent.ttl_s,
                        created_at_ms: sent.created_at_ms,
                        expires_at_ms: sent.expires_at_ms,
                        status: CommandStatus::Sent,
                        result: None,
                        status_reason: None,
                        updated_at_ms: sent.created_at_ms,
                        completed_at_ms: None,
                    },
                );
            }
            CommandEvent::Responded(responded) => {
                let Some(execution) = self.pending.get_mut(&responded.execution_id) else {
                    return;
                };
                execution.status = responded.status;
                execution.updated_at_ms = responded.at_ms;
                if responded.result.is_some() {
                    execution.result = responded.result.clone();
                }
                if responded.status_reason.is_some() {
                    execution.status_reason = responded.status_reason.clone();
                }
                if responded.status.is_terminal() {
                    self.finish(&responded.execution_id, responded.at_ms);
                }
            }
            CommandEvent::TimedOut(finished) => {
                self.end(finished, CommandStatus::TimedOut);
            }
            CommandEvent::Canceled(finished) => {
                self.end(finished, CommandStatus::Canceled);
            }
            CommandEvent::ResponseRefused(_) => {}
        }
        if trim {
            while self.finished.len() > kept_max as usize {
                self.finished.pop_front();
            }
        }
    }

    fn end(&mut self, finished: &CommandFinished, status: CommandStatus) {
        if let Some(execution) = self.pending.get_mut(&finished.execution_id) {
            execution.status = status;
            execution.updated_at_ms = finished.at_ms;
            self.finish(&finished.execution_id, finished.at_ms);
        }
    }

    fn finish(&mut self, execution_id: &str, at_ms: u64) {
        if let Some(mut execution) = self.pending.remove(execution_id) {
            execution.completed_at_ms = Some(at_ms);
            self.finished.push_back(execution);
        }
    }
}

/// A position in the newest-first order of executions: `(created_at_ms, execution_id)`,
/// rendered as `{createdAt}.{executionId}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageCursor {
    /// Unix ms of creation.
    pub created_at_ms: u64,
    /// Execution id.
    pub execution_id: String,
}

impl PageCursor {
    fn of(execution: &CommandExecution) -> PageCursor {
        PageCursor {
            created_at_ms: execution.created_at_ms,
            execution_id: execution.execution_id.clone(),
        }
    }

    /// Parses `{createdAt}.{executionId}`.
    pub fn parse(text: &str) -> Result<PageCursor, Rejection> {
        let invalid = || Rejection::bad_request(format!("invalid cursor '{text}'"));
        let (created, id) = text.split_once('.').ok_or_else(invalid)?;
        Ok(PageCursor {
            created_at_ms: created.parse().map_err(|_| invalid())?,
            execution_id: id.to_owned(),
        })
    }
}

impl std::fmt::Display for PageCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at_ms, self.execution_id)
    }
}

/// A page of executions.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandPage {
    /// Newest first.
    pub items: Vec<CommandExecution>,
    /// Where the next page starts, if there may be more.
    pub next_cursor: Option<PageCursor>,
}

/// A validated command to send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendCommand {
    /// Unique id of this execution (chosen by the caller).
    pub execution_id: String,
    /// The command's id (the caller's, or generated).
    pub command_id: String,
    /// What to do.
    pub action: String,
    /// Input parameters.
    pub params: Option<Map<String, Value>>,
    /// Time-to-live, seconds (`None` = the default).
    pub ttl_s: Option<u64>,
}

/// A device's answer, as read from the topic and payload (checked in [`decide_respond`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandResponse {
    /// From the topic.
    pub execution_id: String,
    /// The raw `status` value (an unknown one is refused and recorded).
    pub status: String,
    /// Output data.
    pub result: Option<Map<String, Value>>,
    /// Why (AWS `statusReason`).
    pub status_reason: Option<StatusReason>,
}

fn json_bytes(value: &Map<String, Value>) -> usize {
    serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// Checks an execution or command id: 1..=64 characters of `[A-Za-z0-9_-]` (one topic level).
pub fn validate_id(what: &str, id: &str) -> Result<(), Rejection> {
    let valid = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if id.is_empty() || id.len() > COMMAND_ID_BYTES_MAX || !valid {
        return Err(Rejection::bad_request(format!(
            "invalid {what} '{id}': 1..={COMMAND_ID_BYTES_MAX} characters of [A-Za-z0-9_-]"
        )));
    }
    Ok(())
}

impl SendCommand {
    /// Validates an operator's request body `{action, params?, ttl?, commandId?}`; the ids
    /// not given are taken from `new_id`.
    pub fn from_json(
        body: &Value,
        execution_id: String,
        new_command_id: impl FnOnce() -> String,
        limits: &CommandLimits,
    ) -> Result<SendCommand, Rejection> {
        let Some(body) = body.as_object() else {
            return Err(Rejection::bad_request("Payload must be a JSON object"));
        };
        let action = match body.get("action") {
            Some(Value::String(action)) => action.clone(),
            Some(_) => return Err(Rejection::bad_request("action must be a string")),
            None => return Err(Rejection::bad_request("Missing required field: action")),
        };
        let params = match body.get("params") {
            None | Some(Value::Null) => None,
            Some(Value::Object(params)) => Some(params.clone()),
            Some(_) => return Err(Rejection::bad_request("params must be a JSON object")),
        };
        let ttl_s = match body.get("ttl") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
                Rejection::bad_request(format!(
                    "ttl must be whole seconds in {}..={}",
                    limits.ttl_s_min, limits.ttl_s_max
                ))
            })?),
            Some(_) => return Err(Rejection::bad_request("ttl must be a number of seconds")),
        };
        let command_id = match body.get("commandId") {
            None | Some(Value::Null) => new_command_id(),
            Some(Value::String(id)) => id.clone(),
            Some(_) => return Err(Rejection::bad_request("commandId must be a string")),
        };
        let command = SendCommand {
            execution_id,
            command_id,
            action,
            params,
            ttl_s,
        };
        command.validate(limits)?;
        Ok(command)
    }

    /// Checks every bound.
    pub fn validate(&self, limits: &CommandLimits) -> Result<(), Rejection> {
        validate_id("executionId", &self.execution_id)?;
        validate_id("commandId", &self.command_id)?;
        if self.action.is_empty() || self.action.len() > limits.action_bytes_max {
            return Err(Rejection::bad_request(format!(
                "action must be 1..={} bytes",
                limits.action_bytes_max
            )));
        }
        if self.action.chars().any(char::is_control) {
            return Err(Rejection::bad_request(
                "action must not contain control characters",
            ));
        }
        if let Some(params) = &self.params {
            let bytes = json_bytes(params);
            if bytes > limits.params_bytes_max {
                return Err(Rejection::new(
                    RejectionKind::PayloadTooLarge,
                    format!(
                        "params is {bytes} bytes; the maximum is {}",
                        limits.params_bytes_max
                    ),
                ));
            }
        }
        if let Some(ttl_s) = self.ttl_s {
            if ttl_s < limits.ttl_s_min || ttl_s > limits.ttl_s_max {
                return Err(Rejection::bad_request(format!(
                    "ttl {ttl_s} is out of range {}..={} seconds",
                    limits.ttl_s_min, limits.ttl_s_max
                )));
            }
        }
        Ok(())
    }
}

impl CommandResponse {
    /// Parses a device response body `{status, result?, statusReason?}`; the execution id comes
    /// from the topic. Malformed bodies are refused here (400, not recorded: they are not a
    /// response); a well-formed one with an unknown status is refused and recorded by
    /// [`decide_respond`].
    pub fn from_json(
        execution_id: &str,
        body: &Value,
        limits: &CommandLimits,
    ) -> Result<CommandResponse, Rejection> {
        validate_id("executionId", execution_id)?;
        let Some(body) = body.as_object() else {
            return Err(Rejection::bad_request("Payload must be a JSON object"));
        };
        let status = match body.get("status") {
            Some(Value::String(status)) => status.clone(),
            Some(_) => return Err(Rejection::bad_request("status must be a string")),
            None => return Err(Rejection::bad_request("Missing required field: status")),
        };
        if status.len() > REASON_CODE_BYTES_MAX {
            return Err(Rejection::bad_request("status is too long"));
        }
        let result = match body.get("result") {
            None | Some(Value::Null) => None,
            Some(Value::Object(result)) => {
                let bytes = json_bytes(result);
                if bytes > limits.result_bytes_max {
                    return Err(Rejection::new(
                        RejectionKind::PayloadTooLarge,
                        format!(
                            "result is {bytes} bytes; the maximum is {}",
                            limits.result_bytes_max
                        ),
                    ));
                }
                Some(result.clone())
            }
            Some(_) => return Err(Rejection::bad_request("result must be a JSON object")),
        };
        let status_reason = match body.get("statusReason") {
            None | Some(Value::Null) => None,
            Some(Value::Object(reason)) => Some(parse_reason(reason)?),
            Some(_) => return Err(Rejection::bad_request("statusReason must be a JSON object")),
        };
        Ok(CommandResponse {
            execution_id: execution_id.to_owned(),
            status,
            result,
            status_reason,
        })
    }
}

fn parse_reason(reason: &Map<String, Value>) -> Result<StatusReason, Rejection> {
    let reason_code = match reason.get("reasonCode") {
        Some(Value::String(code)) => code.clone(),
        _ => {
            return Err(Rejection::bad_request(
                "statusReason.reasonCode must be a string",
            ))
        }
    };
    let valid = reason_code
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if reason_code.is_empty() || reason_code.len() > REASON_CODE_BYTES_MAX || !valid {
        return Err(Rejection::bad_request(format!(
            "statusReason.reasonCode must be 1..={REASON_CODE_BYTES_MAX} characters of [A-Z0-9_-]"
        )));
    }
    let reason_description = match reason.get("reasonDescription") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if text.len() <= REASON_DESCRIPTION_BYTES_MAX => {
            Some(text.clone())
        }
        Some(_) => {
            return Err(Rejection::bad_request(format!(
                "statusReason.reasonDescription must be a string of at most {REASON_DESCRIPTION_BYTES_MAX} bytes"
            )))
        }
    };
    Ok(StatusReason {
        reason_code,
        reason_description,
    })
}

/// Payload of `CommandSent` v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandSent {
    /// Unique per Thing.
    pub execution_id: String,
    /// The command's id.
    pub command_id: String,
    /// What to do.
    pub action: String,
    /// Input parameters.
    #[serde(default)]
    pub params: Option<Map<String, Value>>,
    /// Time-to-live, seconds.
    pub ttl_s: u64,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms of the deadline.
    pub expires_at_ms: u64,
}

/// Payload of `CommandResponded` v1: an accepted device answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResponded {
    /// Which execution.
    pub execution_id: String,
    /// The new status (`IN_PROGRESS` or terminal).
    pub status: CommandStatus,
    /// Output data.
    #[serde(default)]
    pub result: Option<Map<String, Value>>,
    /// Why.
    #[serde(default)]
    pub status_reason: Option<StatusReason>,
    /// Unix ms.
    pub at_ms: u64,
    /// How many finished executions the state keeps (the bound when this was decided, so
    /// replay trims exactly as the live state did).
    pub finished_kept_max: u32,
}

/// Payload of `CommandTimedOut` v1 and `CommandCanceled` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandFinished {
    /// Which execution.
    pub execution_id: String,
    /// Unix ms.
    pub at_ms: u64,
    /// As in [`CommandResponded::finished_kept_max`].
    pub finished_kept_max: u32,
}

/// Payload of `CommandResponseRefused` v1: a device answer that changed nothing, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponseRefused {
    /// The execution the response named.
    pub execution_id: String,
    /// The status it carried (raw).
    pub status: String,
    /// Why it was refused.
    pub reason: String,
    /// Unix ms.
    pub at_ms: u64,
}

/// The command events (a part of [`super::ThingEvent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandEvent {
    /// A command was sent.
    Sent(CommandSent),
    /// The device answered.
    Responded(CommandResponded),
    /// The deadline passed without a terminal answer.
    TimedOut(CommandFinished),
    /// An operator canceled it.
    Canceled(CommandFinished),
    /// A device answer was refused.
    ResponseRefused(CommandResponseRefused),
}

/// What deciding a command request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandDecision {
    /// Events to append, in order.
    pub events: Vec<CommandEvent>,
    /// The reply once they are durable.
    pub outcome: CommandOutcome,
}

/// The reply of a command request.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandOutcome {
    /// The execution after the change.
    Execution(Box<CommandExecution>),
    /// The request was refused, and (if `events` is not empty) the refusal recorded.
    Refused(Rejection),
    /// Deadlines fired: how many executions timed out.
    TimedOut(usize),
}

/// The time-outs due at `now_ms` (deadline reached, no terminal answer), oldest first.
fn time_outs(commands: &Commands, now_ms: u64, limits: &CommandLimits) -> Vec<CommandEvent> {
    let mut due: Vec<&CommandExecution> = commands
        .pending
        .values()
        .filter(|e| e.expires_at_ms <= now_ms)
        .collect();
    due.sort_by_key(|e| (e.expires_at_ms, e.execution_id.clone()));
    due.into_iter()
        .map(|e| {
            CommandEvent::TimedOut(CommandFinished {
                execution_id: e.execution_id.clone(),
                at_ms: now_ms,
                finished_kept_max: limits.finished_kept_max,
            })
        })
        .collect()
}

/// Sends a command: `SENT` with a deadline `ttl` from now.
pub fn decide_send(
    commands: &Commands,
    command: &SendCommand,
    now_ms: u64,
    limits: &CommandLimits,
) -> Result<CommandDecision, Rejection> {
    command.validate(limits)?;
    if commands.get(&command.execution_id).is_some() {
        return Err(Rejection::new(
            RejectionKind::AlreadyExists,
            format!("execution '{}' already exists", command.execution_id),
        ));
    }
    // Executions already past their deadline do not count against the bound.
    let live = commands
        .pending
        .values()
        .filter(|e| e.expires_at_ms > now_ms)
        .count();
    if live >= limits.pending_max {
        return Err(Rejection::new(
            RejectionKind::TooManyRequests,
            format!(
                "Too many pending commands: the thing already has {} awaiting an answer",
                limits.pending_max
            ),
        ));
    }
    let ttl_s = command.ttl_s.unwrap_or(limits.ttl_s_default);
    let sent = CommandSent {
        execution_id: command.execution_id.clone(),
        command_id: command.command_id.clone(),
        action: command.action.clone(),
        params: command.params.clone(),
        ttl_s,
        created_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(ttl_s.saturating_mul(1000)),
    };
    let mut events = time_outs(commands, now_ms, limits);
    events.push(CommandEvent::Sent(sent));
    let execution = outcome_of(commands, &events, &command.execution_id)?;
    Ok(CommandDecision {
        events,
        outcome: CommandOutcome::Execution(execution),
    })
}

/// Applies a device's answer: the first terminal one wins; anything else is refused and
/// recorded.
pub fn decide_respond(
    commands: &Commands,
    response: &CommandResponse,
    now_ms: u64,
    limits: &CommandLimits,
) -> CommandDecision {
    let mut events = time_outs(commands, now_ms, limits);
    let refuse = |events: &mut Vec<CommandEvent>, kind: RejectionKind, reason: String| {
        events.push(CommandEvent::ResponseRefused(CommandResponseRefused {
            execution_id: response.execution_id.clone(),
            status: response.status.clone(),
            reason: reason.clone(),
            at_ms: now_ms,
        }));
        CommandDecision {
            events: std::mem::take(events),
            outcome: CommandOutcome::Refused(Rejection::new(kind, reason)),
        }
    };
    let status = match CommandStatus::parse(&response.status) {
        Some(CommandStatus::Sent) | None => {
            let reason = format!(
                "unknown status '{}': expected SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED or IN_PROGRESS",
                response.status
            );
            return refuse(&mut events, RejectionKind::InvalidRequest, reason);
        }
        Some(status) => status,
    };
    let timed_out_now = events
        .iter()
        .any(|e| matches!(e, CommandEvent::TimedOut(t) if t.execution_id == response.execution_id));
    match commands.get(&response.execution_id) {
        None => {
            let reason = format!("unknown execution '{}'", response.execution_id);
            refuse(&mut events, RejectionKind::ExecutionNotFound, reason)
        }
        Some(_) if timed_out_now => {
            let reason = format!(
                "execution '{}' is already TIMED_OUT (its ttl passed)",
                response.execution_id
            );
            refuse(&mut events, RejectionKind::TerminalStateReached, reason)
        }
        Some(execution) if execution.status.is_terminal() => {
            let reason = format!(
                "execution '{}' is already {}",
                response.execution_id,
                execution.status.as_str()
            );
            refuse(&mut events, RejectionKind::TerminalStateReached, reason)
        }
        Some(_) => {
            events.push(CommandEvent::Responded(CommandResponded {
                execution_id: response.execution_id.clone(),
                status,
                result: response.result.clone(),
                status_reason: response.status_reason.clone(),
                at_ms: now_ms,
                finished_kept_max: limits.finished_kept_max,
            }));
            match outcome_of(commands, &events, &response.execution_id) {
                Ok(execution) => CommandDecision {
                    events,
                    outcome: CommandOutcome::Execution(execution),
                },
                Err(rejection) => CommandDecision {
                    events: Vec::new(),
                    outcome: CommandOutcome::Refused(rejection),
                },
            }
        }
    }
}

/// Cancels a pending execution (409 if it already ended, 404 if unknown).
pub fn decide_cancel(
    commands: &Commands,
    execution_id: &str,
    now_ms: u64,
    limits: &CommandLimits,
) -> Result<CommandDecision, Rejection> {
    let mut events = time_outs(commands, now_ms, limits);
    let Some(execution) = commands.get(execution_id) else {
        return Err(Rejection::new(
            RejectionKind::ExecutionNotFound,
            format!("execution '{execution_id}' not found"),
        ));
    };
    let timed_out_now = events
        .iter()
        .any(|e| matches!(e, CommandEvent::TimedOut(t) if t.execution_id == execution_id));
    if timed_out_now || execution.status.is_terminal() {
        let status = if timed_out_now {
            CommandStatus::TimedOut
        } else {
            execution.status
        };
        // The time-outs found on the way are still worth recording.
        return Ok(CommandDecision {
            events,
            outcome: CommandOutcome::Refused(Rejection::new(
                RejectionKind::TerminalStateReached,
                format!(
                    "execution '{execution_id}' is already {}; it cannot be canceled",
                    status.as_str()
                ),
            )),
        });
    }
    events.push(CommandEvent::Canceled(CommandFinished {
        execution_id: execution_id.to_owned(),
        at_ms: now_ms,
        finished_kept_max: limits.finished_kept_max,
    }));
    let execution = outcome_of(commands, &events, execution_id)?;
    Ok(CommandDecision {
        events,
        outcome: CommandOutcome::Execution(execution),
    })
}

/// Times out every pending execution whose deadline is at or before `now_ms`.
pub fn decide_fire(commands: &Commands, now_ms: u64, limits: &CommandLimits) -> CommandDecision {
    let events = time_outs(commands, now_ms, limits);
    let count = events.len();
    CommandDecision {
        events,
        outcome: CommandOutcome::TimedOut(count),
    }
}

/// The execution as it will be once `events` are applied (only that execution is copied).
fn outcome_of(
    commands: &Commands,
    events: &[CommandEvent],
    execution_id: &str,
) -> Result<Box<CommandExecution>, Rejection> {
    let mut scratch = Commands::default();
    if let Some(execution) = commands.get(execution_id) {
        scratch
            .pending
            .insert(execution_id.to_owned(), execution.clone());
    }
    for event in events {
        // Untrimmed: with a history bound of 0 the execution must still be reported.
        scratch.apply_trimming(event, false);
    }
    scratch
        .pending
        .remove(execution_id)
        .or_else(|| scratch.finished.pop_back())
        .map(Box::new)
        .ok_or_else(|| {
            Rejection::new(
                RejectionKind::Internal,
                "the execution is missing after its own change",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thing::ErrorCode;
    use proptest::prelude::*;
    use serde_json::json;

    const T0: u64 = 1_700_000_000_000;

    fn limits() -> CommandLimits {
        CommandLimits::default()
    }

    fn send(id: &str, ttl_s: Option<u64>) -> SendCommand {
        SendCommand {
            execution_id: id.into(),
            command_id: format!("cmd-{id}"),
            action: "setTemperature".into(),
            params: json!({"value": 24}).as_object().cloned(),
            ttl_s,
        }
    }

    fn response(id: &str, status: &str) -> CommandResponse {
        CommandResponse {
            execution_id: id.into(),
            status: status.into(),
            result: json!({"ok": true}).as_object().cloned(),
            status_reason: None,
        }
    }

    /// Applies every event of `decision` to `commands`; returns the outcome.
    fn then(commands: &mut Commands, decision: CommandDecision) -> CommandOutcome {
        for event in &decision.events {
            commands.apply(event);
        }
        decision.outcome
    }

    fn given_sent(ids: &[&str], ttl_s: u64) -> Commands {
        let mut commands = Commands::default();
        for id in ids {
            let decision =
                decide_send(&commands, &send(id, Some(ttl_s)), T0, &limits()).expect("sent");
            then(&mut commands, decision);
        }
        commands
    }

    fn status_of(commands: &Commands, id: &str) -> CommandStatus {
        commands.get(id).expect("execution").status
    }

    fn refused(outcome: CommandOutcome) -> Rejection {
        match outcome {
            CommandOutcome::Refused(rejection) => rejection,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_sent_command_is_pending_with_an_absolute_deadline() {
        let commands = Commands::default();
        let decision = decide_send(&commands, &send("e1", Some(30)), T0, &limits()).expect("ok");
        assert_eq!(decision.events.len(), 1);
        let CommandOutcome::Execution(execution) = decision.outcome else {
            panic!("execution expected")
        };
        assert_eq!(execution.status, CommandStatus::Sent);
        assert_eq!(execution.expires_at_ms, T0 + 30_000);
        assert_eq!(
            execution.request_json(),
            json!({"commandId":"cmd-e1","action":"setTemperature","params":{"value":24},
                   "timestamp": T0 / 1000, "ttl": 30})
        );
        let defaulted = decide_send(&commands, &send("e2", None), T0, &limits()).expect("ok");
        let CommandOutcome::Execution(execution) = defaulted.outcome else {
            panic!("execution expected")
        };
        assert_eq!(execution.ttl_s, limits().ttl_s_default);
    }

    #[test]
    fn the_first_terminal_answer_wins_and_later_ones_are_refused_and_recorded() {
        let mut commands = given_sent(&["e1"], 30);
        let decision = decide_respond(&commands, &response("e1", "SUCCEEDED"), T0 + 1, &limits());
        assert!(matches!(
            then(&mut commands, decision),
            CommandOutcome::Execution(_)
        ));
        assert_eq!(status_of(&commands, "e1"), CommandStatus::Succeeded);
        assert_eq!(commands.next_deadline_ms(), None);

        let before = commands.clone();
        let decision = decide_respond(&commands, &response("e1", "FAILED"), T0 + 2, &limits());
        assert!(matches!(
            decision.events.as_slice(),
            [CommandEvent::ResponseRefused(r)] if r.status == "FAILED"
        ));
        let rejection = refused(then(&mut commands, decision));
        assert_eq!(rejection.code(), ErrorCode::Conflict);
        assert_eq!(rejection.message, "execution 'e1' is already SUCCEEDED");
        assert_eq!(commands, before, "a refused answer changes nothing");
    }

    #[test]
    fn answers_for_unknown_executions_or_with_unknown_statuses_are_refused_and_recorded() {
        let commands = given_sent(&["e1"], 30);
        let decision = decide_respond(&commands, &response("nope", "SUCCEEDED"), T0, &limits());
        assert_eq!(decision.events.len(), 1);
        assert_eq!(refused(decision.outcome).code(), ErrorCode::NotFound);

        for status in ["DONE", "SENT", "succeeded"] {
            let decision = decide_respond(&commands, &response("e1", status), T0, &limits());
            assert_eq!(decision.events.len(), 1, "{status}");
            let rejection = refused(decision.outcome);
            assert_eq!(rejection.code(), ErrorCode::BadRequest, "{status}");
            assert!(rejection.message.contains("unknown status"), "{status}");
        }
    }

    #[test]
    fn in_progress_keeps_the_execution_pending_until_a_terminal_answer() {
        let mut commands = given_sent(&["e1"], 30);
        let decision = decide_respond(&commands, &response("e1", "IN_PROGRESS"), T0, &limits());
        then(&mut commands, decision);
        assert_eq!(status_of(&commands, "e1"), CommandStatus::InProgress);
        assert_eq!(commands.next_deadline_ms(), Some(T0 + 30_000));
        let decision = decide_respond(&commands, &response("e1", "FAILED"), T0, &limits());
        then(&mut commands, decision);
        assert_eq!(status_of(&commands, "e1"), CommandStatus::Failed);
    }

    #[test]
    fn the_deadline_times_out_only_expired_executions() {
        let mut commands = given_sent(&["e1"], 10);
        let decision = decide_send(&commands, &send("e2", Some(20)), T0, &limits()).expect("ok");
        then(&mut commands, decision);
        assert!(decide_fire(&commands, T0 + 9_999, &limits())
            .events
            .is_empty());
        let decision = decide_fire(&commands, T0 + 10_000, &limits());
        assert_eq!(decision.outcome, CommandOutcome::TimedOut(1));
        then(&mut commands, decision);
        assert_eq!(status_of(&commands, "e1"), CommandStatus::TimedOut);
        assert_eq!(status_of(&commands, "e2"), CommandStatus::Sent);
        assert_eq!(commands.next_deadline_ms(), Some(T0 + 20_000));
    }

    #[test]
    fn a_late_answer_before_the_timer_fired_times_out_first_then_is_refused() {
        let mut commands = given_sent(&["e1"], 10);
        let decision = decide_respond(
            &commands,
            &response("e1", "SUCCEEDED"),
            T0 + 10_000,
            &limits(),
        );
        assert!(matches!(
            decision.events.as_slice(),
            [CommandEvent::TimedOut(_), CommandEvent::ResponseRefused(_)]
        ));
        let rejection = refused(then(&mut commands, decision));
        assert_eq!(rejection.code(), ErrorCode::Conflict);
        assert!(
            rejection.message.contains("TIMED_OUT"),
            "{}",
            rejection.message
        );
        assert_eq!(status_of(&commands, "e1"), CommandStatus::TimedOut);
    }

    #[test]
    fn cancel_ends_a_pending_execution_and_nothing_else() {
        let mut commands = given_sent(&["e1", "e2"], 10);
        let decision = decide_cancel(&commands, "e1", T0 + 1, &limits()).expect("cancel");
        then(&mut commands, decision);
        assert_eq!(status_of(&commands, "e1"), CommandStatus::Canceled);

        let again = decide_cancel(&commands, "e1", T0 + 2, &limits()).expect("decided");
        let rejection = refused(again.outcome);
        assert_eq!(rejection.code(), ErrorCode::Conflict);
        assert!(rejection.message.contains("already CANCELED"));

        let unknown = decide_cancel(&commands, "nope", T0, &limits()).expect_err("404");
        assert_eq!(unknown.code(), ErrorCode::NotFound);

        let late = decide_cancel(&commands, "e2", T0 + 10_000, &limits()).expect("decided");
        assert!(matches!(
            late.events.as_slice(),
            [CommandEvent::TimedOut(_)]
        ));
        assert!(refused(late.outcome).message.contains("TIMED_OUT"));
    }

    #[test]
    fn bad_requests_are_refused_with_specific_errors() {
        let commands = given_sent(&["e1"], 10);
        let check = |command: SendCommand| {
            decide_send(&commands, &command, T0, &limits()).expect_err("refused")
        };
        let err = check(send("e1", Some(10)));
        assert_eq!(err.code(), ErrorCode::Conflict);
        for ttl in [0, limits().ttl_s_max + 1] {
            let err = check(send("e9", Some(ttl)));
            assert_eq!(err.code(), ErrorCode::BadRequest);
            assert!(err.message.contains("out of range"), "{}", err.message);
        }
        let mut empty = send("e9", None);
        empty.action = String::new();
        assert_eq!(check(empty).code(), ErrorCode::BadRequest);
        let mut big = send("e9", None);
        big.params = json!({"blob": "x".repeat(limits().params_bytes_max)})
            .as_object()
            .cloned();
        assert_eq!(check(big).code(), ErrorCode::PayloadTooLarge);
        let mut bad_id = send("e/9", None);
        bad_id.execution_id = "e/9".into();
        assert_eq!(check(bad_id).code(), ErrorCode::BadRequest);
    }

    #[test]
    fn parsing_bodies_reports_the_field_at_fault() {
        let parse = |body: Value| {
            SendCommand::from_json(&body, "e1".into(), || "c1".into(), &limits())
                .map_err(|r| r.message)
        };
        assert_eq!(
            parse(json!([])).expect_err("refused"),
            "Payload must be a JSON object"
        );
        assert_eq!(
            parse(json!({})).expect_err("refused"),
            "Missing required field: action"
        );
        assert_eq!(
            parse(json!({"action": 3})).expect_err("refused"),
            "action must be a string"
        );
        assert_eq!(
            parse(json!({"action": "a", "params": [1]})).expect_err("refused"),
            "params must be a JSON object"
        );
        assert!(parse(json!({"action": "a", "ttl": -1}))
            .expect_err("refused")
            .starts_with("ttl must be whole seconds"));
        let ok = parse(json!({"action": "reboot", "ttl": 5})).expect("valid");
        assert_eq!((ok.command_id.as_str(), ok.ttl_s), ("c1", Some(5)));

        let answer =
            |body: Value| CommandResponse::from_json("e1", &body, &limits()).map_err(|r| r.message);
        assert_eq!(
            answer(json!({})).expect_err("refused"),
            "Missing required field: status"
        );
        assert_eq!(
            answer(json!({"status": "FAILED", "result": 1})).expect_err("refused"),
            "result must be a JSON object"
        );
        assert!(
            answer(json!({"status": "FAILED", "statusReason": {"reasonCode": "bad code"}}))
                .expect_err("refused")
                .contains("reasonCode")
        );
        let parsed = answer(json!({"status": "FAILED",
            "statusReason": {"reasonCode": "DEVICE_TOO_BUSY", "reasonDescription": "later"}}))
        .expect("valid");
        assert_eq!(
            parsed.status_reason.map(|r| r.reason_code),
            Some("DEVICE_TOO_BUSY".to_owned())
        );
    }

    #[test]
    fn pending_executions_are_bounded_and_expired_ones_do_not_count() {
        let small = CommandLimits {
            pending_max: 2,
            ..limits()
        };
        let mut commands = Commands::default();
        for id in ["e1", "e2"] {
            let decision = decide_send(&commands, &send(id, Some(10)), T0, &small).expect("ok");
            then(&mut commands, decision);
        }
        let err = decide_send(&commands, &send("e3", Some(10)), T0, &small).expect_err("full");
        assert_eq!(err.code(), ErrorCode::TooManyRequests);
        // Once they expired, sending times them out and goes ahead.
        let decision = decide_send(&commands, &send("e3", Some(10)), T0 + 10_000, &small)
            .expect("expired ones make room");
        assert_eq!(decision.events.len(), 3);
    }

    #[test]
    fn the_finished_history_is_bounded_by_the_bound_recorded_in_the_events() {
        let small = CommandLimits {
            finished_kept_max: 2,
            ..limits()
        };
        let mut commands = Commands::default();
        for id in ["e1", "e2", "e3"] {
            let decision = decide_send(&commands, &send(id, Some(10)), T0, &small).expect("ok");
            then(&mut commands, decision);
            let decision = decide_respond(&commands, &response(id, "SUCCEEDED"), T0, &small);
            then(&mut commands, decision);
        }
        let kept: Vec<&str> = commands
            .finished
            .iter()
            .map(|e| e.execution_id.as_str())
            .collect();
        assert_eq!(kept, ["e2", "e3"]);
    }

    #[test]
    fn pages_run_newest_first_and_filter_by_status() {
        let mut commands = Commands::default();
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            let decision =
                decide_send(&commands, &send(id, Some(10)), T0 + i as u64, &limits()).expect("ok");
            then(&mut commands, decision);
        }
        let decision = decide_cancel(&commands, "b", T0 + 5, &limits()).expect("cancel");
        then(&mut commands, decision);
        let page = commands.page(None, None, 2);
        let ids: Vec<&str> = page.items.iter().map(|e| e.execution_id.as_str()).collect();
        assert_eq!(ids, ["d", "c"]);
        let cursor =
            PageCursor::parse(&page.next_cursor.expect("more").to_string()).expect("cursor");
        let rest = commands.page(None, Some(&cursor), 10);
        let ids: Vec<&str> = rest.items.iter().map(|e| e.execution_id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(rest.next_cursor, None);
        let canceled = commands.page(Some(CommandStatus::Canceled), None, 10);
        assert_eq!(canceled.items.len(), 1);
        assert!(PageCursor::parse("nonsense").is_err());
    }

    // ---- proptest: any interleaving ends in exactly one terminal state and replays ----

    #[derive(Debug, Clone)]
    enum Op {
        Send(usize, u64),
        Respond(usize, &'static str),
        Cancel(usize),
        Fire,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let status = prop_oneof![
            Just("SUCCEEDED"),
            Just("FAILED"),
            Just("REJECTED"),
            Just("TIMED_OUT"),
            Just("CANCELED"),
            Just("IN_PROGRESS"),
            Just("BOGUS"),
        ];
        prop_oneof![
            (0..4usize, 1..20u64).prop_map(|(i, ttl)| Op::Send(i, ttl)),
            (0..5usize, status).prop_map(|(i, s)| Op::Respond(i, s)),
            (0..5usize).prop_map(Op::Cancel),
            Just(Op::Fire),
            (0..15_000u64).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn any_interleaving_ends_terminal_once_and_replays(ops in prop::collection::vec(op(), 0..60)) {
            let limits = CommandLimits { finished_kept_max: 3, ..CommandLimits::default() };
            let ids = ["e0", "e1", "e2", "e3", "e4"];
            let mut live = Commands::default();
            let mut log: Vec<CommandEvent> = Vec::new();
            let mut now = T0;
            // The first terminal status each execution reached (it must never change after).
            let mut terminal: BTreeMap<String, CommandStatus> = BTreeMap::new();
            let run = |decision: CommandDecision, live: &mut Commands, log: &mut Vec<CommandEvent>| {
                let predicted = live.next_deadline_after(decision.events.iter());
                for event in decision.events {
                    live.apply(&event);
                    log.push(event);
                }
                predicted
            };
            for op in ops {
                let decision = match op {
                    Op::Send(i, ttl) => decide_send(&live, &send(ids[i], Some(ttl)), now, &limits).ok(),
                    Op::Respond(i, status) => Some(decide_respond(&live, &response(ids[i], status), now, &limits)),
                    Op::Cancel(i) => decide_cancel(&live, ids[i], now, &limits).ok(),
                    Op::Fire => Some(decide_fire(&live, now, &limits)),
                    Op::Advance(ms) => { now += ms; None }
                };
                if let Some(decision) = decision {
                    // An id evicted from the kept history may be sent again: a new execution.
                    for event in &decision.events {
                        if let CommandEvent::Sent(sent) = event {
                            terminal.remove(&sent.execution_id);
                        }
                    }
                    let predicted = run(decision, &mut live, &mut log);
                    prop_assert_eq!(predicted, live.next_deadline_ms());
                }
                for execution in live.pending.values().chain(live.finished.iter()) {
                    if execution.status.is_terminal() {
                        let first = *terminal.entry(execution.execution_id.clone()).or_insert(execution.status);
                        prop_assert_eq!(first, execution.status, "terminal status changed");
                    }
                }
            }
            // After every deadline, one fire leaves nothing pending: each ended exactly once.
            now += 20_001;
            let decision = decide_fire(&live, now, &limits);
            run(decision, &mut live, &mut log);
            prop_assert!(live.pending.is_empty());
            prop_assert!(live.finished.iter().all(|e| e.status.is_terminal() && e.completed_at_ms.is_some()));
            let ends = |id: &str| log.iter().filter(|e| match e {
                CommandEvent::Responded(r) => r.execution_id == id && r.status.is_terminal(),
                CommandEvent::TimedOut(f) | CommandEvent::Canceled(f) => f.execution_id == id,
                _ => false,
            }).count();
            for id in ids {
                let sent = log.iter().filter(|e| matches!(e, CommandEvent::Sent(s) if s.execution_id == id)).count();
                prop_assert_eq!(ends(id), sent, "every sent execution ends exactly once");
            }
            let mut replayed = Commands::default();
            for event in &log {
                replayed.apply(event);
            }
            prop_assert_eq!(replayed, live);
        }
    }
}
