//! Every way a request fails, and the one error shape each is answered with.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::engine::{self};

/// Every way a request can fail, each with its status code.
#[derive(Debug)]
pub enum ApiError {
    BadRequest {
        code: &'static str,
        message: String,
        details: Value,
    },
    NotFound(String),
    Conflict {
        code: &'static str,
        message: String,
        details: Value,
    },
    TooLarge {
        limit: usize,
    },
    /// An attachment over `max_attachment_bytes`.
    FileTooLarge {
        message: String,
        limit: u64,
    },
    /// The store cannot be reached: nothing was accepted or changed.
    Unavailable(String),
    /// Something else this server cannot do now (a listener it cannot open), by code.
    Unable {
        code: &'static str,
        message: String,
    },
    /// No token, or one that is not (or no longer) valid.
    Unauthorized {
        code: &'static str,
        message: String,
    },
    /// A valid token whose scope does not allow this.
    Forbidden(String),
    Internal(String),
}

impl ApiError {
    pub(crate) fn bad(code: &'static str, message: impl Into<String>, details: Value) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
            details,
        }
    }
}

impl From<engine::Error> for ApiError {
    fn from(e: engine::Error) -> ApiError {
        match e {
            engine::Error::NotFound(id) => ApiError::NotFound(format!("no job {id}")),
            engine::Error::Store(e) => e.into(),
            engine::Error::Agent(m) | engine::Error::Http(m) => ApiError::Internal(m),
        }
    }
}

impl From<gantry_store::Error> for ApiError {
    fn from(e: gantry_store::Error) -> ApiError {
        if e.is_unavailable() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, details) = match self {
            ApiError::BadRequest {
                code,
                message,
                details,
            } => (StatusCode::BAD_REQUEST, code, message, details),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, "not_found", message, json!({})),
            ApiError::Conflict {
                code,
                message,
                details,
            } => (StatusCode::CONFLICT, code, message, details),
            ApiError::TooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than the limit of {limit} bytes"),
                json!({ "limit_bytes": limit }),
            ),
            ApiError::FileTooLarge { message, limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "attachment_too_large",
                message,
                json!({ "limit_bytes": limit }),
            ),
            ApiError::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("{message}; nothing was accepted or changed, try again shortly"),
                json!({}),
            ),
            ApiError::Unable { code, message } => {
                (StatusCode::SERVICE_UNAVAILABLE, code, message, json!({}))
            }
            ApiError::Unauthorized { code, message } => {
                let body = json!({"error": {"code": code, "message": message, "details": {}}});
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::Forbidden(message) => {
                (StatusCode::FORBIDDEN, "forbidden", message, json!({}))
            }
            ApiError::Internal(message) => {
                tracing::error!(%message, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    message,
                    json!({}),
                )
            }
        };
        let body = json!({"error": {"code": code, "message": message, "details": details}});
        (status, Json(body)).into_response()
    }
}
