//! Job executions: the part of a fleet job that one Thing owns (AWS IoT Jobs semantics).
//!
//! A job (owned by its own entity, not here) queues an *execution* on each target Thing. The
//! device pulls: `start-next` moves the oldest `QUEUED` execution to `IN_PROGRESS` (or returns
//! the oldest one already in progress), `update` reports progress and the end
//! (`IN_PROGRESS`, `SUCCEEDED`, `FAILED`, `REJECTED`). The service ends executions too:
//! `TIMED_OUT` (the step timer, or the job's in-progress timeout), `CANCELED` (the job was
//! canceled; an execution in progress only when forced) and `REMOVED` (an operator deleted it).
//! Terminal executions accept no update (`TerminalStateReached`).
//!
//! Every change is an event; `version_number` starts at 1 and grows by one with each change, so
//! a device's `expectedVersion` is an optimistic lock. Deadlines live in the state (so in the
//! log) like the commands' and are exact whatever the timer's lag: a request that arrives after
//! a deadline first records the time-out.
//!
//! The execution carries its job document (bounded by `document_bytes_max`): `start-next` and
//! `get` answer from the Thing alone, without asking the job entity.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Rejection, RejectionKind};

/// Bounds on job executions (all config values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Largest job document (compact JSON), bytes.
    pub document_bytes_max: usize,
    /// Largest `statusDetails` (compact JSON), bytes.
    pub status_details_bytes_max: usize,
    /// Executions one Thing may have pending (queued or in progress) at once.
    pub pending_max: usize,
    /// Finished executions kept in the state (all of them stay in the log).
    pub finished_kept_max: u32,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            document_bytes_max: 32 * 1024,
            status_details_bytes_max: 4 * 1024,
            pending_max: 50,
            finished_kept_max: 50,
        }
    }
}

/// Longest job id, bytes (as AWS IoT).
pub const JOB_ID_BYTES_MAX: usize = 64;
/// The step timeout a device may ask for, minutes (as AWS IoT: 1..=10080, a week).
pub const STEP_TIMEOUT_MINUTES: std::ops::RangeInclusive<u64> = 1..=10_080;
/// Most pending executions a notification lists (as AWS IoT).
pub const NOTIFY_LISTED_MAX: usize = 15;

/// Where a job execution is.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobExecutionStatus {
    /// Waiting for the device to start it.
    #[serde(rename = "QUEUED")]
    Queued,
    /// The device is working on it.
    #[serde(rename = "IN_PROGRESS")]
    InProgress,
    /// The device finished it.
    #[serde(rename = "SUCCEEDED")]
    Succeeded,
    /// The device tried and failed.
    #[serde(rename = "FAILED")]
    Failed,
    /// The device refused it.
    #[serde(rename = "REJECTED")]
    Rejected,
    /// A step or in-progress timer ran out.
    #[serde(rename = "TIMED_OUT")]
    TimedOut,
    /// The job was canceled.
    #[serde(rename = "CANCELED")]
    Canceled,
    /// An operator removed the execution.
    #[serde(rename = "REMOVED")]
    Removed,
}

impl JobExecutionStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobExecutionStatus::Queued => "QUEUED",
            JobExecutionStatus::InProgress => "IN_PROGRESS",
            JobExecutionStatus::Succeeded => "SUCCEEDED",
            JobExecutionStatus::Failed => "FAILED",
            JobExecutionStatus::Rejected => "REJECTED",
            JobExecutionStatus::TimedOut => "TIMED_OUT",
            JobExecutionStatus::Canceled => "CANCELED",
            JobExecutionStatus::Removed => "REMOVED",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<JobExecutionStatus> {
        Some(match text {
            "QUEUED" => JobExecutionStatus::Queued,
            "IN_PROGRESS" => JobExecutionStatus::InProgress,
            "SUCCEEDED" => JobExecutionStatus::Succeeded,
            "FAILED" => JobExecutionStatus::Failed,
            "REJECTED" => JobExecutionStatus::Rejected,
            "TIMED_OUT" => JobExecutionStatus::TimedOut,
            "CANCELED" => JobExecutionStatus::Canceled,
            "REMOVED" => JobExecutionStatus::Removed,
            _ => return None,
        })
    }

    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            JobExecutionStatus::Queued | JobExecutionStatus::InProgress
        )
    }

    /// A status a device may report.
    pub fn device_may_set(self) -> bool {
        matches!(
            self,
            JobExecutionStatus::InProgress
                | JobExecutionStatus::Succeeded
                | JobExecutionStatus::Failed
                | JobExecutionStatus::Rejected
        )
    }
}

