//! The inbox task: group commit of verified deliveries.
//!
//! Handlers hand a [`NewDelivery`] to [`Inbox::store`] and wait; one inbox task takes every
//! delivery queued at that moment (up to `inbox_batch_max`), writes them in one transaction and
//! answers each waiter once that transaction has committed. The HTTP 200 is sent only after
//! that answer, so an acknowledged delivery is durable. The queue is bounded: when it is full the
//! handler answers 503 at once (the sender retries) instead of growing memory.
//!
//! Hand-off: the inbox task already holds every new delivery in memory, so instead of making a
//! worker claim it back from the database (a second write of the row and a read of its body),
//! it inserts up to a bounded number of pending deliveries *already leased* to this process's
//! workers and passes them over a channel after the commit. The lease keeps the usual
//! guarantees: if this process dies, the lease expires and any worker claims the delivery; the
//! worker's fenced commit makes a late or duplicate hand-off harmless.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Mutex, Notify, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::now_micros;
use crate::metrics::Metrics;
use crate::protocol::Effect;
use crate::store::{
    Applied, ClaimedDelivery, DeliveryStatus, InsertLease, NewDelivery, Store, StoreError, Stored,
};

/// Why a delivery could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The inbox queue is full (backpressure).
    #[error("the inbox is saturated, retry later")]
    Saturated,
    /// The inbox task has stopped (shutdown).
    #[error("the inbox is shutting down")]
    Closed,
    /// The transaction failed.
    #[error("storage failed: {0}")]
    Store(String),
    /// Storage did not answer within the deadline (`SIGNALBOX_STORAGE_DEADLINE_MS`).
    #[error("storage did not answer within {0:?}")]
    Deadline(std::time::Duration),
}

type Reply = oneshot::Sender<Result<Stored, InboxError>>;

/// A batch of deliveries inserted already leased to `owner`, for a local worker.
pub struct HandedOff {
    /// The lease holder to fence the commit with.
    pub owner: Arc<str>,
    /// The deliveries, as a claim would have returned them.
    pub batch: Vec<ClaimedDelivery>,
    /// Gives the batch's places back to the hand-off budget when the batch is done.
    _budget: BudgetGuard,
}

struct BudgetGuard {
    sem: Arc<Semaphore>,
    n: usize,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        self.sem.add_permits(self.n);
    }
}

/// The receiving end of the hand-off, shared by the worker tasks.
pub type HandoffReceiver = Arc<Mutex<mpsc::UnboundedReceiver<HandedOff>>>;

/// Hand-off settings for the inbox task.
pub struct Handoff {
    tx: mpsc::UnboundedSender<HandedOff>,
    owner: Arc<str>,
    lease: std::time::Duration,
    /// At most this many handed-off deliveries are unfinished at once; beyond it new deliveries
    /// are stored unleased and workers claim them from the database.
    budget: Arc<Semaphore>,
}

impl Handoff {
    /// A hand-off with room for `budget` unfinished deliveries, leased for `lease`.
    pub fn new(budget: usize, lease: std::time::Duration) -> (Handoff, HandoffReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let owner: Arc<str> = format!(
            "{}-handoff-{}",
            std::process::id(),
            crate::ids::new_id("lease")
        )
        .into();
        (
            Handoff {
                tx,
                owner,
                lease,
                budget: Arc::new(Semaphore::new(budget)),
            },
            Arc::new(Mutex::new(rx)),
        )
    }
}

/// Handle to the inbox task. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    tx: mpsc::Sender<(NewDelivery, Reply)>,
    takes_outcomes: bool,
    /// For its breaker: nothing is queued while the database is known to be unreachable.
    store: Store,
    /// Longest a caller waits for its commit (see [`Inbox::with_deadline`]).
    deadline: std::time::Duration,
}

impl Inbox {
    /// Starts the inbox task. `wake` is notified after each commit that stored pending work.
    /// When `stop` fires, the inbox task commits what is queued, then refuses new work.
    /// With `handoff`, new pending deliveries are passed to local workers directly.
    pub fn start(
        store: Store,
        capacity: usize,
        batch_max: usize,
        wake: Arc<Notify>,
        metrics: Metrics,
        stop: CancellationToken,
        handoff: Option<Handoff>,
    ) -> (Inbox, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let takes_outcomes = handoff.is_some();
        let w = InboxTask {
            store: store.clone(),
            batch_max,
            wake,
            metrics,
            handoff,
        };
        let handle = tokio::spawn(run_inbox(w, rx, stop));
        (
            Inbox {
                tx,
                takes_outcomes,
                store,
                deadline: std::time::Duration::from_secs(3600),
            },
            handle,
        )
    }

