//! Management API: offline alarm rules and alarms.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use thinghub_actors::alarms::{AlarmFilter, NewRule};
use thinghub_actors::thing::{AlarmSeverity, AlarmStatus};

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::things::page_limit;
use super::AppState;
use crate::auth::Principal;

const RULE_FIELDS: [&str; 5] = [
    "name",
    "offlineForSeconds",
    "thingType",
    "thingGroup",
    "severity",
];

fn optional_string(body: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ApiError::bad_request(format!("{field} must be a string"))),
    }
}

fn parse_rule(body: &Value) -> Result<NewRule, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::bad_request("Payload must be a JSON object"));
    };
    if let Some(key) = body.keys().find(|k| !RULE_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "'{key}' is not a field of an alarm rule (fields: {})",
            RULE_FIELDS.join(", ")
        )));
    }
    let name = optional_string(body, "name")?
        .ok_or_else(|| ApiError::bad_request("Missing required field: name"))?;
    let offline_for_seconds = match body.get("offlineForSeconds") {
        Some(value) => value
            .as_u64()
            .ok_or_else(|| ApiError::bad_request("offlineForSeconds must be a positive integer"))?,
        None => {
            return Err(ApiError::bad_request(
                "Missing required field: offlineForSeconds",
            ))
        }
    };
    let severity = match optional_string(body, "severity")? {
        None => return Err(ApiError::bad_request("Missing required field: severity")),
        Some(text) => AlarmSeverity::parse(&text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "severity '{text}' must be one of CRITICAL, MAJOR, MINOR, WARNING"
            ))
        })?,
    };
    Ok(NewRule {
        name,
        offline_for_seconds,
        thing_type: optional_string(body, "thingType")?,
        thing_group: optional_string(body, "thingGroup")?,
        severity,
    })
}

/// `POST /api/v1/alarm-rules` -> 201. Things already offline long enough get the alarm too
/// (a background sweep asks each Thing the rule can apply to).
#[utoipa::path(
    post,
    path = "/alarm-rules",
    tag = "alarms",
    summary = "Create an offline alarm rule",
    request_body = s::CreateAlarmRuleRequest,
    responses(
        (status = 201, description = "Created", body = thinghub_actors::alarms::AlarmRule, headers(("location" = String, description = "The new resource"))),
        (status = 409, description = "A rule of that name exists, or alarm_rules_max rules do.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn create_rule(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let rule = parse_rule(&body)?;
    let rule = state.alarms.create(rule, state.things.now_ms()).await?;
    Ok((
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/api/v1/alarm-rules/{}", rule.name),
        )],
        Json(rule),
    )
        .into_response())
}

/// `GET /api/v1/alarm-rules`: every rule, in name order (at most `alarm_rules_max`).
#[utoipa::path(
    get,
    path = "/alarm-rules",
    tag = "alarms",
    summary = "List the offline alarm rules",
    responses((status = 200, description = "The rules", body = s::AlarmRuleList))
)]
pub async fn list_rules(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "items": state.alarms.rules() }))
}

/// `GET /api/v1/alarm-rules/{name}`.
#[utoipa::path(
    get,
    path = "/alarm-rules/{name}",
    tag = "alarms",
    summary = "Get an offline alarm rule",
    params(("name" = String, Path, description = "Rule name", example = "offline-10m")),
    responses(
        (status = 200, description = "The rule", body = thinghub_actors::alarms::AlarmRule),
        (status = 404, description = "No such rule.", body = ErrorBody)
    )
)]
pub async fn get_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.alarms.rule(&name)?)))
}