/// One job's execution on this Thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobExecution {
    /// The job.
    pub job_id: String,
    /// Which execution of the job on this Thing (the job entity numbers them).
    pub execution_number: u64,
    /// 1 when queued, +1 with every change.
    pub version_number: u64,
    /// Where it is.
    pub status: JobExecutionStatus,
    /// The device's last details (string values, as AWS IoT).
    #[serde(default)]
    pub status_details: BTreeMap<String, String>,
    /// The job document (shared: every copy of the state points at one).
    pub document: Arc<Map<String, Value>>,
    /// Unix ms it was queued.
    pub queued_at_ms: u64,
    /// Unix ms it first went IN_PROGRESS.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// Unix ms of the last change.
    pub last_updated_at_ms: u64,
    /// The job's in-progress timeout, seconds (counted from `started_at_ms`, never reset).
    #[serde(default)]
    pub in_progress_timeout_s: Option<u64>,
    /// Unix ms the device's current step must end by (a new step timeout resets it).
    #[serde(default)]
    pub step_deadline_ms: Option<u64>,
}

impl JobExecution {
    /// When it times out, if it is in progress with a timer.
    pub fn deadline_ms(&self) -> Option<u64> {
        if self.status != JobExecutionStatus::InProgress {
            return None;
        }
        let in_progress = self
            .started_at_ms
            .zip(self.in_progress_timeout_s)
            .map(|(started, s)| started.saturating_add(s.saturating_mul(1000)));
        [self.step_deadline_ms, in_progress]
            .into_iter()
            .flatten()
            .min()
    }

    /// `JobExecutionSummary` (AWS; times in Unix seconds).
    pub fn summary_json(&self) -> Value {
        let mut summary = serde_json::json!({
            "jobId": self.job_id,
            "executionNumber": self.execution_number,
            "versionNumber": self.version_number,
            "queuedAt": self.queued_at_ms / 1000,
            "lastUpdatedAt": self.last_updated_at_ms / 1000,
        });
        if let Some(started) = self.started_at_ms {
            summary["startedAt"] = (started / 1000).into();
        }
        summary
    }

    /// `JobExecutionState` (AWS): what a `VersionMismatch` and `includeJobExecutionState` carry.
    pub fn state_json(&self) -> Value {
        serde_json::json!({
            "status": self.status.as_str(),
            "statusDetails": self.status_details,
            "versionNumber": self.version_number,
        })
    }

    /// `JobExecution` (AWS), with the document if asked for.
    pub fn execution_json(&self, thing: &str, include_document: bool) -> Value {
        let mut execution = serde_json::json!({
            "jobId": self.job_id,
            "thingName": thing,
            "status": self.status.as_str(),
            "statusDetails": self.status_details,
            "queuedAt": self.queued_at_ms / 1000,
            "lastUpdatedAt": self.last_updated_at_ms / 1000,
            "versionNumber": self.version_number,
            "executionNumber": self.execution_number,
        });
        if let Some(started) = self.started_at_ms {
            execution["startedAt"] = (started / 1000).into();
        }
        if let Some(step_deadline) = self.step_deadline_ms {
            execution["approximateSecondsBeforeTimedOut"] =
                (step_deadline.saturating_sub(self.last_updated_at_ms) / 1000).into();
        }
        if include_document {
            execution["jobDocument"] = Value::Object((*self.document).clone());
        }
        execution
    }
}

/// A Thing's job executions: the pending ones and a bounded recent history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobExecutions {
    /// Queued or in progress, by job id.
    #[serde(default)]
    pub pending: BTreeMap<String, JobExecution>,
    /// Finished executions, oldest first (bounded; the log keeps all).
    #[serde(default)]
    pub finished: VecDeque<JobExecution>,
}