    /// Whether a receiver's outcome ([`NewDelivery::outcome`]) may be committed with its row:
    /// in a node with local workers (their hand-off lease covers the row while it finishes).
    /// Otherwise receivers need not decide one (the inbox would drop it and a worker decide
    /// again). Which outcomes commit with their row: [`crate::store::finishes_at_insert`].
    pub fn takes_outcomes(&self) -> bool {
        self.takes_outcomes
    }

    /// Callers wait at most `deadline` for their commit: past it they get
    /// [`InboxError::Deadline`] (the delivery may still commit; the sender's retry is then a
    /// duplicate) and the store's breaker opens until its probe reaches the database, so a
    /// sender or a load balancer sees a 503 in time, never a hang.
    pub fn with_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Stores one delivery; returns once it is committed (or known to be a duplicate).
    pub async fn store(&self, d: NewDelivery) -> Result<Stored, InboxError> {
        if self.store.is_down() {
            return Err(InboxError::Store("the database is unreachable".into()));
        }
        let (reply, wait) = oneshot::channel();
        self.tx.try_send((d, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InboxError::Saturated,
            mpsc::error::TrySendError::Closed(_) => InboxError::Closed,
        })?;
        match tokio::time::timeout(self.deadline, wait).await {
            Ok(answer) => answer.map_err(|_| InboxError::Closed)?,
            Err(_) => {
                self.store
                    .suspect_down("an inbox commit outlasted the storage deadline");
                Err(InboxError::Deadline(self.deadline))
            }
        }
    }
}

struct InboxTask {
    store: Store,
    batch_max: usize,
    wake: Arc<Notify>,
    metrics: Metrics,
    handoff: Option<Handoff>,
}

async fn run_inbox(
    w: InboxTask,
    mut rx: mpsc::Receiver<(NewDelivery, Reply)>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    let batch_max = w.batch_max;
    // Batches committing at once (see `Store::inbox_concurrency`): while one waits for its
    // commit, the next is already on its way.
    let max_inflight = w.store.inbox_concurrency().max(1);
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut batch: Vec<(NewDelivery, Reply)> = Vec::with_capacity(batch_max);
    let mut stopping = false;
    loop {
        if inflight.len() >= max_inflight {
            inflight.next().await;
            continue;
        }
        let n = tokio::select! {
            biased;
            Some(()) = inflight.next(), if !inflight.is_empty() => continue,
            n = rx.recv_many(&mut batch, batch_max) => n,
            _ = stop.cancelled(), if !stopping => {
                // Refuse new work, then commit whatever is still queued.
                stopping = true;
                rx.close();
                continue;
            }
        };
        if n == 0 {
            break; // closed and drained
        }
        let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_max));
        inflight.push(commit_batch(&w, full));
    }
    while inflight.next().await.is_some() {}
}

