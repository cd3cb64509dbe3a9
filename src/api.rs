//! The admin HTTP API (`/api/v1/…`, bearer token) plus health, readiness and metrics. Handlers
//! are thin: they parse the request, resolve the principal and call [`Admin`].

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use crate::extract::JsonBody;
use crate::extract::{Path, Query};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::{IntegrationUpdate, NewIntegration, Principal, WorkspaceUpdate};
use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::store::{DeliveryFilter, SignalFilter};

/// Routes of the admin API and the probes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route(
            "/api/v1/workspaces",
            post(create_workspace).get(list_workspaces),
        )
        .route(
            "/api/v1/workspaces/{ws}",
            get(get_workspace).patch(update_workspace),
        )
        .route(
            "/api/v1/workspaces/{ws}/webhook-keys",
            post(create_key).get(list_keys),
        )
        .route(
            "/api/v1/webhook-keys/{id}",
            axum::routing::delete(delete_key),
        )
        .route("/api/v1/webhook-keys/{id}/rotate", post(rotate_key))
        .route(
            "/api/v1/workspaces/{ws}/integrations",
            post(create_integration).get(list_integrations),
        )
        .route(
            "/api/v1/integrations/{id}",
            get(get_integration)
                .patch(update_integration)
                .delete(delete_integration),
        )
        .route("/api/v1/integrations", get(list_all_integrations))
        .route(
            "/api/v1/workspaces/{ws}/tokens",
            post(create_token).get(list_tokens),
        )
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/workspaces/{ws}/signals", get(list_signals))
        .route("/api/v1/signals/{id}", get(get_signal).delete(erase_signal))
        .route("/api/v1/workspaces/{ws}/erasure", post(erase_customer))
        .route("/api/v1/workspaces/{ws}/activity", get(list_activity))
        .route("/api/v1/deliveries", get(list_deliveries))
        .route("/api/v1/deliveries/{id}", get(get_delivery))
        .route("/api/v1/deliveries/{id}/replay", post(replay_delivery))
        .route("/api/v1/deliveries/{id}/body", get(delivery_body))
}

/// Paths that need no token (used by the router-enumeration test).
pub const PUBLIC_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"];

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

/// Parses an optional JSON body (empty body = `None`).
fn optional_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<Option<T>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))
}

async fn readyz(State(s): State<AppState>) -> Response {
    // A probe with a shorter timeout than the pool's must see a 503, not a hang.
    // The detail goes to the log once per change of state (probes come every few seconds);
    // the public answer carries only the code.
    static WAS_READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
    let ready = match tokio::time::timeout(s.cfg.storage_deadline, s.store.readiness()).await {
        Ok(ready) => ready,
        Err(_) => {
            s.store
                .suspect_down("the readiness probe outlasted the storage deadline");
            Err(crate::store::NotReady::new(
                "storage_timeout",
                format!(
                    "the database did not answer within {} ms (SIGNALBOX_STORAGE_DEADLINE_MS)",
                    s.cfg.storage_deadline.as_millis()
                ),
            ))
        }
    };
    let was = WAS_READY.swap(ready.is_ok(), std::sync::atomic::Ordering::Relaxed);
    match ready {
        Ok(()) => {
            if !was {
                tracing::info!("ready again: /readyz answers 200");
            }
            (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
        }
        Err(r) => {
            if was {
                tracing::warn!(reason = r.code, detail = %r.detail, "not ready: /readyz answers 503");
            }
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "reason": r.code})),
            )
                .into_response()
        }
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct NameBody {
    name: Option<String>,
}

#[derive(Deserialize)]
struct RotateBody {
    grace_period_secs: Option<u64>,
}

async fn create_workspace(
    State(s): State<AppState>,
    Auth(p): Auth,
    JsonBody(b): JsonBody<NameBody>,
) -> ApiResult<Response> {
    let name = b
        .name
        .ok_or_else(|| ApiError::invalid("name is required"))?;
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_workspace(&p, &name).await?),
    )
        .into_response())
}

async fn list_workspaces(State(s): State<AppState>, Auth(p): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.list_workspaces(&p).await?))
}

async fn get_workspace(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.get_workspace(&p, &ws).await?))
}

async fn create_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let name = optional_json::<NameBody>(&body)?.and_then(|b| b.name);
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_webhook_key(&p, &ws, name).await?),
    )
        .into_response())
}

async fn list_keys(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.list_webhook_keys(&p, &ws).await?))
}

