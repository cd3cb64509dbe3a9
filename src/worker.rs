//! Workers over the durable inbox.
//!
//! Each worker task claims a batch of due deliveries with a lease (PostgreSQL: `FOR UPDATE SKIP
//! LOCKED`; SQLite: one atomic `UPDATE … RETURNING`), turns each into an [`Effect`] through its
//! source, and commits the effect, the activity entry and the delivery's status together, fenced
//! by the lease. A worker that dies mid-way leaves its lease to expire; the delivery is then
//! claimed again and, because the fenced commit never happened, processed exactly once.
//! Transient failures back off exponentially; after `max_attempts` the delivery is `dead`.
//! Workers wake on the in-process notification (and PostgreSQL `LISTEN`), with a polling backstop.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::clock::now_micros;
use crate::ids::new_id;
use crate::ingest::{HandedOff, note_outcome};
use crate::protocol::Effect;
use crate::sources::{self, ProcessError};
use crate::state::AppState;
use crate::store::{Applied, ClaimedDelivery};

/// Runs one worker loop until `cancel` fires.
///
/// A worker takes deliveries from two places: batches the inbox hands over right after its
/// commit (already leased to this process), and the database, which it claims from at start-up,
/// when woken (new unleased work, PostgreSQL `NOTIFY`) and every `poll_interval` (retries that
/// came due, expired leases, other nodes' work).
pub async fn run(state: AppState, index: usize, cancel: CancellationToken) {
    let owner = format!("{}-w{index}-{}", std::process::id(), new_id("lease"));
    let cfg = state.cfg.clone();
    tracing::debug!(%owner, "worker started");
    let mut claim_due = true;
    let mut next_poll = tokio::time::Instant::now() + cfg.poll_interval;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        // Register interest before claiming so a wake-up between the claim and the wait is kept.
        let notified = state.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if claim_due {
            let started = std::time::Instant::now();
            match state
                .store
                .claim_deliveries(&owner, cfg.worker_batch_size, cfg.lease)
                .await
            {
                Ok(claimed) => {
                    tracing::trace!(
                        n = claimed.len(),
                        us = started.elapsed().as_micros() as u64,
                        "claim"
                    );
                    if claimed.is_empty() {
                        claim_due = false;
                    } else if cancel.is_cancelled() {
                        release(&state, &owner, claimed).await;
                        break;
                    } else {
                        handle_batch(&state, &owner, claimed).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming deliveries failed; retrying");
                    claim_due = false;
                    next_poll = tokio::time::Instant::now() + cfg.poll_interval;
                }
            }
        }
        // Hand-offs waiting now go next, so a busy database queue cannot starve them.
        let ready = state.handoff.try_lock().ok().and_then(|mut rx| {
            let first = rx.try_recv().ok()?;
            Some(gather(&mut rx, first, cfg.worker_batch_size))
        });
        if let Some(jobs) = ready {
            handle_handoffs(&state, jobs).await;
            continue;
        }
        if claim_due {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next_poll) => {
                claim_due = true;
                next_poll = tokio::time::Instant::now() + cfg.poll_interval;
            }
            _ = &mut notified => claim_due = true,
            jobs = async {
                let mut rx = state.handoff.lock().await;
                let first = rx.recv().await?;
                Some(gather(&mut rx, first, cfg.worker_batch_size))
            } => {
                if let Some(jobs) = jobs {
                    handle_handoffs(&state, jobs).await;
                }
            }
        }
        if tokio::time::Instant::now() >= next_poll {
            claim_due = true;
            next_poll = tokio::time::Instant::now() + cfg.poll_interval;
        }
    }
    // Shutdown: give back hand-offs nobody started (the attempt is not counted).
    if let Ok(mut rx) = state.handoff.try_lock() {
        while let Ok(job) = rx.try_recv() {
            release(&state, &job.owner, job.batch).await;
        }
    }
    tracing::debug!(%owner, "worker stopped");
}

/// `first` and the hand-offs queued behind it, up to `max` deliveries in all (at least
/// `first`): the inbox hands over one job per commit, often of one delivery, and a worker that
/// took them one at a time would hold each for its whole enrichment (up to its deadline) while
/// the others wait in the queue; merged, they are enriched together and wait once.
fn gather(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<HandedOff>,
    first: HandedOff,
    max: usize,
) -> Vec<HandedOff> {
    let mut n = first.batch.len();
    let mut jobs = vec![first];
    while n < max {
        let Ok(job) = rx.try_recv() else { break };
        n += job.batch.len();
        jobs.push(job);
    }
    jobs
}

