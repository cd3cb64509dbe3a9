//! Time helpers. Timestamps are stored as Unix microseconds (`BIGINT` in both backends) and shown
//! as RFC 3339 UTC strings.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Now, in Unix seconds.
pub fn now_secs() -> i64 {
    now_micros() / 1_000_000
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-29T17:45:00.123456Z`.
pub fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// RFC 3339 of an optional timestamp.
pub fn rfc3339_opt(micros: Option<i64>) -> Option<String> {
    micros.map(rfc3339)
}
