//! Management API: fleet jobs (create, inspect, list, cancel) and a Thing's job executions.
//!
//! A job is durable (its record and targets) before the 201; its executions are queued on the
//! targets in the background (the rollout, resumed after a restart), and each Thing announces
//! them to its device (`jobs/notify`, `jobs/notify-next`) as effects.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use thinghub_actors::job_manager::{
    AbortCriterion, CreateJob, ExponentialRate, FailureType, JobStatus, RateIncreaseCriteria,
};
use thinghub_actors::thing::jobs::{JobExecutionStatus, JobRefusal, STEP_TIMEOUT_MINUTES};
use thinghub_actors::thing::{Rejection, RejectionKind};
use thinghub_actors::Things;

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::things::page_limit;
use super::AppState;

/// Longest job description, bytes (AWS IoT's limit).
const JOB_DESCRIPTION_BYTES_MAX: usize = 2028;
/// Longest cancellation reason code, bytes (AWS IoT's limit).
const REASON_CODE_BYTES_MAX: usize = 128;

fn refusal(refusal: JobRefusal) -> ApiError {
    refusal.rejection.into()
}

/// Reads `POST /api/v1/jobs`'s body. What is not built yet (thing groups, continuous
/// targeting, rollout rates, abort criteria) is refused by name rather than ignored.
fn create_job(body: &Value, document_bytes_max: usize) -> Result<CreateJob, Rejection> {
    let Some(body) = body.as_object() else {
        return Err(Rejection::bad_request("Payload must be a JSON object"));
    };
    for key in body.keys() {
        if !matches!(
            key.as_str(),
            "jobId"
                | "description"
                | "document"
                | "targets"
                | "targetSelection"
                | "timeoutConfig"
                | "rollout"
                | "abortConfig"
        ) {
            return Err(Rejection::bad_request(format!(
                "'{key}' is not a field of a job"
            )));
        }
    }
    let job_id = match body.get("jobId") {
        None | Some(Value::Null) => Things::new_execution_id(),
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err(Rejection::bad_request("jobId must be a string")),
    };
    let description = match body.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if text.len() <= JOB_DESCRIPTION_BYTES_MAX => Some(text.clone()),
        Some(_) => {
            return Err(Rejection::bad_request(format!(
                "description must be a string of at most {JOB_DESCRIPTION_BYTES_MAX} bytes"
            )))
        }
    };
    let document: Map<String, Value> = match body.get("document") {
        Some(Value::Object(document)) => document.clone(),
        Some(_) => return Err(Rejection::bad_request("document must be a JSON object")),
        None => return Err(Rejection::bad_request("Missing required field: document")),
    };
    let bytes = serde_json::to_vec(&document)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if bytes > document_bytes_max {
        return Err(Rejection::new(
            RejectionKind::PayloadTooLarge,
            format!("the job document is {bytes} bytes; the maximum is {document_bytes_max}"),
        ));
    }
    let continuous = match body.get("targetSelection") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "SNAPSHOT" => false,
        Some(Value::String(s)) if s == "CONTINUOUS" => true,
        Some(_) => {
            return Err(Rejection::bad_request(
                "targetSelection must be SNAPSHOT or CONTINUOUS",
            ))
        }
    };
    let Some(targets) = body.get("targets").and_then(Value::as_object) else {
        return Err(Rejection::bad_request(
            "Missing required field: targets {\"thingNames\": [...]}",
        ));
    };
    let mut groups: Vec<String> = Vec::new();
    match targets.get("thingGroupNames") {
        None | Some(Value::Null) => {}
        Some(Value::Array(names)) => {
            for name in names {
                let Some(name) = name.as_str() else {
                    return Err(Rejection::bad_request(
                        "targets.thingGroupNames must be strings",
                    ));
                };
                thinghub_actors::groups::validate_group_name(name)?;
                if !groups.iter().any(|g| g == name) {
                    groups.push(name.to_owned());
                }
            }
        }
        Some(_) => {
            return Err(Rejection::bad_request(
                "targets.thingGroupNames must be an array of group names",
            ))
        }
    }
    let mut things: Vec<String> = Vec::new();
    match targets.get("thingNames") {
        None | Some(Value::Null) if !groups.is_empty() => {}
        Some(Value::Array(names)) => {
            for name in names {
                let Some(name) = name.as_str() else {
                    return Err(Rejection::bad_request("targets.thingNames must be strings"));
                };
                thinghub_actors::thing::validate_thing_name(name)?;
                if !things.iter().any(|t| t == name) {
                    things.push(name.to_owned());
                }
            }
        }
        _ => {
            return Err(Rejection::bad_request(
                "targets needs thingNames (an array of Thing names) or thingGroupNames",
            ))
        }
    }
    if continuous && groups.is_empty() {
        return Err(Rejection::bad_request(
            "a CONTINUOUS job needs targets.thingGroupNames",
        ));
    }
    if things.is_empty() && groups.is_empty() {
        return Err(Rejection::bad_request(
            "targets must name at least one Thing or group",
        ));
    }
    let in_progress_timeout_minutes = match body.get("timeoutConfig") {
        None | Some(Value::Null) => None,
        Some(Value::Object(config)) => match config.get("inProgressTimeoutInMinutes") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64() {
                Some(m) if STEP_TIMEOUT_MINUTES.contains(&m) => Some(m),
                _ => {
                    return Err(Rejection::bad_request(format!(
                    "timeoutConfig.inProgressTimeoutInMinutes must be a whole number in {}..={}",
                    STEP_TIMEOUT_MINUTES.start(),
                    STEP_TIMEOUT_MINUTES.end()
                )))
                }
            },
        },
        Some(_) => {
            return Err(Rejection::bad_request(
                "timeoutConfig must be a JSON object",
            ))
        }
    };
    let (maximum_per_minute, exponential_rate) = rollout(body.get("rollout"))?;
    Ok(CreateJob {
        job_id,
        description,
        document,
        things,
        in_progress_timeout_minutes,
        maximum_per_minute,
        exponential_rate,
        abort_criteria: abort_criteria(body.get("abortConfig"))?,
        groups,
        continuous,
    })
}

