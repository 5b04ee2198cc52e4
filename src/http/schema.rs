//! Schemas of the JSON documents the handlers build by hand (the domain renders them with its
//! own `to_json`, in the contract's field names and units, not in its storage shape), and of the
//! request bodies parsed field by field for specific errors. These types exist for the OpenAPI
//! document; the schemathesis run in `.ci/run` checks every response against them, so a
//! renamed or missing field fails the suite instead of drifting.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};
use thinghub_actors::job_manager::{FailureType, JobStatus};
use thinghub_actors::thing::jobs::JobExecutionStatus;
use thinghub_actors::thing::ThingDescription;
use thinghub_actors::thing::{CommandStatus, Severity};
use thinghub_actors::{HistoryEntry, ThingSummary};
use utoipa::ToSchema;

type Object = Map<String, Value>;

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always "ok" while the server answers.
    pub status: String,
}

/// A page of Things.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThingPage {
    /// In name order.
    pub items: Vec<ThingListItem>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// A Thing in a listing.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThingListItem {
    /// The registry's summary.
    #[serde(flatten)]
    pub summary: ThingSummary,
    /// Whether its MQTT client is connected now.
    pub online: bool,
}

/// A Thing with its groups.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThingView {
    /// The registry's description.
    #[serde(flatten)]
    pub description: ThingDescription,
    /// Its groups, in name order.
    pub thing_groups: Vec<String>,
}

/// One section set of a shadow (`desired`, `reported`, and `delta` in a full document); a
/// section is absent when empty, and null in an update's answer when the update cleared it.
#[derive(Serialize, ToSchema)]
pub struct ShadowState {
    /// What the operator wants.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub desired: Option<Value>,
    /// What the device reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub reported: Option<Value>,
    /// Desired keys whose value differs from reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub delta: Option<Value>,
}

/// Per-leaf metadata: each leaf of the state tree as `{"timestamp": unix seconds}`.
#[derive(Serialize, ToSchema)]
pub struct ShadowMetadata {
    /// Of `desired`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub desired: Option<Value>,
    /// Of `reported`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub reported: Option<Value>,
}

/// A shadow document (AWS IoT / EMQX shape), or an update's `accepted` answer (only the
/// sections the update named).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowDocument {
    /// The state sections.
    pub state: ShadowState,
    /// When each leaf last changed.
    pub metadata: ShadowMetadata,
    /// The shadow version (each accepted update adds one).
    pub version: u64,
    /// Unix seconds of the answer.
    pub timestamp: u64,
    /// The request's client token, echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// A shadow update (operator: `desired` and/or `reported`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"state": {"desired": {"fan": "on", "target": 21}}, "clientToken": "t-1"}))]
pub struct ShadowUpdateRequest {
    /// At least one of `desired` and `reported`; null clears a section, a null leaf deletes a
    /// key.
    pub state: ShadowUpdateState,
    /// Echoed in the answer (at most 64 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
    /// The version the update expects (optimistic locking); absent: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// The state of a shadow update.
#[derive(Serialize, ToSchema)]
pub struct ShadowUpdateState {
    /// New desired values.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub desired: Option<Value>,
    /// New reported values.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub reported: Option<Value>,
}

/// A device's report over HTTPS (`reported` only).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"thingName": "sensor-1", "state": {"reported": {"fan": "on", "target": 21}}}))]
pub struct ReportRequest {
    /// The Thing reporting.
    pub thing_name: String,
    /// Only `reported`.
    pub state: ReportState,
    /// Echoed (at most 64 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
    /// Expected shadow version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// The state of a device report.
#[derive(Serialize, ToSchema)]
pub struct ReportState {
    /// New reported values (null clears).
    #[schema(value_type = Option<Object>)]
    pub reported: Option<Value>,
}

/// The answer to a shadow deletion.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowDeleted {
    /// The version the shadow had (the next update gets the one after).
    pub version: u64,
    /// Unix seconds.
    pub timestamp: u64,
    /// Echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// A page of a Thing's audit history.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    /// Entries.
    pub items: Vec<HistoryEntry>,
    /// Oldest first: pass as `fromSeq` for the next page; null on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_from_seq: Option<Option<u64>>,
    /// Newest first (`order=newest`): pass as `beforeSeq` for the next page; null at the
    /// beginning of the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before_seq: Option<Option<u64>>,
}

/// A device event.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Its position in the Thing's log (null in the answer to an ingestion).
    pub seq: Option<u64>,
    /// The event type.
    pub event_type: String,
    /// Severity.
    pub severity: Severity,
    /// The event's data.
    pub data: Object,
    /// Unix ms, as the device stamped it (or at ingestion).
    pub timestamp: u64,
    /// Unix ms of ingestion.
    pub ingested_at: u64,
}