/// What `notify` and `notify-next` are computed from: the pending executions as a device sees
/// them, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingView {
    /// Job ids in progress, oldest queued first.
    pub in_progress: Vec<String>,
    /// Job ids queued, oldest queued first.
    pub queued: Vec<String>,
}

impl PendingView {
    /// The execution `start-next` would take: the oldest in progress, else the oldest queued.
    pub fn head(&self) -> Option<&str> {
        self.in_progress
            .first()
            .or_else(|| self.queued.first())
            .map(String::as_str)
    }
}

impl JobExecutions {
    /// An execution, pending or recently finished (the newest of that job).
    pub fn get(&self, job_id: &str) -> Option<&JobExecution> {
        self.pending
            .get(job_id)
            .or_else(|| self.finished.iter().rev().find(|e| e.job_id == job_id))
    }

    /// The earliest deadline of an execution in progress (what the deadline index holds).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.pending
            .values()
            .filter_map(JobExecution::deadline_ms)
            .min()
    }

    /// The pending executions in the order a device sees them.
    pub fn pending_view(&self) -> PendingView {
        let ordered = |status: JobExecutionStatus| {
            let mut executions: Vec<&JobExecution> = self
                .pending
                .values()
                .filter(|e| e.status == status)
                .collect();
            executions
                .sort_by(|a, b| (a.queued_at_ms, &a.job_id).cmp(&(b.queued_at_ms, &b.job_id)));
            executions
                .into_iter()
                .map(|e| e.job_id.clone())
                .collect::<Vec<_>>()
        };
        PendingView {
            in_progress: ordered(JobExecutionStatus::InProgress),
            queued: ordered(JobExecutionStatus::Queued),
        }
    }

    /// `jobs/get/accepted` without its envelope: `{inProgressJobs, queuedJobs}` (summaries).
    pub fn pending_json(&self) -> Value {
        let view = self.pending_view();
        let summaries = |ids: &[String]| -> Vec<Value> {
            ids.iter()
                .filter_map(|id| self.pending.get(id))
                .map(JobExecution::summary_json)
                .collect()
        };
        serde_json::json!({
            "inProgressJobs": summaries(&view.in_progress),
            "queuedJobs": summaries(&view.queued),
        })
    }

    /// `jobs/notify` without its timestamp: `{jobs: {IN_PROGRESS: [...], QUEUED: [...]}}`, at most
    /// [`NOTIFY_LISTED_MAX`] summaries, those in progress first; an empty status is left out.
    pub fn notify_json(&self) -> Value {
        let view = self.pending_view();
        let mut jobs = Map::new();
        let mut room = NOTIFY_LISTED_MAX;
        for (name, ids) in [("IN_PROGRESS", &view.in_progress), ("QUEUED", &view.queued)] {
            let listed: Vec<Value> = ids
                .iter()
                .take(room)
                .filter_map(|id| self.pending.get(id))
                .map(JobExecution::summary_json)
                .collect();
            room -= listed.len();
            if !listed.is_empty() {
                jobs.insert(name.into(), Value::Array(listed));
            }
        }
        serde_json::json!({ "jobs": jobs })
    }

    /// Folds one job event in. Holds no rules.
    pub fn apply(&mut self, event: &JobEvent) {
        self.apply_trimming(event, true);
    }

    fn apply_trimming(&mut self, event: &JobEvent, trim: bool) {
        let kept_max = match event {
            JobEvent::Queued(_) => u32::MAX,
            JobEvent::Updated(u) => u.finished_kept_max,
            JobEvent::TimedOut(f) | JobEvent::Canceled(f) | JobEvent::Removed(f) => {
                f.finished_kept_max
            }
        };
        match event {
            JobEvent::Queued(queued) => {
                self.pending.insert(
                    queued.job_id.clone(),
                    JobExecution {
                        job_id: queued.job_id.clone(),
                        execution_number: queued.execution_number,
                        version_number: 1,
                        status: JobExecutionStatus::Queued,
                        status_details: BTreeMap::new(),
                        document: queued.document.clone(),
                        queued_at_ms: queued.at_ms,
                        started_at_ms: None,
                        last_updated_at_ms: queued.at_ms,
                        in_progress_timeout_s: queued.in_progress_timeout_s,
                        step_deadline_ms: None,
                    },
                );
            }
            JobEvent::Updated(updated) => {
                let Some(execution) = self.pending.get_mut(&updated.job_id) else {
                    return;
                };
                execution.status = updated.status;
                execution.version_number += 1;
                execution.last_updated_at_ms = updated.at_ms;
                if let Some(details) = &updated.status_details {
                    execution.status_details = details.clone();
                }
                if updated.status == JobExecutionStatus::InProgress
                    && execution.started_at_ms.is_none()
                {
                    execution.started_at_ms = Some(updated.at_ms);
                }
                if let Some(step_deadline) = updated.step_deadline_ms {
                    execution.step_deadline_ms = Some(step_deadline);
                }
                if updated.status.is_terminal() {
                    self.finish(&updated.job_id);
                }
            }
            JobEvent::TimedOut(finished) => self.end(finished, JobExecutionStatus::TimedOut),
            JobEvent::Canceled(finished) => self.end(finished, JobExecutionStatus::Canceled),
            JobEvent::Removed(finished) => {
                if self.pending.contains_key(&finished.job_id) {
                    self.end(finished, JobExecutionStatus::Removed);
                } else if let Some(position) = self
                    .finished
                    .iter()
                    .rposition(|e| e.job_id == finished.job_id)
                {
                    // A finished execution removed: it leaves the state (the log keeps it).
                    self.finished.remove(position);
                }
            }
        }
        if trim {
            while self.finished.len() > kept_max as usize {
                self.finished.pop_front();
            }
        }
    }

    fn end(&mut self, finished: &JobFinished, status: JobExecutionStatus) {
        if let Some(execution) = self.pending.get_mut(&finished.job_id) {
            execution.status = status;
            execution.version_number += 1;
            execution.last_updated_at_ms = finished.at_ms;
            self.finish(&finished.job_id);
        }
    }

    fn finish(&mut self, job_id: &str) {
        if let Some(execution) = self.pending.remove(job_id) {
            self.finished.push_back(execution);
        }
    }
}

