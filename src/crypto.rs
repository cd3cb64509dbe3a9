//! Encryption at rest for integration secrets and tokens.
//!
//! Every secret/token column is stored as AES-256-GCM ciphertext wrapped in a
//! small, versioned text envelope that fits a `TEXT` column:
//!
//! ```text
//! sbx1:{key_id}:{base64url_nopad(nonce(12) || ciphertext || tag(16))}
//! ```
//!
//! * `sbx1` is the envelope version ([`ENVELOPE_VERSION`]); anything else is
//!   rejected as [`CryptoError::Malformed`] — there is never a plaintext
//!   fallback.
//! * `key_id` names the master key that sealed the value, so a [`Keyring`]
//!   holding several keys can decrypt old values after a rotation while new
//!   values are always sealed under the first (active) key.
//! * The nonce is 96 fresh random bits from the OS RNG for every value.
//!
//! **Associated data.** Each value is bound to where it lives: the AEAD
//! associated data is the UTF-8 string `signalbox/{table}/{row_id}/{column}`
//! (see [`Aad`]). The associated data is not stored; it is rebuilt by the
//! caller on read, so a ciphertext copied into another row, column or table
//! fails to authenticate ([`CryptoError::Decrypt`]). Table and column names
//! are fixed identifiers and row ids are opaque ids, none of which contain
//! `/`, so the joined string is unambiguous.
//!
//! **Keys** come from `SIGNALBOX_MASTER_KEYS` (`ID:BASE64[,ID:BASE64…]`, first
//! is active; see [`Keyring::parse`]) or from a key file created with mode
//! 0600 on first run ([`Keyring::load_or_create_file`]). Key bytes are held in
//! zeroizing buffers and never appear in `Debug`, `Display` or error messages;
//! decrypted values are returned as [`secrecy`] secrets.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD,
};
use rand::RngCore;
use rand::rngs::OsRng;
use secrecy::zeroize::{Zeroize, Zeroizing};
use secrecy::{SecretBox, SecretString};

/// Envelope text format stored in TEXT columns:
/// `"sbx1:{key_id}:{base64url_nopad(nonce(12) || ciphertext+tag)}"`.
pub const ENVELOPE_VERSION: &str = "sbx1";

/// `"sbx1:"`, the prefix every envelope starts with.
const ENVELOPE_PREFIX: &str = "sbx1:";
/// AES-GCM nonce length in bytes (96 bits).
const NONCE_LEN: usize = 12;
/// AES-GCM tag length in bytes.
const TAG_LEN: usize = 16;
/// Master key length in bytes (AES-256).
const KEY_LEN: usize = 32;
/// Shortest valid envelope body (empty plaintext): nonce + tag.
const MIN_BODY_LEN: usize = NONCE_LEN + TAG_LEN;
/// Longest key id accepted.
const MAX_ID_LEN: usize = 32;
/// Refuse to read key files larger than this (they cannot be key files).
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// Standard alphabet, padding optional (for parsing key specs).
const STD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// URL-safe alphabet, padding optional (for parsing key specs).
const URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Errors from key handling and envelope decryption.
///
/// No message ever contains key material or plaintext: key specs are named by
/// id or position, envelopes by what is wrong with them.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A master key specification is invalid, e.g.
    /// `"master key 'k1': expected 32 bytes of base64, got 16"`.
    #[error("bad master key spec: {0}")]
    BadKeySpec(String),
    /// The envelope names a key id that is not in the keyring (the id).
    #[error("envelope names unknown master key '{0}'")]
    UnknownKey(String),
    /// The envelope is not well formed: bad version, missing parts, bad
    /// base64 or too short.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The ciphertext failed authentication.
    #[error("ciphertext does not authenticate (wrong key, wrong row/column, or tampered)")]
    Decrypt,
    /// A key file could not be created, read or written.
    #[error("key file: {0}")]
    Io(String),
}

/// Where a value lives: bound into the AEAD associated data as
/// `"signalbox/{table}/{row_id}/{column}"`.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// Table name, e.g. `"integrations"`.
    pub table: &'a str,
    /// Primary key of the row holding the value.
    pub row_id: &'a str,
    /// Column name, e.g. `"bot_token"`.
    pub column: &'a str,
}

impl<'a> Aad<'a> {
    /// Shorthand for building an [`Aad`].
    pub const fn new(table: &'a str, row_id: &'a str, column: &'a str) -> Self {
        Aad {
            table,
            row_id,
            column,
        }
    }

