//! The inbox writer: group commit of verified deliveries.
//!
//! Handlers hand a [`NewDelivery`] to [`Inbox::store`] and wait; one writer task takes every
//! delivery queued at that moment (up to `inbox_batch_max`), writes them in one transaction and
//! answers each waiter once that transaction has committed. The HTTP 200 is sent only after
//! that answer, so an acknowledged delivery is durable. The queue is bounded: when it is full the
//! handler answers 503 at once (the sender retries) instead of growing memory.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{NewDelivery, Store, StoreError, Stored};

/// Why a delivery could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The writer queue is full (backpressure).
    #[error("the inbox is saturated, retry later")]
    Saturated,
    /// The writer has stopped (shutdown).
    #[error("the inbox is shutting down")]
    Closed,
    /// The transaction failed.
    #[error("storage failed: {0}")]
    Store(String),
}

type Reply = oneshot::Sender<Result<Stored, InboxError>>;

/// Handle to the inbox writer. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    tx: mpsc::Sender<(NewDelivery, Reply)>,
}

impl Inbox {
    /// Starts the writer task. `wake` is notified after each commit that stored pending work.
    /// When `stop` fires, the writer commits what is queued, then refuses new work.
    pub fn start(
        store: Store,
        capacity: usize,
        batch_max: usize,
        wake: Arc<Notify>,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> (Inbox, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let handle = tokio::spawn(writer(store, rx, batch_max, wake, metrics, stop));
        (Inbox { tx }, handle)
    }

    /// Stores one delivery; returns once it is committed (or known to be a duplicate).
    pub async fn store(&self, d: NewDelivery) -> Result<Stored, InboxError> {
        let (reply, wait) = oneshot::channel();
        self.tx.try_send((d, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InboxError::Saturated,
            mpsc::error::TrySendError::Closed(_) => InboxError::Closed,
        })?;
        wait.await.map_err(|_| InboxError::Closed)?
    }
}

async fn writer(
    store: Store,
    mut rx: mpsc::Receiver<(NewDelivery, Reply)>,
    batch_max: usize,
    wake: Arc<Notify>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut batch: Vec<(NewDelivery, Reply)> = Vec::with_capacity(batch_max);
    loop {
        let n = tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, batch_max) => n,
            _ = stop.cancelled() => {
                // Refuse new work, then commit whatever is still queued.
                rx.close();
                rx.recv_many(&mut batch, batch_max).await
            }
        };
        if n == 0 {
            break; // closed and drained
        }
        let started = Instant::now();
        let n = batch.len();
        let result = {
            let rows: Vec<&NewDelivery> = batch.iter().map(|(d, _)| d).collect();
            store.insert_deliveries(&rows).await
        };
        metrics.inbox_batch.observe(n as f64);
        match result {
            Ok(outcomes) => {
                if outcomes.iter().any(|o| matches!(o, Stored::New(_))) {
                    wake.notify_waiters();
                    wake.notify_one();
                }
                for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
                tracing::trace!(n, ms = started.elapsed().as_millis() as u64, "inbox commit");
            }
            Err(e) => {
                let msg = short_store_error(&e);
                tracing::error!(error = %msg, n, "inbox commit failed; answering 503");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(InboxError::Store(msg.clone())));
                }
            }
        }
    }
}

fn short_store_error(e: &StoreError) -> String {
    e.to_string().chars().take(300).collect()
}
