//! `/api/v1/clients`: MQTT sessions (connected or persistent), one client, and kick.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::QueryParams;
use super::AppState;

/// Paging by client id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsPage {
    limit: Option<usize>,
    /// The last client id of the previous page.
    after: Option<String>,
}

/// Default page size.
const CLIENTS_PAGE_DEFAULT: usize = 100;

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