    /// The associated-data bytes: `signalbox/{table}/{row_id}/{column}`.
    fn to_bytes(self) -> Vec<u8> {
        format!("signalbox/{}/{}/{}", self.table, self.row_id, self.column).into_bytes()
    }
}

/// One 256-bit master key. Debug prints only the id.
pub struct MasterKey {
    id: String,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl MasterKey {
    /// The key id (safe to log).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A new random key from the OS RNG. The id is not checked here;
    /// [`Keyring::from_keys`] rejects ids outside `[A-Za-z0-9_-]{1,32}`.
    pub fn generate(id: &str) -> MasterKey {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(&mut key[..]);
        MasterKey {
            id: id.to_owned(),
            key,
        }
    }

    /// `"ID:BASE64"` (standard base64 with padding), as accepted by
    /// [`Keyring::parse`].
    pub fn to_spec(&self) -> SecretString {
        // Exact capacity: 32 bytes encode to 44 padded base64 chars, so the
        // buffer never reallocates (which would leave an unzeroized copy) and
        // `into_boxed_str` inside `SecretString::from` does not shrink it.
        let mut s = String::with_capacity(self.id.len() + 1 + 44);
        s.push_str(&self.id);
        s.push(':');
        STANDARD.encode_string(&self.key[..], &mut s);
        SecretString::from(s)
    }

    fn cipher(&self) -> Aes256Gcm {
        let key: &[u8; KEY_LEN] = &self.key;
        Aes256Gcm::new(key.into())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Ordered set of master keys; the first is the active (encrypting) key, all
/// can decrypt. Debug shows ids only. Cheap to clone.
#[derive(Clone)]
pub struct Keyring {
    /// Invariant: non-empty, ids valid and unique.
    keys: Arc<Vec<MasterKey>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active_id())
            .field("ids", &self.ids())
            .finish()
    }
}

impl Keyring {
    /// Parse `"ID:BASE64[,ID:BASE64…]"`. Entries are separated by commas or
    /// newlines; whitespace around entries is ignored, as are empty entries
    /// (e.g. a trailing newline). Ids must match `[A-Za-z0-9_-]{1,32}` and be
    /// unique; each key must decode (standard or url-safe base64, padded or
    /// not) to exactly 32 bytes. Error messages name the entry by id or
    /// position, never the key.
    pub fn parse(spec: &str) -> Result<Keyring, CryptoError> {
        let mut keys = Vec::new();
        let entries = spec
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for (idx, entry) in entries.enumerate() {
            let pos = idx + 1;
            let Some((id, b64)) = entry.split_once(':') else {
                return Err(CryptoError::BadKeySpec(format!(
                    "master key #{pos}: expected ID:BASE64"
                )));
            };
            let id = id.trim();
            if !valid_key_id(id) {
                return Err(CryptoError::BadKeySpec(format!(
                    "master key #{pos}: id must match [A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}"
                )));
            }
            let key = decode_key(id, b64.trim())?;
            keys.push(MasterKey {
                id: id.to_owned(),
                key,
            });
        }
        Keyring::from_keys(keys)
    }

    /// Build a keyring from keys; the first is active. Keys must be
    /// non-empty, with valid, unique ids.
    pub fn from_keys(keys: Vec<MasterKey>) -> Result<Keyring, CryptoError> {
        if keys.is_empty() {
            return Err(CryptoError::BadKeySpec("no master keys given".into()));
        }
        for (i, k) in keys.iter().enumerate() {
            if !valid_key_id(&k.id) {
                return Err(CryptoError::BadKeySpec(format!(
                    "master key #{}: id must match [A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}",
                    i + 1
                )));
            }
            if keys[..i].iter().any(|o| o.id == k.id) {
                return Err(CryptoError::BadKeySpec(format!(
                    "duplicate master key id '{}'",
                    k.id
                )));
            }
        }
        Ok(Keyring {
            keys: Arc::new(keys),
        })
    }

