//! Device ThingDatas API (`/api/v1/thing-datas/...`): what a device without MQTT uses.
//! Same semantics and error codes as the MQTT topics.

use axum::extract::State;
use axum::Json;
use serde_json::Value;
use thinghub_actors::thing::shadow::client_token_of;
use thinghub_actors::thing::{IngestEvent, Origin, ShadowUpdate};

use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;

/// `POST /api/v1/thing-datas/shadow/reported` `{thingName, state:{reported}, clientToken?, version?}`.
pub async fn report(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(result.accepted))
}

/// `POST /api/v1/thing-datas/events` `{thingName, eventType, severity, data?, timestamp?}`: 201
/// with the stored event; 400 for an invalid one (never stored).
pub async fn event(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let name = match body.get("thingName") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(ApiError::bad_request("thingName must be a string")),
        None => return Err(ApiError::bad_request("Missing required field: thingName")),
    };
    let event = IngestEvent::from_json(&body, None, &state.limits.events)?;
    let stored = state.things.ingest_event(&name, event).await?;
    Ok((axum::http::StatusCode::CREATED, Json(stored.to_json(None))))
}