/// Payload of `JobQueued` v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobQueued {
    /// The job.
    pub job_id: String,
    /// Which execution of the job on this Thing.
    pub execution_number: u64,
    /// The job document.
    pub document: Arc<Map<String, Value>>,
    /// The job's in-progress timeout, seconds.
    #[serde(default)]
    pub in_progress_timeout_s: Option<u64>,
    /// Unix ms.
    pub at_ms: u64,
}

/// Payload of `JobExecutionUpdated` v1: a device's update, or `start-next` taking a queued one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobUpdated {
    /// The job.
    pub job_id: String,
    /// The new status (one a device may set).
    pub status: JobExecutionStatus,
    /// New details (`None`: unchanged).
    #[serde(default)]
    pub status_details: Option<BTreeMap<String, String>>,
    /// A new step deadline, Unix ms (`None`: the running step timer goes on).
    #[serde(default)]
    pub step_deadline_ms: Option<u64>,
    /// Unix ms.
    pub at_ms: u64,
    /// How many finished executions the state keeps (the bound when this was decided).
    pub finished_kept_max: u32,
}

/// Payload of `JobExecutionTimedOut`, `JobExecutionCanceled` and `JobExecutionRemoved` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFinished {
    /// The job.
    pub job_id: String,
    /// Unix ms.
    pub at_ms: u64,
    /// As in [`JobUpdated::finished_kept_max`].
    pub finished_kept_max: u32,
}

/// The job events (to become a part of [`super::ThingEvent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobEvent {
    /// An execution was queued.
    Queued(JobQueued),
    /// Its status changed by the device (or `start-next`).
    Updated(JobUpdated),
    /// A timer ran out.
    TimedOut(JobFinished),
    /// The job was canceled.
    Canceled(JobFinished),
    /// An operator removed it.
    Removed(JobFinished),
}

