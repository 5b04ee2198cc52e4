//! `/api/v1/webhooks`: the operator's web services that receive the Things' durable events
//! (admin only: a webhook reads every Thing's data). Delivery is in `crate::webhooks`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
use super::schema as s;
use super::AppState;
use crate::webhooks::{Kind, WebhookError};

impl From<WebhookError> for ApiError {
    fn from(error: WebhookError) -> ApiError {
        let status = match error {
            WebhookError::Invalid(_) => StatusCode::BAD_REQUEST,
            WebhookError::NotFound(_) => StatusCode::NOT_FOUND,
            WebhookError::TooMany(_) => StatusCode::CONFLICT,
            WebhookError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    }
}

const ID: &str = "webhook id";

/// `POST /api/v1/webhooks`.
#[utoipa::path(
    post,
    path = "/webhooks",
    tag = "webhooks",
    summary = "Create a webhook: it receives what is committed from now on",
    request_body = s::WebhookRequest,
    responses(
        (status = 201, description = "Created", body = s::WebhookView, headers(("location" = String, description = "The new resource"))),
        (status = 409, description = "webhooks_max reached.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    create_kind(&state, Kind::Webhook, &body).await
}

async fn create_kind(state: &AppState, kind: Kind, body: &Value) -> Result<Response, ApiError> {
    let webhook = state.webhooks.create(kind, body).await?;
    let base = match kind {
        Kind::Webhook => "webhooks",
        Kind::Postgres => "postgres-sinks",
    };
    let location = format!("/api/v1/{base}/{}", webhook.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(state.webhooks.view(&webhook)?),
    )
        .into_response())
}

fn list_kind(state: &AppState, kind: Kind) -> Result<Json<Value>, ApiError> {
    let items = state
        .webhooks
        .list(kind)?
        .iter()
        .map(|w| state.webhooks.view(w))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "items": items })))
}

/// `GET /api/v1/webhooks`.
#[utoipa::path(
    get,
    path = "/webhooks",
    tag = "webhooks",
    summary = "List webhooks with their delivery status",
    responses(
        (status = 200, description = "Webhooks", body = s::WebhookList),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    list_kind(&state, Kind::Webhook)
}

