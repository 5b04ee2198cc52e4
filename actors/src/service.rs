//! The application API every frontend calls (HTTP now, MQTT next): typed operations on Things.
//!
//! It validates names, answers 404 for unregistered Things from the registry index without
//! activating an actor (so random names cannot fill memory with actors), routes everything else
//! to the Thing's actor, and reads the append-only log for history. Frontends parse, authorize
//! and render; they never hold state.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Map, Value};
use thinghub_storage::{Claim, RecordedEvent, StorageError, Store};

use crate::codec;
use crate::registry::Registry;
use crate::thing::commands::{CommandPage, PageCursor};
use crate::thing::jobs::{
    parse_status_details, parse_step_timeout, validate_job_id, DeviceJobRequest, JobExecution,
    JobExecutions, JobOutcome, JobRefusal, JobUpdate, QueueJob, StartNext,
};
use crate::thing::shadow::{ShadowDocument, ShadowUpdateResult};
use crate::thing::{
    self, CommandExecution, CommandOutcome, CommandResponse, CommandStatus, EventIngested,
    IngestEvent, Origin, RegisterThing, Rejection, RejectionKind, Reply, SendCommand, ShadowUpdate,
    ThingCommand, ThingDescription, ThingEvent,
};
use crate::thing_actor::{Request, Response};

/// A registered Thing as listed (from the index, without activating it).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThingSummary {
    /// Thing name.
    #[serde(rename = "thingName")]
    pub name: String,
    /// MQTT client id.
    #[serde(rename = "mqttClientId")]
    pub mqtt_client_id: String,
    /// Type label.
    #[serde(rename = "thingType", skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    /// Unix ms of registration.
    #[serde(rename = "createdAt")]
    pub created_at_ms: u64,
}

/// One entry of a Thing's audit history.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// Sequence number in the Thing's log.
    pub seq: u64,
    /// Unix ms the event was recorded.
    #[serde(rename = "recordedAt")]
    pub recorded_at_ms: u64,
    /// `event_type` of the envelope.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Shape version of the stored record.
    #[serde(rename = "eventVersion")]
    pub event_version: u16,
    /// One line for people.
    pub summary: String,
    /// The event as JSON (its stored shape: externally tagged by kind, snake_case fields).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub event: Value,
}

/// Typed operations on Things.
#[derive(Clone)]
pub struct Things {
    registry: Registry,
    store: Store,
    /// MQTT client ids whose registration is in progress in this process. A `client_ids`
    /// entry that names an unregistered Thing is a claim in flight if it is here, and a claim
    /// left by a crash (free to take) if it is not.
    claims_in_flight: Arc<Mutex<HashSet<String>>>,
}

/// Removes a client id from the claims in flight when its registration ends, whatever way.
struct ClaimInFlight<'a> {
    claims: &'a Mutex<HashSet<String>>,
    client_id: String,
}

impl Drop for ClaimInFlight<'_> {
    fn drop(&mut self) {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.client_id);
    }
}

/// A Thing whose records cannot be read is unavailable (503, naming what is wrong), like a
/// Thing whose actor cannot replay its log; only a failure to encode is our own bug (500).
fn storage_failure(error: StorageError) -> Rejection {
    match error {
        StorageError::Encode(_) => {
            tracing::error!(error = %error, "storage failure");
            Rejection::new(RejectionKind::Internal, "storage failure")
        }
        other => {
            tracing::error!(error = %other, "a record cannot be read");
            Rejection::new(RejectionKind::Unavailable, other.to_string())
        }
    }
}

fn unexpected(response: Response) -> Rejection {
    tracing::error!(?response, "a thing answered with an unexpected response");
    Rejection::new(RejectionKind::Internal, "unexpected response")
}

impl Things {
    /// Wraps a started registry.
    pub fn new(registry: Registry) -> Things {
        let store = registry.context().store.clone();
        Things {
            registry,
            store,
            claims_in_flight: Arc::default(),
        }
    }

    /// The registry (stats, shutdown).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// 400 for an invalid name, 404 (with `token`) when it is not registered.
    /// Now, Unix ms, by the node's clock.
    pub fn now_ms(&self) -> u64 {
        self.registry.context().clock.now_ms()
    }

    /// 404 unless `name` is a registered Thing (read from the registry index, no activation).
    pub fn ensure_registered(&self, name: &str) -> Result<(), Rejection> {
        self.require_registered(name, None)
    }

    /// [`Things::require_registered`] for a request its Thing checks again (a command that
    /// answers 404 on an unregistered Thing): a Thing whose actor is running passes without
    /// the index read, which only keeps unknown names from starting actors.
    fn require_routable(&self, name: &str, token: Option<&String>) -> Result<(), Rejection> {
        if self.registry.is_active(name) {
            return thing::validate_thing_name(name).map_err(|r| r.with_token(token.cloned()));
        }
        self.require_registered(name, token)
    }