impl JobEvent {
    /// When it happened, Unix ms.
    pub fn at_ms(&self) -> u64 {
        match self {
            JobEvent::Queued(e) => e.at_ms,
            JobEvent::Updated(e) => e.at_ms,
            JobEvent::TimedOut(e) | JobEvent::Canceled(e) | JobEvent::Removed(e) => e.at_ms,
        }
    }
}

/// A device's job request, whatever its transport (MQTT topic or HTTPS route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceJobRequest<'a> {
    /// The pending executions.
    Get,
    /// Start the next one.
    StartNext,
    /// One execution (`{jobId}/get`).
    Describe(&'a str),
    /// Report on one execution (`{jobId}/update`).
    Update(&'a str),
}

/// A job to queue on this Thing (from the job entity).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueJob {
    /// The job.
    pub job_id: String,
    /// Which execution of the job on this Thing.
    pub execution_number: u64,
    /// The job document.
    pub document: Arc<Map<String, Value>>,
    /// The job's in-progress timeout, seconds.
    pub in_progress_timeout_s: Option<u64>,
}

/// A device's `start-next` request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StartNext {
    /// Details to set when a queued execution starts.
    pub status_details: Option<BTreeMap<String, String>>,
    /// A step timeout, minutes.
    pub step_timeout_minutes: Option<u64>,
}

/// A device's `{jobId}/update` request.
#[derive(Debug, Clone, PartialEq)]
pub struct JobUpdate {
    /// From the topic.
    pub job_id: String,
    /// The raw status (an unknown one is `InvalidRequest`, one a device may not set is
    /// `InvalidStateTransition`).
    pub status: String,
    /// New details.
    pub status_details: Option<BTreeMap<String, String>>,
    /// The version the device believes current.
    pub expected_version: Option<u64>,
    /// The execution the device means.
    pub execution_number: Option<u64>,
    /// A new step timeout, minutes.
    pub step_timeout_minutes: Option<u64>,
}

/// Why a job request was refused, with what AWS IoT returns beside the error.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRefusal {
    /// The error (its kind gives the HTTP status and the AWS error code).
    pub rejection: Rejection,
    /// The current execution state (on `VersionMismatch`).
    pub execution_state: Option<Value>,
}

impl From<Rejection> for JobRefusal {
    fn from(rejection: Rejection) -> Self {
        JobRefusal {
            rejection,
            execution_state: None,
        }
    }
}

/// What a job request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDecision {
    /// Events to append, in order (time-outs found on the way come first).
    pub events: Vec<JobEvent>,
    /// The reply once they are durable.
    pub outcome: JobOutcome,
}

/// The reply of a job request.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// The execution after the change (`None` from `start-next`: nothing pending).
    Execution(Option<Box<JobExecution>>),
    /// Refused (the time-outs in `events`, if any, are still recorded).
    Refused(Box<JobRefusal>),
    /// Timers fired: how many executions timed out.
    TimedOut(usize),
}

/// Checks a job id: 1..=64 characters of `[A-Za-z0-9_-]` (one topic level).
pub fn validate_job_id(job_id: &str) -> Result<(), Rejection> {
    let valid = job_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if job_id.is_empty() || job_id.len() > JOB_ID_BYTES_MAX || !valid {
        return Err(Rejection::bad_request(format!(
            "invalid jobId '{job_id}': 1..={JOB_ID_BYTES_MAX} characters of [A-Za-z0-9_-]"
        )));
    }
    Ok(())
}

fn json_bytes<T: Serialize>(value: &T) -> usize {
    serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// Reads `statusDetails`: an object of strings, bounded.
pub fn parse_status_details(
    value: Option<&Value>,
    limits: &JobLimits,
) -> Result<Option<BTreeMap<String, String>>, Rejection> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(object) = value.as_object() else {
        return Err(Rejection::bad_request(
            "statusDetails must be a JSON object of strings",
        ));
    };
    let mut details = BTreeMap::new();
    for (key, value) in object {
        let Some(text) = value.as_str() else {
            return Err(Rejection::bad_request(format!(
                "statusDetails.{key} must be a string"
            )));
        };
        details.insert(key.clone(), text.to_owned());
    }
    let bytes = json_bytes(&details);
    if bytes > limits.status_details_bytes_max {
        return Err(Rejection::new(
            RejectionKind::PayloadTooLarge,
            format!(
                "statusDetails is {bytes} bytes; the maximum is {}",
                limits.status_details_bytes_max
            ),
        ));
    }
    Ok(Some(details))
}

