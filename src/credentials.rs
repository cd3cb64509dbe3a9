//! Credentials: the master keyring, encryption of secret columns, and the in-memory cache that
//! webhook handlers read instead of the database.
//!
//! Cache rules: entries live for `credential_cache_ttl`, "not found" entries for at most
//! [`MISSING_TTL`]; a local change invalidates the entry at once and, on PostgreSQL, sends
//! `NOTIFY signalbox_credentials` so other nodes drop it too (they would otherwise see it within
//! the TTL at most). `last_used_at` is collected in memory and written in batches by a
//! background flush, never per request.
//!
//! The ids looked up come from unsigned requests, so every cache is bounded ([`CACHE_CAPACITY`]
//! found entries and, apart from them, [`MISSING_CAPACITY`] "not found" entries per kind) and an
//! id that does not have the shape of one of ours (`int_`/`whk_` + a lower-case ULID, a Slack
//! `T…`/`E…` id) is answered "not found" without touching the database or the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde_json::Value;

use crate::clock::now_micros;
use crate::config::Config;
use crate::crypto::{Aad, CryptoError, Keyring};
use crate::ids::prefix;
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
    // Absolute, so that the log says which file (the default is relative to the directory).
    let path = std::path::absolute(&path).unwrap_or(path);
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

/// Most found entries each cache (webhook keys, integrations, Slack teams) holds.
pub const CACHE_CAPACITY: u64 = 10_000;
/// Most "not found" entries each cache holds, apart from the found ones so that a flood of
/// random ids cannot push out the credentials in use.
pub const MISSING_CAPACITY: u64 = 10_000;
/// Longest life of a "not found" entry (the credential TTL when that is shorter).
pub const MISSING_TTL: Duration = Duration::from_secs(10);

/// One kind of cached lookup: found values and ids found to be unknown, each bounded and
/// expiring on its own.
struct Tier<V: Clone + Send + Sync + 'static> {
    found: Cache<String, V>,
    missing: Cache<String, ()>,
}

impl<V: Clone + Send + Sync + 'static> Tier<V> {
    fn new(ttl: Duration) -> Self {
        Tier {
            found: Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(ttl)
                .build(),
            missing: Cache::builder()
                .max_capacity(MISSING_CAPACITY)
                .time_to_live(ttl.min(MISSING_TTL))
                .build(),
        }
    }

    /// `Some(Some(v))` for a cached value, `Some(None)` for a cached "not found", `None` when
    /// the store must be asked.
    fn get(&self, id: &str) -> Option<Option<V>> {
        if let Some(v) = self.found.get(id) {
            return Some(Some(v));
        }
        self.missing.contains_key(id).then_some(None)
    }

    fn put(&self, id: &str, value: Option<V>) {
        match value {
            Some(v) => {
                self.missing.invalidate(id);
                self.found.insert(id.to_string(), v);
            }
            None => {
                self.found.invalidate(id);
                self.missing.insert(id.to_string(), ());
            }
        }
    }

    fn invalidate(&self, id: &str) {
        self.found.invalidate(id);
        self.missing.invalidate(id);
    }

    fn invalidate_all(&self) {
        self.found.invalidate_all();
        self.missing.invalidate_all();
    }

    /// (found, missing) entries, after the cache's pending maintenance (evictions).
    fn counts(&self) -> (u64, u64) {
        self.found.run_pending_tasks();
        self.missing.run_pending_tasks();
        (self.found.entry_count(), self.missing.entry_count())
    }
}

/// The active Slack integrations, for `url_verification` in team-lookup mode (no team named).
#[derive(Default)]
struct SlackList {
    /// Bumped by every invalidation, so that a load that began before one is not kept.
    generation: u64,
    loaded: Option<(Instant, Arc<[Arc<CachedIntegration>]>)>,
}

struct Caches {
    keys: Tier<Arc<CachedKey>>,
    integrations: Tier<Arc<CachedIntegration>>,
    /// Team or enterprise id → its integrations' ids (active first).
    teams: Tier<Arc<[String]>>,
    slack: Mutex<SlackList>,
    /// One load of the Slack list at a time (the others wait for it and use it).
    slack_load: tokio::sync::Mutex<()>,
    /// Store queries made for cache misses.
    store_reads: AtomicU64,
}

