//! Fleet jobs: a job record, its targets, and the counts of its executions.
//!
//! The executions themselves belong to the target Things (their logs hold every change, see
//! [`crate::thing::jobs`]). The job side keeps, in the `kv` tree:
//! - `job/{jobId}`: the [`JobRecord`] (an envelope `JobRecord` v1: document, status, counts per execution status, rollout
//!   progress), written with the target statuses it summarizes in one atomic batch;
//! - `jobtarget/{jobId}/{thing}`: the last status seen of that Thing's execution (empty until
//!   it is queued).
//!
//! Counts follow the executions through the change feed: the `jobs` consumer reads the feed
//! after its durable cursor, reads the job events of the Things that are targets of a job in
//! progress, and moves each target's status and the job's counts together. Replaying the same
//! events after a crash sets the same final statuses, so the counts converge (each batch moves
//! a target from the status stored with the counts to the new one).
//!
//! A rollout task queues the executions (a bounded number at a time) and resumes after a
//! restart from the targets not queued yet; a Thing refuses to run the same execution twice.

mod rollout;

pub use rollout::{ExponentialRate, Pace, RateIncreaseCriteria, RATE_PER_MINUTE_MAX};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thinghub_storage::{Envelope, StorageError, Store};
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::codec;
use crate::groups::Groups;
use crate::service::Things;
use crate::thing::jobs::{validate_job_id, JobEvent, JobExecutionStatus, QueueJob};
use crate::thing::{Rejection, RejectionKind, ThingEvent};

/// The feed consumer's cursor name.
pub const CONSUMER: &str = "jobs";
/// Key prefix of job records (`kv`).
pub const JOB_PREFIX: &str = "job/";
/// Key prefix of job targets (`kv`).
pub const TARGET_PREFIX: &str = "jobtarget/";
/// Records a listing reads from storage at a time.
const SCAN_PAGE: usize = 256;

/// `thinghub check`: a target's stored status is empty (not queued) or an execution status.
pub fn check_target_status(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty()
        || std::str::from_utf8(bytes)
            .ok()
            .and_then(JobExecutionStatus::parse)
            .is_some()
    {
        Ok(())
    } else {
        Err("not an execution status".into())
    }
}

/// Bounds of the job side (config values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobManagerConfig {
    /// Most Things one job may target.
    pub targets_max: usize,
    /// Executions the rollout queues at once.
    pub rollout_in_flight_max: usize,
    /// Feed entries the counting consumer reads per round.
    pub feed_batch_max: usize,
    /// Longest pause of the counting consumer while the feed is quiet.
    pub feed_poll_interval: Duration,
}

impl Default for JobManagerConfig {
    fn default() -> Self {
        JobManagerConfig {
            targets_max: 100_000,
            rollout_in_flight_max: 64,
            feed_batch_max: 4096,
            feed_poll_interval: Duration::from_millis(200),
        }
    }
}

/// Where a job is.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// Executions are queued or running.
    #[serde(rename = "IN_PROGRESS")]
    InProgress,
    /// Every execution reached a terminal status.
    #[serde(rename = "COMPLETED")]
    Completed,
    /// An operator canceled it.
    #[serde(rename = "CANCELED")]
    Canceled,
}

impl JobStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Canceled => "CANCELED",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<JobStatus> {
        Some(match text {
            "IN_PROGRESS" => JobStatus::InProgress,
            "COMPLETED" => JobStatus::Completed,
            "CANCELED" => JobStatus::Canceled,
            _ => return None,
        })
    }
}

/// A job as stored (`job/{jobId}`, rmp-serde named).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id.
    pub job_id: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// The job document every execution carries.
    pub document: Map<String, Value>,
    /// How many Things it targets.
    pub targets: u64,
    /// The executions' in-progress timeout, seconds.
    #[serde(default)]
    pub in_progress_timeout_s: Option<u64>,
    /// Where it is.
    pub status: JobStatus,
    /// Canceled with `force` (executions in progress end too).
    #[serde(default)]
    pub force_canceled: bool,
    /// The operator's reason, when canceled.
    #[serde(default)]
    pub reason_code: Option<String>,
    /// Executions queued so far by the rollout.
    pub queued: u64,
    /// Targets per execution status (QUEUED, IN_PROGRESS, SUCCEEDED, ...).
    pub counts: BTreeMap<String, u64>,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms.
    pub last_updated_at_ms: u64,
    /// Unix ms it completed or was canceled.
    #[serde(default)]
    pub completed_at_ms: Option<u64>,
    /// Most executions queued per minute.
    #[serde(default)]
    pub maximum_per_minute: Option<u32>,
    /// An exponential rollout rate (up to `maximum_per_minute`).
    #[serde(default)]
    pub exponential_rate: Option<ExponentialRate>,
    /// The rate an exponential rollout has reached, per minute (a resumed rollout goes on
    /// from it).
    #[serde(default)]
    pub current_rate_per_minute: Option<u32>,
    /// When the job is canceled because too many executions fail.
    #[serde(default)]
    pub abort_criteria: Vec<AbortCriterion>,
    /// Target groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// CONTINUOUS targeting (Things added to a target group later get the job).
    #[serde(default)]
    pub continuous: bool,
}