/// A page of events, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    /// Events.
    pub items: Vec<Event>,
    /// Pass as `cursor` for the next page; null when none can follow.
    pub next_cursor: Option<u64>,
}

/// A device event sent over HTTPS.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"thingName": "sensor-1", "eventType": "overheat", "severity": "warn", "data": {"celsius": 81}}))]
pub struct IngestEventRequest {
    /// The Thing.
    pub thing_name: String,
    /// 1..=64 of `[A-Za-z0-9_.-]`.
    pub event_type: String,
    /// Severity.
    pub severity: Severity,
    /// Free-form data (compact JSON at most `event_data_bytes_max`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Object>,
    /// Unix ms (default: now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
}

/// A command to send.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"action": "reboot", "params": {"delayS": 5}, "ttl": 60}))]
pub struct SendCommandRequest {
    /// What the device should do (1..=128 bytes).
    pub action: String,
    /// Its parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub params: Option<Object>,
    /// Seconds the device has to answer (default 60).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// The operator's id for it (default: a generated one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
}

/// Why a command or execution ended as it did.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusReason {
    /// `[A-Z0-9_-]{1,64}`.
    pub reason_code: String,
    /// For people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_description: Option<String>,
}

/// A command execution.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    /// Server-generated id.
    pub execution_id: String,
    /// The operator's command id.
    pub command_id: String,
    /// The Thing.
    pub thing_name: String,
    /// The action.
    pub action: String,
    /// Its parameters (null when none).
    pub params: Option<Object>,
    /// Seconds.
    pub ttl: u64,
    /// Where it is.
    pub status: CommandStatus,
    /// Unix ms.
    pub created_at: u64,
    /// Unix ms.
    pub expires_at: u64,
    /// Unix ms.
    pub updated_at: u64,
    /// The device's result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Object>,
    /// Why it ended so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<StatusReason>,
    /// Unix ms, when terminal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
}

/// A page of command executions, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandPage {
    /// Executions.
    pub items: Vec<Command>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// A Thing group.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    /// 1..=128 of `[a-zA-Z0-9:_-]`.
    pub group_name: String,
    /// Unix ms.
    pub created_at: u64,
    /// At most 2028 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A group to create.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"groupName": "floor-2", "description": "second floor"}))]
pub struct CreateGroupRequest {
    /// 1..=128 of `[a-zA-Z0-9:_-]`.
    pub group_name: String,
    /// At most 2028 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A Thing to add to a group.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"thingName": "sensor-1"}))]
pub struct AddMemberRequest {
    /// A registered Thing.
    pub thing_name: String,
}

/// A page of groups.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupPage {
    /// Groups in name order.
    pub items: Vec<Group>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// A page of names (group members).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamePage {
    /// Thing names in order.
    pub items: Vec<String>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// Counts of a job's executions by status.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobProcessDetails {
    /// Queued.
    pub number_of_queued_things: u64,
    /// In progress.
    pub number_of_in_progress_things: u64,
    /// Succeeded.
    pub number_of_succeeded_things: u64,
    /// Failed.
    pub number_of_failed_things: u64,
    /// Rejected.
    pub number_of_rejected_things: u64,
    /// Timed out.
    pub number_of_timed_out_things: u64,
    /// Canceled.
    pub number_of_canceled_things: u64,
    /// Removed.
    pub number_of_removed_things: u64,
    /// Notified by the rollout so far.
    pub number_of_queued_by_rollout: u64,
}

