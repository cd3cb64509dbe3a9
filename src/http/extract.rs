//! Request extractors whose every rejection is the contract's JSON error envelope, and
//! [`Auth`], the bearer-token caller.
//!
//! axum's own `Query`, `Path` and `Json` answer a failed parse with a plain-text body
//! (`Failed to deserialize query string…`); handlers use these instead, so a bad `limit=abc`
//! gets `400 {"error":{"code":"invalid_request",…}}` like every other refusal.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use axum::http::header;

use crate::admin::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// Query string (parsed by axum's `Query`, its rejection re-wrapped).
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))
    }
}

/// Path parameters.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::InvalidRequest(format!("invalid path: {}", e.body_text())))
    }
}

/// JSON body; the media type is not checked (webhook senders and curl users often omit it).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::InvalidJson(e.body_text()))?;
        let v: T = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))?;
        Ok(JsonBody(v))
    }
}

/// The authenticated caller.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        Ok(Auth(state.admin.authenticate(token).await?))
    }
}