/// Reads `stepTimeoutInMinutes` (1..=10080).
pub fn parse_step_timeout(value: Option<&Value>) -> Result<Option<u64>, Rejection> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(minutes) if STEP_TIMEOUT_MINUTES.contains(&minutes) => Ok(Some(minutes)),
            _ => Err(Rejection::bad_request(format!(
                "stepTimeoutInMinutes must be a whole number in {}..={}",
                STEP_TIMEOUT_MINUTES.start(),
                STEP_TIMEOUT_MINUTES.end()
            ))),
        },
    }
}

fn step_deadline(now_ms: u64, minutes: Option<u64>) -> Option<u64> {
    minutes.map(|m| now_ms.saturating_add(m.saturating_mul(60_000)))
}

/// The time-outs due at `now_ms`, oldest deadline first.
fn time_outs(jobs: &JobExecutions, now_ms: u64, limits: &JobLimits) -> Vec<JobEvent> {
    let mut due: Vec<(u64, &str)> = jobs
        .pending
        .values()
        .filter_map(|e| e.deadline_ms().map(|at| (at, e.job_id.as_str())))
        .filter(|(at, _)| *at <= now_ms)
        .collect();
    due.sort();
    due.into_iter()
        .map(|(_, job_id)| {
            JobEvent::TimedOut(JobFinished {
                job_id: job_id.to_owned(),
                at_ms: now_ms,
                finished_kept_max: limits.finished_kept_max,
            })
        })
        .collect()
}

/// `jobs` as it will be once `events` are applied (untrimmed, so an execution ended by them is
/// still found with a history bound of 0).
fn after(jobs: &JobExecutions, events: &[JobEvent]) -> JobExecutions {
    let mut scratch = jobs.clone();
    for event in events {
        scratch.apply_trimming(event, false);
    }
    scratch
}

fn refused(events: Vec<JobEvent>, refusal: JobRefusal) -> JobDecision {
    JobDecision {
        events,
        outcome: JobOutcome::Refused(Box::new(refusal)),
    }
}

/// Queues an execution (from the job entity): 409 if the job already has one pending here,
/// 429 past `pending_max`, 413 for a document past `document_bytes_max`.
pub fn decide_queue(
    jobs: &JobExecutions,
    queue: &QueueJob,
    now_ms: u64,
    limits: &JobLimits,
) -> Result<JobDecision, Rejection> {
    validate_job_id(&queue.job_id)?;
    let bytes = json_bytes(&queue.document);
    if bytes > limits.document_bytes_max {
        return Err(Rejection::new(
            RejectionKind::PayloadTooLarge,
            format!(
                "the job document is {bytes} bytes; the maximum is {}",
                limits.document_bytes_max
            ),
        ));
    }
    let mut events = time_outs(jobs, now_ms, limits);
    let pending = after(jobs, &events);
    if pending
        .finished
        .iter()
        .any(|e| e.job_id == queue.job_id && e.execution_number >= queue.execution_number)
    {
        // A retried queue request (the job's rollout resuming after a crash) must not run
        // the same execution twice.
        return Err(Rejection::new(
            RejectionKind::AlreadyExists,
            format!(
                "execution {} of job '{}' already ran on this thing",
                queue.execution_number, queue.job_id
            ),
        ));
    }
    if pending.pending.contains_key(&queue.job_id) {
        return Err(Rejection::new(
            RejectionKind::AlreadyExists,
            format!(
                "job '{}' already has a pending execution on this thing",
                queue.job_id
            ),
        ));
    }
    if pending.pending.len() >= limits.pending_max {
        return Err(Rejection::new(
            RejectionKind::TooManyRequests,
            format!(
                "Too many pending jobs: the thing already has {}",
                limits.pending_max
            ),
        ));
    }
    events.push(JobEvent::Queued(JobQueued {
        job_id: queue.job_id.clone(),
        execution_number: queue.execution_number,
        document: queue.document.clone(),
        in_progress_timeout_s: queue.in_progress_timeout_s,
        at_ms: now_ms,
    }));
    let execution = after(jobs, &events).get(&queue.job_id).cloned();
    Ok(JobDecision {
        events,
        outcome: JobOutcome::Execution(execution.map(Box::new)),
    })
}