/// When the rollout rate rises: exactly one of the two.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateIncreaseCriteria {
    /// After this many Things were notified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_notified_things: Option<u32>,
    /// After this many Things succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_succeeded_things: Option<u32>,
}

/// A rollout rate that grows.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExponentialRate {
    /// 1..=1000.
    pub base_rate_per_minute: u32,
    /// 1.1..=5.0, one decimal.
    pub increment_factor: f64,
    /// When to rise.
    pub rate_increase_criteria: RateIncreaseCriteria,
}

/// How fast a job notifies Things.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// 1..=1000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_per_minute: Option<u32>,
    /// A rate that grows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exponential_rate: Option<ExponentialRate>,
    /// The rate reached (answers only, with `exponentialRate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_rate_per_minute: Option<u32>,
}

/// When a job is canceled for its failures.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbortCriterion {
    /// Which failures count.
    pub failure_type: FailureType,
    /// Always "CANCEL".
    pub action: String,
    /// (0, 100].
    pub threshold_percentage: f64,
    /// At least 1.
    pub min_number_of_executed_things: u64,
}

/// Abort criteria.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbortConfig {
    /// 1..=4 criteria.
    pub criteria_list: Vec<AbortCriterion>,
}

/// Execution timeouts.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutConfig {
    /// 1..=10080.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_progress_timeout_in_minutes: Option<u64>,
}

/// SNAPSHOT (the targets when created) or CONTINUOUS (and Things joining its groups later).
#[derive(Serialize, ToSchema)]
pub enum TargetSelection {
    /// Fixed targets.
    #[serde(rename = "SNAPSHOT")]
    Snapshot,
    /// Groups keep adding.
    #[serde(rename = "CONTINUOUS")]
    Continuous,
}

/// A fleet job.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// Its id.
    pub job_id: String,
    /// Where it is.
    pub status: JobStatus,
    /// The job document each device receives.
    pub document: Object,
    /// Things targeted.
    pub targets: u64,
    /// Unix ms.
    pub created_at: u64,
    /// Unix ms.
    pub last_updated_at: u64,
    /// Whether it was canceled with force.
    pub force_canceled: bool,
    /// Counts.
    pub job_process_details: JobProcessDetails,
    /// SNAPSHOT or CONTINUOUS.
    pub target_selection: TargetSelection,
    /// For people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Timeouts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_config: Option<TimeoutConfig>,
    /// The cancel's reason code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    /// Unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
    /// Pace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Targeted groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_group_names: Option<Vec<String>>,
    /// Abort criteria.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_config: Option<AbortConfig>,
}

/// What a job targets: at least one Thing or group.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTargets {
    /// Registered Things.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_names: Option<Vec<String>>,
    /// Existing groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_group_names: Option<Vec<String>>,
}

/// A job to create.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"jobId": "job-2", "document": {"operation": "update", "version": "1.2"}, "targets": {"thingNames": ["sensor-1"]}, "rollout": {"maximumPerMinute": 100}}))]
pub struct CreateJobRequest {
    /// 1..=64 of `[A-Za-z0-9_-]` (default: generated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// At most 2028 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The job document (at most `job_document_bytes_max` as compact JSON).
    pub document: Object,
    /// Targets.
    pub targets: JobTargets,
    /// Default SNAPSHOT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_selection: Option<TargetSelection>,
    /// Timeouts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_config: Option<TimeoutConfig>,
    /// Pace (`maximumPerMinute` and/or `exponentialRate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Abort criteria.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_config: Option<AbortConfig>,
}

/// A job cancel (the body may be empty).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"reasonCode": "ROLLBACK"}))]
pub struct CancelJobRequest {
    /// Also end executions in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    /// At most 128 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
}

