//! Admin-key authentication for `/api/v1/...`: `Authorization: Basic base64(key:secret)` or
//! `Authorization: Bearer key:secret`. Anything else is a 401 with a `WWW-Authenticate` hint.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::error::ApiError;
use super::AppState;
use crate::auth::split_key;
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

/// Middleware: 401 unless the request carries a valid admin key; 429 while the source address
/// or the key is throttled after failed attempts.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let unauthorized = |message: &str| {
        let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"thinghub\""),
        );
        response
    };
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
    let (key, secret) = match credentials(&request) {
        Ok(pair) => pair,
        // No secret was tried (a probe, a misconfigured client): refused, not counted.
        Err(message) => return unauthorized(message),
    };
    if state.keys.verify_cached(&key, &secret) {
        return next.run(request).await;
    }
    if let Verdict::Wait(wait) = state.throttle.check(address, Some(&key)) {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications; retry in {seconds} s"),
        )
        .into_response();
        response.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(seconds.max(1)),
        );
        return response;
    }
    let keys = state.keys.clone();
    let name = key.clone();
    // A first verification runs argon2 (tens of ms of CPU): keep it off the async workers.
    let valid = tokio::task::spawn_blocking(move || keys.verify(&name, &secret))
        .await
        .unwrap_or(false);
    if !valid {
        state.throttle.failed(address, Some(&key), "http");
        return unauthorized("invalid API key or secret");
    }
    state.throttle.succeeded(address, &key);
    next.run(request).await
}
