//! Management API: API keys with roles (admin only, see `auth::route_allowed`).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use thinghub_actors::thing::validate_thing_name;

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::groups::PageParams;
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::things::page_limit;
use super::AppState;
use crate::auth::{KeyError, NewApiKey, Role, KEY_NAME_CHARS_MAX, KEY_THINGS_MAX};

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            KeyError::LastAdmin(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            KeyError::Auth(inner) => {
                tracing::error!(error = %inner, "API key storage failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "API keys cannot be stored or read right now",
                )
            }
        }
    }
}

fn parse(body: &Value, now_ms: u64) -> Result<NewApiKey, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::bad_request("Payload must be a JSON object"));
    };
    if let Some(key) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "name" | "role" | "expiresAt" | "things"))
    {
        return Err(ApiError::bad_request(format!(
            "'{key}' is not a field of an API key (name, role, expiresAt, things)"
        )));
    }
    let name = match body.get("name") {
        Some(Value::String(name))
            if !name.trim().is_empty() && name.chars().count() <= KEY_NAME_CHARS_MAX =>
        {
            name.clone()
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "name must be a non-empty string of at most {KEY_NAME_CHARS_MAX} characters"
            )))
        }
        None => return Err(ApiError::bad_request("Missing required field: name")),
    };
    let role = match body.get("role") {
        Some(Value::String(role)) => Role::parse(role).ok_or_else(|| {
            ApiError::bad_request(format!(
                "role '{role}' is not one of admin, operator, viewer, device"
            ))
        })?,
        Some(_) => return Err(ApiError::bad_request("role must be a string")),
        None => return Err(ApiError::bad_request("Missing required field: role")),
    };
    let expires_at_ms = match body.get("expiresAt") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(at) if at > now_ms => Some(at),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "expiresAt must be in the future (Unix ms)",
                ))
            }
            None => {
                return Err(ApiError::bad_request(
                    "expiresAt must be a whole number of Unix ms",
                ))
            }
        },
    };
    let things = match body.get("things") {
        None | Some(Value::Null) => None,
        Some(_) if role != Role::Device => {
            return Err(ApiError::bad_request(
                "things applies to device keys only (role device)",
            ))
        }
        Some(Value::Array(items)) if (1..=KEY_THINGS_MAX).contains(&items.len()) => {
            let mut things = Vec::with_capacity(items.len());
            for item in items {
                let Some(name) = item.as_str() else {
                    return Err(ApiError::bad_request(
                        "things must be Thing names (strings)",
                    ));
                };
                validate_thing_name(name)?;
                if !things.iter().any(|t| t == name) {
                    things.push(name.to_owned());
                }
            }
            Some(things)
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "things must be an array of 1..={KEY_THINGS_MAX} Thing names"
            )))
        }
    };
    Ok(NewApiKey {
        name,
        role,
        expires_at_ms,
        things,
    })
}

/// `POST /api/v1/api-keys` `{"name", "role", "expiresAt"?, "things"?}` -> 201 with the key and
/// its secret (shown only here).
#[utoipa::path(
    post,
    path = "/api-keys",
    tag = "api-keys",
    summary = "Create an API key (the secret is shown only here)",
    request_body = s::CreateApiKeyRequest,
    responses(
        (status = 201, description = "Created", body = s::CreatedApiKey, headers(("location" = String, description = "The new resource"))),
        (status = 503, description = "API keys cannot be stored or read right now.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let now_ms = state.things.now_ms();
    let new = parse(&body, now_ms)?;
    let (view, secret) = state.keys.create(new, now_ms).await?;
    let mut answer = view.to_json();
    answer["secret"] = secret.into();
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/api-keys/{}", view.key))],
        Json(answer),
    )
        .into_response())
}

/// `GET /api/v1/api-keys?limit&cursor`: stored keys in id order (never their secrets; the
/// `THINGHUB_ADMIN_KEY` key is not stored and not listed).
#[utoipa::path(
    get,
    path = "/api-keys",
    tag = "api-keys",
    summary = "List API keys",
    params(super::groups::PageParams),
    responses(
        (status = 200, description = "A page of keys", body = s::ApiKeyPage),
        (status = 503, description = "API keys cannot be stored or read right now.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let keys = state.keys.list(params.cursor.as_deref(), limit)?;
    let next = (keys.len() == limit).then(|| keys.last().map(|k| k.key.clone()));
    let items: Vec<Value> = keys.iter().map(|k| k.to_json()).collect();
    Ok(Json(json!({"items": items, "nextCursor": next.flatten()})))
}

/// `GET /api/v1/api-keys/{key}`.
#[utoipa::path(
    get,
    path = "/api-keys/{key}",
    tag = "api-keys",
    summary = "Get an API key",
    params(("key" = String, Path, description = "API key id")),
    responses(
        (status = 200, description = "The key", body = s::ApiKey),
        (status = 404, description = "No such key.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.keys.get(&key)?.to_json()))
}

/// `DELETE /api/v1/api-keys/{key}` -> 204; refused from the next request on. 409 for the last
/// admin key (unless `THINGHUB_ADMIN_KEY` is set).
#[utoipa::path(
    delete,
    path = "/api-keys/{key}",
    tag = "api-keys",
    summary = "Revoke an API key (at once)",
    params(("key" = String, Path, description = "API key id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such key.", body = ErrorBody),
        (status = 409, description = "The last working admin key.", body = ErrorBody),
        (status = 503, description = "API keys cannot be stored or read right now.", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.keys.delete(&key, state.things.now_ms()).await?;
    Ok(StatusCode::NO_CONTENT)
}