/// `DELETE /api/v1/alarm-rules/{name}` -> 204: no new alarm comes from it; raised ones stay
/// until they are cleared.
#[utoipa::path(
    delete,
    path = "/alarm-rules/{name}",
    tag = "alarms",
    summary = "Delete an offline alarm rule",
    params(("name" = String, Path, description = "Rule name", example = "offline-10m")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such rule.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn delete_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.alarms.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Filters and paging of the fleet-wide listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlarmParams {
    /// `ACTIVE`, `ACKNOWLEDGED` or `CLEARED`.
    status: Option<String>,
    /// `CRITICAL`, `MAJOR`, `MINOR` or `WARNING`.
    severity: Option<String>,
    /// Page size.
    limit: Option<usize>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /api/v1/alarms?status&severity&limit&cursor`: every Thing's alarms (the latest of each
/// type per Thing), in Thing name order. A page may hold fewer than `limit` items and still
/// have a `nextCursor` (a page reads at most `alarm_list_scan_max` entries): follow it until
/// it is null.
#[utoipa::path(
    get,
    path = "/alarms",
    tag = "alarms",
    summary = "List alarms fleet-wide",
    params(AlarmParams),
    responses(
        (status = 200, description = "A page of alarms", body = s::AlarmPage),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<AlarmParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let status = match params.status.as_deref() {
        None => None,
        Some(text) => Some(AlarmStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status '{text}' must be one of ACTIVE, ACKNOWLEDGED, CLEARED"
            ))
        })?),
    };
    let severity = match params.severity.as_deref() {
        None => None,
        Some(text) => Some(AlarmSeverity::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "severity '{text}' must be one of CRITICAL, MAJOR, MINOR, WARNING"
            ))
        })?),
    };
    let page = state.alarms.list(
        AlarmFilter { status, severity },
        params.cursor.as_deref(),
        limit,
    )?;
    Ok(Json(
        json!({"items": page.alarms, "nextCursor": page.next_cursor}),
    ))
}

/// `GET /api/v1/things/{name}/alarms`: the Thing's alarms, every type, cleared ones too.
#[utoipa::path(
    get,
    path = "/things/{name}/alarms",
    tag = "alarms",
    summary = "A Thing's alarms",
    params(("name" = String, Path, description = "Thing name", example = "sensor-1")),
    responses(
        (status = 200, description = "Its alarms", body = s::AlarmList),
        (status = 404, description = "No such Thing.", body = ErrorBody)
    )
)]
pub async fn of_thing(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.things.ensure_registered(&name)?;
    Ok(Json(json!({"items": state.alarms.of_thing(&name)?})))
}

/// `POST /api/v1/things/{name}/alarms/{type}/acknowledge`: ACTIVE -> ACKNOWLEDGED (again:
/// unchanged; a cleared alarm: 409).
#[utoipa::path(
    post,
    path = "/things/{name}/alarms/{type}/acknowledge",
    tag = "alarms",
    summary = "Acknowledge an alarm",
    params(
        ("name" = String, Path, description = "Thing name", example = "sensor-1"),
        ("type" = String, Path, description = "Alarm type (the rule's name)", example = "offline-10m")
    ),
    responses(
        (status = 200, description = "The alarm", body = thinghub_actors::thing::Alarm),
        (status = 404, description = "No such Thing or alarm.", body = ErrorBody),
        (status = 409, description = "The alarm is cleared.", body = ErrorBody)
    )
)]
pub async fn acknowledge(
    state: State<AppState>,
    principal: Extension<Principal>,
    path: Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    alarm_action(state, principal, path, false).await
}

/// `POST /api/v1/things/{name}/alarms/{type}/clear`: ends an open alarm (again: unchanged).
#[utoipa::path(
    post,
    path = "/things/{name}/alarms/{type}/clear",
    tag = "alarms",
    summary = "Clear an alarm",
    params(
        ("name" = String, Path, description = "Thing name", example = "sensor-1"),
        ("type" = String, Path, description = "Alarm type (the rule's name)", example = "offline-10m")
    ),
    responses(
        (status = 200, description = "The alarm", body = thinghub_actors::thing::Alarm),
        (status = 404, description = "No such Thing or alarm.", body = ErrorBody)
    )
)]
pub async fn clear(
    state: State<AppState>,
    principal: Extension<Principal>,
    path: Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    alarm_action(state, principal, path, true).await
}

/// Acknowledges (or clears) an alarm as the calling key.
async fn alarm_action(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((name, alarm_type)): Path<(String, String)>,
    clear: bool,
) -> Result<Json<Value>, ApiError> {
    let alarm = state
        .things
        .alarm_action(&name, &alarm_type, &principal.key, clear)
        .await?;
    Ok(Json(json!(alarm)))
}