/// `start-next`: the oldest execution in progress as it is, else the oldest queued one moved to
/// IN_PROGRESS (with the request's details and step timer); nothing when none is pending.
pub fn decide_start_next(
    jobs: &JobExecutions,
    request: &StartNext,
    now_ms: u64,
    limits: &JobLimits,
) -> JobDecision {
    let mut events = time_outs(jobs, now_ms, limits);
    let current = after(jobs, &events);
    let view = current.pending_view();
    if let Some(job_id) = view.in_progress.first() {
        let execution = current.pending.get(job_id).cloned().map(Box::new);
        return JobDecision {
            events,
            outcome: JobOutcome::Execution(execution),
        };
    }
    let Some(job_id) = view.queued.first() else {
        return JobDecision {
            events,
            outcome: JobOutcome::Execution(None),
        };
    };
    events.push(JobEvent::Updated(JobUpdated {
        job_id: job_id.clone(),
        status: JobExecutionStatus::InProgress,
        status_details: request.status_details.clone(),
        step_deadline_ms: step_deadline(now_ms, request.step_timeout_minutes),
        at_ms: now_ms,
        finished_kept_max: limits.finished_kept_max,
    }));
    let execution = after(jobs, &events).pending.get(job_id).cloned();
    JobDecision {
        events,
        outcome: JobOutcome::Execution(execution.map(Box::new)),
    }
}

/// A device's `{jobId}/update`.
pub fn decide_update(
    jobs: &JobExecutions,
    update: &JobUpdate,
    now_ms: u64,
    limits: &JobLimits,
) -> JobDecision {
    let events = time_outs(jobs, now_ms, limits);
    let current = after(jobs, &events);
    let refuse = |kind: RejectionKind, message: String, state: Option<Value>| {
        refused(
            events.clone(),
            JobRefusal {
                rejection: Rejection::new(kind, message),
                execution_state: state,
            },
        )
    };
    let status = match JobExecutionStatus::parse(&update.status) {
        None => {
            return refuse(
                RejectionKind::InvalidRequest,
                format!(
                "unknown status '{}': a device may set IN_PROGRESS, SUCCEEDED, FAILED or REJECTED",
                update.status
            ),
                None,
            )
        }
        Some(status) => status,
    };
    let Some(execution) = current.get(&update.job_id) else {
        return refuse(
            RejectionKind::ExecutionNotFound,
            format!("no execution of job '{}' on this thing", update.job_id),
            None,
        );
    };
    if update
        .execution_number
        .is_some_and(|n| n != execution.execution_number)
    {
        return refuse(
            RejectionKind::ExecutionNotFound,
            format!(
                "job '{}' has no execution number {} on this thing (current: {})",
                update.job_id,
                update.execution_number.unwrap_or_default(),
                execution.execution_number
            ),
            None,
        );
    }
    if execution.status.is_terminal() {
        return refuse(
            RejectionKind::TerminalStateReached,
            format!(
                "the execution of job '{}' is already {}",
                update.job_id,
                execution.status.as_str()
            ),
            None,
        );
    }
    if !status.device_may_set() {
        return refuse(
            RejectionKind::InvalidStateTransition,
            format!(
                "a device cannot set {}: it may set IN_PROGRESS, SUCCEEDED, FAILED or REJECTED",
                status.as_str()
            ),
            None,
        );
    }
    if update
        .expected_version
        .is_some_and(|v| v != execution.version_number)
    {
        return refuse(
            RejectionKind::VersionConflict,
            format!(
                "expectedVersion {} does not match the current version {}",
                update.expected_version.unwrap_or_default(),
                execution.version_number
            ),
            Some(execution.state_json()),
        );
    }
    let mut events = events;
    events.push(JobEvent::Updated(JobUpdated {
        job_id: update.job_id.clone(),
        status,
        status_details: update.status_details.clone(),
        step_deadline_ms: step_deadline(now_ms, update.step_timeout_minutes),
        at_ms: now_ms,
        finished_kept_max: limits.finished_kept_max,
    }));
    let execution = after(jobs, &events).get(&update.job_id).cloned();
    JobDecision {
        events,
        outcome: JobOutcome::Execution(execution.map(Box::new)),
    }
}

