//! The admin HTTP API (`/api/v1/…`, bearer token) plus health, readiness and metrics. Handlers
//! are thin: they parse the request, resolve the principal and call
//! [`Admin`](crate::admin::Admin).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use crate::http::extract::JsonBody;
use crate::http::extract::{Auth, Path, Query};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::admin::views::{
    ActivityView, DeliveryView, Done, ErasureView, ErrorBody, IntegrationView, Items, Page,
    SignalView, TokenView, WebhookKeyView, WorkspaceView,
};
use crate::admin::{IntegrationUpdate, NewIntegration, WorkspaceUpdate};
use crate::error::{AdminErrors, ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{DeliveryFilter, SignalFilter};

/// Routes of the admin API and the probes, each with its OpenAPI operation.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi))
        .routes(routes!(create_workspace, list_workspaces))
        .routes(routes!(get_workspace, update_workspace))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(delete_key))
        .routes(routes!(rotate_key))
        .routes(routes!(create_integration, list_integrations))
        .routes(routes!(
            get_integration,
            update_integration,
            delete_integration
        ))
        .routes(routes!(list_all_integrations))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
        .routes(routes!(list_signals))
        .routes(routes!(get_signal, erase_signal))
        .routes(routes!(erase_customer))
        .routes(routes!(list_activity))
        .routes(routes!(list_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(replay_delivery))
        .routes(routes!(delivery_body))
}

/// Every HTTP route of the service with its operation: the admin API and probes, every
/// source's webhook receiver and the Slack OAuth flow. [`crate::http::router`] serves these and
/// [`document`] describes them, so the OpenAPI document lists exactly what is routed.
pub fn all_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes())
        .merge(crate::sources::routes())
        .merge(crate::sources::slack::oauth::routes())
}

/// The OpenAPI 3.1 document, generated from the handlers and the types they take and answer.
pub fn document() -> utoipa::openapi::OpenApi {
    all_routes().split_for_parts().1
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "signalbox",
        version = "1",
        description = "Admin API (bearer token: the admin token or a workspace token) and the \
                       webhook endpoints (authenticated by each platform's signature). Every \
                       error is `{\"error\": {\"code\", \"message\"}}` with a stable code."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "probes", description = "Liveness, readiness, metrics and this document"),
        (name = "workspaces", description = "Tenants: everything belongs to one"),
        (name = "webhook-keys", description = "Keys of the generic Standard Webhooks endpoint"),
        (name = "integrations", description = "Slack and Pylon connections"),
        (name = "tokens", description = "Workspace-scoped API tokens"),
        (name = "signals", description = "One record per customer message"),
        (name = "deliveries", description = "Every received webhook request and its outcome"),
        (name = "activity", description = "Who changed what"),
        (name = "webhooks", description = "Receivers, authenticated by the sender's signature"),
        (name = "slack", description = "Slack OAuth v2 install"),
    )
)]
struct ApiDoc;

/// Declares the `bearer` security scheme the admin operations name.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "The admin token (SIGNALBOX_ADMIN_TOKEN) or a workspace token (sbx_…)",
                        ))
                        .build(),
                ),
            );
    }
}

/// Parses an optional JSON body (empty body = `None`).
fn optional_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<Option<T>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice::<Option<T>>(body)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, description = "The process is up", body = StatusBody)))]
async fn healthz() -> Json<StatusBody> {
    Json(StatusBody {
        status: "ok".into(),
        reason: None,
    })
}

/// `/healthz` and `/readyz` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusBody {
    /// `ok`, `ready` or `unavailable`.
    pub status: String,
    /// Why not ready (`storage_timeout`, `disk_full`, …); details are in the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Readiness: 200 when storage accepts writes, else 503 with a reason code.
