//! The HTTP frontend (axum): management API, device ThingDatas API and health.
//!
//! Handlers parse and authorize, call [`Things`], and render; they hold no state. The router is
//! built by [`app`] so tests can drive it without a socket.

mod alarms;
mod api_keys;
pub mod auth;
mod authorization;
pub mod bulk;
mod certificates;
mod clients;
mod commands;
pub mod console;
mod device_registrations;
mod devices;
pub mod error;
pub mod extract;
mod groups;
mod jobs;
pub mod listener;
mod metrics;
pub mod ndjson;
pub mod openapi;
mod publish;
mod schema;
pub mod stats;
mod things;
mod users;
mod webhooks;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use axum::{Json, Router};
use thinghub_actors::thing::{CommandLimits, EventLimits, ShadowLimits};
use thinghub_actors::Things;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// Cumulocity devices are served: a `c8y_...` command must render as its `s/ds` row.
    pub cumulocity: bool,
    /// The operator console's bounds (`None`: not served).
    pub console: Option<console::ConsoleLimits>,
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
    /// Offline alarm rules and the alarm listing.
    pub alarms: thinghub_actors::alarms::Alarms,
    /// Webhooks.
    pub webhooks: Arc<crate::webhooks::Webhooks>,
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
    /// Which Cumulocity device created which child.
    pub children: crate::cumulocity::children::Children,
    /// Cumulocity device registrations (the credential bootstrap).
    pub registrations: Arc<crate::cumulocity::registrations::Registrations>,
    /// Failed-authentication throttling (shared with MQTT).
    pub throttle: Arc<AuthThrottle>,
    /// MQTT authorization rules.
    pub acl: Acl,
    /// Bounds.
    pub limits: HttpLimits,
    /// When the server started (uptime in the metrics).
    pub started: std::time::Instant,
    /// Listeners and TLS (metrics).
    pub transports: Transports,
}

/// What the metrics show of the listeners: open connections per listener and TLS handshakes.
#[derive(Clone)]
pub struct Transports {
    /// MQTT sockets per listener.
    pub mqtt: Arc<crate::mqtt::transport::ListenerStats>,
    /// HTTP and HTTPS connections.
    pub http: Arc<listener::HttpListenerStats>,
    /// TLS, when a listener uses it.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Where device certificates name their Thing (checked when one is registered).
    pub client_identity: crate::tls::ClientIdentity,
}

/// The API's routes, each from its handler's OpenAPI annotation (so none is served undocumented).
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(things::create, things::list))
        // A Thing may be named "bulk": reads and deletes of that path still reach it.
        .routes(routes!(
            bulk::register,
            things::describe_bulk,
            things::delete_bulk
        ))
        .routes(routes!(things::describe, things::delete))
        .routes(routes!(
            things::get_shadow,
            things::update_shadow,
            things::delete_shadow
        ))
        .routes(routes!(things::history))
        .routes(routes!(things::events))
        .routes(routes!(things::connectivity))
        .routes(routes!(things::measurements))
        .routes(routes!(things::children))
        .routes(routes!(commands::send, commands::list))
        .routes(routes!(commands::get))
        .routes(routes!(commands::cancel))
        .routes(routes!(alarms::create_rule, alarms::list_rules))
        .routes(routes!(alarms::get_rule, alarms::delete_rule))
        .routes(routes!(alarms::list))
        .routes(routes!(alarms::of_thing))
        .routes(routes!(alarms::acknowledge))
        .routes(routes!(alarms::clear))
        .routes(routes!(groups::create, groups::list))
        .routes(routes!(groups::get, groups::delete))
        .routes(routes!(groups::add, groups::members))
        .routes(routes!(groups::remove))
        .routes(routes!(jobs::create, jobs::list))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::executions))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::of_thing))
        .routes(routes!(jobs::remove))
        .routes(routes!(devices::event))
        .routes(routes!(devices::jobs))
        .routes(routes!(devices::start_next_job))
        .routes(routes!(devices::describe_job))
        .routes(routes!(devices::update_job))
        .routes(routes!(devices::shadow))
        .routes(routes!(devices::report))
        .routes(routes!(
            device_registrations::create,
            device_registrations::list
        ))
        .routes(routes!(
            device_registrations::get,
            device_registrations::delete
        ))
        .routes(routes!(device_registrations::accept))
        .routes(routes!(certificates::register, certificates::list))
        .routes(routes!(certificates::get))
        .routes(routes!(certificates::revoke))
        .routes(routes!(users::create, users::list))
        .routes(routes!(users::get, users::update, users::delete))
        .routes(routes!(metrics::json))
        .routes(routes!(stats::stats))
        .routes(routes!(clients::list))
        .routes(routes!(clients::get, clients::kick))
        .routes(routes!(clients::subscriptions))
        .routes(routes!(clients::topics))
        .routes(routes!(clients::subscribe))
        .routes(routes!(clients::subscribe_bulk))
        .routes(routes!(clients::unsubscribe))
        .routes(routes!(clients::unsubscribe_bulk))
        .routes(routes!(publish::publish))
        .routes(routes!(publish::bulk))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::get, webhooks::update, webhooks::delete))
        .routes(routes!(webhooks::dead_letters))
        .routes(routes!(webhooks::replay))
        .routes(routes!(webhooks::create_sink, webhooks::list_sinks))
        .routes(routes!(
            webhooks::get_sink,
            webhooks::update_sink,
            webhooks::delete_sink
        ))
        .routes(routes!(api_keys::create, api_keys::list))
        .routes(routes!(api_keys::get, api_keys::delete))
        .routes(routes!(authorization::create, authorization::list))
        .routes(routes!(
            authorization::get,
            authorization::replace,
            authorization::delete
        ))
}

/// Every documented route, unauthenticated and stateless: the router and the document.
fn documented() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .nest("/api/v1", api_routes())
        .routes(routes!(metrics::prometheus))
        .split_for_parts();
    openapi::finish(&mut doc);
    (router, doc)
}

/// The OpenAPI document of this server (what `GET /api/v1/openapi.json` serves).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    documented().1
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let (documented, doc) = documented();
    let doc: Arc<str> = Arc::from(doc.to_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "the OpenAPI document cannot be rendered");
        String::from("{}")
    }));
    // The console calls the same routes in-process, behind its own gate.
    let console = state.limits.console.map(|limits| {
        console::router(state.clone(), documented.clone(), limits)
            .layer(DefaultBodyLimit::max(state.limits.body_bytes_max))
    });
    // Every documented route needs a key; the document itself and the health check do not.
    let authenticated = documented.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::authenticate,
    ));
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/api/v1/openapi.json",
            get(move || openapi::document(doc.clone())),
        )
        .merge(authenticated)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.body_bytes_max))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state);
    // The console renders its own (HTML) errors, so it sits outside the JSON error wrapper.
    match console {
        Some(console) => console.merge(api),
        None => api,
    }
}

/// A 200 whose body is JSON text already rendered (a shadow's `update/accepted`, shared with
/// the MQTT channel's copy of it; the OpenAPI document).
pub(crate) fn json_text(text: &str) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        text.to_owned(),
    )
        .into_response()
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

/// `GET /healthz`: the process answers (no key needed).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    summary = "Liveness",
    responses((status = 200, description = "The server answers", body = schema::Health))
)]
pub async fn healthz() -> Json<serde_json::Value> {
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