/// `GET /api/v1/webhooks/{id}`.
#[utoipa::path(
    get,
    path = "/webhooks/{id}",
    tag = "webhooks",
    summary = "A webhook and its delivery status (cursor lag, delivered, retried, failed, last error)",
    params(("id" = String, Path, description = ID)),
    responses(
        (status = 200, description = "The webhook", body = s::WebhookView),
        (status = 404, description = "No such webhook.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.webhooks.status(Kind::Webhook, &id)?))
}

/// `PUT /api/v1/webhooks/{id}`.
#[utoipa::path(
    put,
    path = "/webhooks/{id}",
    tag = "webhooks",
    summary = "Change a webhook (the fields given); delivery goes on from its cursor",
    params(("id" = String, Path, description = ID)),
    request_body = s::WebhookRequest,
    responses(
        (status = 200, description = "Changed", body = s::WebhookView),
        (status = 404, description = "No such webhook.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let webhook = state.webhooks.update(Kind::Webhook, &id, &body).await?;
    Ok(Json(state.webhooks.view(&webhook)?))
}

/// `DELETE /api/v1/webhooks/{id}`.
#[utoipa::path(
    delete,
    path = "/webhooks/{id}",
    tag = "webhooks",
    summary = "Delete a webhook, its cursor and its dead letters",
    params(("id" = String, Path, description = ID)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such webhook.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.webhooks.delete(Kind::Webhook, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/webhooks/{id}/dead-letters`.
#[utoipa::path(
    get,
    path = "/webhooks/{id}/dead-letters",
    tag = "webhooks",
    summary = "Batches the receiver refused for good (a 4xx other than 408 and 429), oldest first",
    params(("id" = String, Path, description = ID), DeadLetterParams),
    responses(
        (status = 200, description = "A page of dead letters", body = s::DeadLetterList),
        (status = 404, description = "No such webhook.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn dead_letters(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(page): QueryParams<DeadLetterParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = match page.limit {
        None => DEAD_LETTERS_PAGE_DEFAULT.min(state.limits.list_limit_max),
        Some(limit) => super::things::page_limit(Some(limit), state.limits.list_limit_max)?,
    };
    let (items, next) =
        state
            .webhooks
            .dead_letters(Kind::Webhook, &id, page.cursor.as_deref(), limit)?;
    Ok(Json(json!({ "items": items, "nextCursor": next })))
}

/// Dead letters per page when the request names no limit (each holds up to a batch).
const DEAD_LETTERS_PAGE_DEFAULT: usize = 10;

/// Paging of dead letters.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterParams {
    /// 1..=list_limit_max (default 10).
    limit: Option<usize>,
    /// The previous page's `nextCursor`.
    cursor: Option<String>,
}

/// `POST /api/v1/webhooks/{id}/dead-letters/replay`.
#[utoipa::path(
    post,
    path = "/webhooks/{id}/dead-letters/replay",
    tag = "webhooks",
    summary = "Send the dead letters again, oldest first, until one fails; each delivered one is removed",
    params(("id" = String, Path, description = ID)),
    responses(
        (status = 200, description = "How many went and how many are left", body = s::ReplayReply),
        (status = 404, description = "No such webhook.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn replay(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (replayed, left) = state.webhooks.replay(Kind::Webhook, &id).await?;
    Ok(Json(json!({ "replayed": replayed, "left": left })))
}

const SINK_ID: &str = "PostgreSQL sink id";

/// `POST /api/v1/postgres-sinks`.
#[utoipa::path(
    post,
    path = "/postgres-sinks",
    tag = "webhooks",
    summary = "Create a PostgreSQL sink: the same records as a webhook, inserted into a table (created if absent), each once",
    request_body = s::PostgresSinkRequest,
    responses(
        (status = 201, description = "Created", body = s::PostgresSinkView, headers(("location" = String, description = "The new resource"))),
        (status = 409, description = "webhooks_max reached (sinks count with webhooks).", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn create_sink(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    create_kind(&state, Kind::Postgres, &body).await
}

/// `GET /api/v1/postgres-sinks`.
#[utoipa::path(
    get,
    path = "/postgres-sinks",
    tag = "webhooks",
    summary = "List PostgreSQL sinks with their delivery status",
    responses(
        (status = 200, description = "Sinks", body = s::PostgresSinkList),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn list_sinks(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    list_kind(&state, Kind::Postgres)
}

/// `GET /api/v1/postgres-sinks/{id}`.
#[utoipa::path(
    get,
    path = "/postgres-sinks/{id}",
    tag = "webhooks",
    summary = "A PostgreSQL sink and its delivery status",
    params(("id" = String, Path, description = SINK_ID)),
    responses(
        (status = 200, description = "The sink", body = s::PostgresSinkView),
        (status = 404, description = "No such sink.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn get_sink(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.webhooks.status(Kind::Postgres, &id)?))
}

/// `PUT /api/v1/postgres-sinks/{id}`.
#[utoipa::path(
    put,
    path = "/postgres-sinks/{id}",
    tag = "webhooks",
    summary = "Change a PostgreSQL sink (the fields given); delivery goes on from its cursor",
    params(("id" = String, Path, description = SINK_ID)),
    request_body = s::PostgresSinkRequest,
    responses(
        (status = 200, description = "Changed", body = s::PostgresSinkView),
        (status = 404, description = "No such sink.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn update_sink(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let webhook = state.webhooks.update(Kind::Postgres, &id, &body).await?;
    Ok(Json(state.webhooks.view(&webhook)?))
}

/// `DELETE /api/v1/postgres-sinks/{id}`.
#[utoipa::path(
    delete,
    path = "/postgres-sinks/{id}",
    tag = "webhooks",
    summary = "Delete a PostgreSQL sink (its table stays)",
    params(("id" = String, Path, description = SINK_ID)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such sink.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn delete_sink(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.webhooks.delete(Kind::Postgres, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