impl JobRecord {
    /// The management API's view.
    pub fn to_json(&self) -> Value {
        let count =
            |status: JobExecutionStatus| self.counts.get(status.as_str()).copied().unwrap_or(0);
        let mut body = serde_json::json!({
            "jobId": self.job_id,
            "status": self.status.as_str(),
            "document": self.document,
            "targets": self.targets,
            "createdAt": self.created_at_ms,
            "lastUpdatedAt": self.last_updated_at_ms,
            "forceCanceled": self.force_canceled,
            "jobProcessDetails": {
                "numberOfQueuedThings": count(JobExecutionStatus::Queued),
                "numberOfInProgressThings": count(JobExecutionStatus::InProgress),
                "numberOfSucceededThings": count(JobExecutionStatus::Succeeded),
                "numberOfFailedThings": count(JobExecutionStatus::Failed),
                "numberOfRejectedThings": count(JobExecutionStatus::Rejected),
                "numberOfTimedOutThings": count(JobExecutionStatus::TimedOut),
                "numberOfCanceledThings": count(JobExecutionStatus::Canceled),
                "numberOfRemovedThings": count(JobExecutionStatus::Removed),
                "numberOfQueuedByRollout": self.queued,
            },
        });
        if let Some(description) = &self.description {
            body["description"] = description.clone().into();
        }
        if let Some(timeout) = self.in_progress_timeout_s {
            body["timeoutConfig"] = serde_json::json!({"inProgressTimeoutInMinutes": timeout / 60});
        }
        if let Some(reason) = &self.reason_code {
            body["reasonCode"] = reason.clone().into();
        }
        if let Some(completed) = self.completed_at_ms {
            body["completedAt"] = completed.into();
        }
        if self.maximum_per_minute.is_some() || self.exponential_rate.is_some() {
            let mut rollout = serde_json::json!({});
            if let Some(rate) = self.maximum_per_minute {
                rollout["maximumPerMinute"] = rate.into();
            }
            if let Some(exponential) = self.exponential_rate {
                rollout["exponentialRate"] = exponential.to_json();
                rollout["currentRatePerMinute"] = self
                    .current_rate_per_minute
                    .unwrap_or(exponential.base_rate_per_minute)
                    .into();
            }
            body["rollout"] = rollout;
        }
        body["targetSelection"] = if self.continuous {
            "CONTINUOUS"
        } else {
            "SNAPSHOT"
        }
        .into();
        if !self.groups.is_empty() {
            body["thingGroupNames"] = serde_json::json!(self.groups);
        }
        if !self.abort_criteria.is_empty() {
            let criteria: Vec<Value> = self.abort_criteria.iter().map(|c| c.to_json()).collect();
            body["abortConfig"] = serde_json::json!({"criteriaList": criteria});
        }
        body
    }

    fn terminal_count(&self) -> u64 {
        self.counts
            .iter()
            .filter(|(status, _)| {
                JobExecutionStatus::parse(status).is_some_and(|s| s.is_terminal())
            })
            .map(|(_, n)| n)
            .sum()
    }
}

/// A validated job to create.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateJob {
    /// The job's id.
    pub job_id: String,
    /// Free text.
    pub description: Option<String>,
    /// The document.
    pub document: Map<String, Value>,
    /// Target Thing names (distinct).
    pub things: Vec<String>,
    /// Minutes an execution may stay in progress.
    pub in_progress_timeout_minutes: Option<u64>,
    /// Most executions queued per minute (`None`: as fast as the rollout can).
    pub maximum_per_minute: Option<u32>,
    /// An exponential rollout rate (up to `maximum_per_minute`, or 1000 without it).
    pub exponential_rate: Option<ExponentialRate>,
    /// When to cancel the job because too many executions fail.
    pub abort_criteria: Vec<AbortCriterion>,
    /// Target groups: their members when the job is created are targets.
    pub groups: Vec<String>,
    /// CONTINUOUS: a Thing added to a target group later gets the job too.
    pub continuous: bool,
}

/// Which failures an abort criterion counts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureType {
    /// FAILED executions.
    #[serde(rename = "FAILED")]
    Failed,
    /// REJECTED executions.
    #[serde(rename = "REJECTED")]
    Rejected,
    /// TIMED_OUT executions.
    #[serde(rename = "TIMED_OUT")]
    TimedOut,
    /// All three.
    #[serde(rename = "ALL")]
    All,
}

impl FailureType {
    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<FailureType> {
        Some(match text {
            "FAILED" => FailureType::Failed,
            "REJECTED" => FailureType::Rejected,
            "TIMED_OUT" => FailureType::TimedOut,
            "ALL" => FailureType::All,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            FailureType::Failed => "FAILED",
            FailureType::Rejected => "REJECTED",
            FailureType::TimedOut => "TIMED_OUT",
            FailureType::All => "ALL",
        }
    }
}

/// Cancel the job once `threshold_percentage` of at least `min_executed` executed Things
/// failed this way (AWS IoT `abortConfig`, action CANCEL).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AbortCriterion {
    /// Which failures count.
    pub failure_type: FailureType,
    /// Percent of executed Things (0 < p <= 100).
    pub threshold_percentage: f64,
    /// Executed Things (a terminal status set by a device or a timer) before it applies.
    pub min_executed: u64,
}

