//! PostgreSQL's hot path: the inbox batch (one `INSERT … SELECT FROM UNNEST` for the whole
//! batch, with outcomes decided at the edge written in the same transaction) and the workers'
//! fenced apply (a batch of effects in one transaction that commits only while the leases are
//! held). What each effect writes is decided in [`super::outcome`]; the rest of the store's SQL
//! (CRUD, lists, retention) is shared with SQLite in [`super`].

use super::*;
use outcome::{ExistingSignal, SignalChange};

/// How a PostgreSQL worker batch makes sure it still holds its deliveries' leases.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Fence {
    /// Assume it does; the final UPDATE checks, and a shortfall rolls everything back.
    AtTheEnd,
    /// Lock the rows still held first (`SELECT … FOR UPDATE`); the others are `LeaseLost`.
    LockFirst,
}

/// One PostgreSQL worker batch in one transaction. `None` when `Fence::AtTheEnd` found a lost
/// lease (nothing was written).
pub(super) async fn apply_effects_pg(
    p: &PgPool,
    owner: &str,
    batch: &[(&ClaimedDelivery, &Effect)],
    fence: Fence,
) -> Result<Option<Vec<Applied>>> {
    let mut tx = p.begin().await?;
    match apply_effects_pg_in(&mut tx, owner, batch, fence).await? {
        Some(out) => {
            tx.commit().await?;
            Ok(Some(out))
        }
        None => {
            tx.rollback().await?;
            Ok(None)
        }
    }
}