#[utoipa::path(get, path = "/readyz", tag = "probes", responses(
    (status = 200, description = "Storage accepts writes", body = StatusBody),
    (status = 503, description = "Not ready; `reason` says why", body = StatusBody),
))]
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
            let body = StatusBody {
                status: "ready".into(),
                reason: None,
            };
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(r) => {
            if was {
                tracing::warn!(reason = r.code, detail = %r.detail, "not ready: /readyz answers 503");
            }
            let body = StatusBody {
                status: "unavailable".into(),
                reason: Some(r.code.into()),
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "probes", responses(
    (status = 200, description = "OpenMetrics text", body = String,
     content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
))]
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

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "probes", responses(
    (status = 200, description = "The OpenAPI 3.1 document", body = Object),
))]
async fn openapi() -> Response {
    static DOC: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        document()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    });
    ([(header::CONTENT_TYPE, "application/json")], DOC.as_str()).into_response()
}

/// A display name: 1 to 200 characters, not blank.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewWorkspace {
    /// Display name.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]",
        example = "Acme"
    )]
    name: String,
}

/// An optional label.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Label {
    /// Label (1 to 200 characters, not blank); absent or `null`: none.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    name: Option<String>,
}

/// How long the replaced secret keeps verifying.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Rotate {
    /// Seconds (at most 30 days); absent: `SIGNALBOX_SECRET_GRACE_SECS`.
    #[schema(minimum = 0, maximum = 2592000)]
    #[serde(default, deserialize_with = "crate::admin::whole_secs")]
    grace_period_secs: Option<u64>,
}

/// Creates a workspace (admin token only).
#[utoipa::path(post, path = "/api/v1/workspaces", tag = "workspaces",
    security(("bearer" = [])), request_body = NewWorkspace,
    responses((status = 201, description = "Created", body = WorkspaceView), AdminErrors))]
async fn create_workspace(
    State(s): State<AppState>,
    Auth(p): Auth,
    JsonBody(b): JsonBody<NewWorkspace>,
) -> ApiResult<(StatusCode, Json<WorkspaceView>)> {
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_workspace(&p, &b.name).await?),
    ))
}

/// Lists the workspaces this token can see.
#[utoipa::path(get, path = "/api/v1/workspaces", tag = "workspaces",
    security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Items<WorkspaceView>), AdminErrors))]
async fn list_workspaces(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<Items<WorkspaceView>>> {
    Ok(Json(s.admin.list_workspaces(&p).await?))
}

/// One workspace.
#[utoipa::path(get, path = "/api/v1/workspaces/{ws}", tag = "workspaces",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    responses((status = 200, description = "OK", body = WorkspaceView), AdminErrors))]
async fn get_workspace(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(s.admin.get_workspace(&p, &ws).await?))
}

/// Renames a workspace or sets its retention. A workspace token may only shorten the
/// server's retention (`403 forbidden` otherwise).
#[utoipa::path(patch, path = "/api/v1/workspaces/{ws}", tag = "workspaces",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    request_body = WorkspaceUpdate,
    responses((status = 200, description = "Updated", body = WorkspaceView), AdminErrors))]
async fn update_workspace(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    JsonBody(b): JsonBody<WorkspaceUpdate>,
) -> ApiResult<Json<WorkspaceView>> {
    Ok(Json(s.admin.update_workspace(&p, &ws, b).await?))
}

/// Creates a key of the generic webhook endpoint; its `secret` is in this answer only.
#[utoipa::path(post, path = "/api/v1/workspaces/{ws}/webhook-keys", tag = "webhook-keys",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    request_body(content = Option<Label>, description = "Optional; an empty body is no label"),
    responses((status = 201, description = "Created (with `secret`)", body = WebhookKeyView), AdminErrors))]
async fn create_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<WebhookKeyView>)> {
    let name = optional_json::<Label>(&body)?.and_then(|b| b.name);
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_webhook_key(&p, &ws, name).await?),
    ))
}