impl AbortCriterion {
    /// Whether `counts` meet it.
    fn met(&self, counts: &BTreeMap<String, u64>) -> bool {
        let count = |status: JobExecutionStatus| counts.get(status.as_str()).copied().unwrap_or(0);
        let (failed, rejected, timed_out) = (
            count(JobExecutionStatus::Failed),
            count(JobExecutionStatus::Rejected),
            count(JobExecutionStatus::TimedOut),
        );
        let executed = count(JobExecutionStatus::Succeeded) + failed + rejected + timed_out;
        let failures = match self.failure_type {
            FailureType::Failed => failed,
            FailureType::Rejected => rejected,
            FailureType::TimedOut => timed_out,
            FailureType::All => failed + rejected + timed_out,
        };
        executed > 0
            && executed >= self.min_executed
            && failures as f64 * 100.0 >= self.threshold_percentage * executed as f64
    }

    fn to_json(self) -> Value {
        serde_json::json!({
            "failureType": self.failure_type.as_str(),
            "action": "CANCEL",
            "thresholdPercentage": self.threshold_percentage,
            "minNumberOfExecutedThings": self.min_executed,
        })
    }
}

/// What a restart has to go on with.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Jobs in progress: their rollout resumes.
    pub rolling_out: Vec<String>,
    /// Canceled jobs with executions not ended: their cancellation goes on.
    pub canceling: Vec<String>,
}

/// One target's execution as the job side knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    /// The Thing.
    pub thing: String,
    /// `None` until its execution is queued.
    pub status: Option<JobExecutionStatus>,
}

/// The job side of the node.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    things: Things,
    groups: Groups,
    clock: SharedClock,
    config: JobManagerConfig,
    /// Things that are targets of a job in progress (the consumer reads only their logs).
    watched: Mutex<HashSet<String>>,
    /// Serializes writes of job records (the consumer, creation, cancel).
    writes: tokio::sync::Mutex<()>,
    /// Jobs the counter aborted, whose cancellation is still to be told to the Things.
    aborted: Mutex<Vec<String>>,
    /// Jobs by status (the metrics).
    counts: JobCounts,
}

/// Jobs by status: counted when the jobs are loaded at start ([`JobManager::recover`]) and
/// kept as job records are written (created, canceled, ended by their counts).
#[derive(Debug, Default)]
pub struct JobCounts {
    /// Jobs in progress.
    pub in_progress: AtomicU64,
    /// Jobs completed.
    pub completed: AtomicU64,
    /// Jobs canceled (by an operator or their abort criteria).
    pub canceled: AtomicU64,
}

