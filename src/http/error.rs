//! The one HTTP error type: every failure renders as `{code, message, clientToken?}` JSON with
//! the matching status. 5xx details are logged, not returned (a 503 names the unavailable
//! Thing and record, which operators need).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use thinghub_actors::thing::{ErrorCode, Rejection};

/// An error answered over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Specific, human-readable message.
    pub message: String,
    /// Echoed client token, if the request had one.
    pub client_token: Option<String>,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            client_token: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

/// The HTTP status of a contract error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        ApiError {
            status: status_of(rejection.code()),
            message: rejection.message,
            client_token: rejection.client_token,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), message = %self.message, "request failed");
        }
        let mut body = json!({"code": self.status.as_u16(), "message": self.message});
        if let Some(token) = self.client_token {
            body["clientToken"] = token.into();
        }
        (self.status, Json(body)).into_response()
    }
}
