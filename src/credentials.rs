//! Credentials: the master keyring, encryption of secret columns, and the in-memory cache that
//! webhook handlers read instead of the database.
//!
//! Cache rules: entries (including "not found") live for `credential_cache_ttl`; a local change
//! invalidates the entry at once and, on PostgreSQL, sends `NOTIFY signalbox_credentials` so
//! other nodes drop it too (they would otherwise see it within the TTL at most). `last_used_at`
//! is collected in memory and written in batches by a background flush, never per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde_json::Value;

use crate::clock::now_micros;
use crate::config::Config;
use crate::crypto::{Aad, CryptoError, Keyring};
use crate::protocol::standard_webhooks;
use crate::store::{Integration, LastUsedTable, Pool, Store, StoreError, WebhookKey};

/// PostgreSQL channel carrying ids of changed credentials.
pub const NOTIFY_CHANNEL: &str = "signalbox_credentials";

/// Loads the master keyring as configured: `SIGNALBOX_MASTER_KEYS`, else the key file (created
/// with mode 0600 on first run). Returns the keyring and a note for the log.
pub fn load_keyring(cfg: &Config) -> anyhow::Result<(Keyring, String)> {
    if let Some(spec) = &cfg.master_keys {
        let kr = Keyring::parse(spec.expose_secret())
            .map_err(|e| anyhow::anyhow!("SIGNALBOX_MASTER_KEYS: {e}"))?;
        let note = format!(
            "master keys from SIGNALBOX_MASTER_KEYS (active key {})",
            kr.active_id()
        );
        return Ok((kr, note));
    }
    let Some(path) = cfg.effective_key_file() else {
        anyhow::bail!(
            "no master key: set SIGNALBOX_MASTER_KEYS (create one with `signalbox keys generate`) \
             or SIGNALBOX_KEY_FILE; a key file is only created automatically beside a SQLite database"
        );
    };
    let (kr, created) = Keyring::load_or_create_file(&path)
        .map_err(|e| anyhow::anyhow!("master key file {}: {e}", path.display()))?;
    let note = if created {
        format!(
            "created master key file {} (mode 0600, key {}); back it up: without it stored secrets cannot be decrypted",
            path.display(),
            kr.active_id()
        )
    } else {
        if let Ok(false) = crate::crypto::file_mode_is_private(&path) {
            tracing::warn!(path = %path.display(), "master key file is readable by group or others; chmod 600 it");
        }
        format!(
            "master keys from {} (active key {})",
            path.display(),
            kr.active_id()
        )
    };
    Ok((kr, note))
}

/// Refuses to run when stored secrets exist that no configured key can decrypt.
pub async fn check_keys(store: &Store, keyring: &Keyring) -> anyhow::Result<()> {
    let values = store.encrypted_values().await?;
    let mut bad = Vec::new();
    let mut missing_ids = std::collections::BTreeSet::new();
    for v in &values {
        if let Err(e) = keyring.decrypt(&v.value, Aad::new(v.table, &v.row_id, v.column)) {
            if let Some(id) = crate::crypto::envelope_key_id(&v.value) {
                missing_ids.insert(id.to_string());
            }
            bad.push(format!("{v:?}: {e}"));
        }
    }
    if !bad.is_empty() {
        anyhow::bail!(
            "{} stored secret(s) cannot be decrypted with the configured master keys (configured: {}; \
             the data names: {}). Configure the key that encrypted them in SIGNALBOX_MASTER_KEYS \
             (old keys may follow the active one) or restore the key file. First problem: {}",
            bad.len(),
            keyring.ids().join(", "),
            missing_ids.into_iter().collect::<Vec<_>>().join(", "),
            bad[0]
        );
    }
    Ok(())
}

/// Re-encrypts every stored secret under the active key. Safe to re-run and to run while
/// servers are up (each value is swapped only if unchanged meanwhile). Returns (rotated, skipped).
pub async fn rotate_all(store: &Store, keyring: &Keyring) -> anyhow::Result<(usize, usize)> {
    let mut rotated = 0;
    let mut skipped = 0;
    for v in store.encrypted_values().await? {
        if !keyring.needs_rotation(&v.value) {
            skipped += 1;
            continue;
        }
        let aad = Aad::new(v.table, &v.row_id, v.column);
        let plain = keyring
            .decrypt(&v.value, aad)
            .map_err(|e| anyhow::anyhow!("{v:?}: {e}"))?;
        let new = keyring.encrypt(plain.expose_secret(), aad);
        if store.swap_encrypted_value(&v, &new).await? {
            rotated += 1;
        } else {
            skipped += 1;
        }
    }
    Ok((rotated, skipped))
}