/// A page of jobs.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobPage {
    /// In id order.
    pub items: Vec<Job>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// Where a job is on one target: its execution's status, or NOT_QUEUED while the rollout has
/// not reached it.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TargetStatus {
    /// Notified: its execution's status.
    Execution(JobExecutionStatus),
    /// Not notified yet.
    NotQueued(NotQueued),
}

/// Not notified yet.
#[derive(Serialize, ToSchema)]
pub enum NotQueued {
    /// The rollout has not reached the target.
    #[serde(rename = "NOT_QUEUED")]
    NotQueued,
}

/// One target of a job.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTarget {
    /// The Thing.
    pub thing_name: String,
    /// Its execution's status.
    pub status: TargetStatus,
}

/// A page of a job's targets.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTargetPage {
    /// In Thing order.
    pub items: Vec<JobTarget>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// A job execution on one Thing (times in Unix seconds, as AWS IoT Jobs).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobExecution {
    /// The job.
    pub job_id: String,
    /// The Thing.
    pub thing_name: String,
    /// Where it is.
    pub status: JobExecutionStatus,
    /// The device's details.
    pub status_details: BTreeMap<String, String>,
    /// Unix seconds.
    pub queued_at: u64,
    /// Unix seconds.
    pub last_updated_at: u64,
    /// Each update adds one.
    pub version_number: u64,
    /// Which execution of the job on this Thing.
    pub execution_number: u64,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// While a step timer runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approximate_seconds_before_timed_out: Option<u64>,
    /// The job document, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_document: Option<Object>,
}

/// A Thing's job executions.
#[derive(Serialize, ToSchema)]
pub struct JobExecutionList {
    /// In progress, then queued (oldest first), then finished (newest first).
    pub items: Vec<JobExecution>,
}

/// A pending execution in brief.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobExecutionSummary {
    /// The job.
    pub job_id: String,
    /// Which execution.
    pub execution_number: u64,
    /// Version.
    pub version_number: u64,
    /// Unix seconds.
    pub queued_at: u64,
    /// Unix seconds.
    pub last_updated_at: u64,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
}

/// A device's pending executions.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingJobs {
    /// In progress.
    pub in_progress_jobs: Vec<JobExecutionSummary>,
    /// Queued, oldest first.
    pub queued_jobs: Vec<JobExecutionSummary>,
    /// Unix seconds.
    pub timestamp: u64,
}

/// Starts the next pending execution.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"statusDetails": {"step": "download"}, "stepTimeoutInMinutes": 10}))]
pub struct StartNextRequest {
    /// String values, compact JSON at most 4096 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_details: Option<BTreeMap<String, String>>,
    /// 1..=10080.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_timeout_in_minutes: Option<u64>,
    /// Echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// The execution started (absent when nothing was pending), or the one described.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionReply {
    /// The execution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution: Option<JobExecution>,
    /// Unix seconds.
    pub timestamp: u64,
    /// Echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// A device's update of its execution.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"status": "IN_PROGRESS", "statusDetails": {"step": "install"}, "includeJobExecutionState": true}))]
pub struct UpdateExecutionRequest {
    /// IN_PROGRESS, SUCCEEDED, FAILED or REJECTED.
    pub status: JobExecutionStatus,
    /// String values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_details: Option<BTreeMap<String, String>>,
    /// Optimistic locking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    /// Which execution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_number: Option<u64>,
    /// 1..=10080.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_timeout_in_minutes: Option<u64>,
    /// Answer with the execution state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_job_execution_state: Option<bool>,
    /// Answer with the job document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_job_document: Option<bool>,
    /// Echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// An execution's state.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionState {
    /// Where it is.
    pub status: JobExecutionStatus,
    /// The device's details.
    pub status_details: BTreeMap<String, String>,
    /// Version.
    pub version_number: u64,
}

/// The answer to an execution update.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateExecutionReply {
    /// With `includeJobExecutionState`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_state: Option<ExecutionState>,
    /// With `includeJobDocument`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_document: Option<Object>,
    /// Unix seconds.
    pub timestamp: u64,
    /// Echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// A device jobs refusal: the error body with AWS IoT Jobs' error code.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobsError {
    /// HTTP status.
    pub code: u16,
    /// What went wrong.
    pub message: String,
    /// InvalidRequest, InvalidJson, ResourceNotFound, VersionMismatch, TerminalStateReached,
    /// InvalidStateTransition, RequestThrottled or InternalError.
    pub error_code: String,
    /// With VersionMismatch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_state: Option<ExecutionState>,
    /// Echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// An API key as listed (never its secret).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// The key id (`k-` and 16 hex digits).
    pub key: String,
    /// Its role.
    pub role: crate::auth::Role,
    /// Unix ms.
    pub created_at: u64,
    /// For people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Unix ms after which it is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// A device key's Things.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub things: Option<Vec<String>>,
}