/// `rollout: {maximumPerMinute? (1..=1000), exponentialRate?: {baseRatePerMinute (1..=1000),
/// incrementFactor (1.1..=5.0, one decimal), rateIncreaseCriteria: {numberOfNotifiedThings |
/// numberOfSucceededThings (1..=1000000)}}}` (as AWS IoT). With an exponential rate,
/// `maximumPerMinute` is its ceiling (1000 without it) and may not be below the base rate.
fn rollout(value: Option<&Value>) -> Result<(Option<u32>, Option<ExponentialRate>), Rejection> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok((None, None));
    };
    let Some(rollout) = value.as_object() else {
        return Err(Rejection::bad_request("rollout must be a JSON object"));
    };
    if let Some(unknown) = rollout
        .keys()
        .find(|k| !["maximumPerMinute", "exponentialRate"].contains(&k.as_str()))
    {
        return Err(Rejection::bad_request(format!(
            "rollout.{unknown} is not a rollout setting (maximumPerMinute, exponentialRate)"
        )));
    }
    let rate = |value: Option<&Value>, name: &str| match value.and_then(Value::as_u64) {
        Some(rate @ 1..=1000) => Ok(rate as u32),
        _ => Err(Rejection::bad_request(format!(
            "{name} must be a whole number in 1..=1000"
        ))),
    };
    let maximum = match rollout.get("maximumPerMinute") {
        None => None,
        value => Some(rate(value, "rollout.maximumPerMinute")?),
    };
    let Some(exponential) = rollout.get("exponentialRate") else {
        if maximum.is_none() {
            return Err(Rejection::bad_request(
                "rollout needs maximumPerMinute or exponentialRate",
            ));
        }
        return Ok((maximum, None));
    };
    let Some(exponential) = exponential.as_object() else {
        return Err(Rejection::bad_request(
            "rollout.exponentialRate must be a JSON object",
        ));
    };
    let base = rate(
        exponential.get("baseRatePerMinute"),
        "rollout.exponentialRate.baseRatePerMinute",
    )?;
    if maximum.is_some_and(|maximum| maximum < base) {
        return Err(Rejection::bad_request(
            "rollout.maximumPerMinute may not be below rollout.exponentialRate.baseRatePerMinute",
        ));
    }
    // One decimal at most: 1.1 ..= 5.0 in tenths.
    let tenths = exponential
        .get("incrementFactor")
        .and_then(Value::as_f64)
        .map(|factor| factor * 10.0)
        .filter(|tenths| (tenths - tenths.round()).abs() < 1e-9 && (11.0..=50.0).contains(tenths))
        .ok_or_else(|| {
            Rejection::bad_request(
                "rollout.exponentialRate.incrementFactor must be a number in 1.1..=5.0 with one decimal at most",
            )
        })?
        .round() as u32;
    let criteria = exponential
        .get("rateIncreaseCriteria")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Rejection::bad_request(
                "rollout.exponentialRate.rateIncreaseCriteria must be a JSON object",
            )
        })?;
    let count = |name: &str| -> Result<Option<u32>, Rejection> {
        match criteria.get(name) {
            None => Ok(None),
            Some(value) => match value.as_u64() {
                Some(n @ 1..=1_000_000) => Ok(Some(n as u32)),
                _ => Err(Rejection::bad_request(format!(
                    "rollout.exponentialRate.rateIncreaseCriteria.{name} must be a whole number in 1..=1000000"
                ))),
            },
        }
    };
    let criteria = match (
        count("numberOfNotifiedThings")?,
        count("numberOfSucceededThings")?,
    ) {
        (Some(n), None) => RateIncreaseCriteria::NotifiedThings(n),
        (None, Some(n)) => RateIncreaseCriteria::SucceededThings(n),
        _ => {
            return Err(Rejection::bad_request(
                "rollout.exponentialRate.rateIncreaseCriteria needs exactly one of numberOfNotifiedThings and numberOfSucceededThings",
            ))
        }
    };
    Ok((
        maximum,
        Some(ExponentialRate {
            base_rate_per_minute: base,
            increment_factor_tenths: tenths,
            criteria,
        }),
    ))
}

