//! Configuration, layered: built-in defaults, then an optional `signalbox.toml`, then
//! `SIGNALBOX_*` environment variables. Every value is validated once, at start-up, with a message
//! naming the key; secrets are [`SecretString`]s and never printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// Environment variable prefix.
pub const ENV_PREFIX: &str = "SIGNALBOX_";

/// Default config file looked up in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "signalbox.toml";

/// Longest grace period of a rotated secret, seconds (30 days): the bound of
/// `SIGNALBOX_SECRET_GRACE_SECS` and of every `grace_period_secs` the admin API accepts.
pub const MAX_SECRET_GRACE_SECS: u64 = 30 * 86_400;

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: SecretString,
    /// Listen address of the HTTP server.
    pub bind: SocketAddr,
    /// Base used to print webhook URLs; `http://{bind}` when unset.
    pub public_url: String,
    /// Bearer token of the admin API (global scope). Unset: only workspace tokens work.
    pub admin_token: Option<SecretString>,
    /// `ID:BASE64(32 bytes)[,…]`, first active. Unset: the key file beside the SQLite database.
    pub master_keys: Option<SecretString>,
    /// Key file used when `master_keys` is unset (default: `signalbox.key` beside the SQLite db).
    pub key_file: Option<PathBuf>,
    /// App-level Slack signing secret (one app installed in many teams).
    pub slack_signing_secret: Option<SecretString>,
    /// Slack OAuth client id.
    pub slack_client_id: Option<String>,
    /// Slack OAuth client secret.
    pub slack_client_secret: Option<SecretString>,
    /// Slack Web API base URL.
    pub slack_api_base: String,
    /// Slack's OAuth v2 authorize page.
    pub slack_authorize_url: String,
    /// Bot scopes requested by the install flow (comma-separated).
    pub slack_scopes: String,
    /// Pylon API base URL.
    pub pylon_api_base: String,
    /// Larger webhook bodies get 413.
    pub max_body_bytes: usize,
    /// Allowed clock skew of signed timestamps, both directions.
    pub signature_tolerance_secs: i64,
    /// Number of concurrent worker tasks in this process.
    pub worker_concurrency: usize,
    /// Deliveries claimed per worker round trip.
    pub worker_batch_size: usize,
    /// Attempts before a delivery becomes `dead`.
    pub max_attempts: i32,
    /// First retry delay; doubles per attempt up to `retry_max_delay`.
    pub retry_base_delay: Duration,
    /// Longest retry delay.
    pub retry_max_delay: Duration,
    /// How long a claimed delivery stays leased to a worker.
    pub lease: Duration,
    /// Longest a webhook or `/readyz` waits for storage before answering 503 (well under
    /// Slack's 3 s, so a sender or a probe sees a 503, not a hang).
    pub storage_deadline: Duration,
    /// A client must send its request line and headers within this time.
    pub header_read_timeout: Duration,
    /// A client must send its whole body within this time (408 otherwise).
    pub body_read_timeout: Duration,
    /// Polling backstop when no wake-up arrives.
    pub poll_interval: Duration,
    /// Capacity of the inbox task queue; beyond it webhooks get 503.
    pub inbox_capacity: usize,
    /// Deliveries written per inbox transaction at most (group commit).
    pub inbox_batch_max: usize,
    /// Time-to-live of cached credentials.
    pub credential_cache_ttl: Duration,
    /// Grace period during which a rotated secret still verifies.
    pub secret_grace: Duration,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// How long shutdown waits for in-flight work.
    pub shutdown_timeout: Duration,
    /// SQLite `synchronous` level: `full` (default, survives power loss) or `normal`.
    pub sqlite_synchronous: String,
    /// Maximum connections in the database pool.
    pub db_max_connections: u32,
    /// How long raw bodies and headers of finished deliveries, and activity entries, are kept
    /// (`None`: forever). Older ones are purged by the housekeeping task.
    pub retention: Option<Duration>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    /// The variable name (`SIGNALBOX_…`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: format!("{ENV_PREFIX}{}", key.to_uppercase()),
        message: message.into(),
    }
}

/// Raw layered values, keyed by lower-case name without prefix.
#[derive(Debug, Default, Clone)]
pub struct RawConfig(BTreeMap<String, String>);

