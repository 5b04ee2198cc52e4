//! `/api/v1/device-registrations`: Cumulocity's credential bootstrap (admin only: accepting a
//! device creates MQTT credentials for its Thing). The device side is `s/ucr`/`s/dcr` in
//! `crate::mqtt::cumulocity`; the records are `crate::cumulocity::registrations`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
use super::schema as s;
use super::things::page_limit;
use super::AppState;
use crate::cumulocity::registrations::{RegistrationError, RegistrationStatus};

impl From<RegistrationError> for ApiError {
    fn from(error: RegistrationError) -> ApiError {
        let status = match error {
            RegistrationError::Invalid(_) => StatusCode::BAD_REQUEST,
            RegistrationError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistrationError::Exists(_)
            | RegistrationError::Full(_)
            | RegistrationError::NotRequested(_) => StatusCode::CONFLICT,
            RegistrationError::Storage(_) => {
                tracing::error!(error = %error, "device registrations unavailable");
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
            }
        };
        ApiError::new(status, error.to_string())
    }
}

/// Body of a registration.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": "8c3a6e2f0b11"}))]
pub struct CreateRegistration {
    /// The device's id: its MQTT client id (`{id}` or `d:{id}`) and its Thing's name.
    id: String,
}

/// `POST /api/v1/device-registrations` -> 201, WAITING_FOR_CONNECTION.
#[utoipa::path(
    post,
    path = "/device-registrations",
    tag = "cumulocity",
    summary = "Register a device id for the credential bootstrap",
    request_body = CreateRegistration,
    responses(
        (status = 201, description = "Registered", body = crate::cumulocity::registrations::Registration, headers(("location" = String, description = "The new resource"))),
        (status = 400, description = "The id is not a valid Thing name.", body = ErrorBody),
        (status = 409, description = "Registered already, or cumulocity_registrations_max reached.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateRegistration>,
) -> Result<Response, ApiError> {
    let registration = state
        .registrations
        .create(&body.id, state.things.now_ms())
        .await?;
    let location = format!("/api/v1/device-registrations/{}", registration.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(registration),
    )
        .into_response())
}

/// Filter and paging of the listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RegistrationParams {
    /// `WAITING_FOR_CONNECTION`, `PENDING_ACCEPTANCE` or `ACCEPTED`.
    status: Option<String>,
    /// Page size.
    limit: Option<usize>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /api/v1/device-registrations?status&limit&cursor`, in id order. A page reads `limit`
/// registrations and returns those with the status: it may hold fewer and still have a
/// `nextCursor`.
#[utoipa::path(
    get,
    path = "/device-registrations",
    tag = "cumulocity",
    summary = "List device registrations",
    params(RegistrationParams),
    responses(
        (status = 200, description = "A page of registrations", body = s::RegistrationPage),
        (status = 400, description = "An invalid status or limit.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<RegistrationParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let status = match params.status.as_deref() {
        None => None,
        Some(text) => Some(RegistrationStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status '{text}' must be one of WAITING_FOR_CONNECTION, PENDING_ACCEPTANCE, ACCEPTED"
            ))
        })?),
    };
    let (items, next) = state
        .registrations
        .list(status, params.cursor.as_deref(), limit)?;
    Ok(Json(json!({"items": items, "nextCursor": next})))
}

/// `GET /api/v1/device-registrations/{id}`.
#[utoipa::path(
    get,
    path = "/device-registrations/{id}",
    tag = "cumulocity",
    summary = "Get a device registration",
    params(("id" = String, Path, description = "Device id", example = "8c3a6e2f0b11")),
    responses(
        (status = 200, description = "The registration", body = crate::cumulocity::registrations::Registration),
        (status = 404, description = "No such registration.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.registrations.get(&id)?)))
}

/// `POST /api/v1/device-registrations/{id}/accept`: the device's next `s/ucr` gets its
/// credentials (once). Only a device that asked (PENDING_ACCEPTANCE) can be accepted.
#[utoipa::path(
    post,
    path = "/device-registrations/{id}/accept",
    tag = "cumulocity",
    summary = "Accept a device that asked for credentials",
    params(("id" = String, Path, description = "Device id", example = "8c3a6e2f0b11")),
    responses(
        (status = 200, description = "Accepted (again: unchanged)", body = crate::cumulocity::registrations::Registration),
        (status = 404, description = "No such registration.", body = ErrorBody),
        (status = 409, description = "The device has not asked for credentials yet.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn accept(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registration = state
        .registrations
        .accept(&id, state.things.now_ms())
        .await?;
    tracing::info!(device = %id, "device registration accepted");
    Ok(Json(json!(registration)))
}

/// `DELETE /api/v1/device-registrations/{id}` -> 204. Credentials issued already stay valid
/// (delete their MQTT user to revoke them).
#[utoipa::path(
    delete,
    path = "/device-registrations/{id}",
    tag = "cumulocity",
    summary = "Delete a device registration",
    params(("id" = String, Path, description = "Device id", example = "8c3a6e2f0b11")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such registration.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.registrations.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