/// Processes gathered hand-offs: the deliveries of jobs with the same lease owner as one batch,
/// in the order they were handed over. The jobs (their places in the hand-off budget) are kept
/// until their deliveries are done.
async fn handle_handoffs(state: &AppState, mut jobs: Vec<HandedOff>) {
    let mut i = 0;
    while i < jobs.len() {
        let owner = jobs[i].owner.clone();
        let mut batch = Vec::new();
        while let Some(job) = jobs.get_mut(i).filter(|j| j.owner == owner) {
            batch.append(&mut job.batch);
            i += 1;
        }
        handle_batch(state, &owner, batch).await;
    }
    drop(jobs);
}

async fn release(state: &AppState, owner: &str, batch: Vec<ClaimedDelivery>) {
    let ids: Vec<String> = batch.into_iter().map(|d| d.id).collect();
    if let Err(e) = state.store.release_deliveries(owner, &ids).await {
        tracing::warn!(error = %e, "could not release leases; they will expire");
    }
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = cancel.cancelled() => {}
    }
}

/// Exponential backoff with jitter: base · 2^(attempt-1), capped, ±10 %.
pub fn backoff(base: Duration, max: Duration, attempt: i32) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.clamp(1, 31) as u32 - 1));
    let capped = exp.min(max);
    let jitter = rand::thread_rng().gen_range(0.9..1.1);
    capped.mul_f64(jitter)
}

/// Processes one claimed delivery to its committed outcome (or a scheduled retry).
pub async fn handle(state: &AppState, owner: &str, d: ClaimedDelivery) {
    handle_batch(state, owner, vec![d]).await;
}

fn span_of(d: &ClaimedDelivery) -> tracing::Span {
    tracing::info_span!("delivery", delivery_id = %d.id, source = %d.source, attempt = d.attempts)
}

/// Turns one claimed delivery into its effect; `None` when it was dealt with already (dead, or
/// a retry was scheduled).
async fn prepare(state: &AppState, owner: &str, d: &ClaimedDelivery) -> Option<Effect> {
    let span = span_of(d);
    if d.attempts > state.cfg.max_attempts {
        let _ = state
            .store
            .retry_delivery(
                &d.id,
                owner,
                "exceeded the maximum number of attempts",
                now_micros(),
                true,
            )
            .await;
        state.metrics.delivery(&d.source, "dead");
        tracing::warn!(parent: &span, "delivery is dead after {} attempts", d.attempts - 1);
        return None;
    }
    let result = std::panic::AssertUnwindSafe(sources::process(state, d))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(ProcessError::retry("processing panicked")));
    match result {
        Ok(effect) => Some(effect),
        Err(e) => {
            schedule_retry(state, owner, d, e, &span).await;
            None
        }
    }
}

/// Processes a claimed batch: every delivery's effect is computed concurrently (sources may call
/// APIs), then all effects commit in one transaction (group commit on the worker side).
pub async fn handle_batch(state: &AppState, owner: &str, claimed: Vec<ClaimedDelivery>) {
    Box::pin(handle_batch_inner(state, owner, claimed)).await
}

async fn handle_batch_inner(state: &AppState, owner: &str, claimed: Vec<ClaimedDelivery>) {
    let effects = futures::future::join_all(claimed.iter().map(|d| prepare(state, owner, d))).await;
    let ready: Vec<(&ClaimedDelivery, Effect)> = claimed
        .iter()
        .zip(effects)
        .filter_map(|(d, e)| e.map(|e| (d, e)))
        .collect();
    if ready.is_empty() {
        return;
    }
    let done: Vec<&ClaimedDelivery> = ready.iter().map(|(d, _)| *d).collect();
    let started = std::time::Instant::now();
    match state.store.apply_effects(owner, ready).await {
        Ok(applied) => {
            let us = started.elapsed().as_micros() as u64;
            tracing::trace!(n = done.len(), us, "apply");
            for (d, outcome) in done.iter().zip(applied) {
                record(state, d, outcome).await;
            }
        }
        Err(e) if done.len() > 1 && e.is_refused_statement() => {
            // One delivery's outcome was refused (a constraint, a trigger) and its transaction
            // took the whole batch with it: each delivery again on its own, so that only the
            // one that fails is retried.
            tracing::debug!(error = %e, n = done.len(), "a batch's outcomes were refused; applying them one by one");
            for d in done {
                handle_batch(state, owner, vec![d.clone()]).await;
            }
        }
        Err(e) => {
            for d in done {
                let reason = format!("storing the outcome: {e}");
                schedule_retry(state, owner, d, ProcessError::retry(reason), &span_of(d)).await;
            }
        }
    }
}