    /// Load the key file at `path`, or create it (parent dirs must exist)
    /// with one new key `k{unix-seconds}` and mode 0600. The file uses the
    /// [`Keyring::parse`] format. Creation uses `create_new`, so a concurrent
    /// creator is never overwritten. Returns `(keyring, created)`.
    ///
    /// An existing file that is group/world accessible is still loaded; call
    /// [`file_mode_is_private`] to decide whether to warn.
    pub fn load_or_create_file(path: &Path) -> Result<(Keyring, bool), CryptoError> {
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(file) => {
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let key = MasterKey::generate(&format!("k{secs}"));
                if let Err(e) = write_key_file(file, &key) {
                    // Never leave an empty or partial key file behind.
                    let _ = std::fs::remove_file(path);
                    return Err(CryptoError::Io(format!(
                        "cannot write {}: {e}",
                        path.display()
                    )));
                }
                Ok((Keyring::from_keys(vec![key])?, true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok((load_key_file(path)?, false))
            }
            Err(e) => Err(CryptoError::Io(format!(
                "cannot create {}: {e}",
                path.display()
            ))),
        }
    }

    /// Same as the free function [`file_mode_is_private`].
    pub fn file_mode_is_private(path: &Path) -> std::io::Result<bool> {
        file_mode_is_private(path)
    }

    /// Id of the active (encrypting) key.
    pub fn active_id(&self) -> &str {
        // Invariant: `keys` is non-empty (checked in `from_keys`, the only
        // constructor), so the fallback is unreachable.
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// All key ids, active first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    fn key(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Seal `plaintext` under the active key with a fresh random nonce and
    /// `aad` bound in, returning an `sbx1:` envelope.
    ///
    /// # Panics
    /// Only if `plaintext` or the associated data exceeds AES-GCM's limit of
    /// about 64 GiB.
    pub fn encrypt(&self, plaintext: &[u8], aad: Aad<'_>) -> String {
        // Invariant: non-empty keyring (see `active_id`).
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);

        // nonce || plaintext, encrypted in place (no stray plaintext copies:
        // the capacity covers the tag so nothing reallocates), then the tag.
        let mut body = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        body.extend_from_slice(&nonce);
        body.extend_from_slice(plaintext);
        let tag = key
            .cipher()
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                &aad.to_bytes(),
                &mut body[NONCE_LEN..],
            )
            // Infallible for inputs below AES-GCM's 2^36-byte limits on
            // plaintext and associated data (documented under # Panics).
            .expect("AES-GCM input exceeds 64 GiB");
        body.extend_from_slice(&tag);

        let mut out = String::with_capacity(
            ENVELOPE_PREFIX.len() + key.id.len() + 1 + (body.len() * 4).div_ceil(3),
        );
        out.push_str(ENVELOPE_PREFIX);
        out.push_str(&key.id);
        out.push(':');
        URL_SAFE_NO_PAD.encode_string(&body, &mut out);
        out
    }

    /// Decrypt with the key the envelope names. Errors:
    /// [`CryptoError::Malformed`] (wrong version prefix, missing parts,
    /// base64 error, shorter than 12+16 bytes), [`CryptoError::UnknownKey`],
    /// [`CryptoError::Decrypt`].
    pub fn decrypt(&self, envelope: &str, aad: Aad<'_>) -> Result<SecretBox<Vec<u8>>, CryptoError> {
        let plain = self.decrypt_vec(envelope, aad)?;
        Ok(SecretBox::new(Box::new(plain)))
    }

    /// Convenience: decrypt and require UTF-8 -> [`SecretString`]. A
    /// non-UTF-8 plaintext is reported as [`CryptoError::Malformed`].
    pub fn decrypt_string(
        &self,
        envelope: &str,
        aad: Aad<'_>,
    ) -> Result<SecretString, CryptoError> {
        let plain = self.decrypt_vec(envelope, aad)?;
        match String::from_utf8(plain) {
            // `decrypt_vec` returns a Vec whose capacity equals its length,
            // so `SecretString::from` (into_boxed_str) does not reallocate.
            Ok(s) => Ok(SecretString::from(s)),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(CryptoError::Malformed("decrypted value is not UTF-8"))
            }
        }
    }

    /// True when the envelope is under a key other than the active one
    /// (needs `keys rotate`). False for the active key and for strings that
    /// are not well-formed enough to name a key.
    pub fn needs_rotation(&self, envelope: &str) -> bool {
        envelope_key_id(envelope).is_some_and(|id| id != self.active_id())
    }

    fn decrypt_vec(&self, envelope: &str, aad: Aad<'_>) -> Result<Vec<u8>, CryptoError> {
        let (id, body_b64) = split_envelope(envelope)?;
        // Reject obviously short input before decoding: 28 bytes need at
        // least 38 base64 characters.
        if body_b64.len() < (MIN_BODY_LEN * 4).div_ceil(3) {
            return Err(CryptoError::Malformed("envelope too short"));
        }
        let body = URL_SAFE_NO_PAD
            .decode(body_b64)
            .map_err(|_| CryptoError::Malformed("envelope is not valid base64url"))?;
        if body.len() < MIN_BODY_LEN {
            return Err(CryptoError::Malformed("envelope too short"));
        }
        let key = self
            .key(id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_owned()))?;

