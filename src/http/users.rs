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
use super::AppState;
use crate::users::UserError;

impl From<UserError> for ApiError {
    fn from(error: UserError) -> ApiError {
        match error {
            UserError::Exists(_) => ApiError::new(StatusCode::CONFLICT, error.to_string()),
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
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUser {
    username: String,
    password: String,
    #[serde(default)]
    thing_name: Option<String>,
    #[serde(default)]
    superuser: bool,
}

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

pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"items": state.users.list()?})))
}

pub async fn get(
    State(state): State<AppState>,
    Path(username): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.users.get(&username)?)))
}

/// Body of a user update: every field optional; `thingName: null` unbinds.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(default)]
    password: Option<String>,
    #[serde(default, with = "serde_with_double_option")]
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