/// A new API key: the only time its secret is shown.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedApiKey {
    /// The key.
    #[serde(flatten)]
    pub key: ApiKey,
    /// Its secret (store it now).
    pub secret: String,
}

/// An API key to create.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"name": "sensor-1 device key", "role": "device", "things": ["sensor-1"]}))]
pub struct CreateApiKeyRequest {
    /// For people (at most 128 characters).
    pub name: String,
    /// Its role.
    pub role: crate::auth::Role,
    /// Unix ms, in the future.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Device keys only: 1..=1000 Thing names it may act for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub things: Option<Vec<String>>,
}

/// A page of API keys.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyPage {
    /// Keys in id order.
    pub items: Vec<ApiKey>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// MQTT users.
#[derive(Serialize, ToSchema)]
pub struct UserList {
    /// In name order.
    pub items: Vec<crate::users::UserView>,
}

/// A Thing's device certificates.
#[derive(Serialize, ToSchema)]
pub struct CertificateList {
    /// By fingerprint, revoked ones included.
    pub items: Vec<crate::certificates::CertificateView>,
}

/// Authorization rules.
#[derive(Serialize, ToSchema)]
pub struct RuleList {
    /// In evaluation order.
    pub items: Vec<crate::mqtt::acl::AclRule>,
}

/// A page of MQTT clients.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientPage {
    /// In client id order.
    pub items: Vec<crate::mqtt::broker::ClientView>,
    /// Pass as `after`; null on the last page.
    pub next_after: Option<String>,
}

/// A page of subscriptions.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionPage {
    /// In (clientId, topic) order.
    pub items: Vec<crate::mqtt::broker::SubscriptionView>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// A page of topics.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicPage {
    /// In topic order.
    pub items: Vec<crate::mqtt::broker::TopicView>,
    /// Pass as `cursor`; null on the last page.
    pub next_cursor: Option<String>,
}

/// A subscription an operator makes for a session.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"topic": "alerts/#", "qos": 1}))]
pub struct SubscribeRequest {
    /// A topic filter (`$share/{group}/...` allowed).
    pub topic: String,
    /// 0..=2 (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// MQTT 5 no local.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_local: Option<bool>,
    /// MQTT 5 retain as published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retain_as_published: Option<bool>,
    /// MQTT 5 retain handling, 0..=2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retain_handling: Option<u8>,
}

/// A subscription made.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeReply {
    /// The session.
    pub client_id: String,
    /// The filter.
    pub topic: String,
    /// Granted QoS.
    pub qos: u8,
    /// False when it replaced the options of one the session had.
    pub new: bool,
}

/// One answer of a bulk subscribe: the reply with `code` 200, or an error.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeOutcome {
    /// 200 or the item's error status.
    pub code: u16,
    /// The session (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The filter (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Granted QoS (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// Whether new (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<bool>,
    /// Why not (on error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A subscription to remove.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"topic": "alerts/#"}))]
pub struct UnsubscribeRequest {
    /// The filter as subscribed.
    pub topic: String,
}

/// A subscription removed.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnsubscribeReply {
    /// The session.
    pub client_id: String,
    /// The filter.
    pub topic: String,
}