        // Length checked above, so these splits cannot fail; use the
        // non-panicking forms anyway.
        let (nonce, rest) = body
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(CryptoError::Malformed("envelope too short"))?;
        let (ciphertext, tag) = rest
            .split_last_chunk::<TAG_LEN>()
            .ok_or(CryptoError::Malformed("envelope too short"))?;

        // Exact capacity: no reallocation, and capacity == len for callers
        // that convert to a boxed secret.
        let mut buf = Vec::with_capacity(ciphertext.len());
        buf.extend_from_slice(ciphertext);
        match key.cipher().decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            &aad.to_bytes(),
            &mut buf,
            Tag::from_slice(tag),
        ) {
            Ok(()) => Ok(buf),
            // aes-gcm checks the tag before decrypting, so `buf` still holds
            // ciphertext here; nothing to zeroize.
            Err(_) => Err(CryptoError::Decrypt),
        }
    }
}

/// Whether `path` has no group/other permission bits (mode `& 0o077 == 0`).
/// Use it after [`Keyring::load_or_create_file`] to warn about a key file
/// that others can read.
pub fn file_mode_is_private(path: &Path) -> std::io::Result<bool> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    Ok(mode & 0o077 == 0)
}

/// The key id an envelope names, if it is well-formed enough to tell
/// (right version, a valid id, and a body part after it).
pub fn envelope_key_id(envelope: &str) -> Option<&str> {
    split_envelope(envelope).ok().map(|(id, _)| id)
}

/// True if the string looks like one of our envelopes (starts with `"sbx1:"`).
pub fn is_envelope(s: &str) -> bool {
    s.starts_with(ENVELOPE_PREFIX)
}

/// `n` random bytes from the OS RNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    OsRng.fill_bytes(&mut v);
    v
}

/// `prefix` followed by `bytes` random bytes from the OS RNG, base64url
/// without padding.
pub fn random_token(prefix: &str, bytes: usize) -> String {
    let raw = Zeroizing::new(random_bytes(bytes));
    let mut out = String::with_capacity(prefix.len() + (bytes * 4).div_ceil(3));
    out.push_str(prefix);
    URL_SAFE_NO_PAD.encode_string(&raw[..], &mut out);
    out
}

/// Split `sbx1:{id}:{body}` into `(id, body)` without decoding the body.
fn split_envelope(envelope: &str) -> Result<(&str, &str), CryptoError> {
    let rest = envelope
        .strip_prefix(ENVELOPE_PREFIX)
        .ok_or(CryptoError::Malformed("unsupported envelope version"))?;
    let (id, body) = rest
        .split_once(':')
        .ok_or(CryptoError::Malformed("missing key id or ciphertext"))?;
    if !valid_key_id(id) {
        return Err(CryptoError::Malformed("invalid key id"));
    }
    Ok((id, body))
}