async fn record(state: &AppState, d: &ClaimedDelivery, outcome: Applied) {
    if let Applied::Done {
        action: Some("integration.deactivated"),
        ..
    } = &outcome
        && let Some(id) = &d.integration_id
    {
        state.creds.changed(id).await;
    }
    note_outcome(
        &state.metrics,
        &d.source,
        &d.id,
        d.attempts,
        d.received_at,
        outcome,
    );
}

async fn schedule_retry(
    state: &AppState,
    owner: &str,
    d: &ClaimedDelivery,
    e: ProcessError,
    span: &tracing::Span,
) {
    let cfg = &state.cfg;
    // Waiting out a rate limit (the failure said when to come back) is not a failed attempt.
    if e.retry_after.is_some() {
        let _ = state.store.uncount_attempt(&d.id, owner).await;
    }
    let dead = e.retry_after.is_none() && d.attempts >= cfg.max_attempts;
    let delay = e
        .retry_after
        .unwrap_or_else(|| backoff(cfg.retry_base_delay, cfg.retry_max_delay, d.attempts));
    let next = now_micros() + delay.as_micros() as i64;
    match state
        .store
        .retry_delivery(&d.id, owner, &e.reason, next, dead)
        .await
    {
        Ok(_) => {
            state
                .metrics
                .delivery(&d.source, if dead { "dead" } else { "retried" });
            tracing::warn!(parent: span, error = %e.reason, dead, retry_in_ms = delay.as_millis() as u64, "delivery failed");
        }
        Err(se) => {
            tracing::warn!(parent: span, error = %se, "could not schedule the retry; the lease will expire");
        }
    }
}

/// Samples the queue depth and flushes `last_used_at` periodically, and applies the retention
/// policy (`SIGNALBOX_RETENTION`) when one is set.
pub async fn housekeeping(state: AppState, cancel: CancellationToken) {
    tokio::join!(
        samples(state.clone(), cancel.clone()),
        retention(state, cancel)
    );
}

/// Pause between two retention batches, so that ingest's writes get the lock in between.
const PURGE_PAUSE: Duration = Duration::from_millis(50);

/// How often retention runs: a quarter of the shortest retention in effect, between 1 s and
/// 60 s (60 s when nothing has one, so that a workspace given one later is seen within a minute).
pub fn purge_every(shortest: Option<Duration>) -> Duration {
    shortest.map_or(Duration::from_secs(60), |r| {
        (r / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    })
}

/// Retention: every [`purge_every`], for each workspace with a retention (its own, else
/// `SIGNALBOX_RETENTION`; see [`crate::store::Workspace::retention`]) clears body and headers of
/// its finished deliveries received longer ago and deletes its activity entries as old;
/// deliveries that reached no workspace follow `SIGNALBOX_RETENTION`. Each table is purged in
/// batches of [`crate::store::PURGE_BATCH`] rows (one short statement each) with
/// [`PURGE_PAUSE`] between them. Pending deliveries are never touched; the rows, with their
/// dedupe keys, stay.
async fn retention(state: AppState, cancel: CancellationToken) {
    let server = state.cfg.retention;
    // The plan is read again every few seconds, so that a retention set on a workspace takes
    // effect soon; the purge itself runs every `purge_every(shortest)`.
    let look = Duration::from_secs(5);
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        sleep_or_cancel(look, &cancel).await;
        if cancel.is_cancelled() {
            return;
        }
        let workspaces = match state.store.list_workspaces(None).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "retention could not list workspaces; it runs again later");
                continue;
            }
        };
        let now = now_micros();
        let cutoff = |keep: Duration| {
            now.saturating_sub(i64::try_from(keep.as_micros()).unwrap_or(i64::MAX))
        };
        let mut plan: Vec<(Option<&str>, Duration)> = workspaces
            .iter()
            .filter_map(|w| Some((Some(w.id.as_str()), w.retention(server)?)))
            .collect();
        if let Some(keep) = server {
            plan.push((None, keep));
        }
        let every = purge_every(plan.iter().map(|p| p.1).min());
        if plan.is_empty() || last.is_some_and(|t| t.elapsed() < every) {
            continue;
        }
        last = Some(tokio::time::Instant::now());
        let (mut deliveries, mut activity) = (0u64, 0u64);
        for (ws, keep) in plan {
            let before = cutoff(keep);
            deliveries += purge_all(&cancel, || {
                state
                    .store
                    .purge_deliveries_before(ws, before, crate::store::PURGE_BATCH)
            })
            .await;
            if let Some(ws) = ws {
                activity += purge_all(&cancel, || {
                    state
                        .store
                        .purge_activity_before(ws, before, crate::store::PURGE_BATCH)
                })
                .await;
            }
            if cancel.is_cancelled() {
                return;
            }
        }
        if deliveries + activity > 0 {
            tracing::info!(
                deliveries,
                activity,
                "retention purged old deliveries and activity"
            );
        }
    }
}

