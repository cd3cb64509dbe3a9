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