/// How many entries the credential caches hold, and how many store reads they made (for tests
/// and diagnostics: see [`Credentials::cache_entry_count`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    /// Webhook keys found.
    pub keys: u64,
    /// Webhook key ids found unknown (or inactive).
    pub missing_keys: u64,
    /// Integrations found.
    pub integrations: u64,
    /// Integration ids found unknown.
    pub missing_integrations: u64,
    /// Slack team or enterprise ids with integrations.
    pub teams: u64,
    /// Slack team or enterprise ids without.
    pub missing_teams: u64,
    /// 1 when the list of active Slack integrations is loaded.
    pub slack_lists: u64,
    /// Store queries made for cache misses since start (every kind, the Slack list included).
    pub store_reads: u64,
}

impl CacheCounts {
    /// Entries in all caches (`store_reads` is not an entry).
    pub fn entries(&self) -> u64 {
        self.keys
            + self.missing_keys
            + self.integrations
            + self.missing_integrations
            + self.teams
            + self.missing_teams
            + self.slack_lists
    }
}

/// The credential service: keyring plus cache.
#[derive(Clone)]
pub struct Credentials {
    store: Store,
    keyring: Keyring,
    ttl: Duration,
    caches: Arc<Caches>,
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
            caches: Arc::new(Caches {
                keys: Tier::new(ttl),
                integrations: Tier::new(ttl),
                teams: Tier::new(ttl),
                slack: Mutex::default(),
                slack_load: tokio::sync::Mutex::new(()),
                store_reads: AtomicU64::new(0),
            }),
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

