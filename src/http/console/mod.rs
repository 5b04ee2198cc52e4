//! The operator console at `/console`: server-rendered HTML pages (maud) with a little
//! progressive JavaScript, served from the binary.
//!
//! The console is a client of the management API, run in-process: every page reads, and every
//! form writes, through the same routes, validation and role checks as `/api/v1/...` (a router
//! built from the same handlers that is never bound to a socket, called with the signed-in
//! key's [`Principal`]). So the console can show nothing and do nothing that its key could not
//! do with curl, and a refusal reads the same. Only the overview's charts read the statistics
//! samples directly.
//!
//! Sign-in takes an API key and its secret (verified and throttled as the API does); a
//! session cookie (HttpOnly, SameSite=Strict, `Secure` over HTTPS, expiring) then names a
//! session held in memory. Every form that changes something carries the session's CSRF token,
//! and a request a browser marks as cross-site is refused before that.

mod pages;
pub mod session;
mod view;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, OriginalUri, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt as _;

use super::auth::verify_key;
use super::error::ApiError;
use super::listener::OverTls;
use super::AppState;
use crate::auth::{route_allowed, Principal, Role};
use session::{same_token, Flash, Session, Sessions, COOKIE};

/// Largest API answer the console reads back (a page of a listing is far smaller).
const API_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Console bounds (from the config).
#[derive(Debug, Clone, Copy)]
pub struct ConsoleLimits {
    /// Sign-ins held at once.
    pub sessions_max: usize,
    /// Sign-ins of one API key held at once (its oldest ends past it).
    pub sessions_per_key_max: usize,
    /// How long one lasts.
    pub session_ttl: std::time::Duration,
    /// How often the overview's figures refresh in the browser (the statistics sample
    /// interval, at least a second).
    pub refresh_every: std::time::Duration,
}

/// What the console's handlers share.
#[derive(Clone)]
pub struct Console {
    /// The server's state (the overview's statistics, key checks).
    pub app: AppState,
    /// The management API's router, unbound, behind [`authorize_in_process`].
    api: Router,
    /// Sign-ins.
    pub sessions: Arc<Sessions>,
    /// The overview's refresh period.
    pub refresh_every: std::time::Duration,
}

/// The console's routes, under `/console`.
pub fn router(app: AppState, api: Router<AppState>, limits: ConsoleLimits) -> Router {
    // The API's own body bound: a form cannot make a request the API would not take.
    let api = api
        .route_layer(axum::middleware::from_fn(authorize_in_process))
        .layer(axum::extract::DefaultBodyLimit::max(
            app.limits.body_bytes_max,
        ))
        .with_state(app.clone());
    let console = Console {
        app,
        api,
        sessions: Arc::new(Sessions::new(
            limits.sessions_max,
            limits.sessions_per_key_max,
            limits.session_ttl,
        )),
        refresh_every: limits.refresh_every.max(std::time::Duration::from_secs(1)),
    };
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(pages::overview))
        .route("/console/overview/live", get(pages::overview_live))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/things", get(pages::things))
        .route("/console/things/{name}", get(pages::thing))
        .route(
            "/console/things/{name}/desired",
            post(pages::update_desired),
        )
        .route("/console/things/{name}/commands", post(pages::send_command))
        .route(
            "/console/things/{name}/commands/{id}/cancel",
            post(pages::cancel_command),
        )
        .route("/console/jobs", get(pages::jobs).post(pages::create_job))
        .route("/console/jobs/{id}", get(pages::job))
        .route("/console/jobs/{id}/cancel", post(pages::cancel_job))
        .route("/console/clients", get(pages::clients))
        .route("/console/clients/{id}", get(pages::client))
        .route("/console/clients/{id}/kick", post(pages::kick_client))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .route("/console/{*rest}", axum::routing::any(no_such_page))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

/// The in-process API's only gate: the console put the signed-in key's [`Principal`] on the
/// request; its role must allow the route, exactly as for a request with the key itself.
async fn authorize_in_process(request: Request, next: Next) -> Response {
    let Some(principal) = request.extensions().get::<Principal>() else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "not signed in").into_response();
    };
    if let Err(why) = route_allowed(
        principal.role,
        request.method().as_str(),
        request.uri().path(),
    ) {
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    next.run(request).await
}

