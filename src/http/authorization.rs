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
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
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

#[utoipa::path(
    post,
    path = "/authorization/rules",
    tag = "authorization",
    summary = "Add an MQTT authorization rule",
    request_body = crate::mqtt::acl::AclRule,
    responses(
        (status = 201, description = "Added", body = crate::mqtt::acl::AclRule),
        (status = 500, description = "The rule store failed.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(rule): JsonBody<AclRule>,
) -> Result<Response, ApiError> {
    let rule = state.acl.add_rule(rule, SystemClock.now_ms()).await?;
    crate::mqtt::reauthorize_subscriptions(&state.broker, &state.acl);
    Ok((StatusCode::CREATED, Json(rule)).into_response())
}

#[utoipa::path(
    get,
    path = "/authorization/rules",
    tag = "authorization",
    summary = "List the rules in evaluation order",
    responses(
        (status = 200, description = "Rules", body = s::RuleList)
    )
)]
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"items": state.acl.rules()}))
}

#[utoipa::path(
    get,
    path = "/authorization/rules/{id}",
    tag = "authorization",
    summary = "Get a rule",
    params(("id" = String, Path, description = "Rule id")),
    responses(
        (status = 200, description = "The rule", body = crate::mqtt::acl::AclRule),
        (status = 404, description = "No such rule.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AclRule>, ApiError> {
    Ok(Json(state.acl.rule(&id)?))
}

#[utoipa::path(
    put,
    path = "/authorization/rules/{id}",
    tag = "authorization",
    summary = "Replace a rule (subscriptions are re-authorized)",
    params(("id" = String, Path, description = "Rule id")),
    request_body = crate::mqtt::acl::AclRule,
    responses(
        (status = 200, description = "Replaced", body = crate::mqtt::acl::AclRule),
        (status = 404, description = "No such rule.", body = ErrorBody),
        (status = 500, description = "The rule store failed.", body = ErrorBody)
    )
)]
pub async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(rule): JsonBody<AclRule>,
) -> Result<Json<AclRule>, ApiError> {
    let rule = state.acl.replace_rule(&id, rule).await?;
    crate::mqtt::reauthorize_subscriptions(&state.broker, &state.acl);
    Ok(Json(rule))
}

#[utoipa::path(
    delete,
    path = "/authorization/rules/{id}",
    tag = "authorization",
    summary = "Delete a rule",
    params(("id" = String, Path, description = "Rule id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such rule.", body = ErrorBody),
        (status = 500, description = "The rule store failed.", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.acl.delete_rule(&id).await?;
    crate::mqtt::reauthorize_subscriptions(&state.broker, &state.acl);
    Ok(StatusCode::NO_CONTENT)
}
