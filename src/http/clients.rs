//! `/api/v1/clients`: MQTT sessions (connected or persistent), one client, kick, and proxy
//! subscriptions (under the session user's ACL).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;
use crate::mqtt::operator::{self, ProxyError, ProxySubscription};

/// Paging by client id.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ClientsPage {
    limit: Option<usize>,
    /// The last client id of the previous page.
    after: Option<String>,
}

/// Default page size.
const CLIENTS_PAGE_DEFAULT: usize = 100;

#[utoipa::path(
    get,
    path = "/clients",
    tag = "clients",
    summary = "List MQTT sessions",
    params(ClientsPage),
    responses(
        (status = 200, description = "A page of sessions", body = s::ClientPage)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    QueryParams(page): QueryParams<ClientsPage>,
) -> Result<Json<Value>, ApiError> {
    let max = state.limits.list_limit_max;
    let limit = match page.limit {
        None => CLIENTS_PAGE_DEFAULT.min(max),
        Some(limit) if (1..=max).contains(&limit) => limit,
        Some(_) => return Err(ApiError::bad_request(format!("limit must be 1..={max}"))),
    };
    let mut items = state.broker.clients(page.after.as_deref(), limit + 1);
    let next = (items.len() > limit).then(|| {
        items.truncate(limit);
        items.last().map(|c| c.client_id.clone())
    });
    Ok(Json(json!({"items": items, "nextAfter": next.flatten()})))
}

fn unknown(client_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("client '{client_id}' not found"),
    )
}

#[utoipa::path(
    get,
    path = "/clients/{client_id}",
    tag = "clients",
    summary = "Get an MQTT session",
    params(("client_id" = String, Path, description = "MQTT client id", example = "sensor-1")),
    responses(
        (status = 200, description = "The session", body = crate::mqtt::broker::ClientView),
        (status = 404, description = "No such session.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let client = state
        .broker
        .client(&client_id)
        .ok_or_else(|| unknown(&client_id))?;
    Ok(Json(json!(client)))
}

/// Kick: the connection is closed (reason "kicked"; v5 clients get DISCONNECT 0x98) and the
/// session discarded.
#[utoipa::path(
    delete,
    path = "/clients/{client_id}",
    tag = "clients",
    summary = "Disconnect a client and discard its session",
    params(("client_id" = String, Path, description = "MQTT client id", example = "sensor-1")),
    responses(
        (status = 204, description = "Kicked"),
        (status = 404, description = "No such session.", body = ErrorBody)
    )
)]
pub async fn kick(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.broker.kick(&client_id) {
        tracing::info!(%client_id, "client kicked by an operator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown(&client_id))
    }
}

impl From<ProxyError> for ApiError {
    fn from(e: ProxyError) -> Self {
        let status = match e {
            ProxyError::Filter { .. } | ProxyError::Qos | ProxyError::RetainHandling => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::NoSession(_) => StatusCode::NOT_FOUND,
            ProxyError::NotAuthorized { .. } => StatusCode::FORBIDDEN,
            ProxyError::TooManySubscriptions { .. } => StatusCode::CONFLICT,
            ProxyError::NotDurable | ProxyError::UnsubscribeNotDurable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError::new(status, e.to_string())
    }
}

fn topic_of(object: &Map<String, Value>) -> Result<String, ApiError> {
    match object.get("topic") {
        Some(Value::String(topic)) => Ok(topic.clone()),
        Some(_) => Err(ApiError::bad_request("topic must be a string")),
        None => Err(ApiError::bad_request("Missing required field: topic")),
    }
}

/// One subscription request: `{"topic", "qos"?, "noLocal"?, "retainAsPublished"?,
/// "retainHandling"?}`.
fn subscription(body: &Value) -> Result<ProxySubscription, ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::bad_request(
            "a subscription must be a JSON object",
        ));
    };
    if let Some(key) = object.keys().find(|k| {
        !matches!(
            k.as_str(),
            "topic" | "qos" | "noLocal" | "retainAsPublished" | "retainHandling"
        )
    }) {
        return Err(ApiError::bad_request(format!(
            "'{key}' is not a field of a subscription (topic, qos, noLocal, retainAsPublished, retainHandling)"
        )));
    }
    let small = |name: &str, max: u64| -> Result<u8, ApiError> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(value) => value
                .as_u64()
                .filter(|n| *n <= max)
                .map(|n| n as u8)
                .ok_or_else(|| ApiError::bad_request(format!("{name} must be 0..={max}"))),
        }
    };
    let flag = |name: &str| -> Result<bool, ApiError> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(flag)) => Ok(*flag),
            Some(_) => Err(ApiError::bad_request(format!(
                "{name} must be true or false"
            ))),
        }
    };
    Ok(ProxySubscription {
        filter: topic_of(object)?,
        qos: small("qos", 2)?,
        no_local: flag("noLocal")?,
        retain_as_published: flag("retainAsPublished")?,
        retain_handling: small("retainHandling", 2)?,
    })
}