/// Every key the configuration understands, with its default (None = unset).
const KEYS: &[(&str, Option<&str>)] = &[
    ("database_url", Some("sqlite://signalbox.db")),
    ("bind", Some("127.0.0.1:8080")),
    ("public_url", None),
    ("admin_token", None),
    ("master_keys", None),
    ("key_file", None),
    ("slack_signing_secret", None),
    ("slack_client_id", None),
    ("slack_client_secret", None),
    ("slack_api_base", Some("https://slack.com/api")),
    (
        "slack_authorize_url",
        Some("https://slack.com/oauth/v2/authorize"),
    ),
    (
        "slack_scopes",
        Some(
            "channels:history,groups:history,im:history,mpim:history,channels:read,groups:read,users:read",
        ),
    ),
    ("pylon_api_base", Some("https://api.usepylon.com")),
    ("max_body_bytes", Some("1048576")),
    ("signature_tolerance_secs", Some("300")),
    ("worker_concurrency", Some("4")),
    ("worker_batch_size", Some("64")),
    ("max_attempts", Some("8")),
    ("retry_base_delay_ms", Some("2000")),
    ("retry_max_delay_secs", Some("3600")),
    ("lease_secs", Some("60")),
    ("storage_deadline_ms", Some("2000")),
    ("header_read_timeout_ms", Some("10000")),
    ("body_read_timeout_ms", Some("15000")),
    ("poll_interval_ms", Some("1000")),
    ("inbox_capacity", Some("8192")),
    ("inbox_batch_max", Some("512")),
    ("credential_cache_ttl_secs", Some("30")),
    ("secret_grace_secs", Some("86400")),
    ("log_format", Some("text")),
    ("shutdown_timeout_secs", Some("20")),
    ("sqlite_synchronous", Some("full")),
    ("db_max_connections", Some("10")),
    ("retention", Some("keep")),
];

/// One line on each key, for `signalbox config example` (every key of [`KEYS`] has one; a test
/// checks it).
const KEY_DOCS: &[(&str, &str)] = &[
    (
        "database_url",
        "sqlite://PATH (created on first `serve`) or postgres://USER:PASSWORD@HOST:PORT/DB",
    ),
    (
        "bind",
        "listen address, HOST:PORT (host names are resolved at start)",
    ),
    (
        "public_url",
        "base of the webhook URLs printed for Slack and Pylon (default http://{bind})",
    ),
    (
        "admin_token",
        "bearer token of the HTTP admin API; you choose it, at least 16 characters (secret)",
    ),
    (
        "master_keys",
        "ID:BASE64(32 bytes)[,ID:…], first active (`signalbox keys generate`); required on PostgreSQL (secret)",
    ),
    (
        "key_file",
        "master key file (default: signalbox.key beside the SQLite database, created 0600)",
    ),
    (
        "slack_signing_secret",
        "signing secret of the shared (distributed) Slack app (secret)",
    ),
    (
        "slack_client_id",
        "OAuth install flow: the Slack app's client id",
    ),
    (
        "slack_client_secret",
        "OAuth install flow: the Slack app's client secret (secret)",
    ),
    ("slack_api_base", "Slack Web API base URL"),
    (
        "slack_authorize_url",
        "where the install link sends the browser",
    ),
    (
        "slack_scopes",
        "bot scopes the install link asks for, comma-separated",
    ),
    ("pylon_api_base", "Pylon API base URL"),
    ("max_body_bytes", "larger webhook bodies get 413"),
    (
        "signature_tolerance_secs",
        "allowed clock skew of signed timestamps, both directions",
    ),
    (
        "worker_concurrency",
        "worker tasks per process (0: a node that only receives)",
    ),
    (
        "worker_batch_size",
        "deliveries a worker claims per round trip",
    ),
    ("max_attempts", "attempts before a delivery is dead"),
    (
        "retry_base_delay_ms",
        "first retry delay (doubling, with jitter)",
    ),
    ("retry_max_delay_secs", "longest retry delay"),
    (
        "lease_secs",
        "how long a claimed delivery stays with its worker",
    ),
    (
        "storage_deadline_ms",
        "longest a webhook or /readyz waits for storage before answering 503",
    ),
    (
        "header_read_timeout_ms",
        "a client must send its request line and headers within this time",
    ),
    (
        "body_read_timeout_ms",
        "a client must send its whole body within this time (408 otherwise)",
    ),
    ("poll_interval_ms", "polling backstop of the workers"),
    (
        "inbox_capacity",
        "deliveries waiting for their commit (503 beyond)",
    ),
    ("inbox_batch_max", "most deliveries per group commit"),
    (
        "credential_cache_ttl_secs",
        "how long credentials are cached",
    ),
    (
        "secret_grace_secs",
        "default grace of a rotated secret (at most 2592000, 30 days)",
    ),
    ("log_format", "text or json (level via RUST_LOG)"),
    ("shutdown_timeout_secs", "graceful shutdown bound"),
    (
        "sqlite_synchronous",
        "full (an ack survives power loss), normal (a process crash) or extra",
    ),
    ("db_max_connections", "database pool size"),
    (
        "retention",
        "keep, or how long bodies, headers and activity are kept (30d, 12h, 90s)",
    ),
];

