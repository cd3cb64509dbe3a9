//! The one error type of the HTTP edge.
//!
//! Policy: handlers return [`ApiError`]; it maps to the contract's JSON body
//! `{"error":{"code","message"}}` with a stable `code` and the right status. Client errors carry
//! a message meant for the caller. Internal errors never show their cause to the caller (a fixed
//! message instead); the cause is logged once, here, at `error` level, without secrets (our error
//! types never hold secret values).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::protocol::SignatureError;
use crate::store::StoreError;

/// Every error an HTTP handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_json`.
    #[error("{0}")]
    InvalidJson(String),
    /// 400 `invalid_payload`: well-formed JSON that misses required fields.
    #[error("{0}")]
    InvalidPayload(String),
    /// 400 `invalid_request` (admin API validation, naming the field).
    #[error("{0}")]
    InvalidRequest(String),
    /// 400 `missing_integration_id` / `missing_key_id`.
    #[error("{1}")]
    MissingParam(&'static str, String),
    /// 401 signature failures.
    #[error("{0}")]
    Signature(SignatureError),
    /// 401 `stale_timestamp`, with the timestamp, the server's clock and the window.
    #[error("{0}")]
    StaleTimestamp(String),
    /// 401 `unknown_integration` (also for unknown webhook keys).
    #[error("unknown or inactive integration or key")]
    UnknownIntegration,
    /// 401 `unauthorized` (admin API).
    #[error(
        "a valid bearer token is required: send `Authorization: Bearer TOKEN` with the admin \
         token (SIGNALBOX_ADMIN_TOKEN) or a workspace token (`signalbox token create --workspace WS`)"
    )]
    Unauthorized,
    /// 403 `forbidden`: a workspace-scoped token asked for a global action.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `not_found`: names what was looked for and its id (see [`ApiError::not_found`]).
    #[error("{0} not found")]
    NotFound(String),
    /// 405 `method_not_allowed`: the path exists, the method does not (message names both).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409 `conflict`.
    #[error("{0}")]
    Conflict(String),
    /// 410 `purged`: retention or an erasure removed what was asked for (a delivery's body).
    #[error("{0}")]
    Purged(&'static str),
    /// 408 `request_timeout`: the body did not arrive in time (or the client went away).
    #[error("the request body was not received in time")]
    RequestTimeout,
    /// 413 `payload_too_large`.
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 503 `unavailable`: storage cannot take it now; senders retry.
    #[error("{0}")]
    Unavailable(String),
    /// 500 `internal`.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidPayload(_) => "invalid_payload",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::MissingParam(code, _) => code,
            ApiError::Signature(e) => e.code(),
            ApiError::StaleTimestamp(_) => "stale_timestamp",
            ApiError::UnknownIntegration => "unknown_integration",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::Purged(_) => "purged",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidPayload(_)
            | ApiError::InvalidRequest(_)
            | ApiError::MissingParam(..) => StatusCode::BAD_REQUEST,
            ApiError::Signature(_)
            | ApiError::StaleTimestamp(_)
            | ApiError::UnknownIntegration
            | ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Purged(_) => StatusCode::GONE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// 404 naming what was looked for and the id asked for ("workspace ws_1 not found"); the same
    /// answer whether it does not exist or belongs to another workspace.
    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError::NotFound(format!("{what} {id}"))
    }

    /// Shorthand for a 400 naming a field.
    pub fn invalid(msg: impl Into<String>) -> Self {
        ApiError::InvalidRequest(msg.into())
    }
}

impl From<SignatureError> for ApiError {
    fn from(e: SignatureError) -> Self {
        ApiError::Signature(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ApiError::Conflict("already exists".into()),
            // Storage problems are 503: the caller (or the webhook sender) should retry.
            other => {
                tracing::error!(error = %other, "storage error");
                ApiError::Unavailable("storage is unavailable, retry later".into())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "internal error");
        }
        let body = Json(json!({"error": {"code": self.code(), "message": self.to_string()}}));
        let mut resp = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

/// Result alias of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// The errors every admin operation can answer.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum AdminErrors {
    /// A bad query, path or body: the message names the field.
    #[response(status = 400)]
    Invalid(crate::admin::views::ErrorBody),
    /// No or an unknown bearer token.
    #[response(status = 401)]
    Unauthorized(crate::admin::views::ErrorBody),
    /// A workspace token asked for what needs the admin token.
    #[response(status = 403)]
    Forbidden(crate::admin::views::ErrorBody),
    /// No such id visible to this token (another workspace's ids answer the same).
    #[response(status = 404)]
    NotFound(crate::admin::views::ErrorBody),
    /// The body did not arrive in time.
    #[response(status = 408)]
    Timeout(crate::admin::views::ErrorBody),
    /// The body is larger than the limit.
    #[response(status = 413)]
    TooLarge(crate::admin::views::ErrorBody),
    /// Storage cannot answer now; retry after `Retry-After` seconds.
    #[response(status = 503)]
    Unavailable(crate::admin::views::ErrorBody),
}
