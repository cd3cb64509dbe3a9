//! What a delivery does to the signals table, decided by a source's pure normaliser and applied
//! by the worker inside one transaction (together with the delivery's status change and the
//! activity-log entry).

use serde_json::{Map, Value, json};

/// A signal to create, or to merge into the existing one with the same `source_ref`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSignal {
    /// Dedupe key of the signal inside its workspace and source.
    pub source_ref: String,
    /// Readable text of the signal.
    pub verbatim: String,
    /// Source-specific metadata (a JSON object).
    pub metadata: Value,
}

/// How a [`NewSignal`] is merged when its `source_ref` already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// The existing signal stays as it is (a re-sent copy of the same thing).
    Keep,
    /// An edit: the verbatim is replaced, the previous text is appended to `metadata.edits`, and
    /// the new metadata keys overwrite the old ones.
    Edit,
    /// A later event about the same thing: metadata keys are merged over the old ones (the
    /// verbatim is kept unless the new one is non-empty and the old one was a placeholder).
    PatchMetadata,
}

/// The outcome of normalising one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Create the signal, or merge it into the existing one.
    Upsert { signal: NewSignal, merge: Merge },
    /// Mark the signal with this `source_ref` as deleted (nothing is removed). `metadata` is merged
    /// into the signal's metadata. If the signal was never seen the delivery is filtered.
    MarkDeleted { source_ref: String, metadata: Value },
    /// Nothing to do; the delivery is recorded as `filtered` with this reason.
    Filter { reason: String },
    /// The payload can never become a signal; the delivery is `failed` (not retried).
    Reject { reason: String },
    /// The source says the integration is gone (uninstalled, tokens revoked): deactivate it and
    /// wipe its tokens.
    DeactivateIntegration { reason: String },
}

