//! Device ThingDatas API (`/api/v1/thing-datas/...`): what a device without MQTT uses.
//! Same semantics and error codes as the MQTT topics.

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use thinghub_actors::thing::jobs::DeviceJobRequest;
use thinghub_actors::thing::shadow::client_token_of;
use thinghub_actors::thing::{IngestEvent, Origin, ShadowUpdate};

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;
use crate::auth::Principal;

/// 403 unless the request's key may act for `thing` (a device key names its Things).
fn act_for(principal: &Principal, thing: &str) -> Result<(), ApiError> {
    if principal.may_act_for(thing) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this device key may act only for its own Things; '{thing}' is not one of them"
            ),
        ))
    }
}

/// `GET /api/v1/thing-datas/{name}/shadow`: the device reads the same document as the operator.
#[utoipa::path(
    get,
    path = "/thing-datas/{name}/shadow",
    tag = "device",
    summary = "Get the shadow (device)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    responses(
        (status = 200, description = "The shadow document", body = s::ShadowDocument),
        (status = 404, description = "No such Thing, or it has no shadow.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn shadow(
    state: State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    act_for(&principal, &name)?;
    super::things::get_shadow(state, Path(name)).await
}

/// `POST /api/v1/thing-datas/shadow/reported` `{thingName, state:{reported}, clientToken?, version?}`.
#[utoipa::path(
    post,
    path = "/thing-datas/shadow/reported",
    tag = "device",
    summary = "Report state (device)",
    request_body = s::ReportRequest,
    responses(
        (status = 200, description = "Accepted", body = s::ShadowDocument),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 409, description = "Version conflict.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn report(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::bad_request("Payload must be a JSON object"));
    };
    let token = client_token_of(object, &state.limits.shadow)?;
    let with_token = |e: ApiError| ApiError {
        client_token: token.clone(),
        ..e
    };
    let name = match object.get("thingName") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => {
            return Err(with_token(ApiError::bad_request(
                "thingName must be a string",
            )))
        }
        None => {
            return Err(with_token(ApiError::bad_request(
                "Missing required field: thingName",
            )))
        }
    };
    act_for(&principal, &name).map_err(with_token)?;
    if object
        .get("state")
        .and_then(Value::as_object)
        .is_some_and(|state| state.contains_key("desired"))
    {
        return Err(with_token(ApiError::bad_request(
            "this endpoint accepts only state.reported",
        )));
    }
    let update = ShadowUpdate::from_json(&body, &state.limits.shadow)?;
    let result = state
        .things
        .update_shadow(&name, update, Origin::Device)
        .await?;
    Ok(super::json_text(&result.accepted))
}

/// `POST /api/v1/thing-datas/events` `{thingName, eventType, severity, data?, timestamp?}`: 201
/// with the stored event; 400 for an invalid one (never stored).
#[utoipa::path(
    post,
    path = "/thing-datas/events",
    tag = "device",
    summary = "Send an event (device)",
    request_body = s::IngestEventRequest,
    responses(
        (status = 201, description = "Ingested (durable)", body = s::Event),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn event(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<Value>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let name = match body.get("thingName") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(ApiError::bad_request("thingName must be a string")),
        None => return Err(ApiError::bad_request("Missing required field: thingName")),
    };
    act_for(&principal, &name)?;
    let event = IngestEvent::from_json(&body, None, &state.limits.events)?;
    let stored = state.things.ingest_event(&name, event).await?;
    Ok((axum::http::StatusCode::CREATED, Json(stored.to_json(None))))
}

/// A device's job request over HTTPS: the AWS IoT Jobs fields of the MQTT topics, answered
/// with the same documents; a refusal is the HTTP status of its kind with
/// `{code, message, errorCode (AWS), executionState?, clientToken?}`.
async fn job_request(
    state: &AppState,
    principal: &Principal,
    thing: &str,
    request: DeviceJobRequest<'_>,
    body: Map<String, Value>,
) -> Response {
    if let Err(refused) = act_for(principal, thing) {
        return refused.into_response();
    }
    let token = match client_token_of(&body, &state.limits.shadow) {
        Ok(token) => token,
        Err(rejection) => return ApiError::from(rejection).into_response(),
    };
    let outcome = async {
        state.things.ensure_registered(thing)?;
        state.things.device_job_request(thing, request, &body).await
    }
    .await;
    let (status, mut reply) = match outcome {
        Ok(mut accepted) => {
            accepted["timestamp"] = (state.things.now_ms() / 1000).into();
            (StatusCode::OK, accepted)
        }
        Err(refusal) => {
            let error = ApiError::from(refusal.rejection.clone());
            let mut body = json!({
                "code": error.status.as_u16(),
                "message": refusal.rejection.message,
                "errorCode": refusal.rejection.kind.aws_jobs_error_code(),
            });
            if let Some(state) = refusal.execution_state {
                body["executionState"] = state;
            }
            (error.status, body)
        }
    };
    if let Some(token) = token {
        reply["clientToken"] = token.into();
    }
    (status, Json(reply)).into_response()
}

fn object(body: Value) -> Result<Map<String, Value>, ApiError> {
    match body {
        Value::Object(body) => Ok(body),
        _ => Err(ApiError::bad_request("Payload must be a JSON object")),
    }
}