/// The job was canceled: a queued execution is CANCELED, one in progress only with `force`.
pub fn decide_cancel(
    jobs: &JobExecutions,
    job_id: &str,
    force: bool,
    now_ms: u64,
    limits: &JobLimits,
) -> JobDecision {
    end_pending(jobs, job_id, force, now_ms, limits, JobEvent::Canceled)
}

/// An operator removes the execution: a pending one becomes REMOVED (one in progress only with
/// `force`); a finished one leaves the state.
pub fn decide_remove(
    jobs: &JobExecutions,
    job_id: &str,
    force: bool,
    now_ms: u64,
    limits: &JobLimits,
) -> JobDecision {
    let events = time_outs(jobs, now_ms, limits);
    let current = after(jobs, &events);
    if current.pending.contains_key(job_id) {
        return end_pending(jobs, job_id, force, now_ms, limits, JobEvent::Removed);
    }
    if current.get(job_id).is_none() {
        return refused(
            events,
            Rejection::new(
                RejectionKind::ExecutionNotFound,
                format!("no execution of job '{job_id}' on this thing"),
            )
            .into(),
        );
    }
    let mut events = events;
    events.push(JobEvent::Removed(JobFinished {
        job_id: job_id.to_owned(),
        at_ms: now_ms,
        finished_kept_max: limits.finished_kept_max,
    }));
    JobDecision {
        events,
        outcome: JobOutcome::Execution(None),
    }
}

fn end_pending(
    jobs: &JobExecutions,
    job_id: &str,
    force: bool,
    now_ms: u64,
    limits: &JobLimits,
    end: fn(JobFinished) -> JobEvent,
) -> JobDecision {
    let mut events = time_outs(jobs, now_ms, limits);
    let current = after(jobs, &events);
    let Some(execution) = current.get(job_id) else {
        return refused(
            events,
            Rejection::new(
                RejectionKind::ExecutionNotFound,
                format!("no execution of job '{job_id}' on this thing"),
            )
            .into(),
        );
    };
    if execution.status.is_terminal() {
        let status = execution.status;
        return refused(
            events,
            Rejection::new(
                RejectionKind::TerminalStateReached,
                format!(
                    "the execution of job '{job_id}' is already {}",
                    status.as_str()
                ),
            )
            .into(),
        );
    }
    if execution.status == JobExecutionStatus::InProgress && !force {
        return refused(
            events,
            Rejection::new(
                RejectionKind::InvalidStateTransition,
                format!(
                    "the execution of job '{job_id}' is IN_PROGRESS: only a forced request ends it"
                ),
            )
            .into(),
        );
    }
    events.push(end(JobFinished {
        job_id: job_id.to_owned(),
        at_ms: now_ms,
        finished_kept_max: limits.finished_kept_max,
    }));
    let execution = after(jobs, &events).get(job_id).cloned();
    JobDecision {
        events,
        outcome: JobOutcome::Execution(execution.map(Box::new)),
    }
}

/// Times out every execution whose timer ran out by `now_ms`.
pub fn decide_fire(jobs: &JobExecutions, now_ms: u64, limits: &JobLimits) -> JobDecision {
    let events = time_outs(jobs, now_ms, limits);
    let count = events.len();
    JobDecision {
        events,
        outcome: JobOutcome::TimedOut(count),
    }
}

#[cfg(test)]
mod tests;
