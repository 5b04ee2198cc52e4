//! Management API: commands to a Thing (send, inspect, list, cancel).
//!
//! A command is durable (`CommandSent` in the Thing's log, its deadline in the index) before the
//! 201 is returned; its request to the device is the Thing's effect (published, or queued in
//! the device's persistent session, before the 201, and again after a crash if need be).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use thinghub_actors::thing::commands::PageCursor;
use thinghub_actors::thing::{CommandStatus, SendCommand};
use thinghub_actors::Things;

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::things::page_limit;
use super::AppState;

/// `POST /api/v1/things/{name}/commands` `{action, params?, ttl?, commandId?}` -> 201.
#[utoipa::path(
    post,
    path = "/things/{name}/commands",
    tag = "commands",
    summary = "Send a command with a time to live",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    request_body = s::SendCommandRequest,
    responses(
        (status = 201, description = "Sent (durable)", body = s::Command, headers(("location" = String, description = "The new resource"))),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 409, description = "The execution exists already.", body = ErrorBody),
        (status = 429, description = "Too many pending commands or requests.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn send(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let command = SendCommand::from_json(
        &body,
        Things::new_execution_id(),
        Things::new_execution_id,
        &state.limits.commands,
    )?;
    if state.limits.cumulocity && command.action.starts_with("c8y_") {
        // A Cumulocity operation must be one a device understands, with its parameters.
        crate::cumulocity::templates::operation_row(
            &name,
            &command.action,
            command.params.as_ref().unwrap_or(&serde_json::Map::new()),
        )
        .map_err(ApiError::bad_request)?;
    }
    let execution = state.things.send_command(&name, command).await?;
    let location = format!("/api/v1/things/{name}/commands/{}", execution.execution_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(execution.to_json(&name)),
    )
        .into_response())
}

/// `GET /api/v1/things/{name}/commands/{executionId}`.
#[utoipa::path(
    get,
    path = "/things/{name}/commands/{execution_id}",
    tag = "commands",
    summary = "Get a command execution",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), ("execution_id" = String, Path, description = "Execution id")),
    responses(
        (status = 200, description = "The execution", body = s::Command),
        (status = 404, description = "No such Thing or execution.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path((name, execution_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let execution = state.things.get_command(&name, &execution_id).await?;
    Ok(Json(execution.to_json(&name)))
}

/// `POST /api/v1/things/{name}/commands/{executionId}/cancel` -> CANCELED (409 if it ended).
#[utoipa::path(
    post,
    path = "/things/{name}/commands/{execution_id}/cancel",
    tag = "commands",
    summary = "Cancel a command execution",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), ("execution_id" = String, Path, description = "Execution id")),
    responses(
        (status = 200, description = "Canceled", body = s::Command),
        (status = 404, description = "No such Thing or execution.", body = ErrorBody),
        (status = 409, description = "The execution is already finished.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    Path((name, execution_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let execution = state.things.cancel_command(&name, &execution_id).await?;
    Ok(Json(execution.to_json(&name)))
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

/// `GET /api/v1/things/{name}/commands?status&limit&cursor`: newest first.
#[utoipa::path(
    get,
    path = "/things/{name}/commands",
    tag = "commands",
    summary = "List command executions, newest first",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), ListParams),
    responses(
        (status = 200, description = "A page of executions", body = s::CommandPage),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            CommandStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown status '{s}': one of SENT, IN_PROGRESS, SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED"
                ))
            })
        })
        .transpose()?;
    let cursor = params
        .cursor
        .as_deref()
        .map(PageCursor::parse)
        .transpose()?;
    let page = state
        .things
        .list_commands(&name, status, cursor, limit)
        .await?;
    let items: Vec<Value> = page.items.iter().map(|e| e.to_json(&name)).collect();
    Ok(Json(json!({
        "items": items,
        "nextCursor": page.next_cursor.map(|c| c.to_string()),
    })))
}