impl Effect {
    /// Shorthand for [`Effect::Filter`].
    pub fn filter(reason: impl Into<String>) -> Self {
        Effect::Filter {
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Effect::Reject`].
    pub fn reject(reason: impl Into<String>) -> Self {
        Effect::Reject {
            reason: reason.into(),
        }
    }
}

/// Verbatim used when a source gives no text at all.
pub const NO_CONTENT: &str = "No content";

/// The result of merging into an existing signal.
#[derive(Debug, Clone, PartialEq)]
pub enum Merged {
    /// Nothing changes.
    Unchanged,
    /// The signal gets this verbatim and metadata.
    Updated { verbatim: String, metadata: Value },
}

fn as_object(v: &Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    }
}

/// Merges `new` into an existing signal according to `merge`. `now` is an RFC 3339 timestamp
/// recorded with edits.
pub fn merge_into(
    old_verbatim: &str,
    old_metadata: &Value,
    new: &NewSignal,
    merge: Merge,
    now: &str,
) -> Merged {
    let mut meta = as_object(old_metadata);
    match merge {
        Merge::Keep => Merged::Unchanged,
        Merge::Edit => {
            if new.verbatim == old_verbatim {
                return Merged::Unchanged;
            }
            let mut edits = match meta.remove("edits") {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            };
            edits.push(json!({ "verbatim": old_verbatim, "replaced_at": now }));
            for (k, v) in as_object(&new.metadata) {
                if k != "edits" {
                    meta.insert(k, v);
                }
            }
            meta.insert("edits".into(), Value::Array(edits));
            Merged::Updated {
                verbatim: new.verbatim.clone(),
                metadata: Value::Object(meta),
            }
        }
        Merge::PatchMetadata => {
            let before = meta.clone();
            for (k, v) in as_object(&new.metadata) {
                meta.insert(k, v);
            }
            let verbatim = if (old_verbatim == NO_CONTENT || old_verbatim.is_empty())
                && !new.verbatim.is_empty()
            {
                new.verbatim.clone()
            } else {
                old_verbatim.to_string()
            };
            if meta == before && verbatim == old_verbatim {
                return Merged::Unchanged;
            }
            Merged::Updated {
                verbatim,
                metadata: Value::Object(meta),
            }
        }
    }
}

/// Metadata of a signal marked deleted: `deleted: true`, `deleted_at`, plus `patch`'s keys.
pub fn mark_deleted(old_metadata: &Value, patch: &Value, now: &str) -> Value {
    let mut meta = as_object(old_metadata);
    for (k, v) in as_object(patch) {
        meta.insert(k, v);
    }
    meta.insert("deleted".into(), Value::Bool(true));
    meta.insert("deleted_at".into(), Value::String(now.to_string()));
    Value::Object(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(text: &str, meta: Value) -> NewSignal {
        NewSignal {
            source_ref: "r".into(),
            verbatim: text.into(),
            metadata: meta,
        }
    }

    #[test]
    fn edit_replaces_text_and_keeps_history() {
        let old = json!({"channel_id": "C1", "edits": [{"verbatim": "v0", "replaced_at": "t0"}]});
        let merged = merge_into(
            "v1",
            &old,
            &sig("v2", json!({"raw_text": "v2"})),
            Merge::Edit,
            "t1",
        );
        let Merged::Updated { verbatim, metadata } = merged else {
            panic!("expected an update")
        };
        assert_eq!(verbatim, "v2");
        assert_eq!(metadata["channel_id"], "C1");
        assert_eq!(metadata["raw_text"], "v2");
        assert_eq!(metadata["edits"][0]["verbatim"], "v0");
        assert_eq!(metadata["edits"][1]["verbatim"], "v1");
        assert_eq!(metadata["edits"][1]["replaced_at"], "t1");
    }

    #[test]
    fn edit_with_same_text_changes_nothing() {
        let merged = merge_into(
            "same",
            &json!({}),
            &sig("same", json!({})),
            Merge::Edit,
            "t",
        );
        assert_eq!(merged, Merged::Unchanged);
    }

    #[test]
    fn patch_merges_metadata_and_keeps_verbatim() {
        let old = json!({"ticketStatus": "new", "tags": ["a"]});
        let merged = merge_into(
            "body",
            &old,
            &sig("other", json!({"ticketStatus": "closed"})),
            Merge::PatchMetadata,
            "t",
        );
        let Merged::Updated { verbatim, metadata } = merged else {
            panic!("expected an update")
        };
        assert_eq!(verbatim, "body");
        assert_eq!(metadata["ticketStatus"], "closed");
        assert_eq!(metadata["tags"], json!(["a"]));
    }

    #[test]
    fn patch_fills_a_placeholder_verbatim() {
        let merged = merge_into(
            NO_CONTENT,
            &json!({}),
            &sig("real text", json!({})),
            Merge::PatchMetadata,
            "t",
        );
        assert!(matches!(merged, Merged::Updated { ref verbatim, .. } if verbatim == "real text"));
    }

    #[test]
    fn patch_without_news_is_unchanged() {
        let old = json!({"a": 1});
        let merged = merge_into(
            "x",
            &old,
            &sig("y", json!({"a": 1})),
            Merge::PatchMetadata,
            "t",
        );
        assert_eq!(merged, Merged::Unchanged);
    }

    #[test]
    fn keep_never_changes() {
        assert_eq!(
            merge_into(
                "x",
                &json!({}),
                &sig("y", json!({"b": 2})),
                Merge::Keep,
                "t"
            ),
            Merged::Unchanged
        );
    }

    #[test]
    fn delete_marks_and_keeps_everything() {
        let meta = mark_deleted(&json!({"a": 1}), &json!({"deleted_ts": "1.2"}), "t");
        assert_eq!(meta["a"], 1);
        assert_eq!(meta["deleted"], true);
        assert_eq!(meta["deleted_at"], "t");
        assert_eq!(meta["deleted_ts"], "1.2");
    }
}