/// A commented `signalbox.toml` with every key: set keys show their default, unset ones are
/// commented out. It parses back to the defaults.
pub fn example_toml() -> String {
    let mut out = String::from(
        "# signalbox.toml: every key, with its default. Environment variables SIGNALBOX_<KEY>\n\
         # (upper case) win over this file, and `serve` flags over both.\n",
    );
    for (key, default) in KEYS {
        let doc = KEY_DOCS
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, d)| d);
        out.push_str(&format!("\n# {doc}\n"));
        match default {
            Some(v) => out.push_str(&format!("{key} = {}\n", toml::Value::String((*v).into()))),
            None => out.push_str(&format!("# {key} = \"\"\n")),
        }
    }
    out
}

const SECRET_KEYS: &[&str] = &[
    "admin_token",
    "master_keys",
    "slack_signing_secret",
    "slack_client_secret",
];

impl RawConfig {
    /// Defaults only.
    pub fn defaults() -> Self {
        let mut m = BTreeMap::new();
        for (k, v) in KEYS {
            if let Some(v) = v {
                m.insert((*k).to_string(), (*v).to_string());
            }
        }
        RawConfig(m)
    }

    /// Sets one value (lower-case key without prefix).
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.0.insert(key.to_lowercase(), value.into());
        self
    }

    /// Layers a TOML file over the current values. Unknown keys are an error.
    pub fn merge_toml_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("config", format!("cannot read {}: {e}", path.display())))?;
        self.merge_toml_str(&text).map_err(|e| {
            err(
                &e.key.replace(ENV_PREFIX, "").to_lowercase(),
                format!("in {}: {}", path.display(), e.message),
            )
        })
    }

    /// Layers TOML text over the current values.
    pub fn merge_toml_str(&mut self, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| err("config", format!("not valid TOML: {e}")))?;
        for (k, v) in table {
            let key = k.to_lowercase();
            if !KEYS.iter().any(|(name, _)| *name == key) {
                return Err(err(&key, "unknown configuration key"));
            }
            let value = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => {
                    return Err(err(
                        &key,
                        format!("expected a string or number, got {}", other.type_str()),
                    ));
                }
            };
            self.0.insert(key, value);
        }
        Ok(())
    }

    /// Layers `SIGNALBOX_*` variables from `vars` over the current values. Unknown
    /// `SIGNALBOX_` variables are ignored (they may belong to tests or tools).
    pub fn merge_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (k, v) in vars {
            if let Some(name) = k.strip_prefix(ENV_PREFIX) {
                let name = name.to_lowercase();
                if KEYS.iter().any(|(n, _)| *n == name) {
                    self.0.insert(name, v);
                }
            }
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|s| !s.trim().is_empty())
    }

    fn secret(&self, key: &str) -> Option<SecretString> {
        self.get(key).map(|s| SecretString::from(s.to_string()))
    }

    fn num<T>(&self, key: &str, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let raw = self.get(key).ok_or_else(|| err(key, "must be set"))?;
        let v: T = raw
            .trim()
            .parse()
            .map_err(|_| err(key, format!("expected a whole number, got {raw:?}")))?;
        if v < min || v > max {
            return Err(err(
                key,
                format!("must be between {min} and {max}, got {v}"),
            ));
        }
        Ok(v)
    }

    /// Validates and converts every value.
    pub fn build(&self) -> Result<Config, ConfigError> {
        let database_url = self
            .get("database_url")
            .ok_or_else(|| err("database_url", "must be set"))?;
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(err(
                "database_url",
                "must start with sqlite:// or postgres://",
            ));
        }
        let bind_raw = self.get("bind").ok_or_else(|| err("bind", "must be set"))?;
        let bind = parse_bind(bind_raw).map_err(|m| err("bind", m))?;
        let public_url = match self.get("public_url") {
            Some(u) => {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(err("public_url", "must start with http:// or https://"));
                }
                u.trim_end_matches('/').to_string()
            }
            // A host name stays a name (what the operator wrote is what a browser can use).
            None if bind_raw.parse::<SocketAddr>().is_err() => {
                format!("http://{}", bind_raw.trim())
            }
            None => format!("http://{bind}"),
        };
        for k in ["slack_api_base", "pylon_api_base", "slack_authorize_url"] {
            let v = self.get(k).unwrap_or_default();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(err(k, "must be an http:// or https:// URL"));
            }
        }
        if let Some(t) = self.get("admin_token")
            && t.len() < 16
        {
            return Err(err("admin_token", "must be at least 16 characters"));
        }
        let log_format = match self.get("log_format").unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log_format",
                    format!("expected text or json, got {other:?}"),
                ));
            }
        };
        let sqlite_synchronous = self
            .get("sqlite_synchronous")
            .unwrap_or("full")
            .to_lowercase();
        if !matches!(sqlite_synchronous.as_str(), "full" | "normal" | "extra") {
            return Err(err("sqlite_synchronous", "expected full, normal or extra"));
        }
        let retention = match self.get("retention") {
            None => None,
            Some(v) => parse_retention(v).map_err(|m| err("retention", m))?,
        };
        let cfg = Config {
            database_url: SecretString::from(database_url.to_string()),
            bind,
            public_url,
            admin_token: self.secret("admin_token"),
            master_keys: self.secret("master_keys"),
            key_file: self.get("key_file").map(PathBuf::from),
            slack_signing_secret: self.secret("slack_signing_secret"),
            slack_client_id: self.get("slack_client_id").map(str::to_string),
            slack_client_secret: self.secret("slack_client_secret"),
            slack_authorize_url: self
                .get("slack_authorize_url")
                .unwrap_or_default()
                .to_string(),
            slack_scopes: self
                .get("slack_scopes")
                .unwrap_or_default()
                .replace(' ', ""),
            slack_api_base: self
                .get("slack_api_base")
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string(),
            pylon_api_base: self
                .get("pylon_api_base")
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string(),
            max_body_bytes: self.num("max_body_bytes", 1024usize, 64 * 1024 * 1024)?,
            signature_tolerance_secs: self.num("signature_tolerance_secs", 1i64, 86_400)?,
            worker_concurrency: self.num("worker_concurrency", 0usize, 256)?,
            worker_batch_size: self.num("worker_batch_size", 1usize, 1000)?,
            max_attempts: self.num("max_attempts", 1i32, 100)?,
            retry_base_delay: Duration::from_millis(self.num(
                "retry_base_delay_ms",
                1u64,
                3_600_000,
            )?),
            retry_max_delay: Duration::from_secs(self.num(
                "retry_max_delay_secs",
                1u64,
                7 * 86_400,
            )?),
            lease: Duration::from_secs(self.num("lease_secs", 1u64, 3600)?),
            storage_deadline: Duration::from_millis(self.num(
                "storage_deadline_ms",
                50u64,
                60_000,
            )?),
            header_read_timeout: Duration::from_millis(self.num(
                "header_read_timeout_ms",
                10u64,
                600_000,
            )?),
            body_read_timeout: Duration::from_millis(self.num(
                "body_read_timeout_ms",
                10u64,
                600_000,
            )?),
            poll_interval: Duration::from_millis(self.num("poll_interval_ms", 10u64, 60_000)?),
            inbox_capacity: self.num("inbox_capacity", 1usize, 1_000_000)?,
            inbox_batch_max: self.num("inbox_batch_max", 1usize, 10_000)?,
            credential_cache_ttl: Duration::from_secs(self.num(
                "credential_cache_ttl_secs",
                0u64,
                3600,
            )?),
            secret_grace: Duration::from_secs(self.num(
                "secret_grace_secs",
                0u64,
                MAX_SECRET_GRACE_SECS,
            )?),
            log_format,
            shutdown_timeout: Duration::from_secs(self.num("shutdown_timeout_secs", 1u64, 600)?),
            sqlite_synchronous,
            db_max_connections: self.num("db_max_connections", 1u32, 1000)?,
            retention,
        };
        Ok(cfg)
    }
}