    fn require_registered(&self, name: &str, token: Option<&String>) -> Result<(), Rejection> {
        thing::validate_thing_name(name).map_err(|r| r.with_token(token.cloned()))?;
        match self.store.get_thing(name) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(Rejection::new(
                RejectionKind::ThingNotFound,
                format!("Thing '{name}' not found"),
            )
            .with_token(token.cloned())),
            Err(e) => Err(storage_failure(e)),
        }
    }

    /// Registers a Thing: 409 if it exists, or if its MQTT client id belongs to another Thing.
    pub async fn register(
        &self,
        name: &str,
        register: RegisterThing,
    ) -> Result<ThingDescription, Rejection> {
        thing::validate_thing_name(name)?;
        let client_id = register
            .mqtt_client_id
            .clone()
            .unwrap_or_else(|| name.to_owned());
        // One registration per client id at a time in this process, and the id claimed before
        // the registration is appended: two registrations (a bulk body naming one id twice)
        // cannot both get it.
        let _in_flight = {
            let mut claims = self
                .claims_in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !claims.insert(client_id.clone()) {
                return Err(Rejection::new(
                    RejectionKind::AlreadyExists,
                    format!("mqttClientId '{client_id}' is being registered for another Thing"),
                ));
            }
            ClaimInFlight {
                claims: &self.claims_in_flight,
                client_id: client_id.clone(),
            }
        };
        let claimed = claim_client_id(&self.store, &client_id, name).map_err(storage_failure)?;
        if let Err(owner) = claimed {
            return Err(Rejection::new(
                RejectionKind::AlreadyExists,
                format!("mqttClientId '{client_id}' belongs to Thing '{owner}'"),
            ));
        }
        let request = Request::Command(ThingCommand::Register(register));
        let registered = match self.registry.request(name, request).await {
            Ok(Response::Decided(Reply::Registered(description))) => Ok(description),
            Ok(other) => Err(unexpected(other)),
            Err(rejection) => Err(rejection),
        };
        if registered.is_err() && claimed == Ok(true) {
            // Not registered: give back what this call claimed (a crash here leaves a claim
            // that names an unregistered Thing, which `client_id_owner` ignores).
            let _ = self.store.release_client_id(&client_id, name);
        }
        registered
    }

    /// Whether the Thing's actor is live now (bulk work releases only what it woke).
    pub fn is_active(&self, name: &str) -> bool {
        self.registry.is_active(name)
    }

    /// Lets a Thing's actor go now if nothing else is using it (after bulk registration).
    pub fn release(&self, name: &str) {
        self.registry.passivate_now(name);
    }

    /// The registry view of a Thing.
    pub async fn describe(&self, name: &str) -> Result<ThingDescription, Rejection> {
        self.require_registered(name, None)?;
        match self.registry.request(name, Request::Describe).await? {
            Response::Description(description) => Ok(description),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a Thing (its history stays in the log).
    pub async fn delete(&self, name: &str) -> Result<(), Rejection> {
        self.require_registered(name, None)?;
        match self
            .registry
            .request(name, Request::Command(ThingCommand::Delete))
            .await?
        {
            Response::Decided(Reply::Deleted { .. }) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The shadow document.
    pub async fn get_shadow(&self, name: &str) -> Result<ShadowDocument, Rejection> {
        self.require_registered(name, None)?;
        match self.registry.request(name, Request::GetShadow).await? {
            Response::Shadow(document) => Ok(document),
            other => Err(unexpected(other)),
        }
    }

    /// Applies a shadow update; the result is returned once it is durable (its effects are
    /// on their way to the sink by then).
    pub async fn update_shadow(
        &self,
        name: &str,
        update: ShadowUpdate,
        origin: Origin,
    ) -> Result<ShadowUpdateResult, Rejection> {
        self.require_routable(name, update.client_token.as_ref())?;
        let request = Request::Command(ThingCommand::UpdateShadow {
            update,
            origin,
            // The Thing asks its sink whether anyone listens for `update/documents`.
            want_documents: false,
        });
        match self.registry.request(name, request).await? {
            Response::Decided(Reply::ShadowUpdated(result)) => Ok(*result),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes the shadow document: `{version, timestamp, clientToken?}`.
    pub async fn delete_shadow(
        &self,
        name: &str,
        client_token: Option<String>,
        origin: Origin,
    ) -> Result<Value, Rejection> {
        self.require_registered(name, client_token.as_ref())?;
        let request = Request::Command(ThingCommand::DeleteShadow {
            client_token,
            origin,
        });
        match self.registry.request(name, request).await? {
            Response::Decided(Reply::ShadowDeleted(reply)) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// Records that the Thing's MQTT client connected (durable before it returns).
    pub async fn record_connected(
        &self,
        name: &str,
        client_id: &str,
        connection_id: u64,
    ) -> Result<(), Rejection> {
        self.record(
            name,
            ThingCommand::RecordConnected {
                client_id: client_id.to_owned(),
                connection_id,
            },
        )
        .await
    }

    /// Records that the Thing's MQTT client disconnected, and why.
    pub async fn record_disconnected(
        &self,
        name: &str,
        client_id: &str,
        connection_id: u64,
        reason: &str,
    ) -> Result<(), Rejection> {
        self.record(
            name,
            ThingCommand::RecordDisconnected {
                client_id: client_id.to_owned(),
                connection_id,
                reason: reason.to_owned(),
                offline_rules: Vec::new(),
            },
        )
        .await
    }

    /// Records that a connection an earlier run of the server left open (a crash) ended, as
    /// background work (not refused because clients keep the Thing busy).
    pub async fn end_connection_left_open(
        &self,
        name: &str,
        client_id: &str,
        connection_id: u64,
    ) -> Result<(), Rejection> {
        let command = ThingCommand::RecordDisconnected {
            client_id: client_id.to_owned(),
            connection_id,
            reason: "server_restart".to_owned(),
            offline_rules: Vec::new(),
        };
        match self.registry.ask(name, Request::Command(command)).await? {
            Response::Decided(Reply::Recorded) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn record(&self, name: &str, command: ThingCommand) -> Result<(), Rejection> {
        self.require_registered(name, None)?;
        match self
            .registry
            .request(name, Request::Command(command))
            .await?
        {
            Response::Decided(Reply::Recorded) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Stores a device event (durable before it returns).
    pub async fn ingest_event(
        &self,
        name: &str,
        event: IngestEvent,
    ) -> Result<EventIngested, Rejection> {
        self.require_registered(name, None)?;
        match self
            .registry
            .request(name, Request::Command(ThingCommand::IngestEvent(event)))
            .await?
        {
            Response::Decided(Reply::EventStored(stored)) => Ok(stored),
            other => Err(unexpected(other)),
        }
    }

    /// A fresh execution id: 128 random bits as a UUID (v4 layout).
    pub fn new_execution_id() -> String {
        new_uuid()
    }

    /// Sends a command (validated by the caller with [`SendCommand::from_json`]); returns the
    /// execution once `CommandSent` is durable. The caller then publishes the request.
    pub async fn send_command(
        &self,
        name: &str,
        command: SendCommand,
    ) -> Result<CommandExecution, Rejection> {
        self.require_registered(name, None)?;
        self.command_request(name, ThingCommand::SendCommand(command))
            .await
    }

    /// Applies a device's answer; a refused one is recorded in the log, then returned as `Err`.
    pub async fn respond_command(
        &self,
        name: &str,
        response: CommandResponse,
    ) -> Result<CommandExecution, Rejection> {
        self.require_registered(name, None)?;
        self.command_request(name, ThingCommand::RespondCommand(response))
            .await
    }

    /// Cancels a pending execution.
    pub async fn cancel_command(
        &self,
        name: &str,
        execution_id: &str,
    ) -> Result<CommandExecution, Rejection> {
        self.require_registered(name, None)?;
        thing::commands::validate_id("executionId", execution_id)?;
        self.command_request(
            name,
            ThingCommand::CancelCommand {
                execution_id: execution_id.to_owned(),
            },
        )
        .await
    }

    /// An operator acknowledges (or, with `clear`, clears) the Thing's alarm of a type.
    pub async fn alarm_action(
        &self,
        name: &str,
        alarm_type: &str,
        by: &str,
        clear: bool,
    ) -> Result<thing::Alarm, Rejection> {
        self.require_registered(name, None)?;
        crate::alarms::validate_rule_name(alarm_type)?;
        let (alarm_type, by) = (alarm_type.to_owned(), by.to_owned());
        let command = if clear {
            ThingCommand::ClearAlarm { alarm_type, by }
        } else {
            ThingCommand::AcknowledgeAlarm { alarm_type, by }
        };
        match self
            .registry
            .request(name, Request::Command(command))
            .await?
        {
            Response::Decided(Reply::Alarm(Some(alarm))) => Ok(alarm),
            other => Err(unexpected(other)),
        }
    }

    /// Stores a device's measurement (durable before it returns).
    pub async fn record_measurements(
        &self,
        name: &str,
        record: crate::thing::measurements::RecordMeasurements,
    ) -> Result<(), Rejection> {
        self.record(name, ThingCommand::RecordMeasurements(record))
            .await
    }

    /// A Thing's measurements, newest first, from the log (see [`list_measurements`]).
    pub fn measurements(
        &self,
        name: &str,
        query: &MeasurementQuery,
        limit: usize,
    ) -> Result<MeasurementPage, Rejection> {
        self.require_registered(name, None)?;
        list_measurements(&self.store, name, query, limit).map_err(storage_failure)
    }

    /// A device's alarm request (raise, change severity): the alarm as it is after it.
    pub async fn device_alarm(
        &self,
        name: &str,
        command: ThingCommand,
    ) -> Result<Option<thing::Alarm>, Rejection> {
        self.require_registered(name, None)?;
        if let ThingCommand::RaiseAlarm { alarm_type, .. }
        | ThingCommand::ChangeAlarmSeverity { alarm_type, .. }
        | ThingCommand::ClearDeviceAlarm { alarm_type } = &command
        {
            crate::alarms::validate_rule_name(alarm_type)?;
        }
        match self
            .registry
            .request(name, Request::Command(command))
            .await?
        {
            Response::Decided(Reply::Alarm(alarm)) => Ok(alarm),
            other => Err(unexpected(other)),
        }
    }

    async fn command_request(
        &self,
        name: &str,
        command: ThingCommand,
    ) -> Result<CommandExecution, Rejection> {
        match self
            .registry
            .request(name, Request::Command(command))
            .await?
        {
            Response::Decided(Reply::Command(CommandOutcome::Execution(execution))) => {
                Ok(*execution)
            }
            Response::Decided(Reply::Command(CommandOutcome::Refused(rejection))) => Err(rejection),
            other => Err(unexpected(other)),
        }
    }

    /// Queues an execution of a job on the Thing (from the job entity).
    pub async fn queue_job(&self, name: &str, queue: QueueJob) -> Result<JobExecution, Rejection> {
        self.require_registered(name, None)?;
        match self.job_request(name, ThingCommand::QueueJob(queue)).await {
            Ok(Some(execution)) => Ok(execution),
            Ok(None) => Err(Rejection::new(
                RejectionKind::Internal,
                "the queued execution is missing",
            )),
            Err(refusal) => Err(refusal.rejection),
        }
    }

    /// A device's `start-next`: the execution it should work on now, if any.
    pub async fn start_next_job(
        &self,
        name: &str,
        request: StartNext,
    ) -> Result<Option<JobExecution>, JobRefusal> {
        self.require_registered(name, None)?;
        self.job_request(name, ThingCommand::StartNextJob(request))
            .await
    }

    /// A device's update of a job execution.
    pub async fn update_job(
        &self,
        name: &str,
        update: JobUpdate,
    ) -> Result<JobExecution, JobRefusal> {
        self.require_registered(name, None)?;
        validate_job_id(&update.job_id)?;
        let job_id = update.job_id.clone();
        match self
            .job_request(name, ThingCommand::UpdateJob(update))
            .await?
        {
            Some(execution) => Ok(execution),
            None => Err(Rejection::new(
                RejectionKind::ExecutionNotFound,
                format!("no execution of job '{job_id}' on this thing"),
            )
            .into()),
        }
    }

    /// Ends the Thing's execution of a canceled job (one in progress only with `force`).
    pub async fn cancel_job(
        &self,
        name: &str,
        job_id: &str,
        force: bool,
    ) -> Result<Option<JobExecution>, JobRefusal> {
        validate_job_id(job_id)?;
        let command = ThingCommand::CancelJob {
            job_id: job_id.to_owned(),
            force,
        };
        self.job_request(name, command).await
    }

    /// Removes the Thing's execution of a job (one in progress only with `force`).
    pub async fn remove_job(
        &self,
        name: &str,
        job_id: &str,
        force: bool,
    ) -> Result<Option<JobExecution>, JobRefusal> {
        validate_job_id(job_id)?;
        let command = ThingCommand::RemoveJob {
            job_id: job_id.to_owned(),
            force,
        };
        self.job_request(name, command).await
    }

    /// The Thing's job executions (pending, and the recently finished ones).
    pub async fn jobs(&self, name: &str) -> Result<JobExecutions, Rejection> {
        self.require_registered(name, None)?;
        match self.registry.request(name, Request::GetJobs).await? {
            Response::Jobs(jobs) => Ok(*jobs),
            other => Err(unexpected(other)),
        }
    }

    /// A device's job request with its JSON body (AWS IoT Jobs fields), answered with the
    /// `accepted` document (without `timestamp` and `clientToken`, which the transport adds).
    pub async fn device_job_request(
        &self,
        thing: &str,
        request: DeviceJobRequest<'_>,
        body: &Map<String, Value>,
    ) -> Result<Value, JobRefusal> {
        let limits = self.registry.context().limits.jobs;
        let flag = |name: &str, default: bool| match body.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(value)) => Ok(*value),
            Some(_) => Err(Rejection::bad_request(format!(
                "{name} must be true or false"
            ))),
        };
        let number = |name: &str| match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| Rejection::bad_request(format!("{name} must be a whole number"))),
        };
        match request {
            DeviceJobRequest::Get => Ok(self.jobs(thing).await?.pending_json()),
            DeviceJobRequest::StartNext => {
                let request = StartNext {
                    status_details: parse_status_details(body.get("statusDetails"), &limits)?,
                    step_timeout_minutes: parse_step_timeout(body.get("stepTimeoutInMinutes"))?,
                };
                let mut reply = serde_json::json!({});
                if let Some(execution) = self.start_next_job(thing, request).await? {
                    reply["execution"] = execution.execution_json(thing, true);
                }
                Ok(reply)
            }
            DeviceJobRequest::Describe(job_id) => {
                validate_job_id(job_id)?;
                let include_document = flag("includeJobDocument", true)?;
                let wanted = number("executionNumber")?;
                let jobs = self.jobs(thing).await?;
                match jobs.get(job_id) {
                    Some(execution) if wanted.is_none_or(|n| n == execution.execution_number) => {
                        Ok(serde_json::json!({
                            "execution": execution.execution_json(thing, include_document)
                        }))
                    }
                    _ => Err(Rejection::new(
                        RejectionKind::ExecutionNotFound,
                        format!("no execution of job '{job_id}' on this thing"),
                    )
                    .into()),
                }
            }
            DeviceJobRequest::Update(job_id) => {
                let status = match body.get("status") {
                    Some(Value::String(status)) => status.clone(),
                    Some(_) => return Err(Rejection::bad_request("status must be a string").into()),
                    None => {
                        return Err(Rejection::bad_request("Missing required field: status").into())
                    }
                };
                let include_state = flag("includeJobExecutionState", false)?;
                let include_document = flag("includeJobDocument", false)?;
                let update = JobUpdate {
                    job_id: job_id.to_owned(),
                    status,
                    status_details: parse_status_details(body.get("statusDetails"), &limits)?,
                    expected_version: number("expectedVersion")?,
                    execution_number: number("executionNumber")?,
                    step_timeout_minutes: parse_step_timeout(body.get("stepTimeoutInMinutes"))?,
                };
                let execution = self.update_job(thing, update).await?;
                let mut reply = serde_json::json!({});
                if include_state {
                    reply["executionState"] = execution.state_json();
                }
                if include_document {
                    reply["jobDocument"] = Value::Object((*execution.document).clone());
                }
                Ok(reply)
            }
        }
    }

    async fn job_request(
        &self,
        name: &str,
        command: ThingCommand,
    ) -> Result<Option<JobExecution>, JobRefusal> {
        match self
            .registry
            .request(name, Request::Command(command))
            .await?
        {
            Response::Decided(Reply::Job(JobOutcome::Execution(execution))) => {
                Ok(execution.map(|e| *e))
            }
            Response::Decided(Reply::Job(JobOutcome::Refused(refusal))) => Err(*refusal),
            other => Err(unexpected(other).into()),
        }
    }

    /// One execution of a Thing (pending or in the kept history).
    pub async fn get_command(
        &self,
        name: &str,
        execution_id: &str,
    ) -> Result<CommandExecution, Rejection> {
        self.require_registered(name, None)?;
        thing::commands::validate_id("executionId", execution_id)?;
        let request = Request::GetCommand {
            execution_id: execution_id.to_owned(),
        };
        match self.registry.request(name, request).await? {
            Response::Execution(execution) => Ok(*execution),
            other => Err(unexpected(other)),
        }
    }

    /// A page of a Thing's executions, newest first.
    pub async fn list_commands(
        &self,
        name: &str,
        status: Option<CommandStatus>,
        cursor: Option<PageCursor>,
        limit: usize,
    ) -> Result<CommandPage, Rejection> {
        self.require_registered(name, None)?;
        let request = Request::ListCommands {
            status,
            cursor,
            limit,
        };
        match self.registry.request(name, request).await? {
            Response::Executions(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// A Thing's events, newest first, from the log (see [`list_events`]).
    pub fn events(
        &self,
        name: &str,
        query: &EventQuery,
        limit: usize,
    ) -> Result<EventPage, Rejection> {
        self.require_registered(name, None)?;
        list_events(&self.store, name, query, limit).map_err(storage_failure)
    }

    /// Registered Things with names after `after`, in name order.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<ThingSummary>, Rejection> {
        list_things(&self.store, after, limit).map_err(storage_failure)
    }

    /// One Thing's registry summary (`None`: not registered), read without waking its actor.
    pub fn summary(&self, name: &str) -> Result<Option<ThingSummary>, Rejection> {
        let Some(bytes) = self.store.get_thing(name).map_err(storage_failure)? else {
            return Ok(None);
        };
        summary_of(name.to_owned(), &bytes)
            .map(Some)
            .map_err(storage_failure)
    }

    /// A registered Thing's connections, newest first (see [`list_connections`]).
    pub fn connections(
        &self,
        name: &str,
        since_ms: Option<u64>,
        until_ms: Option<u64>,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<ConnectionPage, Rejection> {
        self.require_registered(name, None)?;
        list_connections(&self.store, name, since_ms, until_ms, before_seq, limit)
            .map_err(storage_failure)
    }

    /// A Thing's history newest first, before `before_seq`, only `event_type` when given (see
    /// [`read_history_rev`]).
    pub fn history_rev(
        &self,
        name: &str,
        event_type: Option<&str>,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<HistoryEntry>, Option<u64>), Rejection> {
        thing::validate_thing_name(name)?;
        if let Some(unknown) = event_type.filter(|t| !codec::EVENT_TYPES.contains(t)) {
            return Err(Rejection::new(
                RejectionKind::InvalidRequest,
                format!(
                    "unknown history type '{unknown}' (one of {})",
                    codec::EVENT_TYPES.join(", ")
                ),
            ));
        }
        let page = read_history_rev(&self.store, name, event_type, before_seq, limit)
            .map_err(storage_failure)?;
        if page.0.is_empty()
            && before_seq.is_none()
            && self.store.last_seq(name).map_err(storage_failure)? == 0
        {
            return Err(Rejection::new(
                RejectionKind::ThingNotFound,
                format!("Thing '{name}' has no history"),
            ));
        }
        Ok(page)
    }

    /// A Thing's history from `from_seq` (inclusive), oldest first.
    pub fn history(
        &self,
        name: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, Rejection> {
        thing::validate_thing_name(name)?;
        let entries = read_history(&self.store, name, from_seq, limit).map_err(storage_failure)?;
        if entries.is_empty() && from_seq <= 1 {
            return Err(Rejection::new(
                RejectionKind::ThingNotFound,
                format!("Thing '{name}' has no history"),
            ));
        }
        Ok(entries)
    }
}

fn new_uuid() -> String {
    use rand::Rng;
    let mut bytes: [u8; 16] = rand::thread_rng().gen();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Most log records one events page may scan (a bound on the cost of sparse filters).
pub const EVENTS_SCAN_RECORDS_MAX: usize = 100_000;
/// Records read from the log per step of an events scan.
const EVENTS_SCAN_STEP: usize = 1024;

/// Filters of an events listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only events with timestamp ≥ this (Unix ms).
    pub since_ms: Option<u64>,
    /// Only events with timestamp ≤ this (Unix ms).
    pub until_ms: Option<u64>,
    /// Continue below this log sequence number (the previous page's cursor).
    pub before_seq: Option<u64>,
}

/// Which measurements a listing keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeasurementQuery {
    /// Only values of this fragment.
    pub fragment: Option<String>,
    /// Only values of this series.
    pub series: Option<String>,
    /// Only measurements with time ≥ this (Unix ms).
    pub since_ms: Option<u64>,
    /// Only measurements with time ≤ this (Unix ms).
    pub until_ms: Option<u64>,
    /// Continue below this log sequence number (the previous page's cursor).
    pub before_seq: Option<u64>,
}

/// A page of measurements, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasurementPage {
    /// `(seq, measurement)` pairs, each holding only the values the query keeps.
    pub items: Vec<(u64, crate::thing::measurements::MeasurementsRecorded)>,
    /// Where the next page starts (pass as `before_seq`); `None` at the beginning of the log.
    pub next_before_seq: Option<u64>,
}

/// Reads a Thing's measurements newest first, applying the filters, scanning at most
/// [`EVENTS_SCAN_RECORDS_MAX`] log records per page (a cursor continues a longer scan).
pub fn list_measurements(
    store: &Store,
    name: &str,
    query: &MeasurementQuery,
    limit: usize,
) -> Result<MeasurementPage, StorageError> {
    let (items, next_before_seq) = scan_log_rev(
        store,
        name,
        Some(codec::MEASUREMENTS_RECORDED),
        query.before_seq,
        limit,
        |_, event| {
            let ThingEvent::MeasurementsRecorded(mut measurement) = event else {
                return None;
            };
            measurement.values.retain(|v| {
                query.fragment.as_ref().is_none_or(|f| *f == v.fragment)
                    && query.series.as_ref().is_none_or(|s| *s == v.series)
            });
            let wanted = !measurement.values.is_empty()
                && query.since_ms.is_none_or(|s| measurement.time_ms >= s)
                && query.until_ms.is_none_or(|u| measurement.time_ms <= u);
            wanted.then_some(measurement)
        },
    )?;
    Ok(MeasurementPage {
        items,
        next_before_seq,
    })
}

/// Reads `name`'s log newest first below `before_seq`, decoding the records of `event_type`
/// and keeping what `keep` returns, up to `limit`, scanning at most
/// [`EVENTS_SCAN_RECORDS_MAX`] records; returns the items and where a next page starts.
#[allow(clippy::type_complexity)]
fn scan_log_rev<T>(
    store: &Store,
    name: &str,
    event_type: Option<&str>,
    before_seq: Option<u64>,
    limit: usize,
    mut keep: impl FnMut(&RecordedEvent, ThingEvent) -> Option<T>,
) -> Result<(Vec<(u64, T)>, Option<u64>), StorageError> {
    let mut items = Vec::new();
    let mut below = before_seq.unwrap_or(u64::MAX);
    let mut scanned = 0usize;
    loop {
        if below == 0 {
            return Ok((items, None));
        }
        let batch = store.read_events_rev(name, below - 1, EVENTS_SCAN_STEP)?;
        let Some(last) = batch.last() else {
            return Ok((items, None));
        };
        let batch_end = last.seq;
        for recorded in &batch {
            scanned += 1;
            below = recorded.seq;
            if event_type.is_none_or(|t| recorded.envelope.event_type == t) {
                if let Some(item) = keep(recorded, codec::decode_event(name, recorded)?) {
                    items.push((recorded.seq, item));
                    if items.len() >= limit {
                        // Nothing is below the log's first record.
                        return Ok((items, (recorded.seq > 1).then_some(recorded.seq)));
                    }
                }
            }
            if scanned >= EVENTS_SCAN_RECORDS_MAX {
                return Ok((items, (recorded.seq > 1).then_some(recorded.seq)));
            }
        }
        if batch.len() < EVENTS_SCAN_STEP || batch_end <= 1 {
            return Ok((items, None));
        }
    }
}

/// Reads a Thing's history newest first from before `before_seq`, only entries of
/// `event_type` when given, scanning at most [`EVENTS_SCAN_RECORDS_MAX`] records per page.
/// Returns the entries and where the next page starts (`None` at the beginning of the log).
pub fn read_history_rev(
    store: &Store,
    name: &str,
    event_type: Option<&str>,
    before_seq: Option<u64>,
    limit: usize,
) -> Result<(Vec<HistoryEntry>, Option<u64>), StorageError> {
    let (items, next) = scan_log_rev(
        store,
        name,
        event_type,
        before_seq,
        limit,
        |recorded, event| Some(history_entry(recorded, &event)),
    )?;
    Ok((items.into_iter().map(|(_, entry)| entry).collect(), next))
}

/// A page of events, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPage {
    /// `(seq, event)` pairs.
    pub items: Vec<(u64, EventIngested)>,
    /// Where the next page starts (pass as `before_seq`); `None` at the beginning of the log.
    pub next_before_seq: Option<u64>,
}

/// Reads a Thing's events newest first, applying the filters, scanning at most
/// [`EVENTS_SCAN_RECORDS_MAX`] log records per page (a cursor continues a longer scan).
pub fn list_events(
    store: &Store,
    name: &str,
    query: &EventQuery,
    limit: usize,
) -> Result<EventPage, StorageError> {
    let (items, next_before_seq) = scan_log_rev(
        store,
        name,
        Some(codec::EVENT_INGESTED),
        query.before_seq,
        limit,
        |_, event| {
            let ThingEvent::EventIngested(event) = event else {
                return None;
            };
            let wanted = query
                .event_type
                .as_ref()
                .is_none_or(|t| *t == event.event_type)
                && query.since_ms.is_none_or(|s| event.timestamp_ms >= s)
                && query.until_ms.is_none_or(|u| event.timestamp_ms <= u);
            wanted.then_some(event)
        },
    )?;
    Ok(EventPage {
        items,
        next_before_seq,
    })
}

/// The registered Thing whose MQTT client id is `client_id`, checked against its registry
/// record (the `client_ids` index may lag the log after a crash).
pub fn client_id_owner(store: &Store, client_id: &str) -> Result<Option<String>, StorageError> {
    let Some(owner) = store.client_id_owner(client_id)? else {
        return Ok(None);
    };
    let Some(bytes) = store.get_thing(&owner)? else {
        return Ok(None);
    };
    let record = codec::decode_index_record(&owner, &bytes)?;
    Ok((record.mqtt_client_id == client_id).then_some(owner))
}

/// Whether `owner`'s registry record names `client_id` (so its `client_ids` entry is live).
fn holds_client_id(store: &Store, owner: &str, client_id: &str) -> Result<bool, StorageError> {
    let Some(bytes) = store.get_thing(owner)? else {
        return Ok(false);
    };
    Ok(codec::decode_index_record(owner, &bytes)?.mqtt_client_id == client_id)
}

/// Claims `client_id` for `thing`: `Ok(true)` when this call took it, `Ok(false)` when the
/// Thing held it already, `Err(owner)` when another registered Thing holds it. An entry left
/// by a Thing that no longer holds the id (deleted, re-registered with another id, or a claim
/// whose registration never landed) is taken over: callers make sure no registration of
/// `client_id` is in flight (the registration path holds it in `claims_in_flight`; start-up
/// and activation repairs concern registered Things).
pub fn claim_client_id(
    store: &Store,
    client_id: &str,
    thing: &str,
) -> Result<Result<bool, String>, StorageError> {
    // Bounded: each round either claims, finds a live owner, or loses a race to another claim.
    for _ in 0..CLAIM_ROUNDS_MAX {
        let owner = match store.claim_client_id(client_id, thing)? {
            Claim::Claimed => return Ok(Ok(true)),
            Claim::Held => return Ok(Ok(false)),
            Claim::HeldBy(owner) => owner,
        };
        if holds_client_id(store, &owner, client_id)? {
            return Ok(Err(owner));
        }
        if store.take_over_client_id(client_id, &owner, thing)? {
            return Ok(Ok(true));
        }
    }
    Err(StorageError::Db(format!(
        "client id '{client_id}' kept changing hands while being claimed"
    )))
}

/// Attempts at claiming a client id before giving up (each lost one means another claim won).
const CLAIM_ROUNDS_MAX: usize = 16;

/// The `kv` key that says the `client_ids` index was filled from the registry index.
const CLIENT_IDS_BACKFILLED: &str = "meta/client_ids_backfilled";

/// Registry index records read per step of [`backfill_client_ids`].
const BACKFILL_PAGE_RECORDS: usize = 1000;

/// Fills the `client_ids` index from the registry index, once (a database written before the
/// index existed): a flag in `kv` records that it finished, so an interrupted fill is redone.
/// Two Things registered with one id before uniqueness was enforced: the first in name order
/// keeps it, and the conflict is logged. Returns the entries written.
pub async fn backfill_client_ids(store: &Store) -> Result<usize, StorageError> {
    if store.kv_get(CLIENT_IDS_BACKFILLED)?.is_some() {
        return Ok(0);
    }
    let mut written = 0;
    let mut after: Option<String> = None;
    loop {
        let page = store.list_things(after.as_deref(), BACKFILL_PAGE_RECORDS)?;
        for (name, bytes) in &page {
            let record = codec::decode_index_record(name, bytes)?;
            match claim_client_id(store, &record.mqtt_client_id, name)? {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(owner) => tracing::error!(
                    thing = %name,
                    client_id = %record.mqtt_client_id,
                    %owner,
                    "two Things are registered with one MQTT client id; it stays reserved for the first"
                ),
            }
        }
        match page.last() {
            Some((last, _)) if page.len() == BACKFILL_PAGE_RECORDS => after = Some(last.clone()),
            _ => break,
        }
    }
    store.kv_put(CLIENT_IDS_BACKFILLED, b"1".to_vec()).await?;
    Ok(written)
}

/// Lists registry records straight from the index.
pub fn list_things(
    store: &Store,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<ThingSummary>, StorageError> {
    store
        .list_things(after, limit)?
        .into_iter()
        .map(|(name, bytes)| summary_of(name, &bytes))
        .collect()
}

fn summary_of(name: String, bytes: &[u8]) -> Result<ThingSummary, StorageError> {
    let record = codec::decode_index_record(&name, bytes)?;
    Ok(ThingSummary {
        name,
        mqtt_client_id: record.mqtt_client_id,
        thing_type: record.thing_type,
        created_at_ms: record.created_at_ms,
    })
}

fn history_entry(recorded: &RecordedEvent, event: &ThingEvent) -> HistoryEntry {
    HistoryEntry {
        seq: recorded.seq,
        recorded_at_ms: recorded.envelope.recorded_at_ms,
        event_type: recorded.envelope.event_type.clone(),
        event_version: recorded.envelope.event_version,
        summary: codec::summarize(event),
        event: serde_json::to_value(event).unwrap_or(Value::Null),
    }
}

/// Reads and decodes a Thing's log for people and auditors (`thinghub audit`, the history API).
pub fn read_history(
    store: &Store,
    name: &str,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<HistoryEntry>, StorageError> {
    store
        .read_events(name, from_seq.max(1), limit)?
        .iter()
        .map(|recorded| {
            let event = codec::decode_event(name, recorded)?;
            Ok(history_entry(recorded, &event))
        })
        .collect()
}

/// One connection of a Thing's device, from its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// The log sequence number of the connect.
    pub seq: u64,
    /// The MQTT client id.
    pub client_id: String,
    /// The server's id of the connection.
    pub connection_id: u64,
    /// Unix ms of the connect.
    pub connected_at: u64,
    /// Unix ms of the disconnect (absent while connected, or when the log holds none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<u64>,
    /// Why it ended (`client_disconnect`, `keep_alive_timeout`, `taken_over`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it lasted, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// A page of connections, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionPage {
    /// Connections.
    pub items: Vec<Connection>,
    /// Continue below this sequence number; `None` at the beginning of the log or the window.
    pub next_before_seq: Option<u64>,
}

/// Reads a Thing's connections newest first: those overlapping `[since_ms, until_ms]`, below
/// `before_seq`, scanning at most [`EVENTS_SCAN_RECORDS_MAX`] records per page. A disconnect
/// recorded after the next connect (a takeover) is paired only when both are on one page.
pub fn list_connections(
    store: &Store,
    name: &str,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    before_seq: Option<u64>,
    limit: usize,
) -> Result<ConnectionPage, StorageError> {
    let mut items = Vec::new();
    let mut ended: HashMap<u64, (u64, String)> = HashMap::new();
    let mut below = before_seq.unwrap_or(u64::MAX);
    let mut scanned = 0usize;
    let done = |items, next| {
        Ok(ConnectionPage {
            items,
            next_before_seq: next,
        })
    };
    loop {
        if below <= 1 {
            return done(items, None);
        }
        let batch = store.read_events_rev(name, below - 1, EVENTS_SCAN_STEP)?;
        if batch.is_empty() {
            return done(items, None);
        }
        for recorded in &batch {
            scanned += 1;
            below = recorded.seq;
            let kind = recorded.envelope.event_type.as_str();
            if kind != codec::THING_CONNECTED && kind != codec::THING_DISCONNECTED {
                if scanned >= EVENTS_SCAN_RECORDS_MAX {
                    return done(items, Some(recorded.seq));
                }
                continue;
            }
            match codec::decode_event(name, recorded)? {
                ThingEvent::Disconnected(d) => {
                    ended.insert(d.connection_id, (d.at_ms, d.reason));
                }
                ThingEvent::Connected(c) => {
                    let end = ended.remove(&c.connection_id);
                    let end_ms = end.as_ref().map(|(at, _)| *at);
                    if since_ms.is_some_and(|s| end_ms.unwrap_or(u64::MAX) < s) {
                        // Older connections ended earlier still: the window is done.
                        return done(items, None);
                    }
                    if until_ms.is_none_or(|u| c.at_ms <= u) {
                        items.push(Connection {
                            seq: recorded.seq,
                            client_id: c.client_id,
                            connection_id: c.connection_id,
                            connected_at: c.at_ms,
                            disconnected_at: end_ms,
                            duration_ms: end_ms.map(|e| e.saturating_sub(c.at_ms)),
                            reason: end.map(|(_, reason)| reason),
                        });
                        if items.len() >= limit {
                            return done(items, Some(recorded.seq));
                        }
                    }
                }
                _ => {}
            }
            if scanned >= EVENTS_SCAN_RECORDS_MAX {
                return done(items, Some(recorded.seq));
            }
        }
        if batch.len() < EVENTS_SCAN_STEP {
            return done(items, None);
        }
    }
}
