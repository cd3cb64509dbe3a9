//! The HTTP edge: the router with its layers ([`router`]), the accept loop ([`server`]), the
//! admin API ([`api`]) and the extractors ([`extract`]). Webhook receivers live with their
//! platform in [`crate::sources`]; this module only mounts them.

pub mod api;
pub(crate) mod extract;
pub(crate) mod server;

use axum::Router;
use axum::extract::MatchedPath;
use axum::http::{HeaderName, Request};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::state::AppState;

/// The HTTP router with every layer.
pub fn router(state: AppState) -> Router {
    let body_read_timeout = state.cfg.body_read_timeout;
    let request_id = HeaderName::from_static("x-request-id");
    Router::new()
        // The routes and the OpenAPI document come from one list (`api::all_routes`).
        .merge(api::all_routes().split_for_parts().0)
        // Both fallbacks answer with the JSON envelope (axum's defaults have empty bodies).
        .fallback(|uri: axum::http::Uri| async move {
            crate::error::ApiError::NotFound(format!("route {}", uri.path()))
        })
        .method_not_allowed_fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
            crate::error::ApiError::MethodNotAllowed(format!(
                "{m} is not allowed on {} (see /api/v1/openapi.json)",
                uri.path()
            ))
        })
        .with_state(state)
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let path = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map(MatchedPath::as_str)
                    .unwrap_or("unmatched");
                let rid = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                // Only the method, the route template and the request id: never headers (they
                // carry signatures and tokens) or query strings.
                tracing::info_span!("http", method = %req.method(), route = path, request_id = rid)
            }),
        )
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_read_timeout,
        ))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        // Outermost: an incoming id we would not echo is dropped, so a fresh one is made.
        .layer(tower::util::MapRequestLayer::new(
            drop_unacceptable_request_id::<axum::body::Body>,
        ))
}

/// Longest incoming `x-request-id` kept (longer ones are replaced by a fresh id).
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// True when an incoming `x-request-id` may be used as the request's id (it is echoed back and
/// written into every log line of the request): 1 to [`MAX_REQUEST_ID_LEN`] characters of
/// `[A-Za-z0-9._-]`.
pub fn acceptable_request_id(v: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Removes the caller's `x-request-id` unless it is exactly one acceptable value, so that
/// `SetRequestIdLayer` generates a fresh one.
fn drop_unacceptable_request_id<B>(mut req: Request<B>) -> Request<B> {
    let headers = req.headers_mut();
    let mut values = headers.get_all("x-request-id").iter();
    let keep = match (values.next(), values.next()) {
        (None, _) => return req,
        (Some(v), None) => acceptable_request_id(v.as_bytes()),
        (Some(_), Some(_)) => false,
    };
    if !keep {
        headers.remove("x-request-id");
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_accepted_only_short_and_plain() {
        for ok in ["a", "req-1", "A.b_C-9", &"x".repeat(MAX_REQUEST_ID_LEN)] {
            assert!(acceptable_request_id(ok.as_bytes()), "{ok:?}");
        }
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in ["", &long, "a b", "id\"injected", "a/b", "é", "a\tb", "a=b"] {
            assert!(!acceptable_request_id(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn unacceptable_request_ids_are_dropped() {
        let req = |ids: &[&str]| {
            let mut b = Request::builder();
            for id in ids {
                b = b.header("x-request-id", *id);
            }
            drop_unacceptable_request_id(b.body(()).expect("request"))
        };
        let ids = |r: &Request<()>| {
            r.headers()
                .get_all("x-request-id")
                .iter()
                .map(|v| v.to_str().unwrap_or("?").to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&req(&["abc-1"])), ["abc-1"]);
        assert!(ids(&req(&[])).is_empty());
        assert!(ids(&req(&[&"y".repeat(65)])).is_empty());
        assert!(ids(&req(&["ok", "second"])).is_empty());
        assert!(ids(&req(&["has space"])).is_empty());
    }
}