/// [`apply_effects_pg`] inside the caller's transaction; `None` means a lease was lost and the
/// caller must roll back.
pub(super) async fn apply_effects_pg_in(
    tx: &mut sqlx::PgConnection,
    owner: &str,
    batch: &[(&ClaimedDelivery, &Effect)],
    fence: Fence,
) -> Result<Option<Vec<Applied>>> {
    let now = now_micros();
    let now_s = rfc3339(now);
    let ids: Vec<String> = batch.iter().map(|(d, _)| d.id.clone()).collect();
    let held: std::collections::HashSet<String> = match fence {
        Fence::AtTheEnd => ids.iter().cloned().collect(),
        // Locked, their lease cannot change until we commit, so no per-delivery savepoint
        // is needed.
        Fence::LockFirst => sqlx::query_scalar(
            "SELECT id FROM deliveries WHERE id = ANY($1) AND lease_owner = $2 \
             AND status = 'pending' FOR UPDATE",
        )
        .bind(&ids)
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect(),
    };
    // New signals in one statement: each upsert that is the first item of the batch to touch
    // its signal. Later items on the same signal run after it, in order, below.
    let mut seen = std::collections::HashSet::new();
    let mut first_upserts: Vec<usize> = Vec::new();
    for (i, (d, e)) in batch.iter().enumerate() {
        if !held.contains(&d.id) {
            continue;
        }
        let source_ref = match e {
            Effect::Upsert { signal, .. } => &signal.source_ref,
            Effect::MarkDeleted { source_ref, .. } => source_ref,
            _ => continue,
        };
        let key = (
            d.workspace_id.as_deref(),
            d.source.as_str(),
            source_ref.as_str(),
        );
        if seen.insert(key) && matches!(e, Effect::Upsert { .. }) {
            first_upserts.push(i);
        }
    }
    let mut new_ids: Vec<Option<String>> = vec![None; batch.len()];
    if !first_upserts.is_empty() {
        let mut cols: [Vec<String>; 6] = Default::default();
        for &i in &first_upserts {
            let (d, e) = batch[i];
            if let Effect::Upsert { signal, .. } = e {
                let id = new_id(prefix::SIGNAL);
                cols[0].push(id.clone());
                cols[1].push(d.workspace_id.clone().unwrap_or_default());
                cols[2].push(signal.verbatim.clone());
                cols[3].push(d.source.clone());
                cols[4].push(signal.source_ref.clone());
                cols[5].push(signal.metadata.to_string());
                new_ids[i] = Some(id);
            }
        }
        let [c0, c1, c2, c3, c4, c5] = cols;
        let created = insert_new_signals_pg(&mut *tx, [c0, c1, c2, c3, c4], c5, now).await?;
        for id in new_ids.iter_mut() {
            if id.as_ref().is_some_and(|id| !created.contains(id)) {
                *id = None; // it existed already: merged below
            }
        }
    }
    let mut acts: Vec<[Option<String>; 7]> = Vec::new();
    let mut fin: [Vec<Option<String>>; 5] = Default::default();
    let mut out = Vec::with_capacity(batch.len());
    for (i, (delivery, effect)) in batch.iter().enumerate() {
        if !held.contains(&delivery.id) {
            out.push(Applied::LeaseLost);
            continue;
        }
        let source: &str = &delivery.source;
        let ws = delivery.workspace_id.clone().unwrap_or_default();
        let (done, entry) = match effect {
            Effect::Upsert { signal, .. } => {
                let mut created = new_ids[i].take();
                if created.is_none() && !first_upserts.contains(&i) {
                    // Not in the bulk insert (an earlier item touched this signal): try now.
                    let id = new_id(prefix::SIGNAL);
                    let r = sqlx::query(
                        "INSERT INTO signals (id, workspace_id, verbatim, source, \
                         source_ref, source_metadata, status, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, 'new', $7, $7) \
                         ON CONFLICT (workspace_id, source, source_ref) DO NOTHING",
                    )
                    .bind(&id)
                    .bind(&ws)
                    .bind(&signal.verbatim)
                    .bind(source)
                    .bind(&signal.source_ref)
                    .bind(signal.metadata.to_string())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    if r.rows_affected() == 1 {
                        created = Some(id);
                    }
                }
                if let Some(id) = created {
                    Finish::created(id, outcome::created_metadata(source, &delivery.id, signal))
                } else {
                    // It exists: merge.
                    let existing =
                        existing_signal_pg(&mut *tx, &ws, source, &signal.source_ref).await?;
                    let (change, done) =
                        outcome::on_existing(effect, source, &delivery.id, existing, &now_s);
                    write_change_pg(&mut *tx, change, now).await?;
                    done
                }
            }
            Effect::MarkDeleted { source_ref, .. } => {
                let existing = existing_signal_pg(&mut *tx, &ws, source, source_ref).await?;
                let (change, done) =
                    outcome::on_existing(effect, source, &delivery.id, existing, &now_s);
                write_change_pg(&mut *tx, change, now).await?;
                done
            }
            Effect::Filter { reason } => (Finish::filtered(reason.as_str()), None),
            Effect::Reject { reason } => (Finish::failed(reason.as_str()), None),
            Effect::DeactivateIntegration { reason } => match &delivery.integration_id {
                Some(int_id) => {
                    let changed = sqlx::query(
                        "UPDATE integrations SET is_active = $2, access_token_enc = NULL, \
                         refresh_token_enc = NULL, token_expires_at = NULL, updated_at = $3 \
                         WHERE id = $1 AND (is_active = $4 OR access_token_enc IS NOT NULL)",
                    )
                    .bind(int_id)
                    .bind(false)
                    .bind(now)
                    .bind(true)
                    .execute(&mut *tx)
                    .await?;
                    if changed.rows_affected() == 1 {
                        Finish::deactivated(source, int_id, reason, &delivery.id)
                    } else {
                        (Finish::processed(), None)
                    }
                }
                None => (Finish::no_integration(reason), None),
            },
        };
        if let Some(e) = entry {
            acts.push([
                Some(new_id(prefix::ACTIVITY)),
                Some(ws.clone()),
                e.actor,
                Some(e.action.to_string()),
                Some(e.target_type.to_string()),
                Some(e.target_id),
                Some(e.metadata),
            ]);
        }
        fin[0].push(Some(delivery.id.clone()));
        fin[1].push(Some(done.status.as_str().to_string()));
        fin[2].push(done.signal_id.clone());
        fin[3].push(done.filter_reason);
        fin[4].push(done.last_error);
        out.push(Applied::Done {
            status: done.status,
            signal_id: done.signal_id,
            action: done.action,
        });
    }
    flush_activity(&mut *tx, acts, now).await?;
    if !fin[0].is_empty() {
        let expected = fin[0].len() as u64;
        let [c0, c1, c2, c3, c4] = fin;
        let finished = sqlx::query(
            "UPDATE deliveries SET status = v.status, signal_id = v.signal_id, \
             filter_reason = v.filter_reason, last_error = v.last_error, processed_at = $6, \
             lease_owner = NULL, lease_expires_at = NULL \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
             AS v(id, status, signal_id, filter_reason, last_error) \
             WHERE deliveries.id = v.id AND deliveries.lease_owner = $7 \
             AND deliveries.status = 'pending'",
        )
        .bind(c0)
        .bind(c1)
        .bind(c2)
        .bind(c3)
        .bind(c4)
        .bind(now)
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if finished != expected {
            // Under Fence::LockFirst this cannot happen (the rows are locked and held).
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// Inserts new signals in one statement (columns: id, workspace id, verbatim, source, source
/// ref; then the metadata JSON), skipping those that exist; returns the ids it inserted. Rows
/// go in key order (ties in the given order), so that concurrent transactions take the unique
/// index's locks alike.
pub(super) async fn insert_new_signals_pg<T>(
    c: &mut sqlx::PgConnection,
    cols: [Vec<T>; 5],
    metadata: Vec<String>,
    now: i64,
) -> Result<std::collections::HashSet<String>>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    Vec<T>: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    let [c0, c1, c2, c3, c4] = cols;
    Ok(sqlx::query_scalar(
        "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, \
         source_metadata, status, created_at, updated_at) \
         SELECT id, workspace_id, verbatim, source, source_ref, source_metadata, 'new', \
         $7, $7 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::text[]) WITH ORDINALITY AS t(id, workspace_id, verbatim, source, source_ref, \
         source_metadata, n) ORDER BY workspace_id, source, source_ref, n \
         ON CONFLICT (workspace_id, source, source_ref) DO NOTHING RETURNING id",
    )
    .bind(c0)
    .bind(c1)
    .bind(c2)
    .bind(c3)
    .bind(c4)
    .bind(metadata)
    .bind(now)
    .fetch_all(&mut *c)
    .await?
    .into_iter()
    .collect())
}

/// The signal `(workspace, source, source_ref)` names, locked until the transaction ends.
pub(super) async fn existing_signal_pg(
    tx: &mut sqlx::PgConnection,
    workspace_id: &str,
    source: &str,
    source_ref: &str,
) -> Result<Option<ExistingSignal>> {
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT id, verbatim, source_metadata FROM signals WHERE workspace_id = $1 \
         AND source = $2 AND source_ref = $3 FOR UPDATE",
    )
    .bind(workspace_id)
    .bind(source)
    .bind(source_ref)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(ExistingSignal::from))
}