fn durable_wait(state: &AppState) -> Duration {
    state.limits.subscribe_durable_wait
}

async fn subscribe_one(state: &AppState, client_id: &str, body: &Value) -> Result<Value, ApiError> {
    let request = subscription(body)?;
    let (topic, qos) = (request.filter.clone(), request.qos);
    let new = operator::subscribe(
        &state.broker,
        &state.acl,
        client_id,
        request,
        durable_wait(state),
    )
    .await?;
    Ok(json!({"clientId": client_id, "topic": topic, "qos": qos, "new": new}))
}

async fn unsubscribe_one(
    state: &AppState,
    client_id: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::bad_request(
            "an unsubscription must be a JSON object",
        ));
    };
    if let Some(key) = object.keys().find(|k| k.as_str() != "topic") {
        return Err(ApiError::bad_request(format!(
            "'{key}' is not a field of an unsubscription (topic)"
        )));
    }
    let topic = topic_of(object)?;
    let removed =
        operator::unsubscribe(&state.broker, client_id, &topic, durable_wait(state)).await?;
    if !removed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("client '{client_id}' has no subscription '{topic}'"),
        ));
    }
    Ok(json!({"clientId": client_id, "topic": topic}))
}

/// Each item of a bulk body, answered in order.
async fn each(
    state: &AppState,
    client_id: &str,
    body: &Value,
    subscribe: bool,
) -> Result<Json<Value>, ApiError> {
    let items = super::publish::bulk_items(body, state.limits.publish_bulk_max)?;
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        let outcome = if subscribe {
            subscribe_one(state, client_id, item).await
        } else {
            unsubscribe_one(state, client_id, item).await
        };
        answers.push(super::publish::bulk_answer(outcome));
    }
    Ok(Json(Value::Array(answers)))
}

/// `POST /api/v1/clients/{clientId}/subscribe` `{"topic", "qos"?, "noLocal"?,
/// "retainAsPublished"?, "retainHandling"?}`: the session (connected or persistent) subscribes
/// as its own SUBSCRIBE would, under its user's ACL (403 if its user may not).
#[utoipa::path(
    post,
    path = "/clients/{client_id}/subscribe",
    tag = "messaging",
    summary = "Subscribe a session (its user's ACL applies)",
    params(("client_id" = String, Path, description = "MQTT client id", example = "sensor-1")),
    request_body = s::SubscribeRequest,
    responses(
        (status = 200, description = "Subscribed", body = s::SubscribeReply),
        (status = 409, description = "The session holds mqtt_session_subscriptions_max subscriptions.", body = ErrorBody),
        (status = 404, description = "No such session (connected or persistent).", body = ErrorBody),
        (status = 503, description = "The change could not be made durable in time.", body = ErrorBody)
    )
)]
pub async fn subscribe(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    subscribe_one(&state, &client_id, &body).await.map(Json)
}

/// `POST /api/v1/clients/{clientId}/unsubscribe` `{"topic"}` (404 if it had no such
/// subscription).
#[utoipa::path(
    post,
    path = "/clients/{client_id}/unsubscribe",
    tag = "messaging",
    summary = "Unsubscribe a session",
    params(("client_id" = String, Path, description = "MQTT client id", example = "sensor-1")),
    request_body = s::UnsubscribeRequest,
    responses(
        (status = 200, description = "Unsubscribed", body = s::UnsubscribeReply),
        (status = 404, description = "No such session (connected or persistent).", body = ErrorBody),
        (status = 503, description = "The change could not be made durable in time.", body = ErrorBody)
    )
)]
pub async fn unsubscribe(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    unsubscribe_one(&state, &client_id, &body).await.map(Json)
}