impl Config {
    /// Loads defaults, then `file` (or `./signalbox.toml` if it exists), then the process
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with(file, &[])
    }

    /// [`Config::load`], then `overrides` (command-line flags: `(key, value)`), which win over
    /// the environment, which wins over the file.
    pub fn load_with(
        file: Option<&Path>,
        overrides: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::defaults();
        let env_file = std::env::var(format!("{ENV_PREFIX}CONFIG"))
            .ok()
            .map(PathBuf::from);
        match file.map(Path::to_path_buf).or(env_file) {
            Some(p) => raw.merge_toml_file(&p)?,
            None => {
                let p = Path::new(DEFAULT_CONFIG_FILE);
                if p.exists() {
                    raw.merge_toml_file(p)?;
                }
            }
        }
        raw.merge_env(std::env::vars());
        for (k, v) in overrides {
            raw.set(k, v.clone());
        }
        raw.build()
    }

    /// True when the database is SQLite.
    pub fn is_sqlite(&self) -> bool {
        self.database_url.expose_secret().starts_with("sqlite:")
    }

    /// The SQLite database file path, if the database is SQLite.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let url = self.database_url.expose_secret();
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))?;
        let path = rest.split('?').next().unwrap_or(rest);
        if path.is_empty() || path == ":memory:" {
            return None;
        }
        Some(PathBuf::from(path))
    }

    /// Where the master key file lives when `master_keys` is unset.
    pub fn effective_key_file(&self) -> Option<PathBuf> {
        if let Some(p) = &self.key_file {
            return Some(p.clone());
        }
        let db = self.sqlite_path()?;
        let dir = db.parent().map(Path::to_path_buf).unwrap_or_default();
        Some(dir.join("signalbox.key"))
    }

    /// The effective configuration as `KEY = value` lines, secrets redacted.
    pub fn redacted_lines(&self) -> Vec<(String, String)> {
        let show = |s: &Option<SecretString>| match s {
            Some(_) => "[redacted]".to_string(),
            None => "(unset)".to_string(),
        };
        let opt = |s: &Option<String>| s.clone().unwrap_or_else(|| "(unset)".into());
        let mut out = vec![
            (
                "database_url",
                redact_url(self.database_url.expose_secret()),
            ),
            ("bind", self.bind.to_string()),
            ("public_url", self.public_url.clone()),
            ("admin_token", show(&self.admin_token)),
            ("master_keys", show(&self.master_keys)),
            (
                "key_file",
                self.effective_key_file()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(unset)".into()),
            ),
            ("slack_signing_secret", show(&self.slack_signing_secret)),
            ("slack_client_id", opt(&self.slack_client_id)),
            ("slack_client_secret", show(&self.slack_client_secret)),
            ("slack_api_base", self.slack_api_base.clone()),
            ("slack_authorize_url", self.slack_authorize_url.clone()),
            ("slack_scopes", self.slack_scopes.clone()),
            ("pylon_api_base", self.pylon_api_base.clone()),
            ("max_body_bytes", self.max_body_bytes.to_string()),
            (
                "signature_tolerance_secs",
                self.signature_tolerance_secs.to_string(),
            ),
            ("worker_concurrency", self.worker_concurrency.to_string()),
            ("worker_batch_size", self.worker_batch_size.to_string()),
            ("max_attempts", self.max_attempts.to_string()),
            (
                "retry_base_delay_ms",
                self.retry_base_delay.as_millis().to_string(),
            ),
            (
                "retry_max_delay_secs",
                self.retry_max_delay.as_secs().to_string(),
            ),
            ("lease_secs", self.lease.as_secs().to_string()),
            (
                "storage_deadline_ms",
                self.storage_deadline.as_millis().to_string(),
            ),
            (
                "header_read_timeout_ms",
                self.header_read_timeout.as_millis().to_string(),
            ),
            (
                "body_read_timeout_ms",
                self.body_read_timeout.as_millis().to_string(),
            ),
            (
                "poll_interval_ms",
                self.poll_interval.as_millis().to_string(),
            ),
            ("inbox_capacity", self.inbox_capacity.to_string()),
            ("inbox_batch_max", self.inbox_batch_max.to_string()),
            (
                "credential_cache_ttl_secs",
                self.credential_cache_ttl.as_secs().to_string(),
            ),
            ("secret_grace_secs", self.secret_grace.as_secs().to_string()),
            (
                "log_format",
                match self.log_format {
                    LogFormat::Text => "text".into(),
                    LogFormat::Json => "json".into(),
                },
            ),
            (
                "shutdown_timeout_secs",
                self.shutdown_timeout.as_secs().to_string(),
            ),
            ("sqlite_synchronous", self.sqlite_synchronous.clone()),
            ("db_max_connections", self.db_max_connections.to_string()),
            (
                "retention",
                self.retention
                    .map_or_else(|| "keep".into(), |d| format!("{}s", d.as_secs())),
            ),
        ];
        out.sort_by_key(|(k, _)| KEYS.iter().position(|(n, _)| n == k).unwrap_or(usize::MAX));
        out.into_iter()
            .map(|(k, v)| (format!("{ENV_PREFIX}{}", k.to_uppercase()), v))
            .collect()
    }
}

