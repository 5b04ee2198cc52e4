//! `/api/v1/authorization/rules`: operator ACL rules, evaluated in creation order before the
//! default rules (superusers bypass them). A change applies at once: subscriptions the new
//! rules no longer allow are removed from every session.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use thinghub_actors::clock::{Clock, SystemClock};

use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;
use crate::mqtt::acl::{AclRule, RuleError};

impl From<RuleError> for ApiError {
    fn from(error: RuleError) -> ApiError {
        match error {
            RuleError::Invalid(_) => ApiError::bad_request(error.to_string()),
            RuleError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, error.to_string()),
            RuleError::Storage(_) => {
                tracing::error!(error = %error, "ACL rule store failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    JsonBody(rule): JsonBody<AclRule>,
) -> Result<Response, ApiError> {
    let rule = state.acl.add_rule(rule, SystemClock.now_ms()).await?;
    crate::mqtt::reauthorize_subscriptions(&state.broker, &state.acl);
    Ok((StatusCode::CREATED, Json(rule)).into_response())
}

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"items": state.acl.rules()}))
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AclRule>, ApiError> {
    Ok(Json(state.acl.rule(&id)?))
}

pub async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(rule): JsonBody<AclRule>,
) -> Result<Json<AclRule>, ApiError> {
    let rule = state.acl.replace_rule(&id, rule).await?;
    crate::mqtt::reauthorize_subscriptions(&state.broker, &state.acl);
    Ok(Json(rule))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.acl.delete_rule(&id).await?;
    crate::mqtt::reauthorize_subscriptions(&state.broker, &state.acl);
    Ok(StatusCode::NO_CONTENT)
}