    fn count_store_read(&self) {
        self.caches.store_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// A webhook key by id (active ones only), from the cache when fresh. `None`, without a
    /// lookup, for an id that is not shaped like one of ours.
    pub async fn webhook_key(&self, id: &str) -> Result<Option<Arc<CachedKey>>, StoreError> {
        if !crate::ids::looks_like(id, prefix::WEBHOOK_KEY) {
            return Ok(None);
        }
        if let Some(hit) = self.caches.keys.get(id) {
            return Ok(hit);
        }
        self.count_store_read();
        let row = self.store.get_webhook_key(id).await?;
        let value = row
            .filter(|k| k.is_active)
            .map(|k| Arc::new(self.decode_key(&k)));
        self.caches.keys.put(id, value.clone());
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
    /// `None`, without a lookup, for an id that is not shaped like one of ours.
    pub async fn integration(
        &self,
        id: &str,
    ) -> Result<Option<Arc<CachedIntegration>>, StoreError> {
        if !crate::ids::looks_like(id, prefix::INTEGRATION) {
            return Ok(None);
        }
        if let Some(hit) = self.caches.integrations.get(id) {
            return Ok(hit);
        }
        self.count_store_read();
        let row = self.store.get_integration(id).await?;
        let value = row.map(|r| Arc::new(self.decode_integration(r)));
        self.caches.integrations.put(id, value.clone());
        Ok(value)
    }

    /// Every Slack integration bound to a team or enterprise id, active ones first (newest
    /// first), from the cache when fresh. The caller decides which one an event belongs to.
    /// Empty, without a lookup, for an id that is not shaped like a Slack team or enterprise id.
    pub async fn slack_by_team(
        &self,
        team_id: &str,
    ) -> Result<Vec<Arc<CachedIntegration>>, StoreError> {
        if !crate::protocol::slack::is_team_id(team_id) {
            return Ok(Vec::new());
        }
        let ids = match self.caches.teams.get(team_id) {
            Some(Some(ids)) => ids,
            Some(None) => return Ok(Vec::new()),
            None => {
                self.count_store_read();
                let rows = self.store.find_slack_integrations(team_id).await?;
                let ids: Arc<[String]> = rows.iter().map(|r| r.id.clone()).collect();
                // The query read the rows already: cache them instead of reading each again.
                for row in rows {
                    if !matches!(self.caches.integrations.get(&row.id), Some(Some(_))) {
                        let id = row.id.clone();
                        let value = Arc::new(self.decode_integration(row));
                        self.caches.integrations.put(&id, Some(value));
                    }
                }
                self.caches
                    .teams
                    .put(team_id, (!ids.is_empty()).then(|| ids.clone()));
                ids
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.iter() {
            if let Some(i) = self.integration(id).await? {
                out.push(i);
            }
        }
        Ok(out)
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

    /// Every active Slack integration, for a `url_verification` in team-lookup mode (it names
    /// no team, so any of their signing secrets may verify it): one store query per TTL at
    /// most (and after an invalidation), one at a time, never one per request.
    pub async fn active_slack_integrations(
        &self,
    ) -> Result<Arc<[Arc<CachedIntegration>]>, StoreError> {
        if let Some(hit) = self.fresh_slack_list() {
            return Ok(hit);
        }
        let _one_load = self.caches.slack_load.lock().await;
        if let Some(hit) = self.fresh_slack_list() {
            return Ok(hit);
        }
        let generation = self.slack_list().generation;
        self.count_store_read();
        let rows = self.store.list_integrations(None).await?;
        let list: Arc<[Arc<CachedIntegration>]> = rows
            .into_iter()
            .filter(|r| r.platform == "slack" && r.is_active)
            .map(|r| Arc::new(self.decode_integration(r)))
            .collect();
        let mut slot = self.slack_list();
        if slot.generation == generation {
            slot.loaded = Some((Instant::now(), list.clone()));
        }
        Ok(list)
    }

    fn slack_list(&self) -> std::sync::MutexGuard<'_, SlackList> {
        self.caches.slack.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh_slack_list(&self) -> Option<Arc<[Arc<CachedIntegration>]>> {
        let slot = self.slack_list();
        let (at, list) = slot.loaded.as_ref()?;
        (at.elapsed() < self.ttl).then(|| list.clone())
    }

    fn drop_slack_list(&self) {
        let mut slot = self.slack_list();
        slot.generation += 1;
        slot.loaded = None;
    }

    /// How many entries each cache holds (after their pending evictions) and how many store
    /// reads cache misses made.
    pub fn cache_entry_count(&self) -> CacheCounts {
        let c = &self.caches;
        let (keys, missing_keys) = c.keys.counts();
        let (integrations, missing_integrations) = c.integrations.counts();
        let (teams, missing_teams) = c.teams.counts();
        CacheCounts {
            keys,
            missing_keys,
            integrations,
            missing_integrations,
            teams,
            missing_teams,
            slack_lists: u64::from(self.slack_list().loaded.is_some()),
            store_reads: c.store_reads.load(Ordering::Relaxed),
        }
    }

    /// Drops the cached entries of `id` (key or integration) on this node.
    pub fn invalidate(&self, id: &str) {
        let c = &self.caches;
        c.keys.invalidate(id);
        c.integrations.invalidate(id);
        // Team lookups and the Slack list may point at (or should now find) this integration.
        c.teams.invalidate_all();
        self.drop_slack_list();
    }

    /// Drops everything cached on this node.
    pub fn invalidate_all(&self) {
        let c = &self.caches;
        c.keys.invalidate_all();
        c.integrations.invalidate_all();
        c.teams.invalidate_all();
        self.drop_slack_list();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use crate::crypto::MasterKey;
    use crate::ids::new_id;

    #[test]
    fn only_our_id_shapes_are_well_formed() {
        let int = new_id(prefix::INTEGRATION);
        let whk = new_id(prefix::WEBHOOK_KEY);
        assert!(crate::ids::looks_like(&int, prefix::INTEGRATION), "{int}");
        assert!(crate::ids::looks_like(&whk, prefix::WEBHOOK_KEY), "{whk}");
        assert!(crate::ids::looks_like(
            "int_01m8m7bfnrfyhvmry5qcb9n2qs",
            prefix::INTEGRATION
        ));
        assert!(!crate::ids::looks_like(&int, prefix::WEBHOOK_KEY));
        assert!(!crate::ids::looks_like(&whk, prefix::INTEGRATION));
        let long = format!("int_{}", "a".repeat(100_000));
        for bad in [
            "",
            "int",
            "int_",
            "int_01M8M7BFNRFYHVMRY5QCB9N2QS",  // upper case
            "int_01m8m7bfnrfyhvmry5qcb9n2q",   // 25
            "int_01m8m7bfnrfyhvmry5qcb9n2qss", // 27
            "int_01m8m7bfnrfyhvmry5qcb9n2ql",  // `l` is not Crockford base32
            "int_01m8m7bfnrfyhvmry5qcb9n2qu",  // nor `u`
            "int-01m8m7bfnrfyhvmry5qcb9n2qs",
            "xint_01m8m7bfnrfyhvmry5qcb9n2qs",
            "int_01m8m7bfnrfyhvmry5qcb9n2\u{e9}",
            "int_' OR 1=1 --aaaaaaaaaaaaaaaa",
            long.as_str(),
        ] {
            assert!(
                !crate::ids::looks_like(bad, prefix::INTEGRATION),
                "{bad:.40}"
            );
        }

        for good in ["T0123ABCD", "E1", "T0SOMEONEELSE", "T12345678901234567890"] {
            assert!(crate::protocol::slack::is_team_id(good), "{good}");
        }
        let long_team = format!("T{}", "A".repeat(1_000));
        for bad in [
            "",
            "T",
            "E",
            "t0123ABCD",
            "T0123abcd",
            "U0123ABCD",
            "T123456789012345678901", // 21 after the T
            "T0123 ABC",
            "T0123-ABC",
            "T0123\u{c9}",
            long_team.as_str(),
        ] {
            assert!(!crate::protocol::slack::is_team_id(bad), "{bad:.40}");
        }
    }

    async fn credentials(dir: &tempfile::TempDir) -> Credentials {
        let spec = MasterKey::generate("k1").to_spec();
        let mut raw = RawConfig::defaults();
        raw.set(
            "database_url",
            format!("sqlite://{}", dir.path().join("creds.db").display()),
        )
        .set("master_keys", spec.expose_secret());
        let cfg = raw.build().expect("config");
        let store = Store::connect(&cfg).await.expect("store");
        let (keyring, _) = load_keyring(&cfg).expect("keyring");
        Credentials::new(store, keyring, Duration::from_secs(300))
    }

    /// What an unsigned body or query can name: none of it reaches the database or the cache,
    /// and random well-formed ids cost one read each and leave at most the caches' bound.
    #[tokio::test]
    async fn hostile_ids_leave_no_entry_and_random_ones_stay_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = credentials(&dir).await;
        let huge = format!("int_{}", "0".repeat(1 << 20));
        let huge_team = format!("T{}", "A".repeat(1 << 20));
        let mut malformed: Vec<String> = vec![
            String::new(),
            "int_".into(),
            "whk_".into(),
            "T".into(),
            "int_01M8M7BFNRFYHVMRY5QCB9N2QS".into(),
            "whk_01m8m7bfnrfyhvmry5qcb9n2ql".into(),
            "t0lower".into(),
            "T0123-ABC".into(),
            huge,
            huge_team,
        ];
        malformed.extend((0..1_000).map(|i| format!("int_{i}")));
        malformed.extend((0..1_000).map(|i| format!("T{i:021}")));
        for id in &malformed {
            assert!(creds.webhook_key(id).await.expect("key").is_none());
            assert!(creds.integration(id).await.expect("integration").is_none());
            assert!(creds.slack_by_team(id).await.expect("team").is_empty());
        }
        assert_eq!(
            creds.cache_entry_count(),
            CacheCounts::default(),
            "a malformed id is neither looked up nor cached"
        );

        // Random well-formed ids: one read each (a cached "not found" is answered from memory)
        // and never more entries than the bound.
        let n = MISSING_CAPACITY + 2_000;
        for _ in 0..n {
            let id = new_id(prefix::INTEGRATION);
            assert!(creds.integration(&id).await.expect("lookup").is_none());
        }
        let teams = 300;
        for i in 0..teams {
            let team = format!("T0RANDOM{i}");
            assert!(creds.slack_by_team(&team).await.expect("team").is_empty());
            assert!(creds.slack_by_team(&team).await.expect("team").is_empty());
        }
        let keys = 300;
        for _ in 0..keys {
            let id = new_id(prefix::WEBHOOK_KEY);
            assert!(creds.webhook_key(&id).await.expect("key").is_none());
            assert!(creds.webhook_key(&id).await.expect("key").is_none());
        }
        let c = creds.cache_entry_count();
        assert_eq!(c.store_reads, n + teams + keys, "{c:?}");
        assert!(c.missing_integrations <= MISSING_CAPACITY, "{c:?}");
        assert!(c.missing_integrations > 0, "{c:?}");
        assert_eq!((c.missing_teams, c.missing_keys), (teams, keys), "{c:?}");
        assert_eq!(
            (c.keys, c.integrations, c.teams, c.slack_lists),
            (0, 0, 0, 0)
        );

        // An invalidation drops the "not found" entries it concerns.
        creds.invalidate_all();
        assert_eq!(creds.cache_entry_count().entries(), 0);
    }
}
