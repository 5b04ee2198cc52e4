//! `/api/v1/authentication/users`: MQTT credentials CRUD (passwords stored hashed, never shown).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use thinghub_actors::clock::{Clock, SystemClock};

use super::error::ApiError;
use super::extract::JsonBody;
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;
use crate::users::UserError;

impl From<UserError> for ApiError {
    fn from(error: UserError) -> ApiError {
        match error {
            UserError::Exists(_) | UserError::Reserved(_) => {
                ApiError::new(StatusCode::CONFLICT, error.to_string())
            }
            UserError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, error.to_string()),
            UserError::Invalid(_) => ApiError::bad_request(error.to_string()),
            UserError::Storage(_) | UserError::Auth(_) => {
                tracing::error!(error = %error, "user store failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

/// Body of a user creation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"username": "sensor-2", "password": "s3cret-pass", "thingName": "sensor-2"}))]
pub struct CreateUser {
    username: String,
    password: String,
    #[serde(default)]
    thing_name: Option<String>,
    #[serde(default)]
    superuser: bool,
}

#[utoipa::path(
    post,
    path = "/authentication/users",
    tag = "users",
    summary = "Create an MQTT user",
    request_body = CreateUser,
    responses(
        (status = 201, description = "Created", body = crate::users::UserView),
        (status = 409, description = "The user exists already.", body = ErrorBody),
        (status = 500, description = "The user store failed.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateUser>,
) -> Result<Response, ApiError> {
    let users = state.users.clone();
    // argon2 hashing is CPU-heavy by design: off the async workers.
    let view = tokio::task::spawn_blocking(move || {
        tokio::runtime::Handle::current().block_on(users.create(
            &body.username,
            &body.password,
            body.thing_name,
            body.superuser,
            SystemClock.now_ms(),
        ))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))??;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(
    get,
    path = "/authentication/users",
    tag = "users",
    summary = "List MQTT users",
    responses(
        (status = 200, description = "Users", body = s::UserList),
        (status = 500, description = "The user store failed.", body = ErrorBody)
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"items": state.users.list()?})))
}

#[utoipa::path(
    get,
    path = "/authentication/users/{username}",
    tag = "users",
    summary = "Get an MQTT user",
    params(("username" = String, Path, description = "MQTT user name", example = "sensor-1")),
    responses(
        (status = 200, description = "The user", body = crate::users::UserView),
        (status = 404, description = "No such user.", body = ErrorBody),
        (status = 500, description = "The user store failed.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(username): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.users.get(&username)?)))
}

/// Body of a user update: every field optional; `thingName: null` unbinds.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"password": "n3w-pass"}))]
pub struct UpdateUser {
    #[serde(default)]
    password: Option<String>,
    /// Absent: kept; null: unbound; a name: bound to that Thing.
    #[serde(default, with = "serde_with_double_option")]
    #[schema(value_type = Option<String>)]
    thing_name: Option<Option<String>>,
    #[serde(default)]
    superuser: Option<bool>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
mod serde_with_double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

#[utoipa::path(
    put,
    path = "/authentication/users/{username}",
    tag = "users",
    summary = "Change an MQTT user (its connections are re-authorized)",
    params(("username" = String, Path, description = "MQTT user name", example = "sensor-1")),
    request_body = UpdateUser,
    responses(
        (status = 200, description = "Changed", body = crate::users::UserView),
        (status = 404, description = "No such user.", body = ErrorBody),
        (status = 500, description = "The user store failed.", body = ErrorBody)
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Path(username): Path<String>,
    JsonBody(body): JsonBody<UpdateUser>,
) -> Result<Json<Value>, ApiError> {
    let users = state.users.clone();
    let view = tokio::task::spawn_blocking(move || {
        tokio::runtime::Handle::current().block_on(users.update(
            &username,
            body.password.as_deref(),
            body.thing_name,
            body.superuser,
        ))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))??;
    revoke(&state, &view.username);
    Ok(Json(json!(view)))
}

#[utoipa::path(
    delete,
    path = "/authentication/users/{username}",
    tag = "users",
    summary = "Delete an MQTT user (its connections are closed)",
    params(("username" = String, Path, description = "MQTT user name", example = "sensor-1")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such user.", body = ErrorBody),
        (status = 500, description = "The user store failed.", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(username): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.users.delete(&username).await?;
    revoke(&state, &username);
    Ok(StatusCode::NO_CONTENT)
}

/// Revocation bites at once: the user's live MQTT connections close and its sessions are
/// re-evaluated against what it may do now.
fn revoke(state: &AppState, username: &str) {
    crate::mqtt::revoke_user(&state.broker, &state.acl, &state.users, username);
}
