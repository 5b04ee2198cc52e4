//! Messaging over HTTP: `POST /api/v1/publish` and `POST /api/v1/publish/bulk` (operator and
//! admin keys). Delivered through the broker as a superuser's publish; a Thing's request
//! topics are refused (never device input).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::JsonBody;
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;
use crate::mqtt::operator::{self, OperatorPublish, OperatorPublishError};

impl From<OperatorPublishError> for ApiError {
    fn from(e: OperatorPublishError) -> Self {
        let status = match e {
            OperatorPublishError::RetainedFull => StatusCode::INSUFFICIENT_STORAGE,
            OperatorPublishError::ServerTopic(_) | OperatorPublishError::RequestTopic(_) => {
                StatusCode::FORBIDDEN
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

fn text<'a>(object: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(ApiError::bad_request(format!("{field} must be a string"))),
    }
}

fn properties(value: Option<&Value>, message: &mut OperatorPublish) -> Result<(), ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let Some(properties) = value.as_object() else {
        return Err(ApiError::bad_request("properties must be a JSON object"));
    };
    for (name, value) in properties {
        let bad = |what: &str| ApiError::bad_request(format!("properties.{name} must be {what}"));
        match name.as_str() {
            "messageExpiryInterval" => {
                let seconds = value.as_u64().and_then(|s| u32::try_from(s).ok());
                message.message_expiry_interval_s =
                    Some(seconds.ok_or_else(|| bad("a whole number of seconds (u32)"))?);
            }
            "contentType" => {
                message.content_type = Some(value.as_str().ok_or_else(|| bad("a string"))?.into());
            }
            "payloadFormatIndicator" => {
                message.payload_format_indicator = match value.as_u64() {
                    Some(n @ 0..=1) => Some(n as u8),
                    _ => return Err(bad("0 (bytes) or 1 (UTF-8)")),
                };
            }
            "responseTopic" => {
                message.response_topic =
                    Some(value.as_str().ok_or_else(|| bad("a string"))?.into());
            }
            "correlationData" => {
                let data = value.as_str().ok_or_else(|| bad("a string"))?;
                message.correlation_data = Some(data.as_bytes().to_vec());
            }
            "userProperties" => {
                let pairs = value
                    .as_object()
                    .ok_or_else(|| bad("an object of string values"))?;
                for (key, value) in pairs {
                    let value = value
                        .as_str()
                        .ok_or_else(|| bad("an object of string values"))?;
                    message
                        .user_properties
                        .push((key.clone(), value.to_owned()));
                }
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "properties.{name} is not a publish property (messageExpiryInterval, \
                     contentType, payloadFormatIndicator, responseTopic, correlationData, \
                     userProperties)"
                )))
            }
        }
    }
    Ok(())
}

/// One publish request body.
fn parse(body: &Value) -> Result<OperatorPublish, ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::bad_request("a publish must be a JSON object"));
    };
    if let Some(key) = object.keys().find(|k| {
        !matches!(
            k.as_str(),
            "topic" | "payload" | "payloadEncoding" | "qos" | "retain" | "properties"
        )
    }) {
        return Err(ApiError::bad_request(format!(
            "'{key}' is not a field of a publish (topic, payload, payloadEncoding, qos, retain, properties)"
        )));
    }
    let topic = text(object, "topic")?
        .ok_or_else(|| ApiError::bad_request("Missing required field: topic"))?;
    let payload = text(object, "payload")?.unwrap_or("");
    let payload = match text(object, "payloadEncoding")?.unwrap_or("plain") {
        "plain" => payload.as_bytes().to_vec(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|_| ApiError::bad_request("payload is not valid base64"))?,
        other => {
            return Err(ApiError::bad_request(format!(
                "payloadEncoding '{other}' is not plain or base64"
            )))
        }
    };
    let qos = match object.get("qos") {
        None | Some(Value::Null) => 0,
        Some(value) => match value.as_u64() {
            Some(qos @ 0..=2) => qos as u8,
            _ => return Err(ApiError::bad_request("qos must be 0, 1 or 2")),
        },
    };
    let retain = match object.get("retain") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(retain)) => *retain,
        Some(_) => return Err(ApiError::bad_request("retain must be true or false")),
    };
    let mut message = OperatorPublish {
        topic: topic.to_owned(),
        payload,
        qos,
        retain,
        ..OperatorPublish::default()
    };
    properties(object.get("properties"), &mut message)?;
    Ok(message)
}

fn publish_one(state: &AppState, body: &Value) -> Result<Value, ApiError> {
    let message = parse(body)?;
    let topic = message.topic.clone();
    let subscribers = operator::publish(&state.broker, &state.bridge, &state.acl, message)?;
    Ok(json!({"topic": topic, "subscribers": subscribers}))
}

/// `POST /api/v1/publish` `{"topic", "payload"?, "payloadEncoding"?: "plain|base64", "qos"?,
/// "retain"?, "properties"?}` -> 200 `{"topic", "subscribers"}` (sessions it was delivered or
/// queued to).
#[utoipa::path(
    post,
    path = "/publish",
    tag = "messaging",
    summary = "Publish a message as a superuser would",
    request_body = s::PublishRequest,
    responses(
        (status = 200, description = "Published", body = s::PublishReply),
        (status = 507, description = "The retained message store is full.", body = ErrorBody)
    )
)]
pub async fn publish(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    publish_one(&state, &body).map(Json)
}

/// `POST /api/v1/publish/bulk` `[publish, ...]` (at most `publish_bulk_max`) -> 200 with one
/// answer per item, in order: `{"code":200,"topic","subscribers"}` or `{"code","message"}`.
#[utoipa::path(
    post,
    path = "/publish/bulk",
    tag = "messaging",
    summary = "Publish several messages",
    request_body = Vec<s::PublishRequest>,
    responses(
        (status = 200, description = "One answer per item, in order", body = Vec<s::PublishOutcome>)
    )
)]
pub async fn bulk(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let answers: Vec<Value> = bulk_items(&body, state.limits.publish_bulk_max)?
        .iter()
        .map(|item| bulk_answer(publish_one(&state, item)))
        .collect();
    Ok(Json(Value::Array(answers)))
}

/// The items of a bulk body: an array of 1..=`max`.
pub(super) fn bulk_items(body: &Value, max: usize) -> Result<&Vec<Value>, ApiError> {
    match body.as_array() {
        Some(items) if (1..=max).contains(&items.len()) => Ok(items),
        _ => Err(ApiError::bad_request(format!(
            "the body must be an array of 1..={max} items"
        ))),
    }
}

/// One item's answer in a bulk reply: its own answer with `code` 200, or `{code, message}`.
pub(super) fn bulk_answer(outcome: Result<Value, ApiError>) -> Value {
    match outcome {
        Ok(mut answer) => {
            answer["code"] = 200.into();
            answer
        }
        Err(e) => json!({"code": e.status.as_u16(), "message": e.message}),
    }
}