/// Lists a workspace's webhook keys (never a secret).
#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/webhook-keys", tag = "webhook-keys",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    responses((status = 200, description = "OK", body = Items<WebhookKeyView>), AdminErrors))]
async fn list_keys(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<Items<WebhookKeyView>>> {
    Ok(Json(s.admin.list_webhook_keys(&p, &ws).await?))
}

/// Deactivates a webhook key: its deliveries are refused from now on.
#[utoipa::path(delete, path = "/api/v1/webhook-keys/{id}", tag = "webhook-keys",
    security(("bearer" = [])), params(("id" = String, Path, description = "`whk_…`")),
    responses((status = 200, description = "Deactivated", body = Done), AdminErrors))]
async fn delete_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Done>> {
    Ok(Json(s.admin.delete_webhook_key(&p, &id).await?))
}

/// Rotates a key's secret; the previous one keeps verifying for the grace period.
#[utoipa::path(post, path = "/api/v1/webhook-keys/{id}/rotate", tag = "webhook-keys",
    security(("bearer" = [])), params(("id" = String, Path, description = "`whk_…`")),
    request_body(content = Option<Rotate>, description = "Optional; an empty body takes the default grace"),
    responses((status = 200, description = "Rotated (with the new `secret`)", body = WebhookKeyView), AdminErrors))]
async fn rotate_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<WebhookKeyView>> {
    let grace = optional_json::<Rotate>(&body)?.and_then(|b| b.grace_period_secs);
    Ok(Json(s.admin.rotate_webhook_key(&p, &id, grace).await?))
}

/// Creates a Slack or Pylon integration. Slack needs `slack_team_id` and, unless the server
/// has an app-level signing secret, `signing_secret`; Pylon needs `webhook_secret`.
#[utoipa::path(post, path = "/api/v1/workspaces/{ws}/integrations", tag = "integrations",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    request_body = crate::admin::NewIntegrationDoc,
    responses((status = 201, description = "Created", body = IntegrationView),
              (status = 409, description = "The Slack team is already connected", body = ErrorBody),
              AdminErrors))]
async fn create_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    JsonBody(b): JsonBody<Value>,
) -> ApiResult<(StatusCode, Json<IntegrationView>)> {
    // `null` is refused rather than read as "absent": leave a field out instead.
    if let Some(k) = b
        .as_object()
        .and_then(|o| o.iter().find(|(_, v)| v.is_null()).map(|(k, _)| k))
    {
        return Err(ApiError::invalid(format!(
            "{k} cannot be null: leave it out instead"
        )));
    }
    let b: NewIntegration = serde_json::from_value(b)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))?;
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_integration(&p, &ws, b).await?),
    ))
}

/// Lists a workspace's integrations.
#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/integrations", tag = "integrations",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    responses((status = 200, description = "OK", body = Items<IntegrationView>), AdminErrors))]
async fn list_integrations(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<Items<IntegrationView>>> {
    Ok(Json(s.admin.list_integrations(&p, Some(&ws)).await?))
}

/// Lists every integration this token can see.
#[utoipa::path(get, path = "/api/v1/integrations", tag = "integrations",
    security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Items<IntegrationView>), AdminErrors))]
async fn list_all_integrations(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<Items<IntegrationView>>> {
    Ok(Json(s.admin.list_integrations(&p, None).await?))
}

/// One integration.
#[utoipa::path(get, path = "/api/v1/integrations/{id}", tag = "integrations",
    security(("bearer" = [])), params(("id" = String, Path, description = "`int_…`")),
    responses((status = 200, description = "OK", body = IntegrationView), AdminErrors))]
async fn get_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<IntegrationView>> {
    Ok(Json(s.admin.get_integration(&p, &id).await?))
}

/// Updates name, config, `is_active` or secrets; a field left out keeps its value.
#[utoipa::path(patch, path = "/api/v1/integrations/{id}", tag = "integrations",
    security(("bearer" = [])), params(("id" = String, Path, description = "`int_…`")),
    request_body = IntegrationUpdate,
    responses((status = 200, description = "Updated", body = IntegrationView),
              (status = 409, description = "The Slack team is already connected", body = ErrorBody),
              AdminErrors))]
async fn update_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<IntegrationUpdate>,
) -> ApiResult<Json<IntegrationView>> {
    Ok(Json(s.admin.update_integration(&p, &id, b).await?))
}