/// One answer of a bulk unsubscribe.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnsubscribeOutcome {
    /// 200 or the item's error status.
    pub code: u16,
    /// The session (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The filter (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Why not (on error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// MQTT 5 properties of an operator's publish.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishProperties {
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_expiry_interval: Option<u32>,
    /// MIME type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// 0 (bytes) or 1 (UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    /// A topic name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// Sent as its UTF-8 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<String>,
    /// String values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_properties: Option<BTreeMap<String, String>>,
}

/// How the payload string is to be read.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    /// As UTF-8 text.
    Plain,
    /// Standard base64 of the bytes.
    Base64,
}

/// A message an operator publishes.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"topic": "alerts/floor-1", "payload": "smoke", "qos": 1, "properties": {"contentType": "text/plain", "userProperties": {"source": "ops"}}}))]
pub struct PublishRequest {
    /// A topic name (no wildcards).
    pub topic: String,
    /// Default empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Default plain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_encoding: Option<PayloadEncoding>,
    /// 0..=2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// Retain it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retain: Option<bool>,
    /// MQTT 5 properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<PublishProperties>,
}

/// A message published.
#[derive(Serialize, ToSchema)]
pub struct PublishReply {
    /// The topic.
    pub topic: String,
    /// Sessions it was delivered or queued to.
    pub subscribers: u64,
}

/// One answer of a bulk publish.
#[derive(Serialize, ToSchema)]
pub struct PublishOutcome {
    /// 200 or the item's error status.
    pub code: u16,
    /// The topic (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Sessions reached (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribers: Option<u64>,
    /// Why not (on error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Every metric now, by group and key (`process`, `things`, `storage`, `mqtt`, `auth`,
/// `effects`, `deadlines`; see the README's metrics table).
#[derive(Serialize, ToSchema)]
pub struct Metrics(pub BTreeMap<String, BTreeMap<String, f64>>);

/// Rates per second of every counter over a window.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rates {
    /// The window actually covered (0 before the second sample).
    pub window_seconds: f64,
    /// Per group and key, per second.
    #[serde(flatten)]
    pub groups: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Rates over one and five minutes.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsRates {
    /// About the last minute.
    pub one_minute: Rates,
    /// About the last five minutes.
    pub five_minutes: Rates,
}

/// A dashboard's view: the metrics now and the counters' rates.
#[derive(Serialize, ToSchema)]
pub struct Stats {
    /// As `GET /api/v1/metrics`.
    pub current: Metrics,
    /// Rates.
    pub rates: StatsRates,
}

/// A webhook to create, or the fields to change.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"url": "http://127.0.0.1:9000/hook", "kinds": ["shadow.updated", "thing.connected"], "secret": "s3cret", "batchMax": 50}))]
pub struct WebhookRequest {
    /// http or https URL (required when creating).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Record kinds to deliver (null: every kind): thing.registered, thing.deleted,
    /// thing.connected, thing.disconnected, shadow.updated, shadow.deleted, event.ingested,
    /// command.sent, command.answered, command.timed_out, command.canceled,
    /// command.response_refused, job.execution, alarm.watch_started, alarm.watch_ended,
    /// alarm.raised, alarm.acknowledged, alarm.cleared, alarm.severity_changed, measurement.recorded, client.subscribed,
    /// client.unsubscribed, message.published (needs topicFilters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// Things to deliver (null: every Thing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_names: Option<Vec<String>>,
    /// MQTT topic filters of the messages delivered as `message.published` (null: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_filters: Option<Vec<String>>,
    /// Extra request headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// HMAC-SHA256 key: each POST carries `X-Thinghub-Signature: sha256=<hex of the body's MAC>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Records per POST, 1..=webhook_batch_max.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_max: Option<u64>,
    /// Whether it delivers (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// A webhook's delivery since the server started (counters reset with the process).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookStatus {
    /// Whether its delivery task runs (enabled).
    pub running: bool,
    /// The last change feed position handled.
    pub cursor: u64,
    /// Feed entries committed after the cursor.
    pub lag_entries: u64,
    /// Dead letters held.
    pub dead_letters: u64,
    /// Age of the oldest record not delivered yet, seconds (running only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Records delivered (running only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
    /// Requests retried (running only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retried: Option<u64>,
    /// Records dead-lettered (running only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
    /// The last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    /// Broker events waiting in memory (running, with broker kinds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_queued: Option<u64>,
    /// Broker events dropped: the queue was full or delivery stopped (running, with broker
    /// kinds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_dropped: Option<u64>,
}

/// A delivery failure.
#[derive(Serialize, ToSchema)]
pub struct LastError {
    /// Unix ms.
    pub at: u64,
    /// What the receiver or the network said.
    pub message: String,
}

/// A webhook (its secret is never shown).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    /// `w-` and 16 hex digits.
    pub id: String,
    /// Where batches go.
    pub url: String,
    /// Kinds delivered (null: all).
    pub kinds: Option<Vec<String>>,
    /// Things delivered (null: all).
    pub thing_names: Option<Vec<String>>,
    /// Topic filters of the messages delivered (null: none).
    pub topic_filters: Option<Vec<String>>,
    /// Extra headers.
    pub headers: BTreeMap<String, String>,
    /// Whether requests are signed.
    pub has_secret: bool,
    /// Records per POST.
    pub batch_max: u64,
    /// Whether it delivers.
    pub enabled: bool,
    /// Unix ms.
    pub created_at: u64,
    /// Delivery.
    pub status: WebhookStatus,
}