/// Every console answer: no framing, no sniffing, no caching of pages, scripts and styles
/// only from the binary.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn no_such_page(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        view::bare(
            "Not found",
            &format!("The console has no page {}", uri.path()),
        ),
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("console.css"))
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("console.js"))
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        text,
    )
        .into_response()
}

/// An API answer: its status and JSON body (`{code, message}` for an error).
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Body (`Null` when empty).
    pub body: Value,
}

impl Reply {
    /// A 2xx.
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// What went wrong, for people: the API's message with its status.
    pub fn error(&self) -> String {
        let message = self
            .body
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| self.body.as_str().map(str::to_owned))
            .unwrap_or_else(|| self.status.canonical_reason().unwrap_or("error").into());
        format!(
            "{} {}: {message}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or("")
        )
    }
}

/// The signed-in operator of one request.
#[derive(Clone)]
pub struct Signed {
    /// The session's id (its cookie).
    pub id: String,
    /// The session.
    pub session: Session,
    /// The browser's address (throttling, logs).
    pub peer: SocketAddr,
}

impl Signed {
    /// The key's role.
    pub fn role(&self) -> Role {
        self.session.principal.role
    }

    /// Whether the role may change things (not a viewer).
    pub fn may_change(&self) -> bool {
        matches!(self.role(), Role::Admin | Role::Operator)
    }
}

impl Console {
    /// Calls the management API as the signed-in key. `uri` is the whole path and query
    /// (`/api/v1/...`), its parts already percent-encoded.
    pub async fn call(
        &self,
        who: &Signed,
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Reply {
        let mut request = axum::http::Request::builder().method(method).uri(uri);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Body::from(body.map(|b| b.to_string()).unwrap_or_default()));
        let Ok(mut request) = request else {
            return Reply {
                status: StatusCode::BAD_REQUEST,
                body: serde_json::json!({"message": format!("not a valid address: {uri}")}),
            };
        };
        let extensions = request.extensions_mut();
        extensions.insert(who.session.principal.clone());
        extensions.insert(ConnectInfo(who.peer));
        if let Ok(original) = uri.parse::<Uri>() {
            extensions.insert(OriginalUri(original));
        }
        let response = match self.api.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let Ok(bytes) = axum::body::to_bytes(response.into_body(), API_BODY_BYTES_MAX).await else {
            tracing::warn!(%uri, "console: an API answer was too large to read");
            return Reply {
                status: StatusCode::BAD_GATEWAY,
                body: serde_json::json!({
                    "message": format!("the answer was larger than the console reads ({API_BODY_BYTES_MAX} bytes)")
                }),
            };
        };
        let body = match serde_json::from_slice::<Value>(&bytes) {
            _ if bytes.is_empty() => Value::Null,
            Ok(json) => json,
            // As the API's own error layer does: a 5xx's details are not passed on.
            Err(_) if status.is_server_error() => Value::Null,
            Err(_) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        };
        if status.is_server_error() {
            tracing::warn!(%uri, status = status.as_u16(), "console: the API failed");
        }
        Reply { status, body }
    }