/// `POST /api/v1/clients/{clientId}/subscribe/bulk` `[subscription, ...]`: answered in order.
#[utoipa::path(
    post,
    path = "/clients/{client_id}/subscribe/bulk",
    tag = "messaging",
    summary = "Subscribe a session to several filters",
    params(("client_id" = String, Path, description = "MQTT client id", example = "sensor-1")),
    request_body = Vec<s::SubscribeRequest>,
    responses(
        (status = 200, description = "One answer per item, in order", body = Vec<s::SubscribeOutcome>)
    )
)]
pub async fn subscribe_bulk(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    each(&state, &client_id, &body, true).await
}

/// `POST /api/v1/clients/{clientId}/unsubscribe/bulk` `[{"topic"}, ...]`: answered in order.
#[utoipa::path(
    post,
    path = "/clients/{client_id}/unsubscribe/bulk",
    tag = "messaging",
    summary = "Unsubscribe a session from several filters",
    params(("client_id" = String, Path, description = "MQTT client id", example = "sensor-1")),
    request_body = Vec<s::UnsubscribeRequest>,
    responses(
        (status = 200, description = "One answer per item, in order", body = Vec<s::UnsubscribeOutcome>)
    )
)]
pub async fn unsubscribe_bulk(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    each(&state, &client_id, &body, false).await
}

/// Query of `GET /api/v1/subscriptions`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubscriptionsQuery {
    client_id: Option<String>,
    /// Exactly this filter.
    topic: Option<String>,
    /// Filters that match this topic name.
    #[serde(rename = "match")]
    matching: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// A subscriptions cursor: the last (client id, filter), base64url (a NUL cannot occur in
/// either: MQTT strings may not contain it).
fn subscriptions_cursor(client_id: &str, topic: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{client_id}\0{topic}"))
}

fn parse_subscriptions_cursor(cursor: &str) -> Result<(String, String), ApiError> {
    let bad = || ApiError::bad_request("cursor is not one this listing returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (client_id, topic) = text.split_once('\0').ok_or_else(bad)?;
    Ok((client_id.to_owned(), topic.to_owned()))
}

/// `GET /api/v1/subscriptions?clientId&topic&match&limit&cursor`: every session's
/// subscriptions (fleet-wide), in (client id, filter) order; `match` keeps the filters that
/// match a topic name.
#[utoipa::path(
    get,
    path = "/subscriptions",
    tag = "clients",
    summary = "List subscriptions fleet-wide",
    params(SubscriptionsQuery),
    responses(
        (status = 200, description = "A page of subscriptions", body = s::SubscriptionPage)
    )
)]
pub async fn subscriptions(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<SubscriptionsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::things::page_limit(query.limit, state.limits.list_limit_max)?;
    if let Some(topic) = &query.matching {
        crate::mqtt::topic::validate_topic_name(topic).map_err(|e| {
            ApiError::bad_request(format!("match '{topic}' is not a topic name: {e}"))
        })?;
    }
    let after = query
        .cursor
        .as_deref()
        .map(parse_subscriptions_cursor)
        .transpose()?;
    let items = state.broker.subscriptions(
        query.client_id.as_deref(),
        query.topic.as_deref(),
        query.matching.as_deref(),
        after.as_ref().map(|(c, t)| (c.as_str(), t.as_str())),
        limit,
    );
    let next = (items.len() == limit)
        .then(|| {
            items
                .last()
                .map(|s| subscriptions_cursor(&s.client_id, &s.topic))
        })
        .flatten();
    Ok(Json(json!({"items": items, "nextCursor": next})))
}

/// Query of `GET /api/v1/topics`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TopicsQuery {
    limit: Option<usize>,
    /// The last topic of the previous page.
    cursor: Option<String>,
}

/// `GET /api/v1/topics?limit&cursor`: topics with a retained message or a live subscription
/// (its filter), in order, each with `retained` and `subscriptions`.
#[utoipa::path(
    get,
    path = "/topics",
    tag = "clients",
    summary = "List topics with retained messages or subscriptions",
    params(TopicsQuery),
    responses(
        (status = 200, description = "A page of topics", body = s::TopicPage)
    )
)]
pub async fn topics(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<TopicsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::things::page_limit(query.limit, state.limits.list_limit_max)?;
    let items = state.broker.topics(query.cursor.as_deref(), limit);
    let next = (items.len() == limit)
        .then(|| items.last().map(|t| t.topic.clone()))
        .flatten();
    Ok(Json(json!({"items": items, "nextCursor": next})))
}