/// Runs the write [`outcome::on_existing`] decided on an existing signal.
pub(super) async fn write_change_pg(
    tx: &mut sqlx::PgConnection,
    change: Option<SignalChange>,
    now: i64,
) -> Result<()> {
    match change {
        Some(SignalChange::Edit {
            id,
            verbatim,
            metadata,
        }) => {
            sqlx::query(
                "UPDATE signals SET verbatim = $2, source_metadata = $3, updated_at = $4 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(verbatim)
            .bind(metadata)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        Some(SignalChange::Delete { id, metadata }) => {
            sqlx::query(
                "UPDATE signals SET source_metadata = $2, updated_at = $3, status = 'deleted' \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(metadata)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        None => {}
    }
    Ok(())
}

/// A receiver's outcome as the PostgreSQL inbox writes it with the row.
pub(super) struct PgFinish {
    pub effect: Effect,
    /// The row's final columns (for an upsert: as if the signal is new).
    pub finish: Finish,
    pub entry: Option<outcome::Entry>,
    /// The new signal's id, for an upsert.
    pub signal_id: Option<String>,
}

/// The PostgreSQL inbox batch on `c` (a transaction when `finishes` has any outcome): one
/// statement for the whole batch, of the same shape whatever its size (arrays through UNNEST),
/// so it is prepared once and planned once. Rows the unique index refused are duplicates.
///
/// A new row with a [`PgFinish`] is inserted already finished (one heap tuple and one set of
/// index entries instead of a pending row and its update), then its new signal and activity
/// entry are inserted. If the signal already existed (an edit, a re-sent message), the row is
/// put back to pending under its lease and finished by the worker's own code
/// ([`apply_effects_pg_in`]), which merges, in the same transaction.
pub(super) async fn insert_deliveries_pg<'l>(
    c: &mut sqlx::PgConnection,
    batch: &[&NewDelivery],
    leased: &(dyn Fn(usize) -> (Option<&'l str>, Option<i64>, i32) + Sync),
    finishes: &[Option<PgFinish>],
    now: i64,
) -> Result<Vec<(Stored, Option<Applied>)>> {
    let n = batch.len();
    let mut cols = PgDeliveryColumns::with_capacity(n);
    for (i, (d, f)) in batch.iter().zip(finishes).enumerate() {
        match f {
            Some(f) => cols.push_finished(d, &f.finish, now),
            None => {
                let (owner, until, attempts) = leased(i);
                cols.push(d, owner, until, attempts);
            }
        }
    }
    let inserted: std::collections::HashSet<String> = sqlx::query_scalar(
        "INSERT INTO deliveries (id, workspace_id, integration_id, webhook_key_id, source, \
         dedupe_scope, dedupe_key, body, headers, status, attempts, next_attempt_at, \
         filter_reason, received_at, processed_at, lease_owner, lease_expires_at, signal_id, \
         last_error) \
         SELECT id, workspace_id, integration_id, webhook_key_id, source, dedupe_scope, \
         dedupe_key, body, headers, status, attempts, received_at, filter_reason, \
         received_at, processed_at, lease_owner, lease_expires_at, signal_id, last_error \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::bytea[], $9::text[], $10::text[], $11::int4[], $12::text[], \
         $13::int8[], $14::int8[], $15::text[], $16::int8[], $17::text[], $18::text[]) \
         WITH ORDINALITY AS t(id, workspace_id, integration_id, webhook_key_id, source, \
         dedupe_scope, dedupe_key, body, headers, status, attempts, filter_reason, \
         received_at, processed_at, lease_owner, lease_expires_at, signal_id, last_error, n) \
         ORDER BY dedupe_scope, dedupe_key, n \
         ON CONFLICT (dedupe_scope, dedupe_key) DO NOTHING RETURNING id",
    )
    .bind(cols.id)
    .bind(cols.workspace_id)
    .bind(cols.integration_id)
    .bind(cols.webhook_key_id)
    .bind(cols.source)
    .bind(cols.dedupe_scope)
    .bind(cols.dedupe_key)
    .bind(cols.body)
    .bind(cols.headers)
    .bind(cols.status)
    .bind(cols.attempts)
    .bind(cols.filter_reason)
    .bind(cols.received_at)
    .bind(cols.processed_at)
    .bind(cols.lease_owner)
    .bind(cols.lease_expires_at)
    .bind(cols.signal_id)
    .bind(cols.last_error)
    .fetch_all(&mut *c)
    .await?
    .into_iter()
    .collect();
    let mut out = Vec::with_capacity(n);
    let mut any_pending = false;
    for (i, d) in batch.iter().enumerate() {
        if inserted.contains(&d.id) {
            // Leased rows go to a local worker: nobody else needs waking for them.
            any_pending |= d.status == DeliveryStatus::Pending
                && leased(i).0.is_none()
                && finishes[i].is_none();
            out.push((Stored::New(d.id.clone()), None));
        } else {
            let existing: String = sqlx::query_scalar(
                "SELECT id FROM deliveries WHERE dedupe_scope = $1 AND dedupe_key = $2",
            )
            .bind(&d.dedupe_scope)
            .bind(&d.dedupe_key)
            .fetch_one(&mut *c)
            .await?;
            out.push((Stored::Duplicate(existing), None));
        }
    }
    // The new rows' signals, in one statement: where two rows make the same signal, the first
    // in batch order inserts it and the second finds it existing (and merges, below). Rows (here
    // and in the insert above) go in key order, so that inbox batches committing at once take
    // their unique-index locks in the same order and cannot deadlock on each other.
    let new_finished: Vec<bool> = out
        .iter()
        .zip(finishes)
        .map(|((stored, _), f)| matches!(stored, Stored::New(_)) && f.is_some())
        .collect();
    let mut sig: [Vec<&str>; 5] = Default::default();
    let mut sig_meta: Vec<String> = Vec::new();
    for (i, (d, f)) in batch.iter().zip(finishes).enumerate() {
        if let Some(PgFinish {
            effect: Effect::Upsert { signal, .. },
            signal_id: Some(sid),
            ..
        }) = f
            && new_finished[i]
        {
            sig[0].push(sid);
            sig[1].push(d.workspace_id.as_deref().unwrap_or_default());
            sig[2].push(&signal.verbatim);
            sig[3].push(&d.source);
            sig[4].push(&signal.source_ref);
            sig_meta.push(outcome::json_text(&signal.metadata));
        }
    }
    let created: std::collections::HashSet<String> = if sig[0].is_empty() {
        Default::default()
    } else {
        insert_new_signals_pg(&mut *c, sig, sig_meta, now).await?
    };
    // Rows whose signal existed: back to pending under their lease, finished as a worker would.
    let mut acts: Vec<[Option<String>; 7]> = Vec::new();
    let mut merge: Vec<usize> = Vec::new();
    for (i, (d, f)) in batch.iter().zip(finishes).enumerate() {
        let Some(f) = f else { continue };
        if !new_finished[i] {
            continue;
        }
        if f.signal_id
            .as_ref()
            .is_some_and(|sid| !created.contains(sid))
        {
            merge.push(i);
            continue;
        }
        if let Some(e) = &f.entry {
            acts.push([
                Some(new_id(prefix::ACTIVITY)),
                Some(d.workspace_id.clone().unwrap_or_default()),
                e.actor.clone(),
                Some(e.action.to_string()),
                Some(e.target_type.to_string()),
                Some(e.target_id.clone()),
                Some(e.metadata.clone()),
            ]);
        }
        out[i].1 = Some(Applied::Done {
            status: f.finish.status,
            signal_id: f.finish.signal_id.clone(),
            action: f.finish.action,
        });
    }
    flush_activity(&mut *c, acts, now).await?;
    if let Some(&first) = merge.first() {
        let (Some(owner), Some(until), _) = leased(first) else {
            return Err(StoreError::Writer("an outcome without a lease".into()));
        };
        let ids: Vec<&str> = merge.iter().map(|&i| batch[i].id.as_str()).collect();
        sqlx::query(
            "UPDATE deliveries SET status = 'pending', signal_id = NULL, processed_at = NULL, \
             lease_owner = $2, lease_expires_at = $3 WHERE id = ANY($1)",
        )
        .bind(&ids)
        .bind(owner)
        .bind(until)
        .execute(&mut *c)
        .await?;
        let claimed: Vec<ClaimedDelivery> = merge
            .iter()
            .map(|&i| ClaimedDelivery::first_attempt(batch[i].clone()))
            .collect();
        let pairs: Vec<(&ClaimedDelivery, &Effect)> = claimed
            .iter()
            .zip(&merge)
            .filter_map(|(d, &i)| finishes[i].as_ref().map(|f| (d, &f.effect)))
            .collect();
        let applied = apply_effects_pg_in(c, owner, &pairs, Fence::AtTheEnd)
            .await?
            .ok_or_else(|| {
                StoreError::Writer("a row leased in this transaction was lost".into())
            })?;
        for (&i, a) in merge.iter().zip(applied) {
            out[i].1 = Some(a);
        }
    }
    if any_pending {
        sqlx::query("SELECT pg_notify('signalbox_deliveries', '')")
            .execute(&mut *c)
            .await?;
    }
    Ok(out)
}

/// An inbox batch as one array per column (PostgreSQL `UNNEST`), borrowed from the batch.
#[derive(Default)]
pub(super) struct PgDeliveryColumns<'a> {
    id: Vec<&'a str>,
    workspace_id: Vec<Option<&'a str>>,
    integration_id: Vec<Option<&'a str>>,
    webhook_key_id: Vec<Option<&'a str>>,
    source: Vec<&'a str>,
    dedupe_scope: Vec<&'a str>,
    dedupe_key: Vec<&'a str>,
    body: Vec<&'a [u8]>,
    headers: Vec<&'a str>,
    status: Vec<&'static str>,
    attempts: Vec<i32>,
    filter_reason: Vec<Option<&'a str>>,
    received_at: Vec<i64>,
    processed_at: Vec<Option<i64>>,
    lease_owner: Vec<Option<&'a str>>,
    lease_expires_at: Vec<Option<i64>>,
    signal_id: Vec<Option<&'a str>>,
    last_error: Vec<Option<&'a str>>,
}

impl<'a> PgDeliveryColumns<'a> {
    fn with_capacity(n: usize) -> Self {
        PgDeliveryColumns {
            id: Vec::with_capacity(n),
            body: Vec::with_capacity(n),
            ..Default::default()
        }
    }

    fn push(
        &mut self,
        d: &'a NewDelivery,
        owner: Option<&'a str>,
        until: Option<i64>,
        attempts: i32,
    ) {
        self.id.push(&d.id);
        self.workspace_id.push(d.workspace_id.as_deref());
        self.integration_id.push(d.integration_id.as_deref());
        self.webhook_key_id.push(d.webhook_key_id.as_deref());
        self.source.push(&d.source);
        self.dedupe_scope.push(&d.dedupe_scope);
        self.dedupe_key.push(&d.dedupe_key);
        self.body.push(&d.body);
        self.headers.push(&d.headers);
        self.status.push(d.status.as_str());
        self.attempts.push(attempts);
        self.filter_reason.push(d.filter_reason.as_deref());
        self.received_at.push(d.received_at);
        self.processed_at
            .push((d.status != DeliveryStatus::Pending).then_some(d.received_at));
        self.lease_owner.push(owner);
        self.lease_expires_at.push(until);
        self.signal_id.push(None);
        self.last_error.push(None);
    }

    /// A row inserted already finished with `f` (first attempt, processed at `now`).
    fn push_finished(&mut self, d: &'a NewDelivery, f: &'a Finish, now: i64) {
        self.push(d, None, None, 1);
        let last = self.id.len() - 1;
        self.status[last] = f.status.as_str();
        self.filter_reason[last] = f.filter_reason.as_deref();
        self.processed_at[last] = Some(now);
        self.signal_id[last] = f.signal_id.as_deref();
        self.last_error[last] = f.last_error.as_deref();
    }
}
