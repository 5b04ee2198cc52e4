//! API-key authentication and role checks for `/api/v1/...` and `/metrics`:
//! `Authorization: Basic base64(key:secret)` or `Authorization: Bearer key:secret`. Anything
//! else is a 401 with a `WWW-Authenticate` hint; a key whose role does not allow the route is a
//! 403 that says why. The verified [`Principal`] goes to the handlers as a request extension
//! (the device handlers check a device key's Things with it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, OriginalUri, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::error::ApiError;
use super::AppState;
use crate::auth::{route_allowed, split_key, KeyRefusal, Principal};
use crate::throttle::Verdict;

fn credentials(request: &Request) -> Result<(String, String), &'static str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or("missing Authorization header (use Basic base64(key:secret))")?
        .to_str()
        .map_err(|_| "Authorization header is not ASCII")?;
    let (scheme, rest) = value
        .split_once(' ')
        .ok_or("malformed Authorization header")?;
    let pair = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .map_err(|_| "Basic credentials are not valid base64")?;
        String::from_utf8(decoded).map_err(|_| "Basic credentials are not UTF-8")?
    } else if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().to_owned()
    } else {
        return Err("unsupported Authorization scheme (use Basic or Bearer)");
    };
    let (key, secret) = split_key(&pair).ok_or("credentials must be key:secret")?;
    Ok((key.to_owned(), secret.to_owned()))
}

/// Middleware: 401 unless the request carries a valid API key, 403 unless its role allows the
/// route; 429 while the source address or the key is throttled after failed attempts.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
    let (key, secret) = match credentials(&request) {
        Ok(pair) => pair,
        // No secret was tried (a probe, a misconfigured client): refused, not counted.
        Err(message) => return refusal_response(KeyCheckRefusal::Unauthorized(message.into())),
    };
    let principal = match verify_key(&state, address, &key, secret).await {
        Ok(principal) => principal,
        Err(refusal) => return refusal_response(refusal),
    };
    let path = request.extensions().get::<OriginalUri>().map_or_else(
        || request.uri().path().to_owned(),
        |uri| uri.path().to_owned(),
    );
    if let Err(why) = route_allowed(principal.role, request.method().as_str(), &path) {
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// Why a key and secret were not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheckRefusal {
    /// Wrong, unknown or expired: what to tell the caller.
    Unauthorized(String),
    /// Too many failed attempts from this address or for this key: retry after this many
    /// seconds.
    Throttled(u64),
}

impl std::fmt::Display for KeyCheckRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyCheckRefusal::Unauthorized(message) => f.write_str(message),
            KeyCheckRefusal::Throttled(seconds) => {
                write!(f, "too many failed authentications; retry in {seconds} s")
            }
        }
    }
}

fn refusal_response(refusal: KeyCheckRefusal) -> Response {
    let (status, header) = match refusal {
        KeyCheckRefusal::Unauthorized(_) => (
            StatusCode::UNAUTHORIZED,
            (
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"thinghub\""),
            ),
        ),
        KeyCheckRefusal::Throttled(seconds) => (
            StatusCode::TOO_MANY_REQUESTS,
            (
                header::RETRY_AFTER,
                header::HeaderValue::from(seconds.max(1)),
            ),
        ),
    };
    let mut response = ApiError::new(status, refusal.to_string()).into_response();
    response.headers_mut().insert(header.0, header.1);
    response
}

/// Verifies an API key and its secret, as the API and the console's sign-in both do: a cached
/// verification first; otherwise argon2 off the async workers, with failures throttled per
/// source address and per key.
pub async fn verify_key(
    state: &AppState,
    address: IpAddr,
    key: &str,
    secret: String,
) -> Result<Principal, KeyCheckRefusal> {
    let now_ms = state.things.now_ms();
    let verdict = match state.keys.authenticate_cached(key, &secret, now_ms) {
        Some(verdict) => verdict,
        None => {
            if let Verdict::Wait(wait) = state.throttle.check(address, Some(key)) {
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return Err(KeyCheckRefusal::Throttled(seconds));
            }
            let keys = state.keys.clone();
            let name = key.to_owned();
            // A first verification runs argon2 (tens of ms of CPU): off the async workers.
            let verdict =
                tokio::task::spawn_blocking(move || keys.authenticate(&name, &secret, now_ms))
                    .await
                    .unwrap_or(Err(KeyRefusal::Invalid));
            match &verdict {
                Err(KeyRefusal::Invalid) => state.throttle.failed(address, Some(key), "http"),
                _ => state.throttle.succeeded(address, key),
            }
            verdict
        }
    };
    verdict.map_err(|refusal| match refusal {
        KeyRefusal::Invalid => KeyCheckRefusal::Unauthorized("invalid API key or secret".into()),
        KeyRefusal::Expired(at_ms) => {
            KeyCheckRefusal::Unauthorized(format!("API key '{key}' expired at {at_ms} (Unix ms)"))
        }
    })
}
