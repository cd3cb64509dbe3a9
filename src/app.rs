//! The application: one builder used by `main` and by the tests (`Application::build` →
//! `run_until_stopped`), wiring storage, credentials, the inbox writer, workers and the router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::MatchedPath;
use axum::http::{HeaderName, Request};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::admin::Admin;
use crate::config::Config;
use crate::credentials::{self, Credentials};
use crate::ingest::Inbox;
use crate::metrics::Metrics;
use crate::store::Store;

/// Everything a handler or worker needs, shared behind one `Arc` (a request clones one pointer,
/// not every handle inside).
pub type AppState = Arc<AppInner>;

/// The contents of [`AppState`].
pub struct AppInner {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Storage.
    pub store: Store,
    /// Credentials and their cache.
    pub creds: Credentials,
    /// Admin operations.
    pub admin: Admin,
    /// The inbox writer.
    pub inbox: Inbox,
    /// Metrics.
    pub metrics: Metrics,
    /// Wakes workers when new work is stored.
    pub wake: Arc<Notify>,
    /// Deliveries the inbox hands straight to local workers (already leased to them).
    pub handoff: crate::ingest::HandoffReceiver,
    /// Outbound HTTP client (Slack and Pylon APIs).
    pub http: reqwest::Client,
    /// Slack Web API client.
    pub slack: crate::slack_api::SlackApi,
}

/// Builds the outbound HTTP client (rustls on ring).
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    install_crypto_provider();
    Ok(reqwest::Client::builder()
        .user_agent(concat!("signalbox/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()?)
}

/// Installs rustls' ring provider once per process.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A built application, listening but not yet serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    inbox_task: tokio::task::JoinHandle<()>,
    inbox_stop: CancellationToken,
}

/// The HTTP router with every layer.
pub fn router(state: AppState) -> Router {
    let body_read_timeout = state.cfg.body_read_timeout;
    let request_id = HeaderName::from_static("x-request-id");
    Router::new()
        // The routes and the OpenAPI document come from one list (`api::all_routes`).
        .merge(crate::api::all_routes().split_for_parts().0)
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

impl Application {
    /// Connects storage (applying migrations), loads keys, checks they decrypt what is stored,
    /// starts the inbox writer and binds the listener (`cfg.bind`; port 0 picks one).
    pub async fn build(cfg: Config) -> anyhow::Result<Application> {
        let cfg = Arc::new(cfg);
        let store = Store::connect(&cfg).await?;
        let (keyring, note) = credentials::load_keyring(&cfg)?;
        tracing::info!("{note}");
        credentials::check_keys(&store, &keyring).await?;
        let creds = Credentials::new(store.clone(), keyring, cfg.credential_cache_ttl);
        let metrics = Metrics::new();
        let wake = Arc::new(Notify::new());
        let inbox_stop = CancellationToken::new();
        // Room for two batches per worker waiting or in progress; with no workers (a node that
        // only receives) everything goes through the database.
        let budget = cfg.worker_concurrency * cfg.worker_batch_size * 2;
        let (handoff, handoff_rx) = crate::ingest::Handoff::new(budget, cfg.lease);
        let (inbox, inbox_task) = Inbox::start(
            store.clone(),
            cfg.inbox_capacity,
            cfg.inbox_batch_max,
            wake.clone(),
            metrics.clone(),
            inbox_stop.clone(),
            (budget > 0).then_some(handoff),
        );
        let inbox = inbox.with_deadline(cfg.storage_deadline);
        let admin = Admin {
            store: store.clone(),
            creds: creds.clone(),
            cfg: cfg.clone(),
        };
        let http = http_client()?;
        let slack =
            crate::slack_api::SlackApi::new(http.clone(), &cfg.slack_api_base, metrics.clone());
        let state = Arc::new(AppInner {
            cfg: cfg.clone(),
            store,
            creds,
            admin,
            inbox,
            metrics,
            wake,
            handoff: handoff_rx,
            http,
            slack,
        });
        let listener = TcpListener::bind(cfg.bind).await.map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                "another process (perhaps another signalbox) is listening there; stop it or \
                 choose another address with SIGNALBOX_BIND"
            } else {
                "choose another address with SIGNALBOX_BIND"
            };
            anyhow::anyhow!("cannot listen on {}: {e}; {hint}", cfg.bind)
        })?;
        if cfg.admin_token.is_none() {
            tracing::warn!(
                "SIGNALBOX_ADMIN_TOKEN is not set: the admin API accepts only workspace tokens"
            );
        }
        Ok(Application {
            listener,
            state,
            inbox_task,
            inbox_stop,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The shared state (tests use it to reach the store).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves HTTP and runs the workers until `shutdown` resolves; then stops accepting,
    /// finishes in-flight requests, lets workers finish or release their deliveries, and
    /// closes storage.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            state,
            inbox_task,
            inbox_stop,
        } = self;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        for i in 0..state.cfg.worker_concurrency {
            tracker.spawn(crate::worker::run(state.clone(), i, cancel.clone()));
        }
        tracker.spawn(crate::worker::housekeeping(state.clone(), cancel.clone()));
        tracker.spawn(crate::worker::listen(state.clone(), cancel.clone()));
        tracker.close();
        let addr = listener.local_addr()?;
        tracing::info!(%addr, backend = state.store.backend(), "signalbox listening");
        let app = router(state.clone());
        let http_stop = CancellationToken::new();
        let stop = http_stop.clone();
        let server = tokio::spawn(crate::server::serve(
            listener,
            app,
            state.cfg.header_read_timeout,
            stop,
        ));
        shutdown.await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        http_stop.cancel();
        let timeout = state.cfg.shutdown_timeout;
        match tokio::time::timeout(timeout, server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within the shutdown timeout")
            }
        }
        // Every request is answered: the inbox writer commits what is queued and stops.
        inbox_stop.cancel();
        let _ = tokio::time::timeout(timeout, inbox_task).await;
        cancel.cancel();
        if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
            tracing::warn!(
                "workers did not stop within the shutdown timeout; their leases will expire"
            );
        }
        state.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
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
