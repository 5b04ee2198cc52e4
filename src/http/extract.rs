//! Extractors whose failures render as [`ApiError`] JSON (not axum's plain-text rejections).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::listener::BodyReadTimeout;

/// The body read timeout when the request did not come through the listener (tests that drive
/// the router directly).
const BODY_READ_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(30);

/// A JSON body: 413 past the body limit, 408 if it does not arrive in time, 415 if not UTF-8,
/// 400 if not valid JSON or the wrong shape. The Content-Type header is not required (devices often omit it).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let timeout = request
            .extensions()
            .get::<BodyReadTimeout>()
            .map_or(BODY_READ_TIMEOUT_DEFAULT, |t| t.0);
        let bytes = tokio::time::timeout(timeout, Bytes::from_request(request, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} ms",
                        timeout.as_millis()
                    ),
                )
            })?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "The payload exceeds the maximum size allowed",
                    )
                } else {
                    ApiError::bad_request(format!(
                        "cannot read the request body: {}",
                        rejection.body_text()
                    ))
                }
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON document with the contract's errors.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported document encoding; supported encoding is UTF-8",
        )
    })?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request(format!("invalid request body: {e}"))
        }
        _ => ApiError::bad_request(format!("Payload contains invalid json: {e}")),
    })
}

/// Query parameters: 400 with the parser's reason when malformed.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| QueryParams(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}
