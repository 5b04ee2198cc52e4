//! The HTTP frontend (axum): management API, device ThingDatas API and health.
//!
//! Handlers parse and authorize, call [`Things`], and render; they hold no state. The router is
//! built by [`app`] so tests can drive it without a socket.

mod api_keys;
pub mod auth;
mod authorization;
pub mod bulk;
mod clients;
mod commands;
mod devices;
pub mod error;
pub mod extract;
mod groups;
mod jobs;
pub mod listener;
mod metrics;
pub mod ndjson;
mod publish;
pub mod stats;
mod things;
mod users;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use thinghub_actors::thing::{CommandLimits, EventLimits, ShadowLimits};
use thinghub_actors::Things;

use crate::auth::ApiKeys;
use crate::mqtt::acl::Acl;
use crate::mqtt::broker::Broker;
use crate::mqtt::DeviceStats;
use crate::throttle::AuthThrottle;
use crate::users::MqttUsers;
use error::ApiError;

/// Bounds the HTTP layer applies itself.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body.
    pub body_bytes_max: usize,
    /// Largest page of a listing.
    pub list_limit_max: usize,
    /// Shadow bounds (for parsing requests).
    pub shadow: ShadowLimits,
    /// Event bounds.
    pub events: EventLimits,
    /// Command bounds.
    pub commands: CommandLimits,
    /// Job execution bounds.
    pub jobs: thinghub_actors::thing::jobs::JobLimits,
    /// Most lines one bulk registration reads.
    pub bulk_lines_max: usize,
    /// Most items in one bulk publish, subscribe or unsubscribe.
    pub publish_bulk_max: usize,
    /// How long a proxy subscription change on a persistent session waits to be durable.
    pub subscribe_durable_wait: std::time::Duration,
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The Things service.
    pub things: Things,
    /// Fleet jobs.
    pub jobs: thinghub_actors::job_manager::JobManager,
    /// Thing groups.
    pub groups: thinghub_actors::groups::Groups,
    /// Device requests refused over MQTT (metrics).
    pub device_stats: Arc<DeviceStats>,
    /// The outbox (metrics: effects delivered and recovered, the cursor).
    pub outbox: Arc<thinghub_actors::outbox::Outbox>,
    /// Stored MQTT state (metrics).
    pub persistence: Arc<crate::mqtt::persist::Persistence>,
    /// The MQTT broker (clients API).
    pub broker: Arc<Broker>,
    /// Counter samples for `/api/v1/stats`.
    pub stats: Arc<stats::StatsHistory>,
    /// The device bridge (which topics are a Thing's requests).
    pub bridge: Arc<crate::mqtt::bridge::Bridge>,
    /// Admin credentials.
    pub keys: Arc<ApiKeys>,
    /// MQTT credentials.
    pub users: Arc<MqttUsers>,
    /// Failed-authentication throttling (shared with MQTT).
    pub throttle: Arc<AuthThrottle>,
    /// MQTT authorization rules.
    pub acl: Acl,
    /// Bounds.
    pub limits: HttpLimits,
    /// When the server started (uptime in the metrics).
    pub started: std::time::Instant,
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/things", post(things::create).get(things::list))
        // A Thing may be named "bulk": reads and deletes of that path still reach it.
        .route(
            "/things/bulk",
            post(bulk::register)
                .get(|state: axum::extract::State<AppState>| {
                    things::describe(state, axum::extract::Path("bulk".to_owned()))
                })
                .delete(|state: axum::extract::State<AppState>| {
                    things::delete(state, axum::extract::Path("bulk".to_owned()))
                }),
        )
        .route(
            "/things/{name}",
            get(things::describe).delete(things::delete),
        )
        .route(
            "/things/{name}/shadow",
            get(things::get_shadow)
                .post(things::update_shadow)
                .delete(things::delete_shadow),
        )
        .route("/things/{name}/history", get(things::history))
        .route("/things/{name}/events", get(things::events))
        .route(
            "/things/{name}/commands",
            post(commands::send).get(commands::list),
        )
        .route("/things/{name}/commands/{execution_id}", get(commands::get))
        .route(
            "/things/{name}/commands/{execution_id}/cancel",
            post(commands::cancel),
        )
        .route("/thing-groups", post(groups::create).get(groups::list))
        .route(
            "/thing-groups/{group}",
            get(groups::get).delete(groups::delete),
        )
        .route(
            "/thing-groups/{group}/things",
            post(groups::add).get(groups::members),
        )
        .route(
            "/thing-groups/{group}/things/{name}",
            axum::routing::delete(groups::remove),
        )
        .route("/jobs", post(jobs::create).get(jobs::list))
        .route("/jobs/{job_id}", get(jobs::get))
        .route("/jobs/{job_id}/executions", get(jobs::executions))
        .route("/jobs/{job_id}/cancel", post(jobs::cancel))
        .route("/things/{name}/jobs", get(jobs::of_thing))
        .route(
            "/things/{name}/jobs/{job_id}",
            axum::routing::delete(jobs::remove),
        )
        .route("/thing-datas/events", post(devices::event))
        .route("/thing-datas/{name}/jobs", get(devices::jobs))
        .route(
            "/thing-datas/{name}/jobs/start-next",
            post(devices::start_next_job),
        )
        .route(
            "/thing-datas/{name}/jobs/{job_id}",
            get(devices::describe_job),
        )
        .route(
            "/thing-datas/{name}/jobs/{job_id}/update",
            post(devices::update_job),
        )
        .route("/thing-datas/{name}/shadow", get(devices::shadow))
        .route("/thing-datas/shadow/reported", post(devices::report))
        .route(
            "/authentication/users",
            post(users::create).get(users::list),
        )
        .route(
            "/authentication/users/{username}",
            get(users::get).put(users::update).delete(users::delete),
        )
        .route("/metrics", get(metrics::json))
        .route("/stats", get(stats::stats))
        .route("/clients", get(clients::list))
        .route(
            "/clients/{client_id}",
            get(clients::get).delete(clients::kick),
        )
        .route("/subscriptions", get(clients::subscriptions))
        .route("/topics", get(clients::topics))
        .route("/clients/{client_id}/subscribe", post(clients::subscribe))
        .route(
            "/clients/{client_id}/subscribe/bulk",
            post(clients::subscribe_bulk),
        )
        .route(
            "/clients/{client_id}/unsubscribe",
            post(clients::unsubscribe),
        )
        .route(
            "/clients/{client_id}/unsubscribe/bulk",
            post(clients::unsubscribe_bulk),
        )
        .route("/publish", post(publish::publish))
        .route("/publish/bulk", post(publish::bulk))
        .route("/api-keys", post(api_keys::create).get(api_keys::list))
        .route(
            "/api-keys/{key}",
            get(api_keys::get).delete(api_keys::delete),
        )
        .route(
            "/authorization/rules",
            post(authorization::create).get(authorization::list),
        )
        .route(
            "/authorization/rules/{id}",
            get(authorization::get)
                .put(authorization::replace)
                .delete(authorization::delete),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    // Prometheus scrapes the same admin-key protected data (scrape config `basic_auth`).
    let prometheus = Router::new()
        .route("/metrics", get(metrics::prometheus))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(prometheus)
        .nest("/api/v1", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.body_bytes_max))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Largest error body read back to wrap it in JSON.
const ERROR_BODY_BYTES_MAX: usize = 16 * 1024;

/// Every error answer is `{code, message}` JSON: axum's own rejections (an invalid UTF-8 path
/// segment, say) render plain text, and this wraps them. 5xx details are not passed on.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let reason = status.canonical_reason().unwrap_or("error").to_owned();
    let message = match axum::body::to_bytes(body, ERROR_BODY_BYTES_MAX).await {
        Ok(text) if status.is_client_error() && !text.is_empty() => {
            String::from_utf8_lossy(&text).into_owned()
        }
        _ => reason,
    };
    let json = serde_json::json!({"code": status.as_u16(), "message": message}).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(json))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
