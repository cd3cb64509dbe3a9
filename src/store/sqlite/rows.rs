//! The per-delivery SQL the writer thread runs (rusqlite, cached statements): the inbox batch
//! insert, the workers' claim and the fenced apply of their outcomes. What each effect writes
//! is decided in [`crate::store::outcome`].

use super::*;

/// A delivery to insert, with the lease it gets at insert time (hand-off), if any.
pub(crate) struct InsertRow {
    pub(crate) d: NewDelivery,
    pub(crate) lease: Option<(String, i64)>,
    /// The outcome to commit with the row when it is new (the row must be leased).
    pub(crate) finish: Option<ApplyItem>,
}

/// One claimed delivery's outcome to commit.
pub(crate) struct ApplyItem {
    pub(crate) id: String,
    pub(crate) workspace_id: Option<String>,
    pub(crate) integration_id: Option<String>,
    pub(crate) source: String,
    pub(crate) effect: Effect,
    /// For an upsert: the signal's metadata and the `signal.created` entry's metadata, as JSON
    /// text. Serialising them is the caller's work, not the writer thread's: that thread is the
    /// backend's one serial resource.
    pub(crate) upsert_json: Option<(String, String)>,
}

impl ApplyItem {
    /// The item for `d` and its effect, with its JSON serialised on the calling thread.
    pub(crate) fn new(d: &ClaimedDelivery, effect: Effect) -> ApplyItem {
        Self::of(&d.id, &d.workspace_id, &d.integration_id, &d.source, effect)
    }

    /// The item for a delivery not stored yet, finished in its insert's transaction.
    pub(crate) fn for_new(d: &NewDelivery, effect: Effect) -> ApplyItem {
        Self::of(&d.id, &d.workspace_id, &d.integration_id, &d.source, effect)
    }

    pub(super) fn of(
        id: &str,
        workspace_id: &Option<String>,
        integration_id: &Option<String>,
        source: &str,
        effect: Effect,
    ) -> ApplyItem {
        let upsert_json = match &effect {
            Effect::Upsert { signal, .. } => Some((
                json_text(&signal.metadata),
                outcome::created_metadata(source, id, signal),
            )),
            _ => None,
        };
        ApplyItem {
            id: id.to_string(),
            workspace_id: workspace_id.clone(),
            integration_id: integration_id.clone(),
            source: source.to_string(),
            effect,
            upsert_json,
        }
    }
}

pub(super) fn insert_deliveries(
    conn: &Connection,
    rows: &[InsertRow],
) -> rusqlite::Result<Vec<(Stored, Option<Applied>)>> {
    let mut out = Vec::with_capacity(rows.len());
    // New rows to finish now (their index in `out`, the outcome), and their lease holder: all
    // leased rows of a batch share one, the local hand-off owner.
    let mut to_finish: Vec<(usize, &ApplyItem)> = Vec::new();
    let mut holder = None;
    {
        let mut insert = conn.prepare_cached(
            "INSERT INTO deliveries (id, workspace_id, integration_id, webhook_key_id, \
             source, dedupe_scope, dedupe_key, body, headers, status, attempts, \
             next_attempt_at, filter_reason, received_at, processed_at, lease_owner, \
             lease_expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?14, ?11, ?12, ?11, ?13, ?15, ?16) \
             ON CONFLICT (dedupe_scope, dedupe_key) DO NOTHING",
        )?;
        let mut existing = conn.prepare_cached(
            "SELECT id FROM deliveries WHERE dedupe_scope = ?1 AND dedupe_key = ?2",
        )?;
        for InsertRow { d, lease, finish } in rows {
            let (owner, until) = match lease {
                Some((o, u)) => (Some(o.as_str()), Some(*u)),
                None => (None, None),
            };
            let n = insert.execute(params![
                d.id,
                d.workspace_id,
                d.integration_id,
                d.webhook_key_id,
                d.source,
                d.dedupe_scope,
                d.dedupe_key,
                &d.body[..],
                d.headers,
                d.status.as_str(),
                d.received_at,
                d.filter_reason,
                (d.status != DeliveryStatus::Pending).then_some(d.received_at),
                i32::from(lease.is_some()),
                owner,
                until,
            ])?;
            if n == 1 {
                if let (Some(item), Some(owner)) = (finish, owner) {
                    to_finish.push((out.len(), item));
                    holder = Some(owner);
                }
                out.push((Stored::New(d.id.clone()), None));
            } else {
                let id: String =
                    existing.query_row(params![d.dedupe_scope, d.dedupe_key], |r| r.get(0))?;
                out.push((Stored::Duplicate(id), None));
            }
        }
    }
    // In insert order, so that an edit finishes after the message it edits.
    if let Some(owner) = holder {
        let applied = apply(conn, owner, to_finish.iter().map(|(_, item)| *item))?;
        for ((i, _), a) in to_finish.iter().zip(applied) {
            out[*i].1 = Some(a);
        }
    }
    Ok(out)
}