/// Webhooks.
#[derive(Serialize, ToSchema)]
pub struct WebhookList {
    /// In id order.
    pub items: Vec<WebhookView>,
}

/// A batch the receiver refused for good.
#[derive(Serialize, ToSchema)]
pub struct DeadLetter {
    /// Its key (the first record's feed position; `mqtt-{start}-{n}` for broker events).
    pub id: String,
    /// Unix ms.
    pub at: u64,
    /// The receiver's HTTP status.
    pub status: u16,
    /// The receiver's answer.
    pub error: String,
    /// The records (a broker event's has no `position` nor `seq`).
    pub records: Vec<IntegrationRecord>,
}

/// One integration record: a Thing event from the change feed, or a broker event.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationRecord {
    /// `{thingName}:{seq}`, or `mqtt:{server start ms}:{n}` for a broker event.
    pub id: String,
    /// Change feed position (Thing events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// The kind.
    pub kind: String,
    /// The Thing (absent for a broker event of a client that is no Thing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_name: Option<String>,
    /// The MQTT client id, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Unix ms.
    pub at: u64,
    /// The event's seq in its Thing's log (Thing events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// One line for people.
    pub summary: String,
    /// The event.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// A page of dead letters, oldest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterList {
    /// Dead letters.
    pub items: Vec<DeadLetter>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// The outcome of a replay.
#[derive(Serialize, ToSchema)]
pub struct ReplayReply {
    /// Delivered (and removed).
    pub replayed: u64,
    /// Still held.
    pub left: u64,
}