/// `abortConfig: {criteriaList: [{failureType, action: CANCEL, thresholdPercentage,
/// minNumberOfExecutedThings}]}` (as AWS IoT; at most 4 criteria).
fn abort_criteria(value: Option<&Value>) -> Result<Vec<AbortCriterion>, Rejection> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = value
        .get("criteriaList")
        .and_then(Value::as_array)
        .filter(|list| (1..=4).contains(&list.len()))
        .ok_or_else(|| {
            Rejection::bad_request("abortConfig.criteriaList must be an array of 1..=4 criteria")
        })?;
    let mut criteria = Vec::with_capacity(list.len());
    for criterion in list {
        let field = |name: &str| criterion.get(name);
        let failure_type = field("failureType")
            .and_then(Value::as_str)
            .and_then(FailureType::parse)
            .ok_or_else(|| {
                Rejection::bad_request(
                    "abortConfig failureType must be FAILED, REJECTED, TIMED_OUT or ALL",
                )
            })?;
        if field("action").and_then(Value::as_str) != Some("CANCEL") {
            return Err(Rejection::bad_request("abortConfig action must be CANCEL"));
        }
        let threshold_percentage = field("thresholdPercentage")
            .and_then(Value::as_f64)
            .filter(|p| *p > 0.0 && *p <= 100.0)
            .ok_or_else(|| {
                Rejection::bad_request("abortConfig thresholdPercentage must be in (0, 100]")
            })?;
        let min_executed = field("minNumberOfExecutedThings")
            .and_then(Value::as_u64)
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                Rejection::bad_request(
                    "abortConfig minNumberOfExecutedThings must be a whole number of at least 1",
                )
            })?;
        criteria.push(AbortCriterion {
            failure_type,
            threshold_percentage,
            min_executed,
        });
    }
    Ok(criteria)
}

/// `POST /api/v1/jobs` -> 201 with the job.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    summary = "Create a job",
    request_body = s::CreateJobRequest,
    responses(
        (status = 201, description = "Created", body = s::Job, headers(("location" = String, description = "The new resource"))),
        (status = 404, description = "A target Thing or group does not exist.", body = ErrorBody),
        (status = 409, description = "The job exists already.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let job = create_job(&body, state.limits.jobs.document_bytes_max)?;
    let record = state.jobs.create(job).await?;
    let location = format!("/api/v1/jobs/{}", record.job_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(record.to_json()),
    )
        .into_response())
}

/// `GET /api/v1/jobs/{jobId}`.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}",
    tag = "jobs",
    summary = "Get a job",
    params(("job_id" = String, Path, description = "Job id: 1..=64 of [A-Za-z0-9_-]", example = "job-1")),
    responses(
        (status = 200, description = "The job", body = s::Job),
        (status = 404, description = "No such job.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.jobs.get(&job_id)?.to_json()))
}

/// Listing parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/v1/jobs?status&limit&cursor`: in id order; `nextCursor` is the last id.
#[utoipa::path(
    get,
    path = "/jobs",
    tag = "jobs",
    summary = "List jobs",
    params(ListParams),
    responses(
        (status = 200, description = "A page of jobs", body = s::JobPage),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            JobStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown status '{s}': one of IN_PROGRESS, COMPLETED, CANCELED"
                ))
            })
        })
        .transpose()?;
    let jobs = state.jobs.list(status, params.cursor.as_deref(), limit)?;
    let next = (jobs.len() == limit).then(|| jobs.last().map(|j| j.job_id.clone()));
    let items: Vec<Value> = jobs.iter().map(|j| j.to_json()).collect();
    Ok(Json(json!({"items": items, "nextCursor": next.flatten()})))
}

