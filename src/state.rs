//! The handles every handler and worker shares ([`AppState`]), built once by
//! [`crate::app::Application`]. Nothing here depends on a handler, a worker or the router.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::admin::Admin;
use crate::config::Config;
use crate::credentials::Credentials;
use crate::ingest::{HandoffReceiver, Inbox};
use crate::metrics::Metrics;
use crate::sources::slack::api::SlackApi;
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
    pub(crate) admin: Admin,
    /// The inbox.
    pub(crate) inbox: Inbox,
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// Wakes workers when new work is stored.
    pub(crate) wake: Arc<Notify>,
    /// Deliveries the inbox hands straight to local workers (already leased to them).
    pub(crate) handoff: HandoffReceiver,
    /// Outbound HTTP client (Slack and Pylon APIs).
    pub(crate) http: reqwest::Client,
    /// Slack Web API client.
    pub(crate) slack: SlackApi,
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