/// Deactivates an integration (its signals are kept).
#[utoipa::path(delete, path = "/api/v1/integrations/{id}", tag = "integrations",
    security(("bearer" = [])), params(("id" = String, Path, description = "`int_…`")),
    responses((status = 200, description = "Deactivated", body = IntegrationView), AdminErrors))]
async fn delete_integration(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<IntegrationView>> {
    Ok(Json(s.admin.deactivate_integration(&p, &id).await?))
}

/// Mints a workspace-scoped token (admin token only); the `token` is in this answer only.
#[utoipa::path(post, path = "/api/v1/workspaces/{ws}/tokens", tag = "tokens",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    request_body(content = Option<Label>, description = "Optional; an empty body is no label"),
    responses((status = 201, description = "Created (with `token`)", body = TokenView), AdminErrors))]
async fn create_token(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<TokenView>)> {
    let name = optional_json::<Label>(&body)?.and_then(|b| b.name);
    Ok((
        StatusCode::CREATED,
        Json(s.admin.create_token(&p, &ws, name).await?),
    ))
}

/// Lists a workspace's tokens (never a token value).
#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/tokens", tag = "tokens",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    responses((status = 200, description = "OK", body = Items<TokenView>), AdminErrors))]
async fn list_tokens(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
) -> ApiResult<Json<Items<TokenView>>> {
    Ok(Json(s.admin.list_tokens(&p, &ws).await?))
}

/// Revokes a token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    security(("bearer" = [])), params(("id" = String, Path, description = "`tok_…`")),
    responses((status = 200, description = "Revoked", body = Done), AdminErrors))]
async fn revoke_token(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Done>> {
    Ok(Json(s.admin.revoke_token(&p, &id).await?))
}

/// A page size and where to continue.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
}

/// Filters of the signal list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SignalsQuery {
    /// Only signals from this source (empty: all).
    #[param(value_type = Option<String>, pattern = "^(slack|pylon|webhook)?$")]
    source: Option<String>,
    /// Only signals with this status (empty: all).
    #[param(value_type = Option<String>, pattern = "^(new|triaged|archived|deleted)?$")]
    status: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
}

/// Lists a workspace's signals, newest first.
#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/signals", tag = "signals",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`"), SignalsQuery),
    responses((status = 200, description = "OK", body = Page<SignalView>), AdminErrors))]
async fn list_signals(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    Query(q): Query<SignalsQuery>,
) -> ApiResult<Json<Page<SignalView>>> {
    let f = SignalFilter {
        workspace_id: ws,
        source: q.source.filter(|s| !s.is_empty()),
        status: q.status.filter(|s| !s.is_empty()),
        cursor: q.cursor.filter(|s| !s.is_empty()),
        limit: q.limit.unwrap_or(50),
    };
    Ok(Json(s.admin.list_signals(&p, f).await?))
}

/// One signal.
#[utoipa::path(get, path = "/api/v1/signals/{id}", tag = "signals",
    security(("bearer" = [])), params(("id" = String, Path, description = "`sig_…`")),
    responses((status = 200, description = "OK", body = SignalView), AdminErrors))]
async fn get_signal(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<SignalView>> {
    Ok(Json(s.admin.get_signal(&p, &id).await?))
}

/// A workspace's activity log, newest first.
#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/activity", tag = "activity",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`"), PageQuery),
    responses((status = 200, description = "OK", body = Page<ActivityView>), AdminErrors))]
async fn list_activity(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<ActivityView>>> {
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

/// Filters of the delivery list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeliveriesQuery {
    /// Only this workspace's (a workspace token sees only its own).
    workspace_id: Option<String>,
    /// Only this integration's.
    integration_id: Option<String>,
    /// Only deliveries with this status (empty: all).
    #[param(value_type = Option<String>, pattern = "^(pending|processed|filtered|failed|dead)?$")]
    status: Option<String>,
    /// Only deliveries from this source (empty: all).
    #[param(value_type = Option<String>, pattern = "^(slack|pylon|webhook)?$")]
    source: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
}

/// Lists deliveries, newest first.
#[utoipa::path(get, path = "/api/v1/deliveries", tag = "deliveries",
    security(("bearer" = [])), params(DeliveriesQuery),
    responses((status = 200, description = "OK", body = Page<DeliveryView>), AdminErrors))]