/// `GET /api/v1/thing-datas/{name}/jobs`: `{inProgressJobs, queuedJobs, timestamp}`.
#[utoipa::path(
    get,
    path = "/thing-datas/{name}/jobs",
    tag = "device",
    summary = "List pending job executions (device)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    responses(
        (status = 200, description = "Pending executions", body = s::PendingJobs),
        (status = 404, description = "No such Thing or execution (ResourceNotFound).", body = s::JobsError),
        (status = 429, description = "Throttled: errorCode RequestThrottled when the Thing refused (the JobsError shape), none when authentication is backing off.", body = ErrorBody),
        (status = 503, description = "Unavailable: errorCode InternalError when the Thing did not answer (the JobsError shape), none when the server is at its connection bound.", body = ErrorBody)
    )
)]
pub async fn jobs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    job_request(&state, &principal, &name, DeviceJobRequest::Get, Map::new()).await
}

/// `POST /api/v1/thing-datas/{name}/jobs/start-next` `{statusDetails?, stepTimeoutInMinutes?,
/// clientToken?}`.
#[utoipa::path(
    post,
    path = "/thing-datas/{name}/jobs/start-next",
    tag = "device",
    summary = "Start the next pending job execution (device)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    request_body = s::StartNextRequest,
    responses(
        (status = 200, description = "The execution started, if any", body = s::ExecutionReply),
        (status = 404, description = "No such Thing or execution (ResourceNotFound).", body = s::JobsError),
        (status = 429, description = "Throttled: errorCode RequestThrottled when the Thing refused (the JobsError shape), none when authentication is backing off.", body = ErrorBody),
        (status = 503, description = "Unavailable: errorCode InternalError when the Thing did not answer (the JobsError shape), none when the server is at its connection bound.", body = ErrorBody)
    )
)]
pub async fn start_next_job(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let body = object(body)?;
    Ok(job_request(&state, &principal, &name, DeviceJobRequest::StartNext, body).await)
}

/// Query of `GET /api/v1/thing-datas/{name}/jobs/{jobId}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DescribeParams {
    execution_number: Option<u64>,
    include_job_document: Option<bool>,
}

/// `GET /api/v1/thing-datas/{name}/jobs/{jobId}?executionNumber&includeJobDocument`.
#[utoipa::path(
    get,
    path = "/thing-datas/{name}/jobs/{job_id}",
    tag = "device",
    summary = "Describe a job execution (device)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), ("job_id" = String, Path, description = "Job id: 1..=64 of [A-Za-z0-9_-]", example = "job-1"), DescribeParams),
    responses(
        (status = 200, description = "The execution", body = s::ExecutionReply),
        (status = 404, description = "No such Thing or execution (ResourceNotFound).", body = s::JobsError),
        (status = 429, description = "Throttled: errorCode RequestThrottled when the Thing refused (the JobsError shape), none when authentication is backing off.", body = ErrorBody),
        (status = 503, description = "Unavailable: errorCode InternalError when the Thing did not answer (the JobsError shape), none when the server is at its connection bound.", body = ErrorBody)
    )
)]
pub async fn describe_job(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((name, job_id)): Path<(String, String)>,
    QueryParams(params): QueryParams<DescribeParams>,
) -> Response {
    let mut body = Map::new();
    if let Some(number) = params.execution_number {
        body.insert("executionNumber".into(), number.into());
    }
    if let Some(include) = params.include_job_document {
        body.insert("includeJobDocument".into(), include.into());
    }
    job_request(
        &state,
        &principal,
        &name,
        DeviceJobRequest::Describe(&job_id),
        body,
    )
    .await
}

/// `POST /api/v1/thing-datas/{name}/jobs/{jobId}/update` `{status, statusDetails?,
/// expectedVersion?, executionNumber?, stepTimeoutInMinutes?, includeJobExecutionState?,
/// includeJobDocument?, clientToken?}`.
#[utoipa::path(
    post,
    path = "/thing-datas/{name}/jobs/{job_id}/update",
    tag = "device",
    summary = "Update a job execution (device)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), ("job_id" = String, Path, description = "Job id: 1..=64 of [A-Za-z0-9_-]", example = "job-1")),
    request_body = s::UpdateExecutionRequest,
    responses(
        (status = 200, description = "Updated", body = s::UpdateExecutionReply),
        (status = 409, description = "Terminal, an invalid transition, or a version mismatch.", body = s::JobsError),
        (status = 404, description = "No such Thing or execution (ResourceNotFound).", body = s::JobsError),
        (status = 429, description = "Throttled: errorCode RequestThrottled when the Thing refused (the JobsError shape), none when authentication is backing off.", body = ErrorBody),
        (status = 503, description = "Unavailable: errorCode InternalError when the Thing did not answer (the JobsError shape), none when the server is at its connection bound.", body = ErrorBody)
    )
)]
pub async fn update_job(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((name, job_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let body = object(body)?;
    Ok(job_request(
        &state,
        &principal,
        &name,
        DeviceJobRequest::Update(&job_id),
        body,
    )
    .await)
}
