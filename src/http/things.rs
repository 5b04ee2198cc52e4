//! Management API: the Thing registry, shadows (operator side) and history.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use thinghub_actors::service::EventQuery;
use thinghub_actors::thing::{Origin, RegisterThing, ShadowUpdate};
use thinghub_actors::ThingSummary;

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;

/// Body of `POST /api/v1/things`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"thingName": "sensor-2", "thingType": "thermostat", "attributes": {"room": "12"}}))]
pub struct CreateThing {
    thing_name: String,
    #[serde(default)]
    mqtt_client_id: Option<String>,
    #[serde(default)]
    thing_type: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[utoipa::path(
    post,
    path = "/things",
    tag = "things",
    summary = "Register a Thing",
    request_body = CreateThing,
    responses(
        (status = 201, description = "Registered", body = thinghub_actors::thing::ThingDescription, headers(("location" = String, description = "The new resource"))),
        (status = 409, description = "The Thing or its MQTT client id exists already.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateThing>,
) -> Result<Response, ApiError> {
    let description = state
        .things
        .register(
            &body.thing_name,
            RegisterThing {
                mqtt_client_id: body.mqtt_client_id,
                thing_type: body.thing_type,
                attributes: body.attributes,
            },
        )
        .await?;
    let location = format!("/api/v1/things/{}", description.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(description),
    )
        .into_response())
}

const PAGE_LIMIT_DEFAULT: usize = 100;

pub(super) fn page_limit(requested: Option<usize>, max: usize) -> Result<usize, ApiError> {
    match requested {
        None => Ok(PAGE_LIMIT_DEFAULT.min(max)),
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        Some(_) => Err(ApiError::bad_request(format!("limit must be 1..={max}"))),
    }
}

fn encode_cursor(name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
}

fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::bad_request("invalid cursor"))
}

/// Paging and filters of the Things listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListParams {
    /// Page size.
    limit: Option<usize>,
    /// The previous page's `nextCursor`.
    cursor: Option<String>,
    /// Only names that start with this.
    prefix: Option<String>,
    /// Only Things of this type.
    thing_type: Option<String>,
    /// Only members of this group.
    thing_group: Option<String>,
    /// Only Things whose MQTT client is connected (`true`) or not (`false`).
    online: Option<bool>,
}

/// Most registry records one filtered page reads; past it the page ends early with a
/// `nextCursor` (a bound on the cost of sparse filters).
pub const THINGS_SCAN_RECORDS_MAX: usize = 10_000;
/// Records read per step of a filtered scan.
const THINGS_SCAN_STEP: usize = 256;

/// Where a listing's candidates come from: the registry in name order, or a group's members.
enum Source<'a> {
    Registry,
    Group(&'a str),
}