/// Hides every secret of a database URL: the userinfo password (`scheme://user:[redacted]@host`)
/// and the values of query parameters that hold or point at a credential (libpq's `password`,
/// `sslpassword`, `passfile`, and anything else named like one, see [`is_secret_param`]).
pub fn redact_url(url: &str) -> String {
    // The query starts at the first `?` (or `#`); the userinfo ends at the last `@` before it
    // (a raw `/` or `@` in a password stays inside the redacted part).
    let (head, tail) = match url.find(['?', '#']) {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let mut out = String::with_capacity(url.len());
    match head.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            match rest.rsplit_once('@') {
                Some((creds, host)) => {
                    let user = creds.split(':').next().unwrap_or("");
                    out.push_str(user);
                    if creds.contains(':') {
                        out.push_str(":[redacted]");
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(rest),
            }
        }
        None => out.push_str(head),
    }
    let (query, fragment) = match tail.find('#') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    if let Some(query) = query.strip_prefix('?') {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if is_secret_param(name) => format!("{name}=[redacted]"),
                _ => param.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    if !fragment.is_empty() {
        out.push_str("#[redacted]");
    }
    out
}

/// True when a database URL query parameter holds (or names the file of) a credential:
/// its name, percent-decoded and lower-cased, contains `pass` (`password`, `sslpassword`,
/// `passfile`, `passwd`), `pwd`, `secret`, `token`, `key` (`sslkey`, `api_key`) or
/// `credential`.
pub fn is_secret_param(name: &str) -> bool {
    let name = percent_decode_lossy(name).to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "key", "credential"]
        .iter()
        .any(|w| name.contains(w))
}

/// `%XX` decoding (and `+` as a space) of a query parameter name; invalid escapes stay as
/// they are.
fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                match b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True if `key` (lower-case, no prefix) holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

/// Parses `SIGNALBOX_BIND`: `IP:PORT` (`127.0.0.1:8080`, `[::1]:8080`) or `HOST:PORT`
/// (`localhost:8080`, resolved now; the first address wins).
pub fn parse_bind(v: &str) -> Result<SocketAddr, String> {
    let v = v.trim();
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    let hint = "expected HOST:PORT like 127.0.0.1:8080, [::1]:8080 or localhost:8080";
    if v.rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(format!("{hint}, got {v:?}"));
    }
    use std::net::ToSocketAddrs;
    let mut addrs = v
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {v:?}: {e} ({hint})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{v:?} resolves to no address ({hint})"))
}