/// Runs one purge statement in batches until a batch comes back short (or an error, logged:
/// the next round retries); returns the rows it purged.
async fn purge_all<F, Fut>(cancel: &CancellationToken, mut batch: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    let mut total = 0;
    loop {
        match batch().await {
            Ok(n) => {
                total += n;
                if n < crate::store::PURGE_BATCH.unsigned_abs() || cancel.is_cancelled() {
                    return total;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention purge failed; it runs again later");
                return total;
            }
        }
        sleep_or_cancel(PURGE_PAUSE, cancel).await;
    }
}

async fn samples(state: AppState, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => break,
        }
        if let Ok(n) = state.store.pending_count().await {
            state.metrics.queue_depth.set(n);
        }
        if let Err(e) = state.creds.flush_last_used().await {
            tracing::debug!(error = %e, "flushing last_used_at failed");
        }
    }
    let _ = state.creds.flush_last_used().await;
}

/// PostgreSQL: wakes workers on `signalbox_deliveries` and drops cached credentials on
/// `signalbox_credentials`, reconnecting when the connection drops.
pub async fn listen(state: AppState, cancel: CancellationToken) {
    let crate::store::Pool::Postgres(pool) = state.store.pool().clone() else {
        return;
    };
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "LISTEN connection failed; retrying");
                sleep_or_cancel(Duration::from_secs(2), &cancel).await;
                if cancel.is_cancelled() {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener
            .listen_all(["signalbox_deliveries", crate::credentials::NOTIFY_CHANNEL])
            .await
        {
            tracing::debug!(error = %e, "LISTEN failed; retrying");
            sleep_or_cancel(Duration::from_secs(2), &cancel).await;
            if cancel.is_cancelled() {
                return;
            }
            continue;
        }
        // Anything may have changed while we were not listening.
        state.creds.invalidate_all();
        state.wake.notify_waiters();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                msg = listener.try_recv() => match msg {
                    Ok(Some(n)) => {
                        if n.channel() == crate::credentials::NOTIFY_CHANNEL {
                            state.creds.invalidate(n.payload());
                        } else {
                            state.wake.notify_waiters();
                        }
                    }
                    Ok(None) => {
                        // Connection lost and re-established by sqlx: notifications may be lost.
                        state.creds.invalidate_all();
                        state.wake.notify_waiters();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection error; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// Shared wake-up handle.
pub type Wake = Arc<tokio::sync::Notify>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        let b1 = backoff(base, max, 1).as_secs_f64();
        let b3 = backoff(base, max, 3).as_secs_f64();
        let b20 = backoff(base, max, 20).as_secs_f64();
        assert!((1.8..=2.2).contains(&b1), "{b1}");
        assert!((7.2..=8.8).contains(&b3), "{b3}");
        assert!((54.0..=66.0).contains(&b20), "{b20}");
    }
}