    /// Resolves the request's session, or why not (the sign-in page is the answer).
    pub fn signed(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Signed, Refusal> {
        let to_login = || Refusal::SignIn;
        let id = cookie(headers).ok_or_else(to_login)?;
        let session = self.sessions.get(&id).ok_or_else(to_login)?;
        let now_ms = self.app.things.now_ms();
        match self.app.keys.stamp(&session.principal.key, now_ms) {
            Ok(stamp) if stamp.as_deref() == Some(session.stamp.as_str()) => {}
            Ok(_) => {
                // Deleted, replaced or expired since sign-in.
                self.sessions.remove(&id);
                tracing::info!(key = %session.principal.key, "console: a session's API key is gone; signed out");
                return Err(to_login());
            }
            // Not known now: refused, the session kept (the API fails closed likewise).
            Err(_) => return Err(Refusal::Unavailable),
        }
        Ok(Signed { id, session, peer })
    }

    /// Resolves the session of a request that changes something: it must also carry the
    /// session's CSRF token and not be marked cross-site by the browser.
    pub fn signed_change(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        csrf: &str,
    ) -> Result<Signed, Refusal> {
        if let Some(why) = cross_site(headers) {
            return Err(Refusal::Forbidden(why));
        }
        let signed = self.signed(headers, peer)?;
        if !same_token(csrf, &signed.session.csrf) {
            tracing::warn!(key = %signed.session.principal.key, %peer, "console: a form without its CSRF token was refused");
            return Err(Refusal::Forbidden(
                "the form's CSRF token is missing or wrong (reload the page and try again)",
            ));
        }
        Ok(signed)
    }

    /// A whole page for `who`, with the message the last action left (shown once).
    pub fn page(
        &self,
        who: &Signed,
        section: view::Section,
        title: &str,
        body: maud::Markup,
    ) -> maud::Markup {
        let flash = self.sessions.take_flash(&who.id);
        view::page(who, flash.as_ref(), section, title, body)
    }

    /// Leaves the outcome of an action for the next page.
    pub fn flash(&self, who: &Signed, reply: &Reply, done: impl Into<String>) {
        let flash = if reply.ok() {
            Flash {
                ok: true,
                message: done.into(),
            }
        } else {
            Flash {
                ok: false,
                message: reply.error(),
            }
        };
        self.sessions.flash(&who.id, flash);
    }
}

/// Why a console request is not served as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not signed in (or no longer): the sign-in page.
    SignIn,
    /// A form refused before it reached the API (cross-site, no CSRF token): a 403 page.
    Forbidden(&'static str),
    /// The session's key could not be checked (storage unreadable): a 503 page.
    Unavailable,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::SignIn => Redirect::to("/console/login").into_response(),
            Refusal::Forbidden(why) => (
                StatusCode::FORBIDDEN,
                view::bare("Refused", &format!("Refused: {why}")),
            )
                .into_response(),
            Refusal::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                view::bare(
                    "Unavailable",
                    "The sign-in could not be checked (storage is unavailable); try again.",
                ),
            )
                .into_response(),
        }
    }
}

/// Why a browser says this request is cross-site, if it does. `Sec-Fetch-Site` decides when
/// the browser sends it (every current one does; it also holds behind a proxy that rewrites
/// `Host`); otherwise an `Origin` that is not this host is refused.
fn cross_site(headers: &HeaderMap) -> Option<&'static str> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return (!matches!(site, "same-origin" | "none"))
            .then_some("the request came from another site");
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'));
        if origin_host.is_none() || origin_host != host {
            return Some("the request came from another origin");
        }
    }
    None
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

fn peer_of(request_peer: Option<Extension<ConnectInfo<SocketAddr>>>) -> SocketAddr {
    request_peer.map_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0), |e| {
        e.0 .0
    })
}

/// The browser's address (from the listener).
pub type Peer = Option<Extension<ConnectInfo<SocketAddr>>>;

async fn login_page(State(console): State<Console>, headers: HeaderMap, peer: Peer) -> Response {
    if console.signed(&headers, peer_of(peer)).is_ok() {
        return Redirect::to("/console/").into_response();
    }
    view::login(None).into_response()
}

/// The sign-in form.
#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginForm {
    key: String,
    secret: String,
}