impl Source<'_> {
    /// Up to `step` candidates after `after`, in name order.
    fn next(
        &self,
        state: &AppState,
        after: Option<&str>,
        step: usize,
    ) -> Result<Vec<ThingSummary>, ApiError> {
        match self {
            Source::Registry => Ok(state.things.list(after, step)?),
            Source::Group(group) => {
                let names = state.groups.members(group, after, step)?;
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    match state.things.summary(&name)? {
                        Some(summary) => out.push(summary),
                        // A member deleted since: a placeholder keeps the scan moving.
                        None => out.push(ThingSummary {
                            name,
                            mqtt_client_id: String::new(),
                            thing_type: None,
                            created_at_ms: 0,
                        }),
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Whether the Thing's own MQTT client is connected now.
fn is_online(state: &AppState, summary: &ThingSummary) -> bool {
    !summary.mqtt_client_id.is_empty()
        && state
            .broker
            .thing_connected(&summary.mqtt_client_id, &summary.name)
}

#[utoipa::path(
    get,
    path = "/things",
    tag = "things",
    summary = "List Things, optionally filtered by name prefix, type, group and online status",
    params(ListParams),
    responses(
        (status = 200, description = "A page of Things. With filters, a page may hold fewer than `limit` and still have a `nextCursor` (at most 10,000 records are read per page).", body = s::ThingPage),
        (status = 400, description = "A parameter is invalid.", body = ErrorBody),
        (status = 404, description = "No such group.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let mut after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let prefix = params.prefix.as_deref().filter(|p| !p.is_empty());
    let source = match params.thing_group.as_deref() {
        Some(group) => Source::Group(group),
        None => Source::Registry,
    };
    // Each kept Thing with whether it is online (looked up once).
    let mut items: Vec<(ThingSummary, bool)> = Vec::new();
    let keep = |summary: &ThingSummary| {
        let wanted = !summary.mqtt_client_id.is_empty()
            && params
                .thing_type
                .as_ref()
                .is_none_or(|t| summary.thing_type.as_ref() == Some(t));
        let online = wanted.then(|| is_online(&state, summary))?;
        params.online.is_none_or(|o| o == online).then_some(online)
    };
    // The names with the prefix start at the prefix itself, then follow it in order.
    if let (Some(prefix), None, Source::Registry) = (prefix, &after, &source) {
        if let Some(summary) = state.things.summary(prefix).ok().flatten() {
            if let Some(online) = keep(&summary) {
                items.push((summary, online));
            }
        }
        after = Some(prefix.to_owned());
    }
    // Unfiltered, one read of a page and one more (to know whether another page follows).
    let filtered = prefix.is_some()
        || params.thing_type.is_some()
        || params.online.is_some()
        || matches!(source, Source::Group(_));
    let step = if filtered {
        THINGS_SCAN_STEP
    } else {
        limit + 1
    };
    let mut scanned = 0;
    let mut next = None;
    'scan: loop {
        let batch = source.next(&state, after.as_deref(), step)?;
        let exhausted = batch.len() < step;
        for summary in batch {
            scanned += 1;
            after = Some(summary.name.clone());
            if let Some(prefix) = prefix {
                if !summary.name.starts_with(prefix) {
                    if summary.name.as_str() > prefix {
                        // Past every name with the prefix (the registry is in name order).
                        break 'scan;
                    }
                    continue;
                }
            }
            if let Some(online) = keep(&summary) {
                items.push((summary, online));
                if items.len() > limit {
                    items.truncate(limit);
                    next = items.last().map(|(last, _)| encode_cursor(&last.name));
                    break 'scan;
                }
            }
            if scanned >= THINGS_SCAN_RECORDS_MAX {
                next = after.as_deref().map(encode_cursor);
                break 'scan;
            }
        }
        if exhausted {
            break;
        }
    }
    let items: Vec<Value> = items
        .into_iter()
        .map(|(summary, online)| {
            let mut item = json!(summary);
            item["online"] = json!(online);
            item
        })
        .collect();
    Ok(Json(json!({"items": items, "nextCursor": next})))
}

#[utoipa::path(
    get,
    path = "/things/{name}",
    tag = "things",
    summary = "Describe a Thing",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    responses(
        (status = 200, description = "The Thing", body = s::ThingView),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn describe(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let description = state.things.describe(&name).await?;
    let mut body = json!(description);
    body["thingGroups"] = json!(state.groups.of_thing(&name, state.limits.list_limit_max)?);
    Ok(Json(body))
}

#[utoipa::path(
    delete,
    path = "/things/{name}",
    tag = "things",
    summary = "Delete a Thing (its history stays)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    // Its device certificates go first: a crash in between leaves a Thing without them (its
    // device refused until an operator registers one again), never certificates that would
    // let a device in as a new Thing of the same name.
    // Under the registry's edit lock: no registration can slip in between.
    let _edit = state.users.certificates().edit().await;
    let removed = state
        .users
        .certificates()
        .remove_all(&name)
        .await
        .map_err(ApiError::from)?;
    if removed > 0 {
        tracing::info!(thing = %name, removed, "device certificates removed with their Thing");
    }
    // The device acting as this Thing loses its session: an effect of the deletion.
    state.things.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/things/bulk`: the path of bulk registration also names the Thing "bulk".
#[utoipa::path(
    get,
    path = "/things/bulk",
    tag = "things",
    summary = "Describe the Thing named bulk",
    responses(
        (status = 200, description = "The Thing", body = s::ThingView),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn describe_bulk(state: State<AppState>) -> Result<Json<Value>, ApiError> {
    describe(state, Path("bulk".to_owned())).await
}

/// `DELETE /api/v1/things/bulk`: the Thing named "bulk".
#[utoipa::path(
    delete,
    path = "/things/bulk",
    tag = "things",
    summary = "Delete the Thing named bulk",
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn delete_bulk(state: State<AppState>) -> Result<StatusCode, ApiError> {
    delete(state, Path("bulk".to_owned())).await
}

#[utoipa::path(
    get,
    path = "/things/{name}/shadow",
    tag = "shadows",
    summary = "Get the shadow",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    responses(
        (status = 200, description = "The shadow document", body = s::ShadowDocument),
        (status = 404, description = "No such Thing, or it has no shadow.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn get_shadow(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let document = state.things.get_shadow(&name).await?;
    Ok(Json(document.to_json(None)))
}

#[utoipa::path(
    post,
    path = "/things/{name}/shadow",
    tag = "shadows",
    summary = "Update the shadow (durable when answered)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1")),
    request_body = s::ShadowUpdateRequest,
    responses(
        (status = 200, description = "Accepted: the sections updated, the new version", body = s::ShadowDocument),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 409, description = "Version conflict.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn update_shadow(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let update = ShadowUpdate::from_json(&body, &state.limits.shadow)?;
    // Durable when it returns; the desired change, the delta and `update/accepted` are the
    // Thing's effects, on their way whatever happens to this request now.
    let result = state
        .things
        .update_shadow(&name, update, Origin::Operator)
        .await?;
    Ok(super::json_text(&result.accepted))
}

/// Optional body of a shadow deletion.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct DeleteShadowParams {
    client_token: Option<String>,
}

#[utoipa::path(
    delete,
    path = "/things/{name}/shadow",
    tag = "shadows",
    summary = "Delete the shadow (the version is kept)",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), DeleteShadowParams),
    responses(
        (status = 200, description = "Deleted", body = s::ShadowDeleted),
        (status = 404, description = "No such Thing, or it has no shadow.", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this Thing.", body = ErrorBody),
        (status = 503, description = "The Thing or storage did not answer in time, or is unavailable.", body = ErrorBody)
    )
)]
pub async fn delete_shadow(
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<DeleteShadowParams>,
) -> Result<Json<Value>, ApiError> {
    let reply = state
        .things
        .delete_shadow(&name, params.client_token, Origin::Operator)
        .await?;
    Ok(Json(reply))
}

/// History paging.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryParams {
    /// Oldest first: the first seq to read.
    from_seq: Option<u64>,
    /// Page size.
    limit: Option<usize>,
    /// `oldest` (the default: from `fromSeq` on) or `newest` (backwards from `beforeSeq`).
    order: Option<HistoryOrder>,
    /// Newest first: read entries below this seq (the previous page's `nextBeforeSeq`).
    before_seq: Option<u64>,
    /// Only entries of this type (`ShadowUpdated`, `CommandSent`...).
    #[serde(rename = "type")]
    event_type: Option<String>,
}

/// Which way a history page reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HistoryOrder {
    /// From the first entry on.
    Oldest,
    /// From the last entry back.
    Newest,
}

#[utoipa::path(
    get,
    path = "/things/{name}/history",
    tag = "things",
    summary = "Read the audit history, oldest first, or newest first filtered by type",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), HistoryParams),
    responses(
        (status = 200, description = "A page of history", body = s::HistoryPage),
        (status = 404, description = "The Thing has no history.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn history(
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<HistoryParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    if params.order == Some(HistoryOrder::Newest) {
        if params.from_seq.is_some() {
            return Err(ApiError::bad_request(
                "fromSeq reads oldest first; with order=newest, page with beforeSeq",
            ));
        }
        let (items, next) = state.things.history_rev(
            &name,
            params.event_type.as_deref(),
            params.before_seq,
            limit,
        )?;
        return Ok(Json(json!({"items": items, "nextBeforeSeq": next})));
    }
    if params.before_seq.is_some() || params.event_type.is_some() {
        return Err(ApiError::bad_request(
            "beforeSeq and type apply to order=newest",
        ));
    }
    let from_seq = params.from_seq.unwrap_or(1);
    let mut items = state.things.history(&name, from_seq, limit + 1)?;
    let next = (items.len() > limit).then(|| {
        items.truncate(limit);
        items.last().map(|last| last.seq + 1)
    });
    Ok(Json(json!({"items": items, "nextFromSeq": next.flatten()})))
}

/// Events listing parameters (times in Unix ms).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsParams {
    #[serde(rename = "type")]
    event_type: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<usize>,
    cursor: Option<u64>,
}

/// `GET /api/v1/things/{name}/events?type&since&until&limit&cursor`: newest first.
#[utoipa::path(
    get,
    path = "/things/{name}/events",
    tag = "events",
    summary = "List device events, newest first",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), EventsParams),
    responses(
        (status = 200, description = "A page of events", body = s::EventPage),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn events(
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<EventsParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let query = EventQuery {
        event_type: params.event_type,
        since_ms: params.since,
        until_ms: params.until,
        before_seq: params.cursor,
    };
    let page = state.things.events(&name, &query, limit)?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|(seq, event)| event.to_json(Some(*seq)))
        .collect();
    Ok(Json(
        json!({"items": items, "nextCursor": page.next_before_seq}),
    ))
}

/// Measurements listing parameters (times in Unix ms).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MeasurementsParams {
    /// Only values of this fragment (`c8y_Temperature`).
    fragment: Option<String>,
    /// Only values of this series (`T`).
    series: Option<String>,
    /// Measured at or after this.
    since: Option<u64>,
    /// Measured at or before this.
    until: Option<u64>,
    limit: Option<usize>,
    /// The previous page's `nextCursor`.
    cursor: Option<u64>,
}

/// `GET /api/v1/things/{name}/measurements?fragment&series&since&until&limit&cursor`: newest
/// first, each with the values the filters keep.
#[utoipa::path(
    get,
    path = "/things/{name}/measurements",
    tag = "events",
    summary = "List device measurements, newest first",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"), MeasurementsParams),
    responses(
        (status = 200, description = "A page of measurements", body = s::MeasurementPage),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn measurements(
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<MeasurementsParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let query = thinghub_actors::service::MeasurementQuery {
        fragment: params.fragment,
        series: params.series,
        since_ms: params.since,
        until_ms: params.until,
        before_seq: params.cursor,
    };
    let page = state.things.measurements(&name, &query, limit)?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|(seq, m)| {
            json!({
                "seq": seq,
                "type": m.measurement_type,
                "time": m.time_ms,
                "recordedAt": m.at_ms,
                "values": m.values,
            })
        })
        .collect();
    Ok(Json(
        json!({"items": items, "nextCursor": page.next_before_seq}),
    ))
}

/// Connectivity history parameters (times in Unix ms).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConnectivityParams {
    /// Connections that were live at or after this.
    since: Option<u64>,
    /// Connections that began at or before this.
    until: Option<u64>,
    limit: Option<usize>,
    /// The previous page's `nextCursor`.
    cursor: Option<u64>,
}

/// `GET /api/v1/things/{name}/connectivity?since&until&limit&cursor`: newest first.
#[utoipa::path(
    get,
    path = "/things/{name}/connectivity",
    tag = "things",
    summary = "The device's connections from the Thing's log, newest first, with reasons and durations",
    params(
        ("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "sensor-1"),
        ConnectivityParams
    ),
    responses(
        (status = 200, description = "A page of connections", body = s::ConnectionPage),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn connectivity(
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<ConnectivityParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let page = state
        .things
        .connections(&name, params.since, params.until, params.cursor, limit)?;
    Ok(Json(
        json!({"items": page.items, "nextCursor": page.next_before_seq}),
    ))
}

/// Paging of a device's children.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ChildrenParams {
    limit: Option<usize>,
    /// The previous page's `nextCursor`.
    cursor: Option<String>,
}

/// `GET /api/v1/things/{name}/children?limit&cursor`: the child devices a Cumulocity device
/// created (template 101), in id order. A child whose Thing was deleted (or replaced) is left
/// out, so a page may hold fewer than `limit` and still have a `nextCursor`.
#[utoipa::path(
    get,
    path = "/things/{name}/children",
    tag = "things",
    summary = "List a device's child devices",
    params(("name" = String, Path, description = "Thing name: 1..=128 of [a-zA-Z0-9:_-]", example = "gateway-1"), ChildrenParams),
    responses(
        (status = 200, description = "A page of children", body = s::ChildPage),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 503, description = "Storage unavailable.", body = ErrorBody)
    )
)]
pub async fn children(
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<ChildrenParams>,
) -> Result<Json<Value>, ApiError> {
    state.things.ensure_registered(&name)?;
    let limit = page_limit(params.limit, state.limits.list_limit_max)?;
    let (page, next) = state
        .children
        .page(&name, params.cursor.as_deref(), limit)
        .map_err(|e| {
            tracing::error!(thing = %name, error = %e, "child links unreadable");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
        })?;
    let items: Vec<Value> = page
        .into_iter()
        .map(|child| json!({"id": child.id, "thingName": child.thing}))
        .collect();
    Ok(Json(json!({"items": items, "nextCursor": next})))
}
