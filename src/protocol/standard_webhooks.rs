//! The generic endpoint's scheme: Standard Webhooks (<https://www.standardwebhooks.com/>).
//!
//! `webhook-signature` holds space-separated `v1,BASE64` entries, each an HMAC-SHA256 of
//! `{webhook-id}.{webhook-timestamp}.{body}` keyed with the base64-decoded part of a `whsec_…`
//! secret. Any entry matching any currently valid secret is accepted, so senders and receivers can
//! rotate keys. An empty `v1,` entry never matches (a bug some libraries once had).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{SignatureError, check_timestamp, ct_eq, hmac_sha256};

/// Prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Decodes a `whsec_…` secret into its HMAC key bytes. `None` if it is not valid.
pub fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = STANDARD.decode(b64).ok()?;
    (!key.is_empty()).then_some(key)
}

/// Creates a new random secret (`whsec_` + base64 of 32 random bytes).
pub fn generate_secret() -> String {
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// Signs a message: returns the `v1,BASE64` signature for `key`.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = hmac_sha256(key, &[msg_id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", STANDARD.encode(mac))
}

/// The three headers, as received.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    /// `webhook-id`: the sender's unique message id (our delivery dedupe key).
    pub id: Option<&'a str>,
    /// `webhook-timestamp`: Unix seconds.
    pub timestamp: Option<&'a str>,
    /// `webhook-signature`: space-separated `v1,BASE64` entries.
    pub signature: Option<&'a str>,
}

/// Verifies a request against every valid key in `keys`.
pub fn verify(
    keys: &[&[u8]],
    h: &Headers<'_>,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let id =
        h.id.map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(SignatureError::Missing)?;
    let sig = h
        .signature
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(SignatureError::Missing)?;
    let ts = check_timestamp(h.timestamp, now, tolerance_secs)?;
    let ts = ts.to_string();
    let expected: Vec<[u8; 32]> = keys
        .iter()
        .map(|k| hmac_sha256(k, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]))
        .collect();
    let mut ok = false;
    for entry in sig.split(' ').filter(|e| !e.is_empty()) {
        let Some(("v1", b64)) = entry.split_once(',') else {
            continue;
        };
        let Ok(given) = STANDARD.decode(b64) else {
            continue;
        };
        for e in &expected {
            // ct_eq checks the length first, so an empty `v1,` never matches.
            ok |= ct_eq(&given, e);
        }
    }
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The published test vector of the Standard Webhooks specification.
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1649367553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn headers<'a>(sig: &'a str, ts: &'a str) -> Headers<'a> {
        Headers {
            id: Some(ID),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    fn key() -> Vec<u8> {
        decode_secret(SECRET).expect("the spec's secret decodes")
    }

    #[test]
    fn accepts_the_published_vector() {
        let k = key();
        assert_eq!(sign(&k, ID, TS, BODY), SIG);
        assert_eq!(
            verify(&[&k], &headers(SIG, "1649367553"), BODY, TS, 300),
            Ok(())
        );
    }

    #[test]
    fn accepts_a_match_among_several_signatures() {
        let k = key();
        let multi = format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,abc {SIG}");
        assert_eq!(
            verify(&[&k], &headers(&multi, "1649367553"), BODY, TS, 300),
            Ok(())
        );
    }

    #[test]
    fn accepts_the_previous_key_during_rotation() {
        let k = key();
        let other = b"another key of some length".to_vec();
        assert_eq!(
            verify(&[&other, &k], &headers(SIG, "1649367553"), BODY, TS, 300),
            Ok(())
        );
    }

    #[test]
    fn rejects_empty_and_garbled_signatures() {
        let k = key();
        for bad in [
            "v1,",
            "v1, v1,",
            "v1,!!!",
            "garbage",
            "v2,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ] {
            assert_eq!(
                verify(&[&k], &headers(bad, "1649367553"), BODY, TS, 300),
                Err(SignatureError::Invalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_changed_body_id_or_secret() {
        let k = key();
        assert_eq!(
            verify(&[&k], &headers(SIG, "1649367553"), b"{}", TS, 300),
            Err(SignatureError::Invalid)
        );
        let h = Headers {
            id: Some("msg_other"),
            ..headers(SIG, "1649367553")
        };
        assert_eq!(
            verify(&[&k], &h, BODY, TS, 300),
            Err(SignatureError::Invalid)
        );
        let wrong = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid base64");
        assert_eq!(
            verify(&[&wrong], &headers(SIG, "1649367553"), BODY, TS, 300),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn enforces_the_timestamp_window_both_ways() {
        let k = key();
        let h = headers(SIG, "1649367553");
        assert_eq!(
            verify(&[&k], &h, BODY, TS + 301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&[&k], &h, BODY, TS - 301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(verify(&[&k], &h, BODY, TS + 300, 300), Ok(()));
        assert_eq!(
            verify(&[&k], &headers(SIG, "16493675x3"), BODY, TS, 300),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn missing_headers_are_missing() {
        let k = key();
        let none = Headers::default();
        assert_eq!(
            verify(&[&k], &none, BODY, TS, 300),
            Err(SignatureError::Missing)
        );
        let h = Headers {
            signature: Some(""),
            ..headers(SIG, "1649367553")
        };
        assert_eq!(
            verify(&[&k], &h, BODY, TS, 300),
            Err(SignatureError::Missing)
        );
        let h = Headers {
            timestamp: None,
            ..headers(SIG, "1649367553")
        };
        assert_eq!(
            verify(&[&k], &h, BODY, TS, 300),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn generated_secrets_round_trip() {
        let s = generate_secret();
        assert!(s.starts_with(SECRET_PREFIX));
        let k = decode_secret(&s).expect("decodes");
        assert_eq!(k.len(), 32);
        let sig = sign(&k, "id1", 10, b"x");
        assert_eq!(
            verify(
                &[&k],
                &Headers {
                    id: Some("id1"),
                    timestamp: Some("10"),
                    signature: Some(&sig)
                },
                b"x",
                10,
                300
            ),
            Ok(())
        );
    }
}