async fn login(
    State(console): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    tls: Option<Extension<OverTls>>,
    Form(form): Form<LoginForm>,
) -> Response {
    // Login CSRF (signing a victim in as the attacker) is refused like any cross-site form.
    if let Some(why) = cross_site(&headers) {
        return Refusal::Forbidden(why).into_response();
    }
    let peer = peer_of(peer);
    let (key, secret) = match form.key.trim().split_once(':') {
        // `key:secret` pasted whole into the key field.
        Some((key, secret)) if form.secret.is_empty() => (key.to_owned(), secret.to_owned()),
        _ => (form.key.trim().to_owned(), form.secret),
    };
    let key = key.as_str();
    // Only the key's name goes to the log, bounded (never a secret typed in the wrong field).
    let logged: String = key
        .split(':')
        .next()
        .unwrap_or_default()
        .chars()
        .take(64)
        .collect();
    let principal = match verify_key(&console.app, peer.ip(), key, secret).await {
        Ok(principal) => principal,
        Err(refusal) => {
            tracing::info!(key = %logged, %peer, "console: sign-in refused");
            return (
                StatusCode::UNAUTHORIZED,
                view::login(Some(&refusal.to_string())),
            )
                .into_response();
        }
    };
    if principal.role == Role::Device {
        return (
            StatusCode::FORBIDDEN,
            view::login(Some(
                "a device key cannot use the console (use an admin, operator or viewer key)",
            )),
        )
            .into_response();
    }
    let now_ms = console.app.things.now_ms();
    let stamp = match console.app.keys.stamp(key, now_ms) {
        Ok(Some(stamp)) => stamp,
        Ok(None) => {
            return (
                StatusCode::UNAUTHORIZED,
                view::login(Some("invalid API key or secret")),
            )
                .into_response()
        }
        Err(_) => return Refusal::Unavailable.into_response(),
    };
    let role = principal.role;
    // A full table: the sessions whose key is gone or replaced make room. Their keys are read
    // here, once each and outside the table's lock; one that cannot be read stays.
    let revoked = console
        .sessions
        .stamps_if_full()
        .into_iter()
        .filter(|(key, stamp)| {
            matches!(console.app.keys.stamp(key, now_ms), Ok(now) if now.as_deref() != Some(stamp.as_str()))
        })
        .collect();
    let previous = cookie(&headers);
    let id = match console
        .sessions
        .create(principal, stamp, previous.as_deref(), &revoked)
    {
        Ok(id) => id,
        Err(full) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                view::login(Some(&format!(
                    "{} console sessions are open (console_sessions_max); try again when one ends",
                    full.0
                ))),
            )
                .into_response()
        }
    };
    tracing::info!(key = %logged, role = role.as_str(), %peer, "console: signed in");
    let secure = if tls.is_some_and(|t| t.0 .0) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        console.sessions.ttl().as_secs()
    );
    let mut response = Redirect::to("/console/").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// A form that only carries the CSRF token.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CsrfOnly {
    /// The session's token.
    pub csrf: String,
}

async fn logout(
    State(console): State<Console>,
    headers: HeaderMap,
    peer: Peer,
    Form(form): Form<CsrfOnly>,
) -> Response {
    let signed = match console.signed_change(&headers, peer_of(peer), &form.csrf) {
        Ok(signed) => signed,
        Err(refusal) => return refusal.into_response(),
    };
    console.sessions.remove(&signed.id);
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "thinghub_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

/// Percent-encodes one path segment or query value (everything but RFC 3986's unreserved).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-process gate must see the whole path, as the API's middleware does: a nested
    /// router's view (`/api-keys`) would slip past the admin-only prefixes.
    #[tokio::test]
    async fn the_in_process_gate_checks_the_whole_path_of_a_nested_route() {
        let api = Router::new()
            .nest(
                "/api/v1",
                Router::new().route("/api-keys", get(|| async { "listed" })),
            )
            .route_layer(axum::middleware::from_fn(authorize_in_process));
        let call = |role: Role| {
            let mut request = axum::http::Request::get("/api/v1/api-keys")
                .body(Body::empty())
                .expect("request");
            request.extensions_mut().insert(Principal {
                key: "k".into(),
                role,
                things: None,
            });
            request
                .extensions_mut()
                .insert(OriginalUri(Uri::from_static("/api/v1/api-keys")));
            api.clone().oneshot(request)
        };
        let refused = call(Role::Operator).await.expect("answer");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let allowed = call(Role::Admin).await.expect("answer");
        assert_eq!(allowed.status(), StatusCode::OK);
    }

    #[test]
    fn segments_are_encoded_so_a_name_cannot_leave_its_place() {
        assert_eq!(encode("a/../b?c=d&e"), "a%2F..%2Fb%3Fc%3Dd%26e");
        assert_eq!(encode("sensor-1_x.y~"), "sensor-1_x.y~");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn a_browser_marking_a_request_cross_site_is_told_apart() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(cross_site(&headers), None);
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert_eq!(cross_site(&headers), None);
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(cross_site(&headers).is_some());
        headers.remove(header::ORIGIN);
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&headers).is_some());
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(
            cross_site(&headers).is_some(),
            "another port of the host is another origin"
        );
        // Behind a proxy that rewrites Host, the browser's word decides.
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://console.example"),
        );
        assert_eq!(cross_site(&headers), None);
    }
}
