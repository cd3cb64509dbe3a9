//! What applying an [`Effect`] writes, decided once for both backends and without the database:
//! which effects commit with their inbox row ([`finishes_at_insert`]), what an effect does to
//! the signal that is already there ([`on_existing`]), and the delivery's final columns and
//! activity entry ([`Finish`]). The backends differ only in how they read the existing row and
//! run the writes (rusqlite on SQLite's writer thread, sqlx on PostgreSQL); what they write,
//! and the text and metadata users see, comes from here.

use serde_json::{Value, json};

use super::DeliveryStatus;
use crate::protocol::Effect;
use crate::protocol::effect::{Merged, NewSignal, mark_deleted, merge_into};

/// Whether the inbox commits `effect` with its row (the delivery is inserted finished, in the
/// same transaction): a new or changed signal, a filter, a rejection — outcomes whose final
/// columns are known before the insert. A deletion (it must not overtake the message it
/// deletes, which may be waiting for enrichment in a worker) and a deactivation (the worker
/// refreshes the credential cache after it) go through a worker. The one place this is
/// decided: receivers offer any outcome they know without I/O, the inbox and both backends ask
/// here.
pub fn finishes_at_insert(effect: &Effect) -> bool {
    matches!(
        effect,
        Effect::Upsert { .. } | Effect::Filter { .. } | Effect::Reject { .. }
    )
}

/// A signal row that is already there, as read inside the applying transaction.
pub(super) struct ExistingSignal {
    pub id: String,
    pub verbatim: String,
    /// `source_metadata` as stored (JSON text).
    pub metadata: String,
}

impl From<(String, String, String)> for ExistingSignal {
    fn from((id, verbatim, metadata): (String, String, String)) -> Self {
        ExistingSignal {
            id,
            verbatim,
            metadata,
        }
    }
}

/// A write to an existing signal row, decided by [`on_existing`].
pub(super) enum SignalChange {
    /// Signal `id` gets new verbatim and metadata (an edit, or metadata merged in).
    Edit {
        id: String,
        verbatim: String,
        metadata: String,
    },
    /// Signal `id`'s metadata is marked deleted and its status `deleted`.
    Delete { id: String, metadata: String },
}

/// What an upsert whose signal already exists, or a deletion, does: the write to that signal
/// , if any, and the delivery's finish. `existing` is `None` when the
/// row is not there (an upsert racing a purge, a deletion of a message never captured). `now`
/// is the RFC 3339 time recorded in edit and deletion metadata. Other effects need no existing
/// signal: `None` and a processed finish.
pub(super) fn on_existing(
    effect: &Effect,
    source: &str,
    delivery_id: &str,
    existing: Option<ExistingSignal>,
    now: &str,
) -> (Option<SignalChange>, (Finish, Option<Entry>)) {
    let old_meta =
        |e: &ExistingSignal| -> Value { serde_json::from_str(&e.metadata).unwrap_or(Value::Null) };
    match (effect, existing) {
        (Effect::Upsert { signal, merge }, Some(e)) => {
            match merge_into(&e.verbatim, &old_meta(&e), signal, *merge, now) {
                Merged::Updated { verbatim, metadata } => {
                    let done = Finish::updated(source, delivery_id, e.id.clone(), &verbatim);
                    let change = SignalChange::Edit {
                        id: e.id,
                        verbatim,
                        metadata: json_text(&metadata),
                    };
                    (Some(change), done)
                }
                Merged::Unchanged => (None, (Finish::on_signal(e.id), None)),
            }
        }
        (Effect::MarkDeleted { metadata, .. }, Some(e)) => {
            let old = old_meta(&e);
            if old.get("deleted") == Some(&Value::Bool(true)) {
                return (None, (Finish::on_signal(e.id), None));
            }
            let done = Finish::deleted(source, delivery_id, e.id.clone());
            let change = SignalChange::Delete {
                id: e.id,
                metadata: json_text(&mark_deleted(&old, metadata, now)),
            };
            (Some(change), done)
        }
        (Effect::MarkDeleted { .. }, None) => (None, (Finish::never_seen(), None)),
        _ => (None, (Finish::processed(), None)),
    }
}

/// Longest verbatim excerpt kept in an activity entry, in characters.
const PREVIEW_CHARS: usize = 100;

/// The start of a verbatim, for activity metadata.
pub(super) fn preview(s: &str) -> String {
    s.chars().take(PREVIEW_CHARS).collect()
}

