//! Management API: Thing groups (what jobs can target).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::things::page_limit;
use super::AppState;

/// `POST /api/v1/thing-groups` `{"groupName", "description"?}` -> 201 (409 if it exists).
#[utoipa::path(
    post,
    path = "/thing-groups",
    tag = "groups",
    summary = "Create a Thing group",
    request_body = s::CreateGroupRequest,
    responses(
        (status = 201, description = "Created", body = s::Group, headers(("location" = String, description = "The new resource"))),
        (status = 409, description = "The group exists already.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::bad_request("Payload must be a JSON object"));
    };
    if let Some(key) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "groupName" | "description"))
    {
        return Err(ApiError::bad_request(format!(
            "'{key}' is not a field of a thing group"
        )));
    }
    let name = match body.get("groupName") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(ApiError::bad_request("groupName must be a string")),
        None => return Err(ApiError::bad_request("Missing required field: groupName")),
    };
    let description = match body.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => return Err(ApiError::bad_request("description must be a string")),
    };
    let record = state
        .groups
        .create(&name, description, state.things.now_ms())
        .await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/thing-groups/{name}"))],
        Json(record.to_json()),
    )
        .into_response())
}

/// Paging parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    pub(crate) limit: Option<usize>,
    pub(crate) cursor: Option<String>,
}

/// `GET /api/v1/thing-groups?limit&cursor`: in name order; `nextCursor` is the last name.
#[utoipa::path(
    get,
    path = "/thing-groups",
    tag = "groups",
    summary = "List groups",
    params(PageParams),
    responses(
        (status = 200, description = "A page of groups", body = s::GroupPage),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let groups = state.groups.list(params.cursor.as_deref(), limit)?;
    let next = (groups.len() == limit).then(|| groups.last().map(|g| g.name.clone()));
    let items: Vec<Value> = groups.iter().map(|g| g.to_json()).collect();
    Ok(Json(json!({"items": items, "nextCursor": next.flatten()})))
}

/// `GET /api/v1/thing-groups/{group}`.
#[utoipa::path(
    get,
    path = "/thing-groups/{group}",
    tag = "groups",
    summary = "Get a group",
    params(("group" = String, Path, description = "Group name: 1..=128 of [a-zA-Z0-9:_-]", example = "floor-1")),
    responses(
        (status = 200, description = "The group", body = s::Group),
        (status = 404, description = "No such group.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.groups.get(&name)?.to_json()))
}

/// `DELETE /api/v1/thing-groups/{group}` -> 204 (its Things stay).
#[utoipa::path(
    delete,
    path = "/thing-groups/{group}",
    tag = "groups",
    summary = "Delete a group (its Things stay)",
    params(("group" = String, Path, description = "Group name: 1..=128 of [a-zA-Z0-9:_-]", example = "floor-1")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such group.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.groups.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/thing-groups/{group}/things` `{"thingName"}`: 201 when added, 200 when it
/// was a member already. CONTINUOUS jobs targeting the group reach it.
#[utoipa::path(
    post,
    path = "/thing-groups/{group}/things",
    tag = "groups",
    summary = "Add a Thing to a group",
    params(("group" = String, Path, description = "Group name: 1..=128 of [a-zA-Z0-9:_-]", example = "floor-1")),
    request_body = s::AddMemberRequest,
    responses(
        (status = 201, description = "Added"),
        (status = 200, description = "Already a member"),
        (status = 404, description = "No such Thing or group.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn add(
    State(state): State<AppState>,
    Path(group): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<StatusCode, ApiError> {
    let thing = match body.get("thingName") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(ApiError::bad_request("thingName must be a string")),
        None => return Err(ApiError::bad_request("Missing required field: thingName")),
    };
    state.things.ensure_registered(&thing)?;
    let added = state.groups.add(&group, &thing).await?;
    state.jobs.thing_joined(&group, &thing).await?;
    state.alarms.thing_joined(&group, &thing).await?;
    Ok(if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    })
}

/// `DELETE /api/v1/thing-groups/{group}/things/{name}` -> 204.
#[utoipa::path(
    delete,
    path = "/thing-groups/{group}/things/{name}",
    tag = "groups",
    summary = "Remove a Thing from a group",
    params(("group" = String, Path, description = "Group name: 1..=128 of [a-zA-Z0-9:_-]", example = "floor-1"), ("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such group, or the Thing is not in it.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    Path((group, thing)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.groups.remove(&group, &thing).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/thing-groups/{group}/things?limit&cursor`: its Things in name order.
#[utoipa::path(
    get,
    path = "/thing-groups/{group}/things",
    tag = "groups",
    summary = "List a group's Things",
    params(("group" = String, Path, description = "Group name: 1..=128 of [a-zA-Z0-9:_-]", example = "floor-1"), PageParams),
    responses(
        (status = 200, description = "A page of Thing names", body = s::NamePage),
        (status = 404, description = "No such group.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn members(
    State(state): State<AppState>,
    Path(group): Path<String>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let things = state
        .groups
        .members(&group, params.cursor.as_deref(), limit)?;
    let next = (things.len() == limit).then(|| things.last().cloned());
    Ok(Json(json!({"items": things, "nextCursor": next.flatten()})))
}