/// `GET /api/v1/jobs/{jobId}/executions?status&limit&cursor`: targets in Thing order.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/executions",
    tag = "jobs",
    summary = "List a job's targets and their status",
    params(("job_id" = String, Path, description = "Job id: 1..=64 of [A-Za-z0-9_-]", example = "job-1"), ListParams),
    responses(
        (status = 200, description = "A page of targets", body = s::JobTargetPage),
        (status = 404, description = "No such job.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn executions(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            JobExecutionStatus::parse(s)
                .ok_or_else(|| ApiError::bad_request(format!("unknown execution status '{s}'")))
        })
        .transpose()?;
    let targets = state
        .jobs
        .targets(&job_id, status, params.cursor.as_deref(), limit)?;
    let next = (targets.len() == limit).then(|| targets.last().map(|t| t.thing.clone()));
    let items: Vec<Value> = targets
        .iter()
        .map(|t| {
            json!({
                "thingName": t.thing,
                "status": t.status.map_or("NOT_QUEUED", JobExecutionStatus::as_str),
            })
        })
        .collect();
    Ok(Json(json!({"items": items, "nextCursor": next.flatten()})))
}

/// `POST /api/v1/jobs/{jobId}/cancel` `{"force"?, "reasonCode"?}`.
#[utoipa::path(
    post,
    path = "/jobs/{job_id}/cancel",
    tag = "jobs",
    summary = "Cancel a job",
    params(("job_id" = String, Path, description = "Job id: 1..=64 of [A-Za-z0-9_-]", example = "job-1")),
    request_body = s::CancelJobRequest,
    responses(
        (status = 200, description = "Canceled", body = s::Job),
        (status = 404, description = "No such job.", body = ErrorBody),
        (status = 409, description = "The job is already completed or canceled.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("Invalid JSON: {e}")))?
    };
    let Some(body) = body.as_object() else {
        return Err(ApiError::bad_request("Payload must be a JSON object"));
    };
    let force = match body.get("force") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(force)) => *force,
        Some(_) => return Err(ApiError::bad_request("force must be true or false")),
    };
    let reason_code = match body.get("reasonCode") {
        None | Some(Value::Null) => None,
        Some(Value::String(code)) if code.len() <= REASON_CODE_BYTES_MAX => Some(code.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "reasonCode must be a string of at most {REASON_CODE_BYTES_MAX} bytes"
            )))
        }
    };
    let record = state.jobs.cancel(&job_id, force, reason_code).await?;
    Ok(Json(record.to_json()))
}

/// `GET /api/v1/things/{name}/jobs`: the Thing's executions, pending first.
#[utoipa::path(
    get,
    path = "/things/{name}/jobs",
    tag = "jobs",
    summary = "List a Thing's job executions",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    responses(
        (status = 200, description = "Executions", body = s::JobExecutionList),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn of_thing(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = state.things.jobs(&name).await?;
    let view = jobs.pending_view();
    let mut items: Vec<Value> = view
        .in_progress
        .iter()
        .chain(view.queued.iter())
        .filter_map(|id| jobs.pending.get(id))
        .map(|e| e.execution_json(&name, false))
        .collect();
    items.extend(
        jobs.finished
            .iter()
            .rev()
            .map(|e| e.execution_json(&name, false)),
    );
    Ok(Json(json!({"items": items})))
}

/// Removal parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    force: Option<bool>,
}

/// `DELETE /api/v1/things/{name}/jobs/{jobId}?force=true` -> 204 (REMOVED; an execution in
/// progress only with `force`).
#[utoipa::path(
    delete,
    path = "/things/{name}/jobs/{job_id}",
    tag = "jobs",
    summary = "Remove a job's execution from a Thing",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), ("job_id" = String, Path, description = "Job id: 1..=64 of [A-Za-z0-9_-]", example = "job-1"), RemoveParams),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such Thing or execution.", body = ErrorBody),
        (status = 409, description = "In progress: only a forced removal ends it.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    Path((name, job_id)): Path<(String, String)>,
    QueryParams(params): QueryParams<RemoveParams>,
) -> Result<StatusCode, ApiError> {
    state.things.ensure_registered(&name)?;
    state
        .things
        .remove_job(&name, &job_id, params.force.unwrap_or(false))
        .await
        .map_err(refusal)?;
    Ok(StatusCode::NO_CONTENT)
}