pub(super) fn claim(
    conn: &Connection,
    owner: &str,
    now: i64,
    until: i64,
    limit: usize,
) -> rusqlite::Result<Vec<ClaimedDelivery>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE deliveries SET lease_owner = ?1, lease_expires_at = ?2, \
         attempts = attempts + 1 WHERE id IN (SELECT id FROM deliveries \
         WHERE status = 'pending' AND next_attempt_at <= ?3 AND \
         (lease_expires_at IS NULL OR lease_expires_at < ?3) \
         ORDER BY next_attempt_at LIMIT ?4) RETURNING id, workspace_id, integration_id, \
         webhook_key_id, source, dedupe_key, body, headers, attempts, received_at",
    )?;
    let mut rows: Vec<ClaimedDelivery> = stmt
        .query_map(params![owner, until, now, limit as i64], |r| {
            Ok(ClaimedDelivery {
                id: r.get(0)?,
                workspace_id: r.get(1)?,
                integration_id: r.get(2)?,
                webhook_key_id: r.get(3)?,
                source: r.get(4)?,
                dedupe_key: r.get(5)?,
                body: r.get::<_, Vec<u8>>(6)?.into(),
                headers: r.get(7)?,
                attempts: r.get(8)?,
                received_at: r.get(9)?,
                parsed: Default::default(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.sort_by_key(|d| d.received_at);
    Ok(rows)
}

pub(super) fn apply<'a>(
    conn: &Connection,
    owner: &str,
    items: impl IntoIterator<Item = &'a ApplyItem>,
) -> rusqlite::Result<Vec<Applied>> {
    let now = now_micros();
    let now_s = rfc3339(now);
    let mut out = Vec::new();
    // Under SQLite's single write lock no lease changes while we hold it, so checking the lease
    // first is as good as fencing the final UPDATE.
    let mut held = conn.prepare_cached(
        "SELECT 1 FROM deliveries WHERE id = ?1 AND lease_owner = ?2 AND status = 'pending'",
    )?;
    let mut insert_signal = conn.prepare_cached(
        "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, \
         source_metadata, status, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'new', ?7, ?7) \
         ON CONFLICT (workspace_id, source, source_ref) DO NOTHING",
    )?;
    let mut find_signal = conn.prepare_cached(
        "SELECT id, verbatim, source_metadata FROM signals WHERE workspace_id = ?1 \
         AND source = ?2 AND source_ref = ?3",
    )?;
    let mut insert_activity = conn.prepare_cached(
        "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, target_id, \
         metadata, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut finish = conn.prepare_cached(
        "UPDATE deliveries SET status = ?2, signal_id = ?3, filter_reason = ?4, \
         last_error = ?5, processed_at = ?6, lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = ?1",
    )?;
    for item in items {
        if !held.exists(params![item.id, owner])? {
            out.push(Applied::LeaseLost);
            continue;
        }
        let ws = item.workspace_id.as_deref().unwrap_or_default();
        let source = item.source.as_str();
        let (done, entry) = match &item.effect {
            Effect::Upsert { signal, .. } => {
                // Insert first (the common case, a new signal); merge only on conflict. Ids are
                // made here, under the write lock, so that id order is commit order.
                let serialised;
                let (metadata, created) = match &item.upsert_json {
                    Some((m, c)) => (m.as_str(), Some(c)),
                    None => {
                        serialised = signal.metadata.to_string();
                        (serialised.as_str(), None)
                    }
                };
                let id = new_id(prefix::SIGNAL);
                let n = insert_signal.execute(params![
                    id,
                    ws,
                    signal.verbatim,
                    source,
                    signal.source_ref,
                    metadata,
                    now
                ])?;
                if n == 1 {
                    let created = created
                        .cloned()
                        .unwrap_or_else(|| outcome::created_metadata(source, &item.id, signal));
                    Finish::created(id, created)
                } else {
                    let existing = find_signal
                        .query_row(params![ws, source, signal.source_ref], row3)
                        .optional()?;
                    let (change, done) =
                        outcome::on_existing(&item.effect, source, &item.id, existing, &now_s);
                    write_change(conn, change, now)?;
                    done
                }
            }
            Effect::MarkDeleted { source_ref, .. } => {
                let existing = find_signal
                    .query_row(params![ws, source, source_ref], row3)
                    .optional()?;
                let (change, done) =
                    outcome::on_existing(&item.effect, source, &item.id, existing, &now_s);
                write_change(conn, change, now)?;
                done
            }
            Effect::Filter { reason } => (Finish::filtered(reason.as_str()), None),
            Effect::Reject { reason } => (Finish::failed(reason.as_str()), None),
            Effect::DeactivateIntegration { reason } => match &item.integration_id {
                Some(int_id) => {
                    let changed = conn
                        .prepare_cached(
                            "UPDATE integrations SET is_active = 0, access_token_enc = NULL, \
                             refresh_token_enc = NULL, token_expires_at = NULL, \
                             updated_at = ?2 WHERE id = ?1 \
                             AND (is_active = 1 OR access_token_enc IS NOT NULL)",
                        )?
                        .execute(params![int_id, now])?;
                    if changed == 1 {
                        Finish::deactivated(source, int_id, reason, &item.id)
                    } else {
                        (Finish::processed(), None)
                    }
                }
                None => (Finish::no_integration(reason), None),
            },
        };
        if let Some(e) = entry {
            insert_activity.execute(params![
                new_id(prefix::ACTIVITY),
                ws,
                e.actor,
                e.action,
                e.target_type,
                e.target_id,
                e.metadata,
                now
            ])?;
        }
        finish.execute(params![
            item.id,
            done.status.as_str(),
            done.signal_id,
            done.filter_reason,
            done.last_error,
            now
        ])?;
        out.push(Applied::Done {
            status: done.status,
            signal_id: done.signal_id,
            action: done.action,
        });
    }
    Ok(out)
}

pub(super) fn row3(r: &rusqlite::Row<'_>) -> rusqlite::Result<ExistingSignal> {
    Ok(ExistingSignal {
        id: r.get(0)?,
        verbatim: r.get(1)?,
        metadata: r.get(2)?,
    })
}

/// Runs the write [`outcome::on_existing`] decided on an existing signal.
pub(super) fn write_change(
    conn: &Connection,
    change: Option<SignalChange>,
    now: i64,
) -> rusqlite::Result<()> {
    match change {
        Some(SignalChange::Edit {
            id,
            verbatim,
            metadata,
        }) => {
            conn.prepare_cached(
                "UPDATE signals SET verbatim = ?2, source_metadata = ?3, updated_at = ?4 \
                 WHERE id = ?1",
            )?
            .execute(params![id, verbatim, metadata, now])?;
        }
        Some(SignalChange::Delete { id, metadata }) => {
            conn.prepare_cached(
                "UPDATE signals SET source_metadata = ?2, updated_at = ?3, status = 'deleted' \
                 WHERE id = ?1",
            )?
            .execute(params![id, metadata, now])?;
        }
        None => {}
    }
    Ok(())
}