/// A PostgreSQL sink to create, or the fields to change.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"connection": "host=127.0.0.1 port=5432 user=thinghub password=pw dbname=fleet", "table": "thing_events", "kinds": ["thing.connected", "thing.disconnected"]}))]
pub struct PostgresSinkRequest {
    /// libpq-style connection string or URL (required when creating; never shown again; no
    /// TLS yet: `sslmode=require` is refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    /// Table (1..=63 of [a-z0-9_]; created if absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Record kinds (null: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// Things (null: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_names: Option<Vec<String>>,
    /// Topic filters of the messages written as `message.published` (null: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_filters: Option<Vec<String>>,
    /// Records per transaction, 1..=webhook_batch_max.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_max: Option<u64>,
    /// Whether it delivers (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// Where a sink connects (no password).
#[derive(Serialize, ToSchema)]
pub struct PostgresConnection {
    /// Hosts.
    pub hosts: Vec<String>,
    /// Ports.
    pub ports: Vec<u16>,
    /// Database.
    pub dbname: Option<String>,
    /// User.
    pub user: Option<String>,
}

/// A PostgreSQL sink.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSinkView {
    /// `w-` and 16 hex digits.
    pub id: String,
    /// The table.
    pub table: String,
    /// Where it connects.
    pub connection: Option<PostgresConnection>,
    /// Kinds delivered (null: all).
    pub kinds: Option<Vec<String>>,
    /// Things delivered (null: all).
    pub thing_names: Option<Vec<String>>,
    /// Topic filters of the messages written (null: none).
    pub topic_filters: Option<Vec<String>>,
    /// Records per transaction.
    pub batch_max: u64,
    /// Whether it delivers.
    pub enabled: bool,
    /// Unix ms.
    pub created_at: u64,
    /// Delivery.
    pub status: WebhookStatus,
}

/// PostgreSQL sinks.
#[derive(Serialize, ToSchema)]
pub struct PostgresSinkList {
    /// In id order.
    pub items: Vec<PostgresSinkView>,
}

/// A page of a device's connections, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPage {
    /// Connections.
    pub items: Vec<thinghub_actors::service::Connection>,
    /// Pass as `cursor`; null at the beginning of the log or the window.
    pub next_cursor: Option<u64>,
}

/// A new offline alarm rule.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"name": "offline-10m", "offlineForSeconds": 600, "thingType": "sensor", "severity": "MAJOR"}))]
pub struct CreateAlarmRuleRequest {
    /// 1..=128 of `[a-zA-Z0-9:_.-]`; the type of the alarms it raises.
    pub name: String,
    /// 1..=31536000.
    pub offline_for_seconds: u64,
    /// Only Things of this type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    /// Only Things in this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_group: Option<String>,
    /// `CRITICAL`, `MAJOR`, `MINOR` or `WARNING`.
    pub severity: thinghub_actors::thing::AlarmSeverity,
}

/// The offline alarm rules.
#[derive(Serialize, ToSchema)]
pub struct AlarmRuleList {
    /// In name order.
    pub items: Vec<thinghub_actors::alarms::AlarmRule>,
}

/// One child device.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChildItem {
    /// Its id under its parent (what the parent's rows name it: `s/us/{id}`).
    pub id: String,
    /// Its Thing (`{parent}:{id}`).
    pub thing_name: String,
}

/// A page of child devices.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChildPage {
    /// In id order.
    pub items: Vec<ChildItem>,
    /// Pass as `cursor`; null when the listing is done.
    pub next_cursor: Option<String>,
}

/// A page of device registrations.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationPage {
    /// In id order.
    pub items: Vec<crate::cumulocity::registrations::Registration>,
    /// Pass as `cursor`; null when the listing is done.
    pub next_cursor: Option<String>,
}

/// A page of alarms.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlarmPage {
    /// In Thing name order.
    pub items: Vec<thinghub_actors::alarms::ListedAlarm>,
    /// Pass as `cursor`; null when the listing is done.
    pub next_cursor: Option<String>,
}

/// A Thing's alarms.
#[derive(Serialize, ToSchema)]
pub struct AlarmList {
    /// By type.
    pub items: Vec<thinghub_actors::alarms::ListedAlarm>,
}

/// One stored measurement.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeasurementItem {
    /// Its seq in the Thing's log.
    pub seq: u64,
    /// Its type.
    #[serde(rename = "type")]
    pub measurement_type: String,
    /// When it was measured, Unix ms.
    pub time: u64,
    /// When it was stored, Unix ms.
    pub recorded_at: u64,
    /// The values the filters keep.
    pub values: Vec<thinghub_actors::thing::measurements::MeasurementValue>,
}

/// A page of measurements, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeasurementPage {
    /// Measurements.
    pub items: Vec<MeasurementItem>,
    /// Pass as `cursor`; null at the beginning of the log.
    pub next_cursor: Option<u64>,
}