/// Parses `SIGNALBOX_RETENTION`: `keep` (or empty: nothing is purged) or a whole number
/// followed by `d`, `h`, `m` or `s` (`30d`, `12h`, `90s`), at least one second and at most
/// ten years.
pub fn parse_retention(v: &str) -> Result<Option<Duration>, String> {
    let v = v.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("keep") {
        return Ok(None);
    }
    let bad = || format!("expected keep or a duration such as 30d, 12h or 90s, got {v:?}");
    let (num, unit) = v.split_at(v.len() - v.chars().last().map_or(0, char::len_utf8));
    let per: u64 = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(bad()),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = n.checked_mul(per).ok_or_else(bad)?;
    if secs == 0 {
        return Err(format!("must be at least 1s, got {v:?}"));
    }
    if secs > 10 * 366 * 86_400 {
        return Err(format!("must be at most ten years, got {v:?}"));
    }
    Ok(Some(Duration::from_secs(secs)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on unexpected results
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = RawConfig::defaults().build().expect("defaults are valid");
        assert_eq!(c.database_url.expose_secret(), "sqlite://signalbox.db");
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.public_url, "http://127.0.0.1:8080");
        assert_eq!(c.slack_api_base, "https://slack.com/api");
        assert_eq!(c.pylon_api_base, "https://api.usepylon.com");
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.signature_tolerance_secs, 300);
        assert!(c.admin_token.is_none());
        assert_eq!(c.effective_key_file(), Some(PathBuf::from("signalbox.key")));
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        let mut raw = RawConfig::defaults();
        raw.merge_toml_str("bind = \"0.0.0.0:9000\"\nmax_body_bytes = 2048\n")
            .expect("valid toml");
        raw.merge_env([
            ("SIGNALBOX_MAX_BODY_BYTES".to_string(), "4096".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ]);
        let c = raw.build().expect("valid");
        assert_eq!(c.bind.to_string(), "0.0.0.0:9000");
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.public_url, "http://0.0.0.0:9000");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("bind", "nope", "SIGNALBOX_BIND"),
            ("max_body_bytes", "lots", "SIGNALBOX_MAX_BODY_BYTES"),
            ("database_url", "mysql://x", "SIGNALBOX_DATABASE_URL"),
            (
                "signature_tolerance_secs",
                "0",
                "SIGNALBOX_SIGNATURE_TOLERANCE_SECS",
            ),
            ("admin_token", "short", "SIGNALBOX_ADMIN_TOKEN"),
            ("public_url", "ftp://x", "SIGNALBOX_PUBLIC_URL"),
        ];
        for (k, v, name) in cases {
            let mut raw = RawConfig::defaults();
            raw.set(k, v);
            let e = raw.build().expect_err(k);
            assert_eq!(e.key, name);
            assert!(e.to_string().contains(name));
        }
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let mut raw = RawConfig::defaults();
        let e = raw.merge_toml_str("bnd = \"x\"").expect_err("unknown key");
        assert_eq!(e.key, "SIGNALBOX_BND");
    }

    #[test]
    fn printing_redacts_secrets() {
        let mut raw = RawConfig::defaults();
        raw.set("admin_token", "super-secret-admin-token")
            .set("database_url", "postgres://u:hunter2@db/x")
            .set("slack_signing_secret", "abcdef0123456789");
        let c = raw.build().expect("valid");
        let text = format!("{:?} {:?}", c.redacted_lines(), c);
        for s in ["super-secret-admin-token", "hunter2", "abcdef0123456789"] {
            assert!(!text.contains(s), "{s} leaked");
        }
        assert!(text.contains("postgres://u:[redacted]@db/x"));
    }

    #[test]
    fn database_urls_are_redacted_in_userinfo_and_query() {
        let cases = [
            ("postgres://u:hunter2@db/x", "postgres://u:[redacted]@db/x"),
            ("postgres://u@db/x", "postgres://u@db/x"),
            (
                "postgres://u@h/db?password=secret",
                "postgres://u@h/db?password=[redacted]",
            ),
            (
                "postgres://u@h/db?sslmode=require&sslpassword=secret&passfile=/home/u/.pgpass",
                "postgres://u@h/db?sslmode=require&sslpassword=[redacted]&passfile=[redacted]",
            ),
            (
                "postgres://u:hunter2@h:5432/db?PassWord=secret&application_name=sb",
                "postgres://u:[redacted]@h:5432/db?PassWord=[redacted]&application_name=sb",
            ),
            // Percent-encoded parameter names and `@` inside a query value.
            (
                "postgres://u@h/db?pass%77ord=a@b",
                "postgres://u@h/db?pass%77ord=[redacted]",
            ),
            // A raw `/` or `@` in the password stays inside the redacted part.
            ("postgres://u:pa/s@s@h/db", "postgres://u:[redacted]@h/db"),
            (
                "sqlite://signalbox.db?mode=rwc",
                "sqlite://signalbox.db?mode=rwc",
            ),
            ("sqlite:x.db", "sqlite:x.db"),
            ("postgres://h/db#frag-secret", "postgres://h/db#[redacted]"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
        // What `config print` shows.
        let mut raw = RawConfig::defaults();
        raw.set("database_url", "postgres://u@db/x?password=s3cr3t-in-query");
        let c = raw.build().expect("valid");
        let text = format!("{:?}", c.redacted_lines());
        assert!(!text.contains("s3cr3t-in-query"), "{text}");
        assert!(
            text.contains("postgres://u@db/x?password=[redacted]"),
            "{text}"
        );
    }

    #[test]
    fn secret_grace_is_bounded_to_thirty_days() {
        let mut raw = RawConfig::defaults();
        raw.set("secret_grace_secs", MAX_SECRET_GRACE_SECS.to_string());
        let c = raw.build().expect("30 days is allowed");
        assert_eq!(c.secret_grace.as_secs(), 2_592_000);
        for bad in ["2592001", "9000000000000", "-1"] {
            let mut raw = RawConfig::defaults();
            raw.set("secret_grace_secs", bad);
            let e = raw.build().expect_err(bad);
            assert_eq!(e.key, "SIGNALBOX_SECRET_GRACE_SECS");
        }
    }

    #[test]
    fn the_example_has_every_key_and_parses_back_to_the_defaults() {
        let text = example_toml();
        for (key, _) in KEYS {
            assert!(
                KEY_DOCS.iter().any(|(k, _)| k == key),
                "{key} has no doc line"
            );
            assert!(
                text.contains(&format!("\n{key} = ")) || text.contains(&format!("\n# {key} = ")),
                "{key} missing from the example"
            );
        }
        assert_eq!(
            KEY_DOCS.len(),
            KEYS.len(),
            "a doc line for a key that does not exist"
        );
        let mut raw = RawConfig::default();
        raw.merge_toml_str(&text)
            .expect("the example is valid TOML of known keys");
        let from_example = raw.build().expect("the example is a valid configuration");
        let defaults = RawConfig::defaults().build().unwrap();
        assert_eq!(from_example.redacted_lines(), defaults.redacted_lines());
    }

    #[test]
    fn bind_takes_addresses_and_host_names() {
        assert_eq!(
            parse_bind("127.0.0.1:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_bind("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert!(parse_bind("localhost:8080").unwrap().ip().is_loopback());
        for bad in [
            "8080",
            "localhost",
            ":8080",
            "localhost:http",
            "localhost:99999",
        ] {
            let e = parse_bind(bad).unwrap_err();
            assert!(e.contains("localhost:8080"), "{bad}: {e}");
        }
        let mut raw = RawConfig::defaults();
        raw.set("bind", "localhost:8181");
        let c = raw.build().unwrap();
        assert_eq!(c.public_url, "http://localhost:8181");
        assert_eq!(c.bind.port(), 8181);
    }

    #[test]
    fn retention_is_keep_or_a_duration() {
        let c = RawConfig::defaults().build().expect("defaults");
        assert_eq!(c.retention, None);
        for (v, secs) in [
            ("30d", 2_592_000),
            ("12h", 43_200),
            ("90s", 90),
            ("5m", 300),
        ] {
            let mut raw = RawConfig::defaults();
            raw.set("retention", v);
            assert_eq!(
                raw.build().expect(v).retention,
                Some(Duration::from_secs(secs))
            );
        }
        for bad in [
            "30",
            "d",
            "-1d",
            "0s",
            "1.5h",
            "30 days",
            "1w",
            "99999999999999999d",
        ] {
            let mut raw = RawConfig::defaults();
            raw.set("retention", bad);
            let e = raw.build().expect_err(bad);
            assert_eq!(e.key, "SIGNALBOX_RETENTION");
            assert!(
                e.message.contains("30d") || e.message.contains("at"),
                "{}",
                e.message
            );
        }
    }
}