/// `[A-Za-z0-9_-]{1,32}`.
fn valid_key_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Decode one key's base64 (standard or url-safe, padding optional) into
/// exactly 32 bytes. Errors name the key by id only: base64 errors are not
/// forwarded because they quote the offending byte.
fn decode_key(id: &str, b64: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    // Capacity covers the decoder's estimate, so the buffer never reallocates
    // (zeroizing a Vec clears its whole capacity on drop).
    let mut buf = Zeroizing::new(Vec::with_capacity(b64.len() + 3));
    let mut ok = STD_LENIENT.decode_vec(b64, &mut buf).is_ok();
    if !ok {
        buf.zeroize();
        ok = URL_LENIENT.decode_vec(b64, &mut buf).is_ok();
    }
    if !ok {
        return Err(CryptoError::BadKeySpec(format!(
            "master key '{id}': not valid base64"
        )));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if buf.len() != KEY_LEN {
        return Err(CryptoError::BadKeySpec(format!(
            "master key '{id}': expected {KEY_LEN} bytes of base64, got {}",
            buf.len()
        )));
    }
    key.copy_from_slice(&buf);
    Ok(key)
}

fn write_key_file(mut file: std::fs::File, key: &MasterKey) -> std::io::Result<()> {
    use secrecy::ExposeSecret;
    let spec = key.to_spec();
    let mut line = Zeroizing::new(String::with_capacity(spec.expose_secret().len() + 1));
    line.push_str(spec.expose_secret());
    line.push('\n');
    file.write_all(line.as_bytes())?;
    file.sync_all()
}

fn load_key_file(path: &Path) -> Result<Keyring, CryptoError> {
    let io_err =
        |e: std::io::Error| CryptoError::Io(format!("cannot read {}: {e}", path.display()));
    // A concurrent first run may have created the file but not written it
    // yet; give it a moment before treating an empty file as an error.
    for attempt in 0..10 {
        let mut file = std::fs::File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len > MAX_KEY_FILE_LEN {
            return Err(CryptoError::Io(format!(
                "{} is too large to be a key file",
                path.display()
            )));
        }
        // `len` <= 64 KiB, so the conversion cannot truncate.
        let mut text = Zeroizing::new(String::with_capacity(len as usize + 1));
        (&mut file)
            .take(MAX_KEY_FILE_LEN)
            .read_to_string(&mut text)
            .map_err(io_err)?;
        if text.trim().is_empty() && attempt < 9 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        return Keyring::parse(&text).map_err(|e| match e {
            CryptoError::BadKeySpec(m) => {
                CryptoError::BadKeySpec(format!("key file {}: {m}", path.display()))
            }
            other => other,
        });
    }
    Err(CryptoError::BadKeySpec(format!(
        "key file {}: no master keys",
        path.display()
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on unexpected results
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const AAD: Aad<'static> = Aad::new("integrations", "01HZX", "bot_token");

    fn ring(ids: &[&str]) -> Keyring {
        Keyring::from_keys(ids.iter().map(|id| MasterKey::generate(id)).collect()).unwrap()
    }

    fn spec(k: &MasterKey) -> String {
        k.to_spec().expose_secret().to_owned()
    }

    fn b64_of(spec: &str) -> &str {
        spec.split_once(':').unwrap().1
    }

    #[test]
    fn round_trip() {
        let kr = ring(&["k1"]);
        for pt in [
            &b""[..],
            b"x",
            b"xoxb-123-secret",
            &[0u8, 255, 7][..],
            &[9u8; 5000][..],
        ] {
            let env = kr.encrypt(pt, AAD);
            assert!(is_envelope(&env));
            assert!(env.starts_with("sbx1:k1:"));
            assert_eq!(envelope_key_id(&env), Some("k1"));
            assert_eq!(
                kr.decrypt(&env, AAD).unwrap().expose_secret().as_slice(),
                pt
            );
        }
        let env = kr.encrypt("héllo token".as_bytes(), AAD);
        assert_eq!(
            kr.decrypt_string(&env, AAD).unwrap().expose_secret(),
            "héllo token"
        );
    }

    #[test]
    fn envelope_layout() {
        let kr = ring(&["k1"]);
        let env = kr.encrypt(b"abc", AAD);
        let body = env.strip_prefix("sbx1:k1:").unwrap();
        assert!(!body.contains('='));
        let raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        assert_eq!(raw.len(), NONCE_LEN + 3 + TAG_LEN);
    }

    #[test]
    fn fresh_nonce_each_time() {
        let kr = ring(&["k1"]);
        let a = kr.encrypt(b"same", AAD);
        let b = kr.encrypt(b"same", AAD);
        assert_ne!(a, b);
        let na = &URL_SAFE_NO_PAD.decode(&a[8..]).unwrap()[..NONCE_LEN];
        let nb = &URL_SAFE_NO_PAD.decode(&b[8..]).unwrap()[..NONCE_LEN];
        assert_ne!(na, nb);
    }

    #[test]
    fn wrong_key_same_id_fails() {
        let a = ring(&["k1"]);
        let b = ring(&["k1"]);
        let env = a.encrypt(b"secret", AAD);
        assert!(matches!(b.decrypt(&env, AAD), Err(CryptoError::Decrypt)));
    }

    #[test]
    fn unknown_key_id() {
        let a = ring(&["k1"]);
        let b = ring(&["k2"]);
        let env = a.encrypt(b"secret", AAD);
        match b.decrypt(&env, AAD) {
            Err(CryptoError::UnknownKey(id)) => assert_eq!(id, "k1"),
            other => panic!("expected UnknownKey, got {other:?}"),
        }
    }

    #[test]
    fn bound_to_row_column_and_table() {
        let kr = ring(&["k1"]);
        let env = kr.encrypt(b"secret", AAD);
        for other in [
            Aad::new("integrations", "01HZY", "bot_token"),
            Aad::new("integrations", "01HZX", "signing_secret"),
            Aad::new("webhooks", "01HZX", "bot_token"),
        ] {
            assert!(matches!(kr.decrypt(&env, other), Err(CryptoError::Decrypt)));
        }
        assert!(kr.decrypt(&env, AAD).is_ok());
    }

    #[test]
    fn every_truncation_errors_without_panic() {
        let kr = ring(&["k1"]);
        for pt in [&b""[..], b"some secret value"] {
            let env = kr.encrypt(pt, AAD);
            for n in 0..env.len() {
                let r = kr.decrypt(&env[..n], AAD);
                assert!(
                    matches!(r, Err(CryptoError::Malformed(_) | CryptoError::Decrypt)),
                    "prefix {n}: {r:?}"
                );
                assert!(kr.decrypt_string(&env[..n], AAD).is_err());
            }
        }
    }

    #[test]
    fn bad_version_is_malformed() {
        let kr = ring(&["k1"]);
        let env = kr.encrypt(b"secret", AAD);
        let v2 = env.replacen("sbx1:", "sbx2:", 1);
        assert!(matches!(
            kr.decrypt(&v2, AAD),
            Err(CryptoError::Malformed(_))
        ));
        assert!(!is_envelope(&v2));
        assert_eq!(envelope_key_id(&v2), None);
        // Plaintext is never accepted as a fallback.
        assert!(matches!(
            kr.decrypt("xoxb-plain-token", AAD),
            Err(CryptoError::Malformed(_))
        ));
        assert!(matches!(
            kr.decrypt("", AAD),
            Err(CryptoError::Malformed(_))
        ));
    }

    #[test]
    fn bad_base64_and_bad_parts_are_malformed() {
        let kr = ring(&["k1"]);
        let env = kr.encrypt(b"secret", AAD);
        let body = env.strip_prefix("sbx1:k1:").unwrap();
        let cases = [
            format!("sbx1:k1:{}", "!".repeat(body.len())),
            format!("sbx1:k1:{body}=="),
            format!("sbx1:k1:{}+/", &body[..body.len() - 2]),
            "sbx1:k1".to_owned(),
            "sbx1:".to_owned(),
            format!("sbx1::{body}"),
            format!("sbx1:k 1:{body}"),
            format!("sbx1:{}:{body}", "k".repeat(33)),
            format!("sbx1:k1:{}", &body[..37]),
        ];
        for c in &cases {
            assert!(
                matches!(kr.decrypt(c, AAD), Err(CryptoError::Malformed(_))),
                "{c}"
            );
        }
    }

    #[test]
    fn flipped_byte_fails() {
        let kr = ring(&["k1"]);
        let env = kr.encrypt(b"secret value", AAD);
        let raw = URL_SAFE_NO_PAD
            .decode(env.strip_prefix("sbx1:k1:").unwrap())
            .unwrap();
        for i in 0..raw.len() {
            let mut t = raw.clone();
            t[i] ^= 0x01;
            let tampered = format!("sbx1:k1:{}", URL_SAFE_NO_PAD.encode(&t));
            assert!(
                matches!(kr.decrypt(&tampered, AAD), Err(CryptoError::Decrypt)),
                "byte {i}"
            );
        }
    }

    #[test]
    fn rotation() {
        let k1 = MasterKey::generate("k1");
        let k1_spec = spec(&k1);
        let old = Keyring::from_keys(vec![k1]).unwrap();
        let env_old = old.encrypt(b"tok", AAD);
        assert!(!old.needs_rotation(&env_old));

        let k2 = MasterKey::generate("k2");
        let rotated = Keyring::parse(&format!("{},{k1_spec}", spec(&k2))).unwrap();
        assert_eq!(rotated.active_id(), "k2");
        assert_eq!(rotated.ids(), vec!["k2", "k1"]);
        assert_eq!(
            rotated
                .decrypt(&env_old, AAD)
                .unwrap()
                .expose_secret()
                .as_slice(),
            b"tok"
        );
        assert!(rotated.needs_rotation(&env_old));

        let env_new = rotated.encrypt(b"tok", AAD);
        assert_eq!(envelope_key_id(&env_new), Some("k2"));
        assert!(!rotated.needs_rotation(&env_new));
        assert!(!rotated.needs_rotation("not an envelope"));
        // The old ring cannot read values sealed under the new key.
        assert!(matches!(
            old.decrypt(&env_new, AAD),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn parse_accepts_variants() {
        let k = MasterKey::generate("a_B-9");
        let s = spec(&k);
        let b64 = b64_of(&s);
        let raw = STANDARD.decode(b64).unwrap();
        let url = URL_SAFE_NO_PAD.encode(&raw);
        let std_nopad = b64.trim_end_matches('=');
        let other = spec(&MasterKey::generate("k2"));
        for text in [
            s.clone(),
            format!("a_B-9:{url}"),
            format!("a_B-9:{std_nopad}"),
            format!("  a_B-9:{b64} ,\n {other}\n"),
            format!("a_B-9:{b64}\n{other}\n\n"),
            format!("a_B-9:{b64},,{other},"),
        ] {
            let kr = Keyring::parse(&text).unwrap();
            assert_eq!(kr.active_id(), "a_B-9");
            assert_eq!(spec(&kr.keys[0]), s);
        }
    }

    #[test]
    fn parse_errors_never_show_key() {
        let k = MasterKey::generate("k1");
        let s = spec(&k);
        let b64 = b64_of(&s).to_owned();
        let short = STANDARD.encode([7u8; 16]);
        let long = STANDARD.encode([7u8; 33]);
        let bad = format!("{}*{}", &b64[..20], &b64[21..]);
        let cases: Vec<(String, &str, &str)> = vec![
            (format!("k1:{bad}"), "not valid base64", &bad),
            (
                format!("k1:{short}"),
                "expected 32 bytes of base64, got 16",
                &short,
            ),
            (format!("k1:{long}"), "got 33", &long),
            (format!("{s},{s}"), "duplicate master key id 'k1'", &b64),
            (String::new(), "no master keys", &b64),
            (" , \n ".to_owned(), "no master keys", &b64),
            (format!("k 1:{b64}"), "#1: id must match", &b64),
            (format!("k1:{b64},k/2:{b64}"), "#2: id must match", &b64),
            (format!("{}:{b64}", "k".repeat(33)), "id must match", &b64),
            (format!(":{b64}"), "id must match", &b64),
            (b64.clone(), "#1: expected ID:BASE64", &b64),
        ];
        for (text, want, key) in &cases {
            let err = Keyring::parse(text).unwrap_err();
            assert!(matches!(err, CryptoError::BadKeySpec(_)), "{text}");
            let shown = err.to_string();
            let dbg = format!("{err:?}");
            assert!(shown.contains(want), "{shown:?} should contain {want:?}");
            assert!(!key.is_empty());
            assert!(!shown.contains(*key) && !dbg.contains(*key), "{shown}");
        }
        let e = Keyring::parse(&format!("k1:{short}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "bad master key spec: master key 'k1': expected 32 bytes of base64, got 16"
        );
    }

    #[test]
    fn from_keys_validates() {
        assert!(Keyring::from_keys(vec![]).is_err());
        assert!(
            Keyring::from_keys(vec![MasterKey::generate("a"), MasterKey::generate("a")]).is_err()
        );
        assert!(Keyring::from_keys(vec![MasterKey::generate("bad id")]).is_err());
        assert!(
            Keyring::from_keys(vec![MasterKey::generate("a"), MasterKey::generate("b")]).is_ok()
        );
    }

    #[test]
    fn debug_never_shows_key() {
        let k1 = MasterKey::generate("k1");
        let s = spec(&k1);
        let b64 = b64_of(&s).to_owned();
        let raw = STANDARD.decode(&b64).unwrap();
        let dbg_key = format!("{k1:?}");
        assert!(dbg_key.contains("k1"));
        assert!(!dbg_key.contains(&b64));
        assert!(!dbg_key.contains(&format!("{:?}", &raw[..4])));
        let kr = Keyring::parse(&s).unwrap();
        for d in [
            format!("{kr:?}"),
            format!("{kr:#?}"),
            format!("{:?}", kr.keys[0]),
        ] {
            assert!(d.contains("k1"));
            assert!(!d.contains(&b64), "{d}");
            assert!(!d.contains(&s), "{d}");
            assert!(!d.contains(&format!("{:?}", &raw[..4])), "{d}");
        }
        // Decrypted values and specs are secrets: redacted in Debug.
        let env = kr.encrypt(b"plaintext-value", AAD);
        assert!(!format!("{:?}", kr.decrypt(&env, AAD)).contains("plaintext"));
        assert!(!format!("{:?}", kr.decrypt_string(&env, AAD)).contains("plaintext"));
        assert!(!format!("{:?}", k1.to_spec()).contains(&b64));
    }

    #[test]
    fn decrypt_errors_hide_plaintext() {
        let kr = ring(&["k1"]);
        let env = kr.encrypt(b"plaintext-value", AAD);
        let e = kr.decrypt(&env, Aad::new("t", "r", "c")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ciphertext does not authenticate (wrong key, wrong row/column, or tampered)"
        );
    }

    #[test]
    fn decrypt_string_rejects_non_utf8() {
        let kr = ring(&["k1"]);
        let env = kr.encrypt(&[0xff, 0xfe], AAD);
        assert!(matches!(
            kr.decrypt_string(&env, AAD),
            Err(CryptoError::Malformed(_))
        ));
        assert!(kr.decrypt(&env, AAD).is_ok());
    }

    #[test]
    fn key_file_created_private_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.keys");
        let (kr1, created) = Keyring::load_or_create_file(&path).unwrap();
        assert!(created);
        assert!(kr1.active_id().starts_with('k'));
        assert!(kr1.active_id()[1..].bytes().all(|b| b.is_ascii_digit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(file_mode_is_private(&path).unwrap());
        assert!(Keyring::file_mode_is_private(&path).unwrap());

        let env = kr1.encrypt(b"tok", AAD);
        let (kr2, created) = Keyring::load_or_create_file(&path).unwrap();
        assert!(!created);
        assert_eq!(kr2.active_id(), kr1.active_id());
        assert_eq!(
            kr2.decrypt(&env, AAD).unwrap().expose_secret().as_slice(),
            b"tok"
        );

        // A world-readable file still loads; the caller can warn.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!file_mode_is_private(&path).unwrap());
        let (kr3, created) = Keyring::load_or_create_file(&path).unwrap();
        assert!(!created);
        assert_eq!(kr3.active_id(), kr1.active_id());
    }

    #[test]
    fn key_file_multiple_entries_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (a, b) = (MasterKey::generate("new"), MasterKey::generate("old"));
        std::fs::write(&path, format!("{}\n{}\n", spec(&a), spec(&b))).unwrap();
        let (kr, created) = Keyring::load_or_create_file(&path).unwrap();
        assert!(!created);
        assert_eq!(kr.ids(), vec!["new", "old"]);

        let short = STANDARD.encode([1u8; 16]);
        std::fs::write(&path, format!("k1:{short}\n")).unwrap();
        let e = Keyring::load_or_create_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("key file") && e.contains("got 16") && !e.contains(&short),
            "{e}"
        );

        let missing = dir.path().join("no/such/dir/keys");
        assert!(matches!(
            Keyring::load_or_create_file(&missing),
            Err(CryptoError::Io(_))
        ));
        assert!(!missing.exists());
    }

    #[test]
    fn to_spec_round_trips() {
        let k = MasterKey::generate("k9");
        let s = spec(&k);
        assert!(s.starts_with("k9:") && s.ends_with('='));
        assert_eq!(STANDARD.decode(b64_of(&s)).unwrap().len(), 32);
        let kr = Keyring::parse(&s).unwrap();
        let env = Keyring::from_keys(vec![k]).unwrap().encrypt(b"v", AAD);
        assert_eq!(
            kr.decrypt(&env, AAD).unwrap().expose_secret().as_slice(),
            b"v"
        );
    }

    #[test]
    fn random_helpers() {
        assert_eq!(random_bytes(0).len(), 0);
        assert_eq!(random_bytes(32).len(), 32);
        assert_ne!(random_bytes(32), random_bytes(32));
        let t = random_token("sbx_", 32);
        assert!(t.starts_with("sbx_"));
        assert_eq!(URL_SAFE_NO_PAD.decode(&t[4..]).unwrap().len(), 32);
        assert_ne!(random_token("p", 16), random_token("p", 16));
        assert_eq!(random_token("p", 0), "p");
    }

    #[test]
    fn envelope_helpers() {
        assert!(is_envelope("sbx1:k1:abc"));
        assert!(!is_envelope("sbx1"));
        assert!(!is_envelope("xoxb-1"));
        assert_eq!(envelope_key_id("sbx1:k1:abc"), Some("k1"));
        assert_eq!(envelope_key_id("sbx1:k1"), None);
        assert_eq!(envelope_key_id("sbx1:k!:abc"), None);
        assert_eq!(envelope_key_id("sbx2:k1:abc"), None);
    }
}
