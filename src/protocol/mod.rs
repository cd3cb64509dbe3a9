//! Pure protocol code: signature verification, payload parsing and normalisation of a stored
//! delivery into an [`Effect`] on the signals table.
//!
//! Nothing in this module does I/O, reads the clock or touches the database: every function takes
//! its inputs (raw body, headers, `now`, secrets, integration settings) as arguments, so it can be
//! unit-tested with published vectors and fuzzed. Handlers call the verifiers; the worker calls the
//! normalisers and applies the returned [`Effect`] in one transaction.

pub mod effect;
pub mod html;
pub mod pylon;
pub mod slack;
pub mod standard_webhooks;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use effect::{Effect, Merge, NewSignal};

/// Why a signed request was rejected. Each maps to one stable contract error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required signature or timestamp header is absent or empty.
    #[error("signature headers are missing")]
    Missing,
    /// The signature does not match (or is malformed, or the timestamp is not a number).
    #[error("signature does not match")]
    Invalid,
    /// The signed timestamp is outside the allowed window (either direction).
    #[error("timestamp is outside the allowed window")]
    Stale,
}

impl SignatureError {
    /// The contract's error code for this rejection.
    pub fn code(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing_signature",
            SignatureError::Invalid => "invalid_signature",
            SignatureError::Stale => "stale_timestamp",
        }
    }
}

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Checks a signed Unix-seconds timestamp header against `now` with a symmetric tolerance.
///
/// A missing/empty header is [`SignatureError::Missing`], a non-numeric one
/// [`SignatureError::Invalid`], and one outside `now ± tolerance` [`SignatureError::Stale`].
pub fn check_timestamp(
    header: Option<&str>,
    now: i64,
    tolerance_secs: i64,
) -> Result<i64, SignatureError> {
    let raw = header
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(SignatureError::Missing)?;
    let ts: i64 = raw.parse().map_err(|_| SignatureError::Invalid)?;
    if now.abs_diff(ts) > tolerance_secs.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    Ok(ts)
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for query values and paths).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Lowercase hex SHA-256 of `data` (used as a dedupe key for unsigned-timestamp sources).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(data))
}

/// Seconds to wait according to a `Retry-After` header value, which is either delay-seconds or
/// an HTTP-date (RFC 9110 §10.2.3; the IMF-fixdate form, e.g. `Wed, 21 Oct 2015 07:28:00 GMT`).
/// A date already past is 0. `None` when the value is neither (callers pick their default).
pub fn retry_after_secs(value: &str, now_unix: i64) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs);
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some(u64::try_from(when.timestamp().saturating_sub(now_unix)).unwrap_or(0))
}

#[cfg(test)]
mod retry_after_tests {
    use super::retry_after_secs;

    // RFC 9110's example date, as Unix time.
    const DATE: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const DATE_UNIX: i64 = 784_111_777;

    #[test]
    fn delay_seconds() {
        assert_eq!(retry_after_secs("120", 0), Some(120));
        assert_eq!(retry_after_secs(" 0 ", 0), Some(0));
    }

    #[test]
    fn an_http_date_is_the_time_left_until_it() {
        assert_eq!(retry_after_secs(DATE, DATE_UNIX - 90), Some(90));
        assert_eq!(retry_after_secs(DATE, DATE_UNIX), Some(0));
        assert_eq!(
            retry_after_secs(DATE, DATE_UNIX + 5),
            Some(0),
            "past dates wait 0"
        );
    }

    #[test]
    fn anything_else_is_none() {
        for v in ["", "-5", "soon", "1.5", "Sun, 06 Nov 1994"] {
            assert_eq!(retry_after_secs(v, DATE_UNIX), None, "{v:?}");
        }
    }
}
