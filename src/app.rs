//! The application: one builder used by `main` and by the tests (`Application::build` →
//! `run_until_stopped`), wiring storage, credentials, the inbox task, workers and the router.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::Config;
use crate::credentials::{self, Credentials};
use crate::http::router;
use crate::ingest::Inbox;
use crate::metrics::Metrics;
use crate::state::{AppInner, AppState, http_client};
use crate::store::Store;

/// A built application, listening but not yet serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    inbox_task: tokio::task::JoinHandle<()>,
    inbox_stop: CancellationToken,
}

impl Application {
    /// Connects storage (applying migrations), loads keys, checks they decrypt what is stored,
    /// starts the inbox task and binds the listener (`cfg.bind`; port 0 picks one).
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
            sources: crate::sources::SOURCES,
            platforms: crate::sources::PLATFORMS,
        };
        let http = http_client()?;
        let slack = crate::sources::slack::api::SlackApi::new(
            http.clone(),
            &cfg.slack_api_base,
            metrics.clone(),
        );
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
        let server = tokio::spawn(crate::http::server::serve(
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
        // Every request is answered: the inbox task commits what is queued and stops.
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