/// The metadata of the `signal.created` entry for `signal` (JSON text). It depends only on the
/// delivery, so callers serialise it before taking the write lock.
pub(super) fn created_metadata(source: &str, delivery_id: &str, signal: &NewSignal) -> String {
    // Fields in the order `json!` gave them (alphabetical), without building a map first.
    #[derive(serde::Serialize)]
    struct Created<'a> {
        delivery_id: &'a str,
        source: &'a str,
        source_ref: &'a str,
        verbatim_preview: &'a str,
    }
    let end = signal
        .verbatim
        .char_indices()
        .nth(PREVIEW_CHARS)
        .map_or(signal.verbatim.len(), |(i, _)| i);
    json_text(&Created {
        delivery_id,
        source,
        source_ref: &signal.source_ref,
        verbatim_preview: &signal.verbatim[..end],
    })
}

/// `value` as JSON text. `serde_json::to_string` writes straight into a buffer; `Display` (what
/// `to_string()` on a `Value` uses) goes through a formatter adapter and is slower.
pub(super) fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // Serialising a map with string keys, or a struct of strings, cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string())
}

/// A finished delivery's columns.
#[derive(Debug)]
pub(super) struct Finish {
    pub status: DeliveryStatus,
    pub signal_id: Option<String>,
    pub filter_reason: Option<String>,
    pub last_error: Option<String>,
    /// The action logged for it, if any (`signal.created`, …).
    pub action: Option<&'static str>,
}

/// An activity-log entry of a finished delivery (its workspace is the delivery's).
#[derive(Debug)]
pub(super) struct Entry {
    pub actor: Option<String>,
    pub action: &'static str,
    pub target_type: &'static str,
    pub target_id: String,
    /// The entry's metadata, already serialised (JSON text).
    pub metadata: String,
}

impl Finish {
    fn new(status: DeliveryStatus) -> Finish {
        Finish {
            status,
            signal_id: None,
            filter_reason: None,
            last_error: None,
            action: None,
        }
    }

    fn logged(mut self, entry: Entry) -> (Finish, Option<Entry>) {
        self.action = Some(entry.action);
        (self, Some(entry))
    }

    /// A new signal was inserted; `metadata` is [`created_metadata`] of it.
    pub fn created(signal_id: String, metadata: String) -> (Finish, Option<Entry>) {
        let entry = Entry {
            actor: None,
            action: "signal.created",
            target_type: "signal",
            target_id: signal_id.clone(),
            metadata,
        };
        Finish::on_signal(signal_id).logged(entry)
    }

    /// An existing signal took the delivery's changes.
    pub fn updated(
        source: &str,
        delivery_id: &str,
        signal_id: String,
        verbatim: &str,
    ) -> (Finish, Option<Entry>) {
        let entry = Entry {
            actor: None,
            action: "signal.updated",
            target_type: "signal",
            target_id: signal_id.clone(),
            metadata: json!({"source": source, "delivery_id": delivery_id,
                "verbatim_preview": preview(verbatim)})
            .to_string(),
        };
        Finish::on_signal(signal_id).logged(entry)
    }

    /// A signal was marked deleted.
    pub fn deleted(source: &str, delivery_id: &str, signal_id: String) -> (Finish, Option<Entry>) {
        let entry = Entry {
            actor: None,
            action: "signal.deleted",
            target_type: "signal",
            target_id: signal_id.clone(),
            metadata: json!({"source": source, "delivery_id": delivery_id}).to_string(),
        };
        Finish::on_signal(signal_id).logged(entry)
    }

    /// Processed against an existing signal that did not change (nothing logged).
    pub fn on_signal(signal_id: String) -> Finish {
        Finish {
            signal_id: Some(signal_id),
            ..Finish::new(DeliveryStatus::Processed)
        }
    }

    /// Processed without touching a signal (nothing logged).
    pub fn processed() -> Finish {
        Finish::new(DeliveryStatus::Processed)
    }

    /// The integration was deactivated and its tokens wiped.
    pub fn deactivated(
        source: &str,
        integration_id: &str,
        reason: &str,
        delivery_id: &str,
    ) -> (Finish, Option<Entry>) {
        let entry = Entry {
            actor: Some(source.to_string()),
            action: "integration.deactivated",
            target_type: "integration",
            target_id: integration_id.to_string(),
            metadata: json!({"reason": reason, "delivery_id": delivery_id}).to_string(),
        };
        Finish::processed().logged(entry)
    }