async fn delete_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.delete_webhook_key(&p, &id).await?))
}

async fn rotate_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let grace = optional_json::<RotateBody>(&body)?.and_then(|b| b.grace_period_secs);
    Ok(Json(s.admin.rotate_webhook_key(&p, &id, grace).await?))
}

async fn create_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    JsonBody(b): JsonBody<NewIntegration>,
) -> ApiResult<Response> {
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_integration(&p, &ws, b).await?),
    )
        .into_response())
}

async fn list_integrations(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.list_integrations(&p, Some(&ws)).await?))
}

async fn list_all_integrations(State(s): State<AppState>, Auth(p): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.list_integrations(&p, None).await?))
}

async fn get_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.get_integration(&p, &id).await?))
}

async fn update_workspace(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    JsonBody(b): JsonBody<WorkspaceUpdate>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.update_workspace(&p, &ws, b).await?))
}

async fn update_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<IntegrationUpdate>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.update_integration(&p, &id, b).await?))
}

async fn delete_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.deactivate_integration(&p, &id).await?))
}

async fn create_token(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let name = optional_json::<NameBody>(&body)?.and_then(|b| b.name);
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_token(&p, &ws, name).await?),
    )
        .into_response())
}

async fn list_tokens(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.list_tokens(&p, &ws).await?))
}

async fn revoke_token(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.revoke_token(&p, &id).await?))
}

#[derive(Deserialize)]
struct SignalsQuery {
    source: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_signals(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    Query(q): Query<SignalsQuery>,
) -> ApiResult<Json<Value>> {
    let f = SignalFilter {
        workspace_id: ws,
        source: q.source.filter(|s| !s.is_empty()),
        status: q.status.filter(|s| !s.is_empty()),
        cursor: q.cursor.filter(|s| !s.is_empty()),
        limit: q.limit.unwrap_or(50),
    };
    Ok(Json(s.admin.list_signals(&p, f).await?))
}

async fn get_signal(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.get_signal(&p, &id).await?))
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_activity(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        s.admin
            .list_activity(
                &p,
                &ws,
                q.limit.unwrap_or(50),
                q.cursor.as_deref().filter(|c| !c.is_empty()),
            )
            .await?,
    ))
}

#[derive(Deserialize)]
struct DeliveriesQuery {
    workspace_id: Option<String>,
    integration_id: Option<String>,
    status: Option<String>,
    source: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_deliveries(
    State(s): State<AppState>,
    Auth(p): Auth,
    Query(q): Query<DeliveriesQuery>,
) -> ApiResult<Json<Value>> {
    let ne = |o: Option<String>| o.filter(|s| !s.is_empty());
    let f = DeliveryFilter {
        workspace_id: ne(q.workspace_id),
        integration_id: ne(q.integration_id),
        status: ne(q.status),
        source: ne(q.source),
        cursor: ne(q.cursor),
        limit: q.limit.unwrap_or(50),
    };
    Ok(Json(s.admin.list_deliveries(&p, f).await?))
}

async fn get_delivery(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.get_delivery(&p, &id).await?))
}

async fn replay_delivery(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.admin.replay_delivery(&p, &id).await?))
}

async fn delivery_body(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (content_type, body) = s.admin.delivery_body(&p, &id).await?;
    let content_type = header::HeaderValue::from_str(&content_type)
        .unwrap_or(header::HeaderValue::from_static("application/octet-stream"));
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            // The bytes are a sender's: never let a browser run or sniff them.
            (
                header::X_CONTENT_TYPE_OPTIONS,
                header::HeaderValue::from_static("nosniff"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static("sandbox"),
            ),
        ],
        body,
    )
        .into_response())
}

async fn erase_signal(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.admin.erase_signal(&p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErasureBody {
    customer_email: String,
}

async fn erase_customer(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    JsonBody(b): JsonBody<ErasureBody>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        s.admin.erase_customer(&p, &ws, &b.customer_email).await?,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_document_is_valid_json_and_lists_the_routes() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("openapi.json")).expect("valid JSON");
        let paths = v["paths"].as_object().expect("paths");
        for p in [
            "/api/v1/workspaces",
            "/api/v1/workspaces/{ws}/integrations",
            "/api/v1/integrations/{id}",
            "/api/v1/deliveries/{id}/replay",
            "/api/webhooks/signals",
            "/api/webhooks/slack/events",
            "/api/webhooks/pylon",
        ] {
            assert!(paths.contains_key(p), "{p} missing from openapi.json");
        }
    }
}
