//! Opaque, prefixed, time-sortable identifiers (`ws_…`, `int_…`, `whk_…`, `dlv_…`, `sig_…`,
//! `act_…`, `tok_…`): a lower-case ULID behind the prefix, monotonic within this process so that
//! ordering by id is ordering by creation.

use std::sync::{LazyLock, Mutex};

use ulid::Generator;

static GENERATOR: LazyLock<Mutex<Generator>> = LazyLock::new(|| Mutex::new(Generator::new()));

/// Kinds of identifiers and their prefixes.
pub mod prefix {
    /// Workspace.
    pub const WORKSPACE: &str = "ws";
    /// Integration.
    pub const INTEGRATION: &str = "int";
    /// Generic webhook key.
    pub const WEBHOOK_KEY: &str = "whk";
    /// Delivery (inbox row).
    pub const DELIVERY: &str = "dlv";
    /// Signal.
    pub const SIGNAL: &str = "sig";
    /// Activity-log entry.
    pub const ACTIVITY: &str = "act";
    /// Workspace-scoped API token.
    pub const TOKEN: &str = "tok";
}

/// A new id with `prefix`.
pub fn new_id(prefix: &str) -> String {
    let ulid = {
        let mut g = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
        // The generator only fails when 2^80 ids are made in one millisecond.
        g.generate().unwrap_or_else(|_| ulid::Ulid::new())
    };
    // Encoded into a stack buffer and lower-cased in place: one allocation per id (ids are made
    // for every delivery, signal and activity entry, two of them on the SQLite writer thread).
    let mut buf = [0u8; ulid::ULID_LEN];
    let encoded = ulid.array_to_str(&mut buf);
    encoded.make_ascii_lowercase();
    let mut id = String::with_capacity(prefix.len() + 1 + ulid::ULID_LEN);
    id.push_str(prefix);
    id.push('_');
    id.push_str(encoded);
    id
}

/// True when `id` looks like one of ours with `prefix`: the prefix, `_`, and 26 lower-case
/// Crockford base32 characters (what [`new_id`] makes). A cheap shape check before any lookup
/// or cache entry, so ids from unsigned requests cost nothing.
pub fn looks_like(id: &str, prefix: &str) -> bool {
    let Some(ulid) = id.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else {
        return false;
    };
    ulid.len() == ulid::ULID_LEN
        && ulid.bytes().all(|b| {
            matches!(b, b'0'..=b'9' | b'a'..=b'h' | b'j' | b'k' | b'm' | b'n' | b'p'..=b't' | b'v'..=b'z')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_sortable() {
        let a = new_id(prefix::SIGNAL);
        let b = new_id(prefix::SIGNAL);
        assert!(a.starts_with("sig_"));
        assert!(a < b, "{a} < {b}");
        assert!(looks_like(&a, prefix::SIGNAL));
        assert!(!looks_like(&a, prefix::WORKSPACE));
        assert!(!looks_like("sig_' OR 1=1 --", prefix::SIGNAL));
    }

    #[test]
    fn the_id_is_the_lower_case_ulid_text() {
        let id = new_id(prefix::DELIVERY);
        let (p, rest) = id.split_once('_').expect("prefixed");
        assert_eq!(p, "dlv");
        assert_eq!(rest.len(), 26);
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        );
        let ulid = ulid::Ulid::from_string(&rest.to_uppercase()).expect("a ULID");
        assert_eq!(ulid.to_string().to_lowercase(), rest);
    }
}