async fn list_deliveries(
    State(s): State<AppState>,
    Auth(p): Auth,
    Query(q): Query<DeliveriesQuery>,
) -> ApiResult<Json<Page<DeliveryView>>> {
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

/// One delivery.
#[utoipa::path(get, path = "/api/v1/deliveries/{id}", tag = "deliveries",
    security(("bearer" = [])), params(("id" = String, Path, description = "`dlv_…`")),
    responses((status = 200, description = "OK", body = DeliveryView), AdminErrors))]
async fn get_delivery(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<DeliveryView>> {
    Ok(Json(s.admin.get_delivery(&p, &id).await?))
}

/// Processes a delivery again from its stored body.
#[utoipa::path(post, path = "/api/v1/deliveries/{id}/replay", tag = "deliveries",
    security(("bearer" = [])), params(("id" = String, Path, description = "`dlv_…`")),
    responses((status = 200, description = "Queued again", body = DeliveryView),
              (status = 409, description = "It has no workspace (it could not be routed)", body = ErrorBody),
              (status = 410, description = "Its body was purged (retention or erasure)", body = ErrorBody),
              AdminErrors))]
async fn replay_delivery(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<DeliveryView>> {
    Ok(Json(s.admin.replay_delivery(&p, &id).await?))
}

/// The raw body of a delivery as received, with its content type.
#[utoipa::path(get, path = "/api/v1/deliveries/{id}/body", tag = "deliveries",
    security(("bearer" = [])), params(("id" = String, Path, description = "`dlv_…`")),
    responses((status = 200, description = "The bytes as received", body = Vec<u8>, content_type = "*/*"),
              (status = 410, description = "Purged (retention or erasure)", body = ErrorBody),
              AdminErrors))]
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

/// Erases one signal: the signal, its deliveries' bodies and headers and the text of its
/// activity entries (logged as `signal.erased`).
#[utoipa::path(delete, path = "/api/v1/signals/{id}", tag = "signals",
    security(("bearer" = [])), params(("id" = String, Path, description = "`sig_…`")),
    responses((status = 204, description = "Erased"), AdminErrors))]
async fn erase_signal(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.admin.erase_signal(&p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whose data to erase.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Erasure {
    /// The customer's email as signals record it (1 to 320 characters).
    #[schema(
        min_length = 1,
        max_length = 320,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]",
        example = "jane@example.com"
    )]
    customer_email: String,
}

/// Erases everything about one customer email in a workspace (every signal naming it as the
/// customer, as `DELETE /api/v1/signals/{id}` does); logged as `workspace.erasure` with the
/// counts only.
#[utoipa::path(post, path = "/api/v1/workspaces/{ws}/erasure", tag = "signals",
    security(("bearer" = [])), params(("ws" = String, Path, description = "`ws_…`")),
    request_body = Erasure,
    responses((status = 200, description = "Erased", body = ErasureView), AdminErrors))]
async fn erase_customer(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(ws): Path<String>,
    JsonBody(b): JsonBody<Erasure>,
) -> ApiResult<Json<ErasureView>> {
    Ok(Json(
        s.admin.erase_customer(&p, &ws, &b.customer_email).await?,
    ))
}

#[cfg(test)]
mod tests {
    /// docs/openapi.json is the repository's copy of the document for readers and client
    /// generators; it must be what the server serves.
    #[test]
    fn the_committed_copy_is_current() {
        let generated = super::document().to_pretty_json().expect("serialises");
        let committed = include_str!("../../docs/openapi.json");
        assert!(
            committed.trim_end() == generated.trim_end(),
            "docs/openapi.json is stale: run `cargo run -q -- openapi > docs/openapi.json`"
        );
    }
}