/// A secret that verifies signatures, possibly only until a grace deadline.
pub struct VerifyingSecret {
    /// The raw key bytes (HMAC key).
    pub key: SecretBox<Vec<u8>>,
    /// Unix µs after which it no longer verifies (previous secrets during rotation).
    pub valid_until: Option<i64>,
}

impl std::fmt::Debug for VerifyingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VerifyingSecret([redacted], valid_until={:?})",
            self.valid_until
        )
    }
}

/// Secrets valid at `now`, as byte slices for the verifiers.
pub fn valid_keys(secrets: &[VerifyingSecret], now: i64) -> Vec<&[u8]> {
    secrets
        .iter()
        .filter(|s| s.valid_until.is_none_or(|t| t > now))
        .map(|s| s.key.expose_secret().as_slice())
        .collect()
}

/// A generic webhook key as the handler needs it.
#[derive(Debug)]
pub struct CachedKey {
    /// `whk_…`
    pub id: String,
    /// Owner.
    pub workspace_id: String,
    /// Current and (during grace) previous HMAC keys.
    pub secrets: Vec<VerifyingSecret>,
}

/// An integration as handlers and workers need it (secrets decrypted, in memory only).
#[derive(Debug)]
pub struct CachedIntegration {
    /// The row (secret columns are envelopes, never plaintext).
    pub row: Integration,
    /// Parsed config.
    pub config: Value,
    /// Signing/webhook secrets valid for verification.
    pub secrets: Vec<VerifyingSecret>,
    /// Value of the required shared header, if configured.
    pub required_header: Option<SecretString>,
    /// API/bot token.
    pub access_token: Option<SecretString>,
}

#[derive(Default)]
struct Caches {
    keys: HashMap<String, (Instant, Option<Arc<CachedKey>>)>,
    integrations: HashMap<String, (Instant, Option<Arc<CachedIntegration>>)>,
    teams: HashMap<String, (Instant, Option<String>)>,
}

/// The credential service: keyring plus cache.
#[derive(Clone)]
pub struct Credentials {
    store: Store,
    keyring: Keyring,
    ttl: Duration,
    caches: Arc<Mutex<Caches>>,
    used_keys: Arc<Mutex<HashMap<String, i64>>>,
    used_integrations: Arc<Mutex<HashMap<String, i64>>>,
}