impl JobCounts {
    /// A job in progress ended as `to`.
    fn ended(&self, to: JobStatus) {
        let _ = self
            .in_progress
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        match to {
            JobStatus::Completed => self.completed.fetch_add(1, Ordering::Relaxed),
            JobStatus::Canceled => self.canceled.fetch_add(1, Ordering::Relaxed),
            JobStatus::InProgress => self.in_progress.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn storage(e: StorageError) -> Rejection {
    tracing::error!(error = %e, "job storage failed");
    Rejection::new(RejectionKind::Unavailable, format!("storage failed: {e}"))
}

/// `event_type` of a stored job record.
pub const JOB_RECORD: &str = "JobRecord";

fn encode_record(record: &JobRecord) -> Result<Vec<u8>, StorageError> {
    Ok(Envelope::new(JOB_RECORD, 1, record.last_updated_at_ms, record)?.to_bytes()?)
}

fn encode(record: &JobRecord) -> Result<Vec<u8>, Rejection> {
    encode_record(record)
        .map_err(|e| Rejection::new(RejectionKind::Internal, format!("cannot encode: {e}")))
}

/// Decodes a stored job record (also for `thinghub check`).
pub fn decode_record(bytes: &[u8]) -> Result<JobRecord, String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    match (envelope.event_type.as_str(), envelope.event_version) {
        (JOB_RECORD, 1) => envelope.payload_as().map_err(|e| e.0),
        (other, version) => Err(format!("unknown record {other} v{version}")),
    }
}

fn target_key(job_id: &str, thing: &str) -> String {
    format!("{TARGET_PREFIX}{job_id}/{thing}")
}

fn status_after(event: &JobEvent) -> JobExecutionStatus {
    match event {
        JobEvent::Queued(_) => JobExecutionStatus::Queued,
        JobEvent::Updated(updated) => updated.status,
        JobEvent::TimedOut(_) => JobExecutionStatus::TimedOut,
        JobEvent::Canceled(_) => JobExecutionStatus::Canceled,
        JobEvent::Removed(_) => JobExecutionStatus::Removed,
    }
}

fn job_id_of(event: &JobEvent) -> &str {
    match event {
        JobEvent::Queued(e) => &e.job_id,
        JobEvent::Updated(e) => &e.job_id,
        JobEvent::TimedOut(e) | JobEvent::Canceled(e) | JobEvent::Removed(e) => &e.job_id,
    }
}

impl JobManager {
    /// The job side over `store`, queuing through `things`.
    pub fn new(
        store: Store,
        things: Things,
        groups: Groups,
        clock: SharedClock,
        config: JobManagerConfig,
    ) -> JobManager {
        JobManager {
            inner: Arc::new(Inner {
                store,
                things,
                groups,
                clock,
                config,
                watched: Mutex::new(HashSet::new()),
                writes: tokio::sync::Mutex::new(()),
                aborted: Mutex::new(Vec::new()),
                counts: JobCounts::default(),
            }),
        }
    }

    /// Jobs by status.
    pub fn counts(&self) -> &JobCounts {
        &self.inner.counts
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads what a restart needs: the targets of jobs in progress (and of canceled jobs with
    /// executions not ended yet), and the consumer's cursor (a first start begins at the end of
    /// the feed: no job existed before). Returns the jobs whose rollout or cancellation must go
    /// on.
    pub fn recover(&self) -> Result<Recovered, StorageError> {
        let store = &self.inner.store;
        // Only a first start begins at the end: a cursor stored as 0 (a server whose feed was
        // empty when it first started) still has every event after it to count.
        if store.cursor_stored(CONSUMER)?.is_none() {
            store.set_cursor(CONSUMER, store.feed_durable_end().saturating_sub(1))?;
        }
        let mut recovered = Recovered::default();
        for (_, bytes) in store.kv_scan_prefix(JOB_PREFIX, usize::MAX)? {
            let Ok(record) = decode_record(&bytes) else {
                continue;
            };
            let counter = match record.status {
                JobStatus::InProgress => &self.inner.counts.in_progress,
                JobStatus::Completed => &self.inner.counts.completed,
                JobStatus::Canceled => &self.inner.counts.canceled,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            match record.status {
                JobStatus::InProgress => recovered.rolling_out.push(record.job_id),
                JobStatus::Canceled if record.terminal_count() < record.targets => {
                    recovered.canceling.push(record.job_id)
                }
                JobStatus::Canceled | JobStatus::Completed => {}
            }
        }
        let mut watched = self.watched();
        for job_id in recovered.rolling_out.iter().chain(&recovered.canceling) {
            for (key, _) in
                store.kv_scan_prefix(&format!("{TARGET_PREFIX}{job_id}/"), usize::MAX)?
            {
                if let Some(thing) = key.rsplit('/').next() {
                    watched.insert(thing.to_owned());
                }
            }
        }
        Ok(recovered)
    }

    /// Goes on after a restart with what [`JobManager::recover`] found.
    pub fn resume(&self, recovered: Recovered) {
        for job_id in recovered.rolling_out {
            let manager = self.clone();
            tokio::spawn(async move { manager.roll_out(&job_id).await });
        }
        for job_id in recovered.canceling {
            let manager = self.clone();
            tokio::spawn(async move { manager.propagate_cancel(&job_id, None).await });
        }
    }

    /// One job.
    pub fn get(&self, job_id: &str) -> Result<JobRecord, Rejection> {
        validate_job_id(job_id)?;
        let bytes = self
            .inner
            .store
            .kv_get(&format!("{JOB_PREFIX}{job_id}"))
            .map_err(storage)?
            .ok_or_else(|| {
                Rejection::new(
                    RejectionKind::ExecutionNotFound,
                    format!("job '{job_id}' not found"),
                )
            })?;
        decode_record(&bytes).map_err(|e| {
            Rejection::new(
                RejectionKind::Unavailable,
                format!("job '{job_id}' cannot be read: {e}"),
            )
        })
    }

    /// Jobs in id order after `after`, optionally of one status (reads in pages of
    /// `SCAN_PAGE`, never the whole range at once).
    pub fn list(
        &self,
        status: Option<JobStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, Rejection> {
        let mut out = Vec::new();
        let mut from = after.map(|a| format!("{JOB_PREFIX}{a}"));
        while out.len() < limit {
            let page = self
                .inner
                .store
                .kv_scan_prefix_after(JOB_PREFIX, from.as_deref(), SCAN_PAGE)
                .map_err(storage)?;
            let Some((last, _)) = page.last() else { break };
            from = Some(last.clone());
            for (_, bytes) in &page {
                let Ok(record) = decode_record(bytes) else {
                    continue;
                };
                if status.is_none_or(|s| s == record.status) && out.len() < limit {
                    out.push(record);
                }
            }
        }
        Ok(out)
    }

    /// A job's targets and their executions' statuses, in Thing order after `after` (read in
    /// pages, like [`JobManager::list`]).
    pub fn targets(
        &self,
        job_id: &str,
        status: Option<JobExecutionStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TargetStatus>, Rejection> {
        self.get(job_id)?;
        let prefix = format!("{TARGET_PREFIX}{job_id}/");
        let mut out = Vec::new();
        let mut from = after.map(|a| format!("{prefix}{a}"));
        while out.len() < limit {
            let page = self
                .inner
                .store
                .kv_scan_prefix_after(&prefix, from.as_deref(), SCAN_PAGE)
                .map_err(storage)?;
            let Some((last, _)) = page.last() else { break };
            from = Some(last.clone());
            for (key, bytes) in &page {
                let current = std::str::from_utf8(bytes)
                    .ok()
                    .and_then(JobExecutionStatus::parse);
                if status.is_none_or(|s| Some(s) == current) && out.len() < limit {
                    out.push(TargetStatus {
                        thing: key[prefix.len()..].to_owned(),
                        status: current,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Creates a job (durable before this returns) and starts its rollout.
    pub async fn create(&self, mut job: CreateJob) -> Result<JobRecord, Rejection> {
        validate_job_id(&job.job_id)?;
        for thing in &job.things {
            self.inner.things.ensure_registered(thing)?;
        }
        let max = self.inner.config.targets_max;
        let mut named: HashSet<String> = job.things.iter().cloned().collect();
        for group in &job.groups {
            // Members that are not registered (deleted since they joined) are skipped.
            for thing in self
                .inner
                .groups
                .members(group, None, max.saturating_add(1))?
            {
                if self.inner.things.ensure_registered(&thing).is_ok()
                    && named.insert(thing.clone())
                {
                    job.things.push(thing);
                }
            }
        }
        if job.things.is_empty() && !job.continuous {
            return Err(Rejection::bad_request(
                "the job's targets name no registered Thing",
            ));
        }
        if job.things.len() > max {
            return Err(Rejection::bad_request(format!(
                "a job may target at most {max} Things; this one has {}",
                job.things.len()
            )));
        }
        let now_ms = self.inner.clock.now_ms();
        let record = JobRecord {
            job_id: job.job_id.clone(),
            description: job.description,
            document: job.document,
            targets: job.things.len() as u64,
            in_progress_timeout_s: job
                .in_progress_timeout_minutes
                .map(|m| m.saturating_mul(60)),
            status: JobStatus::InProgress,
            force_canceled: false,
            reason_code: None,
            queued: 0,
            counts: BTreeMap::new(),
            created_at_ms: now_ms,
            last_updated_at_ms: now_ms,
            completed_at_ms: None,
            maximum_per_minute: job.maximum_per_minute,
            exponential_rate: job.exponential_rate,
            current_rate_per_minute: None,
            abort_criteria: job.abort_criteria,
            groups: job.groups,
            continuous: job.continuous,
        };
        {
            // Only this manager writes `job/...`, under `writes`: the check and the batch
            // cannot interleave with another create. One batch: a crash keeps the job with all
            // its targets or nothing.
            let _writes = self.inner.writes.lock().await;
            let key = format!("{JOB_PREFIX}{}", job.job_id);
            if self.inner.store.kv_get(&key).map_err(storage)?.is_some() {
                return Err(Rejection::new(
                    RejectionKind::AlreadyExists,
                    format!("job '{}' already exists", job.job_id),
                ));
            }
            let mut batch: Vec<(String, Option<Vec<u8>>)> = job
                .things
                .iter()
                .map(|thing| (target_key(&job.job_id, thing), Some(Vec::new())))
                .collect();
            batch.push((key, Some(encode(&record)?)));
            self.inner.store.kv_apply_behind(batch).map_err(storage)?;
            // Counted once applied (a failed sync still leaves the job for its end to count).
            self.inner
                .counts
                .in_progress
                .fetch_add(1, Ordering::Relaxed);
            self.inner.store.sync().await.map_err(storage)?;
        }
        self.watched().extend(job.things.iter().cloned());
        tracing::info!(job = %record.job_id, targets = record.targets, "job created");
        let manager = self.clone();
        let job_id = record.job_id.clone();
        tokio::spawn(async move { manager.roll_out(&job_id).await });
        Ok(record)
    }

    /// Queues the executions of `job_id` not queued yet (a bounded number at a time). A Thing
    /// deleted since the job was created counts as REMOVED; other failures are retried at the
    /// next start (logged). If the job is canceled meanwhile, what the last chunk queued is
    /// canceled too.
    pub async fn roll_out(&self, job_id: &str) {
        let Ok(record) = self.get(job_id) else { return };
        let Ok(targets) = self.targets(job_id, None, None, usize::MAX) else {
            return;
        };
        let pending: Vec<String> = targets
            .into_iter()
            .filter(|t| t.status.is_none())
            .map(|t| t.thing)
            .collect();
        // One copy of the document for every queue request of this run.
        let document = Arc::new(record.document.clone());
        let mut queued = 0u64;
        // Paced: one queue request per interval of the current rate (a resumed rollout starts
        // its own pace, from the rate it had reached).
        let succeeded = |record: &JobRecord| {
            record
                .counts
                .get(JobExecutionStatus::Succeeded.as_str())
                .copied()
                .unwrap_or(0)
        };
        let mut pace = Pace::new(
            record.maximum_per_minute,
            record.exponential_rate,
            record.current_rate_per_minute,
            succeeded(&record),
        );
        let mut next_at = tokio::time::Instant::now();
        let in_flight_max = self.inner.config.rollout_in_flight_max;
        let concurrency = match pace.ceiling_per_minute() {
            Some(rate) => (rate as usize).min(in_flight_max),
            None => in_flight_max,
        }
        .max(1);
        // A sliding window of `concurrency` queue requests (one slow activation does not hold
        // up the others). Every `concurrency` answers the job's status is checked: once it is
        // canceled, what may have been queued after the cancellation passed is canceled too.
        let mut tasks = tokio::task::JoinSet::new();
        let mut in_flight: BTreeSet<usize> = BTreeSet::new();
        // Every target below this index was queued before a check found the job in progress:
        // a later cancellation reaches it through the stored targets.
        let mut confirmed = 0usize;
        let mut next = 0usize;
        let mut answers_since_check = 0usize;
        let mut canceled = false;
        loop {
            let may_send = in_flight.len() < concurrency && next < pending.len();
            if may_send && tokio::time::Instant::now() >= next_at {
                if let Some(interval) = pace.interval() {
                    // Paced: a cancellation is noticed before the next request, not a window
                    // of requests later; the rate may rise with what was answered so far.
                    let now = match self.get(job_id) {
                        Ok(now) if now.status == JobStatus::InProgress => now,
                        _ => {
                            canceled = true;
                            break;
                        }
                    };
                    if let Some(raised) = pace.observe(queued, succeeded(&now)) {
                        self.rate_raised(job_id, raised).await;
                    }
                    next_at = next_at.max(tokio::time::Instant::now())
                        + pace.interval().unwrap_or(interval);
                }
                let things = self.inner.things.clone();
                let queue = QueueJob {
                    job_id: job_id.to_owned(),
                    execution_number: 1,
                    document: document.clone(),
                    in_progress_timeout_s: record.in_progress_timeout_s,
                };
                let thing = pending[next].clone();
                let index = next;
                // A Thing woken only to queue its execution goes back to sleep at once: a
                // rollout to a million Things must not hold them all active until they idle
                // out (its device, when it comes, wakes it again).
                tasks.spawn(async move {
                    let was_active = things.is_active(&thing);
                    let outcome = things.queue_job(&thing, queue).await;
                    if !was_active {
                        things.release(&thing);
                    }
                    (index, outcome)
                });
                in_flight.insert(next);
                next += 1;
                continue;
            }
            if tasks.is_empty() && !may_send {
                break;
            }
            // Answers are taken while the next request waits for its turn.
            let joined = tokio::select! {
                Some(joined) = tasks.join_next() => joined,
                () = tokio::time::sleep_until(next_at), if may_send => continue,
            };
            // A panicked request stays "in flight": the window only shrinks, and the
            // cancellation check below stays conservative.
            let Ok((index, outcome)) = joined else {
                continue;
            };
            in_flight.remove(&index);
            let thing = &pending[index];
            match outcome {
                Ok(_) => queued += 1,
                Err(rejection) if rejection.kind == RejectionKind::AlreadyExists => queued += 1,
                Err(rejection) if rejection.kind == RejectionKind::ThingNotFound => {
                    tracing::info!(job = %job_id, %thing, "target deleted since the job was created: REMOVED");
                    self.set_target(job_id, thing, JobExecutionStatus::Removed)
                        .await;
                }
                Err(rejection) => {
                    tracing::warn!(job = %job_id, %thing, error = %rejection.message, "cannot queue the job's execution; the next start retries");
                }
            }
            answers_since_check += 1;
            if answers_since_check >= concurrency || (in_flight.is_empty() && next == pending.len())
            {
                answers_since_check = 0;
                if !self.in_progress(job_id) {
                    canceled = true;
                    break;
                }
                confirmed = in_flight.first().copied().unwrap_or(next);
            }
        }
        if canceled {
            tracing::info!(job = %job_id, "rollout stopped: the job is no longer in progress");
            while tasks.join_next().await.is_some() {}
            self.propagate_cancel(job_id, Some(&pending[confirmed..next]))
                .await;
            return;
        }
        tracing::info!(job = %job_id, queued, "rollout done");
        let _writes = self.inner.writes.lock().await;
        if let Ok(mut record) = self.get(job_id) {
            record.queued = record.queued.saturating_add(queued).min(record.targets);
            if let Ok(bytes) = encode(&record) {
                let _ = self
                    .inner
                    .store
                    .kv_apply_behind(vec![(format!("{JOB_PREFIX}{job_id}"), Some(bytes))]);
            }
        }
    }

    /// Stores the rate an exponential rollout reached (not synced: after a crash, a rollout
    /// resumes at the rate stored before, which is slower, never faster).
    async fn rate_raised(&self, job_id: &str, rate: u32) {
        tracing::info!(job = %job_id, rate_per_minute = rate, "rollout rate raised");
        let _writes = self.inner.writes.lock().await;
        let Ok(mut record) = self.get(job_id) else {
            return;
        };
        record.current_rate_per_minute = Some(rate);
        let stored = encode(&record).and_then(|bytes| {
            self.inner
                .store
                .kv_apply_behind(vec![(format!("{JOB_PREFIX}{job_id}"), Some(bytes))])
                .map_err(storage)
        });
        if let Err(e) = stored {
            tracing::warn!(job = %job_id, error = %e.message, "cannot store the rollout's rate");
        }
    }

    /// `thing` joined `group`: every CONTINUOUS job in progress that targets the group gets it
    /// as a new target (durably) and queues its execution.
    pub async fn thing_joined(&self, group: &str, thing: &str) -> Result<(), Rejection> {
        let jobs: Vec<JobRecord> = self
            .list(Some(JobStatus::InProgress), None, usize::MAX)?
            .into_iter()
            .filter(|job| job.continuous && job.groups.iter().any(|g| g == group))
            .collect();
        for job in jobs {
            let key = target_key(&job.job_id, thing);
            {
                let _writes = self.inner.writes.lock().await;
                let store = &self.inner.store;
                if store.kv_get(&key).map_err(storage)?.is_some() {
                    continue;
                }
                let mut record = self.get(&job.job_id)?;
                if record.status != JobStatus::InProgress {
                    continue;
                }
                record.targets += 1;
                store
                    .kv_apply_behind(vec![
                        (key, Some(Vec::new())),
                        (
                            format!("{JOB_PREFIX}{}", job.job_id),
                            Some(encode(&record)?),
                        ),
                    ])
                    .map_err(storage)?;
                store.sync().await.map_err(storage)?;
            }
            self.watched().insert(thing.to_owned());
            tracing::info!(job = %job.job_id, %thing, %group, "a Thing joined a target group: the job reaches it");
            let manager = self.clone();
            let job_id = job.job_id.clone();
            tokio::spawn(async move { manager.roll_out(&job_id).await });
        }
        Ok(())
    }

    fn in_progress(&self, job_id: &str) -> bool {
        self.get(job_id)
            .is_ok_and(|record| record.status == JobStatus::InProgress)
    }

    /// Records `status` for a target that has no execution to report it (its Thing is gone),
    /// with the job's counts, as the counter would.
    async fn set_target(&self, job_id: &str, thing: &str, status: JobExecutionStatus) {
        let _writes = self.inner.writes.lock().await;
        let mut records = HashMap::new();
        let at_ms = self.inner.clock.now_ms();
        match self.move_target(job_id, thing, status, at_ms, &mut records) {
            Ok(true) => {
                if let Err(e) = self.inner.store.sync().await {
                    tracing::error!(job = %job_id, error = %e, "cannot store a target's status");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(job = %job_id, error = %e, "cannot store a target's status"),
        }
    }

    /// Cancels a job: no more executions are queued, queued ones end, and those in progress too
    /// with `force`. Durable before this returns; the Things are told in the background (and
    /// again after a restart until every execution has ended).
    pub async fn cancel(
        &self,
        job_id: &str,
        force: bool,
        reason_code: Option<String>,
    ) -> Result<JobRecord, Rejection> {
        let record = {
            let _writes = self.inner.writes.lock().await;
            let mut record = self.get(job_id)?;
            if record.status != JobStatus::InProgress
                && !(force && record.status == JobStatus::Canceled && !record.force_canceled)
            {
                return Err(Rejection::new(
                    RejectionKind::TerminalStateReached,
                    format!("job '{job_id}' is already {}", record.status.as_str()),
                ));
            }
            let now_ms = self.inner.clock.now_ms();
            let was_in_progress = record.status == JobStatus::InProgress;
            record.status = JobStatus::Canceled;
            record.force_canceled |= force;
            record.reason_code = reason_code.or(record.reason_code);
            record.last_updated_at_ms = now_ms;
            record.completed_at_ms = Some(now_ms);
            self.inner
                .store
                .kv_apply_behind(vec![(
                    format!("{JOB_PREFIX}{job_id}"),
                    Some(encode(&record)?),
                )])
                .map_err(storage)?;
            self.inner.store.sync().await.map_err(storage)?;
            if was_in_progress {
                self.inner.counts.ended(JobStatus::Canceled);
            }
            record
        };
        let manager = self.clone();
        let job = job_id.to_owned();
        tokio::spawn(async move { manager.propagate_cancel(&job, None).await });
        tracing::info!(job = %job_id, force, "job canceled");
        Ok(record)
    }

    /// Tells the targets (`only` these, or all) of a canceled job to end their executions.
    /// Targets whose status is not known yet are told too: their execution may exist already.
    async fn propagate_cancel(&self, job_id: &str, only: Option<&[String]>) {
        let Ok(record) = self.get(job_id) else { return };
        let targets: Vec<String> = match only {
            Some(things) => things.to_vec(),
            None => match self.targets(job_id, None, None, usize::MAX) {
                Ok(targets) => targets
                    .into_iter()
                    .filter(|t| t.status.is_none_or(|s| !s.is_terminal()))
                    .map(|t| t.thing)
                    .collect(),
                Err(_) => return,
            },
        };
        for thing in targets {
            match self
                .inner
                .things
                .cancel_job(&thing, job_id, record.force_canceled)
                .await
            {
                Ok(_) => {}
                Err(refusal) => {
                    tracing::debug!(job = %job_id, %thing, reason = %refusal.rejection.message, "execution not canceled");
                }
            }
        }
    }

    /// Runs the counting consumer until `stop`: a round at most every `feed_poll_interval`
    /// (at once while it is behind by a whole batch), so it costs the durable path nothing per
    /// change.
    pub async fn run_counter(self, mut stop: watch::Receiver<bool>) {
        loop {
            let full = match self.count_round().await {
                Ok(read) => read >= self.inner.config.feed_batch_max,
                Err(e) => {
                    tracing::error!(error = %e, "job counting round failed; retrying");
                    false
                }
            };
            if *stop.borrow() {
                return;
            }
            if !full {
                tokio::select! {
                    () = tokio::time::sleep(self.inner.config.feed_poll_interval) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }

    /// Reads the feed after the cursor once; returns how many entries it read.
    pub async fn count_round(&self) -> Result<usize, StorageError> {
        let store = &self.inner.store;
        // Read before looking at the targets: an execution of a job created after the look
        // takes a position at or after this end, so skipping below it loses nothing.
        let end = store.feed_durable_end();
        if self.watched().is_empty() {
            // No job in progress: nothing in the feed below `end` can move a count.
            store.set_cursor(CONSUMER, end.saturating_sub(1))?;
            return Ok(0);
        }
        let cursor = store.cursor(CONSUMER)?;
        let entries = store.read_feed(cursor, self.inner.config.feed_batch_max)?;
        let Some(last) = entries.last().map(|e| e.position) else {
            return Ok(0);
        };
        let watched: HashSet<String> = self.watched().clone();
        let _writes = self.inner.writes.lock().await;
        let mut records: HashMap<String, Option<JobRecord>> = HashMap::new();
        let mut wrote = false;
        for entry in entries.iter().filter(|e| watched.contains(&e.thing)) {
            // One unreadable entry must not stop the counts (and the feed's trimming) for
            // good: it is logged and skipped, like the effects consumer gives up a Thing.
            let events = match store.read_events(
                &entry.thing,
                entry.first_seq,
                entry.count as usize,
            ) {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(thing = %entry.thing, first_seq = entry.first_seq, error = %e, "job counts skip events that cannot be read");
                    continue;
                }
            };
            for recorded in events {
                let Ok(ThingEvent::Job(event)) = codec::decode_event(&entry.thing, &recorded)
                else {
                    continue;
                };
                let (job_id, status) = (job_id_of(&event), status_after(&event));
                match self.move_target(job_id, &entry.thing, status, event.at_ms(), &mut records) {
                    Ok(moved) => wrote |= moved,
                    Err(e) => {
                        tracing::error!(job = %job_id, thing = %entry.thing, error = %e, "cannot store a job count");
                    }
                }
            }
        }
        if wrote {
            // The counts are durable before the cursor passes the events they follow.
            store.sync().await?;
        }
        drop(_writes);
        let aborted =
            std::mem::take(&mut *self.inner.aborted.lock().unwrap_or_else(|p| p.into_inner()));
        for job_id in aborted {
            // Durable now (CANCELED with its reason); a restart tells the Things again.
            let manager = self.clone();
            tokio::spawn(async move { manager.propagate_cancel(&job_id, None).await });
        }
        // Not synced by itself: a cursor lost in a crash replays events whose statuses are
        // already stored, which changes nothing.
        store.set_cursor(CONSUMER, last)?;
        Ok(entries.len())
    }

    /// Moves `thing`'s status in job `job_id` to `after`, and the job's counts with it, in one
    /// atomic batch (not synced); returns whether it wrote.
    fn move_target(
        &self,
        job_id: &str,
        thing: &str,
        after: JobExecutionStatus,
        at_ms: u64,
        records: &mut HashMap<String, Option<JobRecord>>,
    ) -> Result<bool, StorageError> {
        let store = &self.inner.store;
        let record = match records.get_mut(job_id) {
            Some(record) => record,
            None => {
                let loaded = store
                    .kv_get(&format!("{JOB_PREFIX}{job_id}"))?
                    .and_then(|bytes| decode_record(&bytes).ok());
                records.entry(job_id.to_owned()).or_insert(loaded)
            }
        };
        let Some(record) = record.as_mut() else {
            return Ok(false);
        };
        let key = target_key(job_id, thing);
        let Some(stored) = store.kv_get(&key)? else {
            return Ok(false); // not a target of this job
        };
        let before = std::str::from_utf8(&stored)
            .ok()
            .and_then(JobExecutionStatus::parse);
        // A target's status only moves forward: its first terminal status is the job's outcome
        // on that Thing. Removing a finished execution from the Thing's state later is
        // housekeeping, not an outcome, and events read again after a crash (the cursor is not
        // synced) cannot move a count back.
        if before == Some(after) || before.is_some_and(JobExecutionStatus::is_terminal) {
            return Ok(false);
        }
        if let Some(before) = before {
            if let Some(n) = record.counts.get_mut(before.as_str()) {
                *n = n.saturating_sub(1);
            }
        }
        *record.counts.entry(after.as_str().to_owned()).or_insert(0) += 1;
        record.last_updated_at_ms = at_ms;
        let was = record.status;
        if record.status == JobStatus::InProgress {
            if let Some(criterion) = record.abort_criteria.iter().find(|c| c.met(&record.counts)) {
                record.status = JobStatus::Canceled;
                record.reason_code = Some(format!(
                    "aborted: {}% of executed Things {}",
                    criterion.threshold_percentage,
                    criterion.failure_type.as_str()
                ));
                record.completed_at_ms = Some(at_ms);
                tracing::warn!(job = %job_id, failure_type = criterion.failure_type.as_str(), threshold = criterion.threshold_percentage, "job aborted by its criteria");
                self.inner
                    .aborted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(job_id.to_owned());
            } else if !record.continuous && record.terminal_count() >= record.targets {
                record.status = JobStatus::Completed;
                record.completed_at_ms = Some(record.last_updated_at_ms);
                tracing::info!(job = %job_id, "job completed");
            }
        }
        store.kv_apply_behind(vec![
            (key, Some(after.as_str().as_bytes().to_vec())),
            (
                format!("{JOB_PREFIX}{job_id}"),
                Some(encode_record(record)?),
            ),
        ])?;
        // Counted once written: a failed write leaves the stored job in progress, and the
        // event that ends it later counts it then.
        if was != record.status {
            self.inner.counts.ended(record.status);
        }
        Ok(true)
    }
}