    /// Recorded as `filtered` with this reason.
    pub fn filtered(reason: impl Into<String>) -> Finish {
        Finish {
            filter_reason: Some(reason.into()),
            ..Finish::new(DeliveryStatus::Filtered)
        }
    }

    /// A deletion of a message no signal was made from.
    pub fn never_seen() -> Finish {
        Finish::filtered("deleted message was never seen")
    }

    /// A deactivation for a delivery that names no integration.
    pub fn no_integration(reason: &str) -> Finish {
        Finish::filtered(format!("{reason}: no integration to deactivate"))
    }

    /// `failed` for good (the payload can never become a signal).
    pub fn failed(reason: impl Into<String>) -> Finish {
        Finish {
            last_error: Some(reason.into()),
            ..Finish::new(DeliveryStatus::Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(text: &str) -> Value {
        serde_json::from_str(text).expect("metadata is JSON")
    }

    fn signal(verbatim: &str) -> NewSignal {
        NewSignal {
            source_ref: "C1:1.2".into(),
            verbatim: verbatim.into(),
            metadata: json!({}),
        }
    }

    #[test]
    fn a_new_signal_is_logged_with_a_preview() {
        let long = "é".repeat(150);
        let metadata = created_metadata("slack", "dlv_1", &signal(&long));
        let (f, e) = Finish::created("sig_1".into(), metadata);
        let e = e.expect("logged");
        let meta = json(&e.metadata);
        assert_eq!(f.status, DeliveryStatus::Processed);
        assert_eq!(f.signal_id.as_deref(), Some("sig_1"));
        assert_eq!(f.action, Some("signal.created"));
        assert_eq!(
            (e.action, e.target_type, e.target_id.as_str()),
            ("signal.created", "signal", "sig_1")
        );
        assert_eq!(e.actor, None);
        assert_eq!(meta["source"], "slack");
        assert_eq!(meta["delivery_id"], "dlv_1");
        assert_eq!(meta["source_ref"], "C1:1.2");
        assert_eq!(
            meta["verbatim_preview"],
            "é".repeat(100),
            "100 characters, not bytes"
        );
    }

    #[test]
    fn updates_deletes_and_deactivations_name_what_they_touched() {
        let (f, e) = Finish::updated("pylon", "dlv_2", "sig_2".into(), "new text");
        let e = e.expect("logged");
        assert_eq!(
            (f.action, e.target_id.as_str()),
            (Some("signal.updated"), "sig_2")
        );
        assert_eq!(
            json(&e.metadata),
            json!({"source": "pylon", "delivery_id": "dlv_2", "verbatim_preview": "new text"})
        );

        let (f, e) = Finish::deleted("slack", "dlv_3", "sig_3".into());
        let e = e.expect("logged");
        assert_eq!(
            (f.signal_id.as_deref(), e.action),
            (Some("sig_3"), "signal.deleted")
        );
        assert_eq!(
            json(&e.metadata),
            json!({"source": "slack", "delivery_id": "dlv_3"})
        );

        let (f, e) = Finish::deactivated("slack", "int_1", "app_uninstalled", "dlv_4");
        let e = e.expect("logged");
        assert_eq!((f.status, f.signal_id), (DeliveryStatus::Processed, None));
        assert_eq!(e.actor.as_deref(), Some("slack"));
        assert_eq!(
            (e.target_type, e.target_id.as_str()),
            ("integration", "int_1")
        );
        assert_eq!(
            json(&e.metadata),
            json!({"reason": "app_uninstalled", "delivery_id": "dlv_4"})
        );
    }

    #[test]
    fn unlogged_outcomes_say_why() {
        let f = Finish::never_seen();
        assert_eq!(f.status, DeliveryStatus::Filtered);
        assert_eq!(
            f.filter_reason.as_deref(),
            Some("deleted message was never seen")
        );
        let f = Finish::no_integration("tokens_revoked");
        assert_eq!(
            f.filter_reason.as_deref(),
            Some("tokens_revoked: no integration to deactivate")
        );
        let f = Finish::failed("not a ticket");
        assert_eq!(
            (f.status, f.last_error.as_deref()),
            (DeliveryStatus::Failed, Some("not a ticket"))
        );
        assert_eq!(f.action, None);
        let f = Finish::on_signal("sig_9".into());
        assert_eq!(
            (f.status, f.signal_id.as_deref(), f.action),
            (DeliveryStatus::Processed, Some("sig_9"), None)
        );
    }

    fn existing(verbatim: &str, metadata: &str) -> Option<ExistingSignal> {
        Some(ExistingSignal {
            id: "sig_1".into(),
            verbatim: verbatim.into(),
            metadata: metadata.into(),
        })
    }

    fn upsert(verbatim: &str, merge: crate::protocol::Merge) -> Effect {
        Effect::Upsert {
            signal: signal(verbatim),
            merge,
        }
    }

    #[test]
    fn an_edit_of_an_existing_signal_rewrites_it_and_is_logged() {
        use crate::protocol::Merge;
        let (change, (f, e)) = on_existing(
            &upsert("new text", Merge::Edit),
            "slack",
            "dlv_2",
            existing("old text", r#"{"channel":"C1"}"#),
            "2026-12-08T00:00:00Z",
        );
        let Some(SignalChange::Edit {
            id,
            verbatim,
            metadata,
        }) = change
        else {
            panic!("an edit rewrites the signal");
        };
        assert_eq!((id.as_str(), verbatim.as_str()), ("sig_1", "new text"));
        let meta = json(&metadata);
        assert_eq!(meta["channel"], "C1");
        assert_eq!(meta["edits"][0]["verbatim"], "old text");
        assert_eq!(f.signal_id.as_deref(), Some("sig_1"));
        assert_eq!(e.expect("logged").action, "signal.updated");
        // The same text again changes nothing and logs nothing.
        let (change, (f, e)) = on_existing(
            &upsert("old text", Merge::Edit),
            "slack",
            "dlv_3",
            existing("old text", "{}"),
            "2026-12-08T00:00:00Z",
        );
        assert!(change.is_none() && e.is_none());
        assert_eq!(f.signal_id.as_deref(), Some("sig_1"));
    }

    #[test]
    fn a_deletion_marks_once_and_a_missing_signal_is_never_seen() {
        let delete = Effect::MarkDeleted {
            source_ref: "C1:1.2".into(),
            metadata: json!({"deleted_by": "U1"}),
        };
        let now = "2026-12-08T00:00:00Z";
        let (change, (f, e)) = on_existing(&delete, "slack", "dlv_4", existing("t", "{}"), now);
        let Some(SignalChange::Delete { id, metadata }) = change else {
            panic!("a deletion marks the signal");
        };
        assert_eq!(id, "sig_1");
        let meta = json(&metadata);
        assert_eq!(
            (meta["deleted"].clone(), meta["deleted_by"].clone()),
            (json!(true), json!("U1"))
        );
        assert_eq!(meta["deleted_at"], now);
        assert_eq!(f.signal_id.as_deref(), Some("sig_1"));
        assert_eq!(e.expect("logged").action, "signal.deleted");
        // Already deleted: nothing to write, nothing logged.
        let (change, (_, e)) = on_existing(
            &delete,
            "slack",
            "dlv_5",
            existing("t", r#"{"deleted":true}"#),
            now,
        );
        assert!(change.is_none() && e.is_none());
        let (change, (f, e)) = on_existing(&delete, "slack", "dlv_6", None, now);
        assert!(change.is_none() && e.is_none());
        assert_eq!(f.status, Finish::never_seen().status);
    }

    #[test]
    fn deletions_and_deactivations_never_finish_at_insert() {
        let upsert = Effect::Upsert {
            signal: NewSignal {
                source_ref: "slack-T1-C1-1.0".into(),
                verbatim: "hello".into(),
                metadata: serde_json::json!({}),
            },
            merge: crate::protocol::Merge::Keep,
        };
        assert!(finishes_at_insert(&upsert));
        assert!(finishes_at_insert(&Effect::filter("bot message")));
        assert!(finishes_at_insert(&Effect::reject("no channel")));
        // A deletion committed with its inbox row could overtake the message it deletes while
        // that message waits in a worker for enrichment; it must go through a worker too.
        let deletion = Effect::MarkDeleted {
            source_ref: "slack-T1-C1-1.0".into(),
            metadata: serde_json::json!({ "deleted_ts": "1.0" }),
        };
        assert!(!finishes_at_insert(&deletion));
        // A deactivation is followed by a credential-cache refresh, which the worker does.
        let deactivation = Effect::DeactivateIntegration {
            reason: "app_uninstalled".into(),
        };
        assert!(!finishes_at_insert(&deactivation));
    }
}