impl Credentials {
    /// A credential service over `store`.
    pub fn new(store: Store, keyring: Keyring, ttl: Duration) -> Self {
        Credentials {
            store,
            keyring,
            ttl,
            caches: Arc::default(),
            used_keys: Arc::default(),
            used_integrations: Arc::default(),
        }
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Encrypts a secret for `table.column` of row `row_id`.
    pub fn encrypt(&self, table: &str, row_id: &str, column: &str, plaintext: &str) -> String {
        self.keyring
            .encrypt(plaintext.as_bytes(), Aad::new(table, row_id, column))
    }

    /// Decrypts a stored secret.
    pub fn decrypt(
        &self,
        table: &str,
        row_id: &str,
        column: &str,
        envelope: &str,
    ) -> Result<SecretString, CryptoError> {
        self.keyring
            .decrypt_string(envelope, Aad::new(table, row_id, column))
    }

    fn fresh<T: Clone>(&self, entry: Option<&(Instant, T)>) -> Option<T> {
        entry.and_then(|(at, v)| (at.elapsed() < self.ttl).then(|| v.clone()))
    }

    /// A webhook key by id (active ones only), from the cache when fresh.
    pub async fn webhook_key(&self, id: &str) -> Result<Option<Arc<CachedKey>>, StoreError> {
        if let Some(hit) = self.fresh(self.lock().keys.get(id)) {
            return Ok(hit);
        }
        let row = self.store.get_webhook_key(id).await?;
        let value = row
            .filter(|k| k.is_active)
            .map(|k| Arc::new(self.decode_key(&k)));
        self.lock()
            .keys
            .insert(id.to_string(), (Instant::now(), value.clone()));
        Ok(value)
    }

    fn decode_key(&self, k: &WebhookKey) -> CachedKey {
        let mut secrets = Vec::new();
        let decode = |col: &str, env: &str| {
            self.decrypt("webhook_keys", &k.id, col, env)
                .map_err(|e| tracing::error!(key_id = %k.id, column = col, error = %e, "cannot decrypt webhook key"))
                .ok()
                .and_then(|s| standard_webhooks::decode_secret(s.expose_secret()))
        };
        if let Some(key) = decode("secret_enc", &k.secret_enc) {
            secrets.push(VerifyingSecret {
                key: SecretBox::new(Box::new(key)),
                valid_until: None,
            });
        }
        if let (Some(env), Some(until)) = (&k.previous_secret_enc, k.previous_expires_at)
            && let Some(key) = decode("previous_secret_enc", env)
        {
            secrets.push(VerifyingSecret {
                key: SecretBox::new(Box::new(key)),
                valid_until: Some(until),
            });
        }
        CachedKey {
            id: k.id.clone(),
            workspace_id: k.workspace_id.clone(),
            secrets,
        }
    }

    /// An integration by id (active or not: the caller decides), from the cache when fresh.
    pub async fn integration(
        &self,
        id: &str,
    ) -> Result<Option<Arc<CachedIntegration>>, StoreError> {
        if let Some(hit) = self.fresh(self.lock().integrations.get(id)) {
            return Ok(hit);
        }
        let row = self.store.get_integration(id).await?;
        let value = row.map(|r| Arc::new(self.decode_integration(r)));
        self.lock()
            .integrations
            .insert(id.to_string(), (Instant::now(), value.clone()));
        Ok(value)
    }

    /// The Slack integration of a team id (the active one if any), from the cache when fresh.
    pub async fn slack_by_team(
        &self,
        team_id: &str,
    ) -> Result<Option<Arc<CachedIntegration>>, StoreError> {
        let cached = self.fresh(self.lock().teams.get(team_id));
        let id = match cached {
            Some(id) => id,
            None => {
                let rows = self.store.find_slack_integrations(team_id).await?;
                let id = rows.first().map(|r| r.id.clone());
                self.lock()
                    .teams
                    .insert(team_id.to_string(), (Instant::now(), id.clone()));
                id
            }
        };
        match id {
            Some(id) => self.integration(&id).await,
            None => Ok(None),
        }
    }

    /// Decrypts an integration's secrets into a cache entry.
    pub fn decode_integration(&self, row: Integration) -> CachedIntegration {
        let dec = |col: &str, env: &Option<String>| -> Option<SecretString> {
            let env = env.as_deref()?;
            self.decrypt("integrations", &row.id, col, env)
                .map_err(|e| tracing::error!(integration_id = %row.id, column = col, error = %e, "cannot decrypt"))
                .ok()
        };
        let mut secrets = Vec::new();
        if let Some(s) = dec("webhook_secret_enc", &row.webhook_secret_enc) {
            secrets.push(VerifyingSecret {
                key: SecretBox::new(Box::new(s.expose_secret().as_bytes().to_vec())),
                valid_until: None,
            });
        }
        if let (Some(s), Some(until)) = (
            dec(
                "previous_webhook_secret_enc",
                &row.previous_webhook_secret_enc,
            ),
            row.previous_secret_expires_at,
        ) {
            secrets.push(VerifyingSecret {
                key: SecretBox::new(Box::new(s.expose_secret().as_bytes().to_vec())),
                valid_until: Some(until),
            });
        }
        let required_header = dec("required_header_value_enc", &row.required_header_value_enc);
        let access_token = dec("access_token_enc", &row.access_token_enc);
        let config =
            serde_json::from_str(&row.config).unwrap_or_else(|_| Value::Object(Default::default()));
        CachedIntegration {
            row,
            config,
            secrets,
            required_header,
            access_token,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the cached entries of `id` (key or integration) on this node.
    pub fn invalidate(&self, id: &str) {
        let mut c = self.lock();
        c.keys.remove(id);
        c.integrations.remove(id);
        // Team lookups may point at (or should now find) this integration.
        c.teams.clear();
    }

    /// Drops everything cached on this node.
    pub fn invalidate_all(&self) {
        let mut c = self.lock();
        c.keys.clear();
        c.integrations.clear();
        c.teams.clear();
    }

    /// Invalidates `id` here and tells the other nodes (PostgreSQL).
    pub async fn changed(&self, id: &str) {
        self.invalidate(id);
        if let Pool::Postgres(p) = self.store.pool()
            && let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(id)
                .execute(p)
                .await
        {
            tracing::warn!(error = %e, "could not notify other nodes of a credential change");
        }
    }

    /// Notes that a key or integration was used (written later in a batch).
    pub fn mark_used(&self, table: LastUsedTable, id: &str) {
        let map = match table {
            LastUsedTable::WebhookKeys => &self.used_keys,
            LastUsedTable::Integrations => &self.used_integrations,
        };
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), now_micros());
    }

    /// Writes collected `last_used_at` values.
    pub async fn flush_last_used(&self) -> Result<(), StoreError> {
        for (table, map) in [
            (LastUsedTable::WebhookKeys, &self.used_keys),
            (LastUsedTable::Integrations, &self.used_integrations),
        ] {
            let batch: Vec<(String, i64)> =
                std::mem::take(&mut *map.lock().unwrap_or_else(|p| p.into_inner()))
                    .into_iter()
                    .collect();
            self.store.touch_last_used(table, &batch).await?;
        }
        Ok(())
    }
}