async fn commit_batch(w: &InboxTask, mut batch: Vec<(NewDelivery, Reply)>) {
    let started = Instant::now();
    let n = batch.len();
    // Outcomes the receivers decided are committed with their rows, leased to the hand-off
    // owner for the length of that transaction (with local workers on a backend that can).
    let mut outcomes: Vec<Option<Effect>> = batch
        .iter_mut()
        .map(|(d, _)| {
            let o = d.outcome.take();
            o.filter(|e| w.handoff.is_some() && crate::store::finishes_at_insert(e))
        })
        .collect();
    // Take places in the hand-off budget for the other pending deliveries (as many as are free).
    let mut handing = vec![false; n];
    let mut granted = 0usize;
    let mut permit = None;
    if let Some(h) = &w.handoff {
        let to_hand = |d: &NewDelivery, o: &Option<Effect>| {
            d.status == DeliveryStatus::Pending && o.is_none()
        };
        let pending = batch
            .iter()
            .zip(&outcomes)
            .filter(|((d, _), o)| to_hand(d, o))
            .count();
        let want = pending.min(h.budget.available_permits());
        if want > 0
            && let Ok(p) = h.budget.clone().try_acquire_many_owned(want as u32)
        {
            permit = Some(p);
            for ((slot, (d, _)), o) in handing.iter_mut().zip(batch.iter()).zip(&outcomes) {
                if granted < want && to_hand(d, o) {
                    *slot = true;
                    granted += 1;
                }
            }
        }
    }
    let until = w
        .handoff
        .as_ref()
        .map(|h| now_micros() + h.lease.as_micros() as i64);
    let lease = |rows| {
        w.handoff.as_ref().zip(until).map(|(h, until)| InsertLease {
            owner: &h.owner,
            until,
            rows,
        })
    };
    let rows: Vec<&NewDelivery> = batch.iter().map(|(d, _)| d).collect();
    let plain = |stored: Vec<Stored>| stored.into_iter().map(|s| (s, None)).collect::<Vec<_>>();
    let result = if outcomes.iter().any(Option::is_some) {
        // Rows finishing now are leased too: the outcome commits under that lease.
        let leased: Vec<bool> = handing
            .iter()
            .zip(&outcomes)
            .map(|(h, o)| *h || o.is_some())
            .collect();
        let r = w
            .store
            .insert_and_finish(&rows, lease(&leased), std::mem::take(&mut outcomes))
            .await;
        if let Err(e) = &r
            && e.is_refused_statement()
        {
            // The database refused an outcome (a constraint or trigger on signals, a deadlock
            // between concurrent batches): store the batch without outcomes, so that nothing is
            // lost and nobody gets a 503 for it. The workers claim those deliveries and decide
            // them again (and retry as usual). An unreachable or busy database is a 503 as
            // before: trying again at once would only make the sender wait longer.
            tracing::warn!(error = %short_store_error(e), n,
                "committing outcomes with the inbox batch failed; storing it without them");
            w.store
                .insert_deliveries(&rows, lease(&handing))
                .await
                .map(plain)
        } else {
            r
        }
    } else {
        w.store
            .insert_deliveries(&rows, lease(&handing))
            .await
            .map(plain)
    };
    drop(rows);
    w.metrics.inbox_batch.observe(n as f64);
    match result {
        Ok(stored) => {
            let mut handed = Vec::new();
            let mut others_pending = false;
            for (((d, reply), (outcome, applied)), leased) in
                batch.drain(..).zip(stored).zip(handing)
            {
                let new = matches!(outcome, Stored::New(_));
                let _ = reply.send(Ok(outcome));
                if let Some(applied) = applied {
                    note_outcome(&w.metrics, &d.source, &d.id, 1, d.received_at, applied);
                } else if new && leased {
                    handed.push(ClaimedDelivery::first_attempt(d));
                } else if new && d.status == DeliveryStatus::Pending {
                    others_pending = true;
                }
            }
            if others_pending {
                w.wake.notify_waiters();
                w.wake.notify_one();
            }
            if let (Some(h), Some(p)) = (&w.handoff, permit) {
                // Places taken by duplicates go back now; the rest when the batch is done.
                p.forget();
                h.budget.add_permits(granted - handed.len());
                if !handed.is_empty() {
                    let budget = BudgetGuard {
                        sem: h.budget.clone(),
                        n: handed.len(),
                    };
                    let job = HandedOff {
                        owner: h.owner.clone(),
                        batch: handed,
                        _budget: budget,
                    };
                    if h.tx.send(job).is_err() {
                        // No worker is left (shutdown): the leases expire and any worker
                        // claims these deliveries later.
                        tracing::debug!("no worker to hand deliveries to; leaving them leased");
                    }
                }
            }
            tracing::trace!(n, us = started.elapsed().as_micros() as u64, "inbox commit");
        }
        Err(e) => {
            w.store.note_failure(&e);
            let msg = short_store_error(&e);
            tracing::error!(error = %msg, n, "inbox commit failed; answering 503");
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(Err(InboxError::Store(msg.clone())));
            }
        }
    }
}

fn short_store_error(e: &StoreError) -> String {
    e.to_string().chars().take(300).collect()
}

/// Counts and logs a committed outcome: a worker's, or one its receiver decided and the inbox
/// committed with the row.
pub fn note_outcome(
    metrics: &Metrics,
    source: &str,
    id: &str,
    attempt: i32,
    received_at: i64,
    outcome: Applied,
) {
    let span = tracing::info_span!("delivery", delivery_id = %id, source = %source, attempt);
    match outcome {
        Applied::Done {
            status,
            signal_id,
            action,
        } => {
            metrics.delivery(source, status.as_str());
            metrics
                .processing_latency
                .get_or_create(&vec![("source", source.to_string())])
                .observe((now_micros() - received_at).max(0) as f64 / 1e6);
            tracing::info!(parent: &span, status = status.as_str(), signal_id = ?signal_id, action = ?action, "delivery processed");
        }
        Applied::LeaseLost => {
            tracing::warn!(parent: &span, "lease lost before commit; another worker owns the delivery");
        }
    }
}
