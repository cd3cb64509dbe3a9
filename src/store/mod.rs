//! Storage: one interface ([`Store`]), two first-class backends (SQLite and PostgreSQL).
//!
//! - `outcome.rs` decides, without the database, what applying an effect writes (for both).
//! - Each backend's hot path — the inbox batch, the workers' claim, the fenced apply — is in one
//!   place: `sqlite/` (a dedicated writer thread with its durability and its SQL) and
//!   `postgres.rs` (batched `UNNEST` statements).
//! - Everything else (admin CRUD, lists, retention, readiness) is here, written once and run
//!   on either pool by the `on_pool!` macro where the SQL text is the same, with a text per
//!   backend where it is not (row locks, `SKIP LOCKED`, `BEGIN IMMEDIATE`, placeholders).
//! - `inspect.rs` holds the benchmark's verification and seeding queries.
//!
//! Both schemas have one shape: timestamps are Unix-microsecond `BIGINT`s, JSON is `TEXT`.
//! Migrations live in `migrations/sqlite` and `migrations/postgres`.
//!
//! Invariants enforced here rather than by callers:
//! - a delivery is unique per `(dedupe_scope, dedupe_key)` (unique constraint, not check-then-insert);
//! - a signal is unique per `(workspace_id, source, source_ref)`;
//! - a delivery's outcome, its signal change and its activity entry commit together, and only if
//!   the worker still holds the delivery's lease (fencing).

pub mod inspect;
mod models;
mod outcome;
mod postgres;
mod sqlite;

use outcome::Finish;

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use models::*;
pub use outcome::finishes_at_insert;
use postgres::{Fence, PgFinish, apply_effects_pg, insert_deliveries_pg};

use crate::clock::{now_micros, rfc3339};
use crate::config::Config;
use crate::ids::{new_id, prefix};
use crate::protocol::effect::Effect;

/// Errors from storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the operation.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A unique constraint was hit.
    #[error("already exists")]
    Conflict,
    /// SQLite's dedicated writer connection failed (see `sqlite`).
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// SQLite's writer thread is not running.
    #[error("database error: {0}")]
    Writer(String),
}

/// A PostgreSQL connection failure in words that name the server, the database and the cause.
/// The pool's own error after its acquire timeout says only that it timed out, so one direct
/// connection attempt finds the cause (refused, unknown host, no such database, password).
async fn pg_connect_error(opts: &PgConnectOptions, e: sqlx::Error) -> StoreError {
    use sqlx::ConnectOptions;
    let cause = match e {
        sqlx::Error::PoolTimedOut => {
            match tokio::time::timeout(Duration::from_secs(3), opts.connect()).await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => sqlx::Error::PoolTimedOut,
                Err(_) => sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer within 3 s",
                )),
            }
        }
        e => e,
    };
    let hint = match &cause {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "; is PostgreSQL running and listening on that port?"
        }
        sqlx::Error::Database(d) if d.code().as_deref() == Some("3D000") => {
            "; create it (`createdb NAME`) or fix SIGNALBOX_DATABASE_URL"
        }
        sqlx::Error::Database(d) if d.code().as_deref() == Some("28P01") => {
            "; check the user and password in SIGNALBOX_DATABASE_URL"
        }
        _ => "",
    };
    let cause = match &cause {
        sqlx::Error::Database(d) => d.message().to_string(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    };
    StoreError::Writer(format!(
        "cannot connect to PostgreSQL at {}:{} (database {:?}, user {:?}): {cause}{hint}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or_default(),
        opts.get_username(),
    ))
}

/// Whether the database is known to be unreachable: opened by the first failure that says so
/// ([`StoreError::is_unreachable`]), closed by a probe that reaches it again. While it is open
/// webhooks and `/readyz` answer 503 at once instead of each waiting for the pool's acquire
/// timeout.
#[derive(Debug, Default)]
struct Health {
    down: std::sync::atomic::AtomicBool,
    probing: std::sync::atomic::AtomicBool,
}

/// How often the breaker's probe tries the database while it is open.
const PROBE_EVERY: Duration = Duration::from_millis(250);

impl StoreError {
    /// True when the database could not be reached at all (connection refused or lost, no
    /// connection within the pool's timeout, the server shutting down), as opposed to refusing
    /// or failing one statement.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Db(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            // Connection exceptions (08…) and operator intervention (57P01–03: shutdown, crash
            // recovery, cannot connect now).
            StoreError::Db(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P0")),
            _ => false,
        }
    }

    /// True when the database refused a statement (a constraint, a trigger, a deadlock), as
    /// opposed to being unreachable, busy, out of space or out of connections: retrying the
    /// same work another way can then succeed.
    pub fn is_refused_statement(&self) -> bool {
        match self {
            StoreError::Conflict => true,
            StoreError::Db(sqlx::Error::Database(_)) => true,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
                f.code,
                rusqlite::ErrorCode::ConstraintViolation
                    | rusqlite::ErrorCode::TypeMismatch
                    | rusqlite::ErrorCode::TooBig
                    | rusqlite::ErrorCode::Unknown
            ),
            _ => false,
        }
    }

    fn from_sqlx(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return StoreError::Conflict;
        }
        StoreError::Db(e)
    }

    fn from_rusqlite(e: rusqlite::Error) -> Self {
        // Only a unique (or primary key) constraint is a conflict; a failed check, foreign key
        // or trigger is an error like any other.
        if let rusqlite::Error::SqliteFailure(f, _) = &e
            && matches!(
                f.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            )
        {
            return StoreError::Conflict;
        }
        StoreError::Sqlite(e)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::from_rusqlite(e)
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The database pool, one variant per backend.
#[derive(Clone, Debug)]
pub enum Pool {
    /// Embedded SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Runs `$body` with `$p` bound to the concrete pool of either backend. The body is compiled
/// once per backend, so it can use every driver feature with concrete types.
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// The storage handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// The breaker: whether the database is known to be unreachable.
    health: std::sync::Arc<Health>,
    /// SQLite allows one writer at a time. The hot writers of this process (inbox commits,
    /// claims, worker commits) take turns on this async lock instead of colliding inside
    /// SQLite, whose busy handler would make the losers sleep for milliseconds.
    write_turn: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// SQLite: the dedicated connection for the per-delivery writes.
    sqlite: Option<sqlite::SqliteWriter>,
}

/// Outcome of storing one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A new row was written.
    New(String),
    /// A delivery with the same dedupe key was already stored (its id).
    Duplicate(String),
}

/// What applying a worker outcome did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The outcome was committed; the delivery has this status.
    Done {
        /// Final delivery status.
        status: DeliveryStatus,
        /// The signal created or touched, if any.
        signal_id: Option<String>,
        /// The activity action logged, if any.
        action: Option<&'static str>,
    },
    /// The lease was lost (another worker took the delivery); nothing was written.
    LeaseLost,
}

/// A lease granted at insert time (see [`Store::insert_deliveries`]).
#[derive(Debug, Clone, Copy)]
pub struct InsertLease<'a> {
    /// The lease holder (the local worker pool's hand-off owner id).
    pub owner: &'a str,
    /// Unix µs when the lease expires.
    pub until: i64,
    /// Parallel to the batch: which rows to lease (only pending ones should be).
    pub rows: &'a [bool],
}

const DELIVERY_COLS: &str = "id, workspace_id, integration_id, webhook_key_id, source, dedupe_key, \
     status, attempts, last_error, filter_reason, signal_id, received_at, processed_at";

/// Keeps a released SQLite connection only if no transaction is left open on it. When a COMMIT
/// fails with `SQLITE_FULL` (or an I/O error) SQLite may already have rolled the transaction
/// back; sqlx's own ROLLBACK then fails, and sqlx still counts the connection as inside a
/// transaction. Its next `begin()` issues a `SAVEPOINT` (which opens a real transaction), and
/// that transaction's rollback is a `ROLLBACK TO`, which leaves it open: the pooled connection
/// keeps the WAL write lock and every other writer gets `database is locked` until a restart.
/// Closing such a connection ends its transaction. The ping first makes sure a rollback sqlx
/// queued on drop has run.
async fn release_if_clean(conn: &mut sqlx::SqliteConnection) -> sqlx::Result<bool> {
    use sqlx::Connection;
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::warn!(
            "closing a SQLite connection left inside a failed transaction (disk full or I/O error)"
        );
        return Ok(false);
    }
    Ok(true)
}

impl Store {
    /// Connects to the configured database (creating a SQLite file if missing) and applies
    /// migrations.
    pub async fn connect(cfg: &Config) -> Result<Store> {
        let store = Self::connect_without_migrating(cfg).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without applying migrations. A new SQLite database file is created mode 0600
    /// before SQLite opens it (SQLite gives its `-wal` and `-shm` files the database file's
    /// mode); an existing one readable by group or others is warned about.
    pub async fn connect_without_migrating(cfg: &Config) -> Result<Store> {
        let url = cfg.database_url.expose_secret();
        #[cfg(unix)]
        if let Some(path) = cfg.sqlite_path().filter(|_| cfg.is_sqlite()) {
            use std::os::unix::fs::OpenOptionsExt;
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match created {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let abs = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
                    let hint = match abs.parent() {
                        Some(dir) if !dir.exists() => {
                            format!("; the directory {} does not exist", dir.display())
                        }
                        Some(dir) => {
                            format!("; check that {} is writable by this user", dir.display())
                        }
                        None => String::new(),
                    };
                    return Err(StoreError::Writer(format!(
                        "cannot create the SQLite database {} (mode 0600): {e}{hint} \
                         (SIGNALBOX_DATABASE_URL)",
                        abs.display()
                    )));
                }
            }
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                let file = std::path::PathBuf::from(file);
                if let Ok(false) = crate::crypto::file_mode_is_private(&file) {
                    tracing::warn!(
                        path = %file.display(),
                        "SQLite database file is readable by group or others (it holds customer \
                         content); chmod 600 it"
                    );
                }
            }
        }
        let pool = if cfg.is_sqlite() {
            let sync = match cfg.sqlite_synchronous.as_str() {
                "normal" => SqliteSynchronous::Normal,
                "extra" => SqliteSynchronous::Extra,
                _ => SqliteSynchronous::Full,
            };
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sync)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(cfg.db_max_connections.min(8))
                    .acquire_timeout(Duration::from_secs(10))
                    .after_release(|conn, _| Box::pin(release_if_clean(conn)))
                    .connect_with(opts)
                    .await
                    .map_err(|e| {
                        let path = cfg.sqlite_path().unwrap_or_default();
                        let abs = std::path::absolute(&path).unwrap_or(path);
                        StoreError::Writer(format!(
                            "cannot open the SQLite database {}: {e} (SIGNALBOX_DATABASE_URL)",
                            abs.display()
                        ))
                    })?,
            )
        } else {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(cfg.db_max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts.clone())
                .await;
            match pool {
                Ok(p) => Pool::Postgres(p),
                Err(e) => return Err(pg_connect_error(&opts, e).await),
            }
        };
        let turn: std::sync::Arc<tokio::sync::Mutex<()>> = Default::default();
        let sqlite = match &pool {
            Pool::Sqlite(_) => {
                let path = cfg.sqlite_path().ok_or_else(|| {
                    StoreError::Writer("SQLite needs a database file, not :memory:".into())
                })?;
                Some(sqlite::SqliteWriter::open(
                    &path,
                    &cfg.sqlite_synchronous,
                    turn.clone(),
                )?)
            }
            Pool::Postgres(_) => None,
        };
        Ok(Store {
            pool,
            health: Default::default(),
            write_turn: turn,
            sqlite,
        })
    }

    /// Takes this process's SQLite write turn (no-op on PostgreSQL).
    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.pool {
            Pool::Sqlite(_) => Some(self.write_turn.lock().await),
            Pool::Postgres(_) => None,
        }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// True while the breaker is open: the database is known to be unreachable.
    pub fn is_down(&self) -> bool {
        self.health.down.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records a storage failure: one that says the database is unreachable opens the breaker
    /// and starts its probe.
    pub fn note_failure(&self, e: &StoreError) {
        if e.is_unreachable() {
            self.suspect_down(&e.to_string());
        }
    }

    /// Opens the breaker (`why` is logged) and starts its probe, which closes it as soon as
    /// the database answers: a slow database is 503 for one probe interval, an unreachable one
    /// until it is back. PostgreSQL only.
    pub fn suspect_down(&self, why: &str) {
        use std::sync::atomic::Ordering;
        // A SQLite file is never unreachable: a slow or locked one is answered by the deadline
        // alone (and a full one by the writer's own state).
        if matches!(self.pool, Pool::Sqlite(_)) || self.health.down.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(reason = %why, "storage looks unreachable; answering 503 at once until a probe reaches it");
        if self.health.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let ping = async {
                    on_pool!(&store, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))
                };
                match tokio::time::timeout(Duration::from_secs(1), ping).await {
                    Ok(Ok(())) => {
                        store.health.down.store(false, Ordering::Release);
                        tracing::info!("the database is reachable again");
                        break;
                    }
                    // Shutting down: nothing left to probe for.
                    Ok(Err(sqlx::Error::PoolClosed)) => break,
                    _ => {}
                }
            }
            store.health.probing.store(false, Ordering::Release);
        });
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(p) => sqlx::migrate!("migrations/sqlite").run(p).await?,
            Pool::Postgres(p) => sqlx::migrate!("migrations/postgres").run(p).await?,
        }
        Ok(())
    }

    /// Closes the SQLite writer and the pool, returning once every connection is closed.
    pub async fn close(&self) {
        if let Some(w) = &self.sqlite {
            w.close().await;
        }
        on_pool!(self, p => p.close().await)
    }

    /// `Ok` when the database accepts a write right now (used by `/readyz`), else why not, in
    /// words for the operator. A SQLite writer stopped by an fsync or I/O error does not,
    /// whatever the file says; nor does a SQLite database whose filesystem has less than
    /// [`MIN_FREE_BYTES`] free.
    pub async fn readiness(&self) -> std::result::Result<(), NotReady> {
        if self.is_down() {
            return Err(NotReady::new(
                "database_unreachable",
                "the database is unreachable (the breaker is open; see earlier errors)".into(),
            ));
        }
        if let Some(w) = &self.sqlite {
            if !w.takes_writes() {
                return Err(NotReady::new(
                    "writer_stopped",
                    "an fsync or I/O error stopped the SQLite writer; restart the process once \
                     the disk is healthy"
                        .into(),
                ));
            }
            // Below the floor a write is about to fail (or a checkpoint cannot grow the
            // database file), even if the WAL still has room for a small probe.
            if let (Some(free), dir) = w.free_bytes()
                && free < MIN_FREE_BYTES
            {
                return Err(NotReady::new(
                    "disk_full",
                    format!(
                        "the disk holding {} has {free} bytes free (needs at least \
                         {MIN_FREE_BYTES}); free space and the service recovers by itself",
                        dir.display()
                    ),
                ));
            }
            // A rolled-back probe needs no space: while the disk is known to be full, only a
            // commit through the writer tells whether it takes writes again.
            if w.is_full() {
                return w.probe_commit().await.map_err(|e| {
                    NotReady::new(
                        "disk_full",
                        format!(
                            "a test write failed ({e}); free space and the service recovers \
                             by itself"
                        ),
                    )
                });
            }
        }
        let res: Result<()> = on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            sqlx::query(
                "INSERT INTO readiness_probe (id, at) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            )
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            tx.rollback().await?;
            Ok(())
        }.await);
        res.map_err(|e| {
            self.note_failure(&e);
            NotReady::new("probe_failed", format!("a test write failed: {e}"))
        })
    }

    // ---------------------------------------------------------------- workspaces

    /// Creates a workspace.
    pub async fn create_workspace(&self, name: &str) -> Result<Workspace> {
        let now = now_micros();
        let ws = Workspace {
            id: new_id(prefix::WORKSPACE),
            name: name.to_string(),
            retention_secs: None,
            created_at: now,
            updated_at: now,
        };
        on_pool!(self, p => sqlx::query(
            "INSERT INTO workspaces (id, name, created_at, updated_at) VALUES ($1, $2, $3, $4)")
            .bind(&ws.id).bind(&ws.name).bind(now).bind(now)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(ws)
    }

    /// Lists workspaces (all, or only `only` when given).
    pub async fn list_workspaces(&self, only: Option<&str>) -> Result<Vec<Workspace>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, Workspace>(
            "SELECT id, name, retention_secs, created_at, updated_at FROM workspaces \
             WHERE ($1 IS NULL OR id = $1) ORDER BY id")
            .bind(only).fetch_all(p).await)?)
    }

    /// One workspace.
    pub async fn get_workspace(&self, id: &str) -> Result<Option<Workspace>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, Workspace>(
            "SELECT id, name, retention_secs, created_at, updated_at FROM workspaces WHERE id = $1")
            .bind(id).fetch_optional(p).await)?)
    }

    /// Renames a workspace and/or sets its retention (`Some(None)`: follow the server's);
    /// returns the row as it is now, `None` for an unknown id.
    pub async fn update_workspace(
        &self,
        id: &str,
        name: Option<&str>,
        retention_secs: Option<Option<i64>>,
    ) -> Result<Option<Workspace>> {
        let now = now_micros();
        on_pool!(self, p => sqlx::query(
            "UPDATE workspaces SET name = COALESCE($2, name), \
             retention_secs = CASE WHEN $3 THEN $4 ELSE retention_secs END, updated_at = $5 \
             WHERE id = $1")
            .bind(id).bind(name).bind(retention_secs.is_some()).bind(retention_secs.flatten())
            .bind(now).execute(p).await.map(|r| r.rows_affected()))?;
        self.get_workspace(id).await
    }

    // ---------------------------------------------------------------- webhook keys

    /// Stores a new webhook key (the caller encrypts the secret, bound to `key.id`).
    pub async fn insert_webhook_key(&self, key: &WebhookKey) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO webhook_keys (id, workspace_id, name, secret_enc, previous_secret_enc, \
             previous_expires_at, is_active, last_used_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
            .bind(&key.id).bind(&key.workspace_id).bind(&key.name).bind(&key.secret_enc)
            .bind(&key.previous_secret_enc).bind(key.previous_expires_at).bind(key.is_active)
            .bind(key.last_used_at).bind(key.created_at).bind(key.updated_at)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(StoreError::from_sqlx)?;
        Ok(())
    }

    /// One webhook key.
    pub async fn get_webhook_key(&self, id: &str) -> Result<Option<WebhookKey>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, WebhookKey>(
            "SELECT * FROM webhook_keys WHERE id = $1").bind(id).fetch_optional(p).await)?)
    }

    /// A workspace's webhook keys, newest first.
    pub async fn list_webhook_keys(&self, workspace_id: &str) -> Result<Vec<WebhookKey>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, WebhookKey>(
            "SELECT * FROM webhook_keys WHERE workspace_id = $1 ORDER BY id DESC")
            .bind(workspace_id).fetch_all(p).await)?)
    }

    /// Replaces a key's secrets (rotation), keeping the previous one until `previous_expires_at`.
    pub async fn update_webhook_key_secrets(
        &self,
        id: &str,
        secret_enc: &str,
        previous_secret_enc: Option<&str>,
        previous_expires_at: Option<i64>,
    ) -> Result<bool> {
        let r = on_pool!(self, p => sqlx::query(
            "UPDATE webhook_keys SET secret_enc = $2, previous_secret_enc = $3, \
             previous_expires_at = $4, updated_at = $5 WHERE id = $1")
            .bind(id).bind(secret_enc).bind(previous_secret_enc).bind(previous_expires_at)
            .bind(now_micros()).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Deactivates a webhook key. Returns false when it does not exist.
    pub async fn deactivate_webhook_key(&self, id: &str) -> Result<bool> {
        let r = on_pool!(self, p => sqlx::query(
            "UPDATE webhook_keys SET is_active = $2, updated_at = $3 WHERE id = $1")
            .bind(id).bind(false).bind(now_micros()).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Records `last_used_at` for many keys or integrations at once (batched, not per request).
    pub async fn touch_last_used(&self, table: LastUsedTable, ids: &[(String, i64)]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = match table {
            LastUsedTable::WebhookKeys => {
                "UPDATE webhook_keys SET last_used_at = $2 WHERE id = $1 \
                 AND (last_used_at IS NULL OR last_used_at < $2)"
            }
            LastUsedTable::Integrations => {
                "UPDATE integrations SET last_used_at = $2 WHERE id = $1 \
                 AND (last_used_at IS NULL OR last_used_at < $2)"
            }
        };
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            for (id, at) in ids {
                sqlx::query(sql).bind(id).bind(at).execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)?;
        Ok(())
    }

    // ---------------------------------------------------------------- integrations

    /// Stores a new integration (secrets already encrypted, bound to `row.id`).
    pub async fn insert_integration(&self, row: &Integration) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO integrations (id, workspace_id, platform, name, webhook_secret_enc, \
             previous_webhook_secret_enc, previous_secret_expires_at, access_token_enc, \
             refresh_token_enc, token_expires_at, required_header_value_enc, slack_team_id, \
             slack_team_name, slack_bot_user_id, slack_enterprise_id, slack_app_id, slack_scopes, \
             pylon_account_id, is_active, needs_reauth, config, last_used_at, created_at, \
             updated_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
             $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)")
            .bind(&row.id).bind(&row.workspace_id).bind(&row.platform).bind(&row.name)
            .bind(&row.webhook_secret_enc).bind(&row.previous_webhook_secret_enc)
            .bind(row.previous_secret_expires_at).bind(&row.access_token_enc)
            .bind(&row.refresh_token_enc).bind(row.token_expires_at)
            .bind(&row.required_header_value_enc).bind(&row.slack_team_id)
            .bind(&row.slack_team_name).bind(&row.slack_bot_user_id).bind(&row.slack_enterprise_id)
            .bind(&row.slack_app_id).bind(&row.slack_scopes).bind(&row.pylon_account_id)
            .bind(row.is_active).bind(row.needs_reauth).bind(&row.config).bind(row.last_used_at)
            .bind(row.created_at).bind(row.updated_at).bind(&row.created_by)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(StoreError::from_sqlx)?;
        Ok(())
    }

    /// Writes every mutable column of an integration back.
    pub async fn update_integration(&self, row: &Integration) -> Result<bool> {
        let r = on_pool!(self, p => sqlx::query(
            "UPDATE integrations SET name = $2, webhook_secret_enc = $3, \
             previous_webhook_secret_enc = $4, previous_secret_expires_at = $5, \
             access_token_enc = $6, refresh_token_enc = $7, token_expires_at = $8, \
             required_header_value_enc = $9, slack_team_id = $10, slack_team_name = $11, \
             slack_bot_user_id = $12, slack_enterprise_id = $13, slack_app_id = $14, \
             slack_scopes = $15, pylon_account_id = $16, is_active = $17, needs_reauth = $18, \
             config = $19, updated_at = $20 WHERE id = $1")
            .bind(&row.id).bind(&row.name).bind(&row.webhook_secret_enc)
            .bind(&row.previous_webhook_secret_enc).bind(row.previous_secret_expires_at)
            .bind(&row.access_token_enc).bind(&row.refresh_token_enc).bind(row.token_expires_at)
            .bind(&row.required_header_value_enc).bind(&row.slack_team_id)
            .bind(&row.slack_team_name).bind(&row.slack_bot_user_id).bind(&row.slack_enterprise_id)
            .bind(&row.slack_app_id).bind(&row.slack_scopes).bind(&row.pylon_account_id)
            .bind(row.is_active).bind(row.needs_reauth).bind(&row.config).bind(now_micros())
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// One integration.
    pub async fn get_integration(&self, id: &str) -> Result<Option<Integration>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, Integration>(
            "SELECT * FROM integrations WHERE id = $1").bind(id).fetch_optional(p).await)?)
    }

    /// Integrations of a workspace (or all), newest first.
    pub async fn list_integrations(&self, workspace_id: Option<&str>) -> Result<Vec<Integration>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, Integration>(
            "SELECT * FROM integrations WHERE ($1 IS NULL OR workspace_id = $1) ORDER BY id DESC")
            .bind(workspace_id).fetch_all(p).await)?)
    }

    /// Slack integrations stored under an installation id: the team id of a workspace install
    /// or the enterprise id of an org-wide one (active first, newest first).
    pub async fn find_slack_integrations(&self, team_id: &str) -> Result<Vec<Integration>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, Integration>(
            "SELECT * FROM integrations WHERE platform = 'slack' AND slack_team_id = $1 \
             ORDER BY is_active DESC, id DESC")
            .bind(team_id).fetch_all(p).await)?)
    }

    /// An active integration of the distributed app (no signing secret of its own) that stops
    /// `team_id` (in `enterprise_id`, if known) from being bound to workspace `ws`: one of
    /// another workspace for the same team, for its enterprise, or for a workspace inside the
    /// enterprise that `team_id` is; or one of any workspace for the same team (one active
    /// integration per installation). `except` is the integration being (re)activated.
    pub async fn slack_owner_conflict(
        &self,
        ws: &str,
        team_id: &str,
        enterprise_id: Option<&str>,
        except: &str,
    ) -> Result<Option<Integration>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, Integration>(
            "SELECT * FROM integrations WHERE platform = 'slack' AND is_active = $5 \
             AND webhook_secret_enc IS NULL AND id <> $4 AND ( \
               slack_team_id = $2 \
               OR (workspace_id <> $1 AND (slack_team_id = $3 OR slack_enterprise_id = $3 \
                                           OR slack_enterprise_id = $2))) \
             ORDER BY id LIMIT 1")
            .bind(ws).bind(team_id).bind(enterprise_id).bind(except).bind(true)
            .fetch_optional(p).await)?)
    }

    /// Deactivates an integration and wipes its tokens, logging `integration.deactivated`.
    pub async fn deactivate_integration(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<bool> {
        let now = now_micros();
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            let ws: Option<String> = sqlx::query_scalar(
                "UPDATE integrations SET is_active = $2, access_token_enc = NULL, \
                 refresh_token_enc = NULL, token_expires_at = NULL, updated_at = $3 \
                 WHERE id = $1 RETURNING workspace_id")
                .bind(id).bind(false).bind(now).fetch_optional(&mut *tx).await?;
            let Some(ws) = ws else { return Ok(false) };
            insert_activity(&mut *tx, &ws, Some(actor), "integration.deactivated", "integration", id,
                &serde_json::json!({"reason": reason}), now).await?;
            tx.commit().await?;
            Ok(true)
        }.await)
    }

    // ---------------------------------------------------------------- Slack OAuth and token refresh

    /// Stores an OAuth `state` (hashed) bound to a workspace.
    pub async fn insert_oauth_state(
        &self,
        state_hash: &str,
        workspace_id: &str,
        created_by: &str,
        expires_at: i64,
    ) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO oauth_states (state_hash, workspace_id, created_by, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)")
            .bind(state_hash).bind(workspace_id).bind(created_by).bind(now_micros()).bind(expires_at)
            .execute(p).await.map(|r| r.rows_affected())).map_err(StoreError::from_sqlx)?;
        Ok(())
    }

    /// Uses an OAuth `state` once: returns its workspace if it exists, is unused and unexpired.
    pub async fn consume_oauth_state(&self, state_hash: &str) -> Result<Option<String>> {
        let now = now_micros();
        Ok(on_pool!(self, p => sqlx::query_scalar::<_, String>(
            "UPDATE oauth_states SET used_at = $2 WHERE state_hash = $1 AND used_at IS NULL \
             AND expires_at > $2 RETURNING workspace_id")
            .bind(state_hash).bind(now).fetch_optional(p).await)?)
    }

    /// Takes the refresh lock of an integration until `until` (single-flight across nodes).
    pub async fn try_lock_refresh(&self, id: &str, until: i64) -> Result<bool> {
        let r = on_pool!(self, p => sqlx::query(
            "UPDATE integrations SET refresh_lock_until = $2 WHERE id = $1 \
             AND (refresh_lock_until IS NULL OR refresh_lock_until < $3)")
            .bind(id).bind(until).bind(now_micros()).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Stores refreshed tokens atomically, only while holding the lock taken with `lock`.
    pub async fn store_refreshed_tokens(
        &self,
        id: &str,
        lock: i64,
        access_enc: &str,
        refresh_enc: Option<&str>,
        expires_at: Option<i64>,
    ) -> Result<bool> {
        let r = on_pool!(self, p => sqlx::query(
            "UPDATE integrations SET access_token_enc = $3, refresh_token_enc = $4, \
             token_expires_at = $5, refresh_lock_until = NULL, needs_reauth = $6, updated_at = $7 \
             WHERE id = $1 AND refresh_lock_until = $2")
            .bind(id).bind(lock).bind(access_enc).bind(refresh_enc).bind(expires_at).bind(false)
            .bind(now_micros()).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Releases a refresh lock without changing tokens.
    pub async fn release_refresh_lock(&self, id: &str, lock: i64) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "UPDATE integrations SET refresh_lock_until = NULL WHERE id = $1 AND refresh_lock_until = $2")
            .bind(id).bind(lock).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Marks an integration as needing re-installation (its refresh failed for good).
    pub async fn mark_needs_reauth(&self, id: &str, reason: &str) -> Result<()> {
        let now = now_micros();
        let ws: Option<String> = on_pool!(self, p => sqlx::query_scalar(
            "UPDATE integrations SET needs_reauth = $2, refresh_lock_until = NULL, updated_at = $3 \
             WHERE id = $1 RETURNING workspace_id")
            .bind(id).bind(true).bind(now).fetch_optional(p).await)?;
        if let Some(ws) = ws {
            self.log_activity(
                &ws,
                Some("worker"),
                "integration.needs_reauth",
                "integration",
                id,
                &serde_json::json!({"reason": reason}),
            )
            .await?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- api tokens

    /// Stores a workspace-scoped token (hash only).
    pub async fn insert_api_token(&self, t: &ApiToken) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO api_tokens (id, workspace_id, name, token_hash, created_at, revoked_at, \
             last_used_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&t.id).bind(&t.workspace_id).bind(&t.name).bind(&t.token_hash)
            .bind(t.created_at).bind(t.revoked_at).bind(t.last_used_at)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(StoreError::from_sqlx)?;
        Ok(())
    }

    /// An unrevoked token by its hash.
    pub async fn find_api_token(&self, token_hash: &str) -> Result<Option<ApiToken>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, ApiToken>(
            "SELECT * FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL")
            .bind(token_hash).fetch_optional(p).await)?)
    }

    /// A workspace's tokens.
    pub async fn list_api_tokens(&self, workspace_id: &str) -> Result<Vec<ApiToken>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, ApiToken>(
            "SELECT * FROM api_tokens WHERE workspace_id = $1 ORDER BY id DESC")
            .bind(workspace_id).fetch_all(p).await)?)
    }

    /// One token.
    pub async fn get_api_token(&self, id: &str) -> Result<Option<ApiToken>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, ApiToken>(
            "SELECT * FROM api_tokens WHERE id = $1").bind(id).fetch_optional(p).await)?)
    }

    /// Revokes a token.
    pub async fn revoke_api_token(&self, id: &str) -> Result<bool> {
        let r = on_pool!(self, p => sqlx::query(
            "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id).bind(now_micros()).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    // ---------------------------------------------------------------- encrypted columns

    /// Every encrypted value stored, for key rotation and the start-up key check.
    pub async fn encrypted_values(&self) -> Result<Vec<EncryptedValue>> {
        let mut out = Vec::new();
        for (table, column) in ENCRYPTED_COLUMNS {
            let sql = encrypted_select_sql(table, column);
            let rows: Vec<(String, String)> = on_pool!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_all(p).await)?;
            out.extend(rows.into_iter().map(|(row_id, value)| EncryptedValue {
                table,
                column,
                row_id,
                value,
            }));
        }
        Ok(out)
    }

    /// Replaces one encrypted value if it is still `old` (compare-and-swap, safe while the
    /// server runs). Returns false when the value changed meanwhile.
    pub async fn swap_encrypted_value(&self, v: &EncryptedValue, new_value: &str) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET {} = $1 WHERE id = $2 AND {} = $3",
            v.table, v.column, v.column
        );
        let r = on_pool!(self, p => sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(new_value).bind(&v.row_id).bind(&v.value).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    // ---------------------------------------------------------------- deliveries (inbox)

    /// Stores a batch of deliveries in one transaction (group commit). Each element's outcome
    /// says whether it was new or a duplicate of an already stored delivery.
    ///
    /// With `lease`, the rows it marks are inserted already claimed (one attempt counted, leased
    /// to `lease.owner` until `lease.until`): the inbox hands them straight to a local worker
    /// instead of making a worker claim them again. If that worker dies the lease expires and
    /// any worker claims them as usual.
    pub async fn insert_deliveries(
        &self,
        batch: &[&NewDelivery],
        lease: Option<InsertLease<'_>>,
    ) -> Result<Vec<Stored>> {
        let out = self.insert_and_finish(batch, lease, Vec::new()).await?;
        Ok(out.into_iter().map(|(stored, _)| stored).collect())
    }

    /// How many inbox batches may commit at once. SQLite: three, so that the writer thread has
    /// the next batch to commit while the previous one waits for its WAL fsync (batches queued
    /// together share a transaction). PostgreSQL: a few, so that a batch's
    /// round trips and commit overlap with the next batch's instead of the inbox waiting for
    /// each in turn (PostgreSQL merges concurrent commits' WAL flushes itself). At most a third
    /// of the pool, so that workers and the API keep connections.
    pub fn inbox_concurrency(&self) -> usize {
        match &self.pool {
            Pool::Sqlite(_) => 3,
            Pool::Postgres(p) => (p.options().get_max_connections() as usize / 3).clamp(1, 3),
        }
    }

    /// [`Store::insert_deliveries`], and in the same transaction, for every *new* row whose
    /// `outcomes` entry is set, what [`Store::apply_effects`] would commit for it (signal,
    /// activity entry, final status). Such rows must be leased by `lease`: they are inserted
    /// held, then finished under that lease, so one transaction writes a delivery and its outcome
    /// instead of two. `outcomes` is parallel to `batch` (or empty); each new row with an
    /// outcome gets its `Applied`. A duplicate's outcome is dropped (the unique index decides,
    /// as ever). Only outcomes that [`finishes_at_insert`] allows are written
    /// with their rows; the others are dropped (a worker decides those).
    pub async fn insert_and_finish(
        &self,
        batch: &[&NewDelivery],
        lease: Option<InsertLease<'_>>,
        mut outcomes: Vec<Option<Effect>>,
    ) -> Result<Vec<(Stored, Option<Applied>)>> {
        let leased = |i: usize| -> (Option<&str>, Option<i64>, i32) {
            match &lease {
                Some(l) if l.rows.get(i).copied().unwrap_or(false) => {
                    (Some(l.owner), Some(l.until), 1)
                }
                _ => (None, None, 0),
            }
        };
        // The rule of what commits with its row (`finishes_at_insert`), for rows inserted under
        // a lease; both backends write what is left.
        outcomes.resize_with(batch.len(), || None);
        for (i, o) in outcomes.iter_mut().enumerate() {
            if leased(i).0.is_none() || !o.as_ref().is_some_and(finishes_at_insert) {
                *o = None;
            }
        }
        let p = match (&self.pool, &self.sqlite) {
            (Pool::Postgres(p), _) => p,
            (Pool::Sqlite(_), Some(w)) => {
                let rows = batch
                    .iter()
                    .zip(outcomes)
                    .enumerate()
                    .map(|(i, (d, outcome))| {
                        let (owner, until, _) = leased(i);
                        let lease = owner.zip(until).map(|(o, u)| (o.to_string(), u));
                        sqlite::InsertRow {
                            finish: outcome.map(|e| sqlite::ApplyItem::for_new(d, e)),
                            // The writer thread needs the columns, not the receiver's parse.
                            d: NewDelivery {
                                parsed: Parsed::default(),
                                outcome: None,
                                ..(*d).clone()
                            },
                            lease,
                        }
                    })
                    .collect();
                return w.insert_deliveries(rows).await;
            }
            (Pool::Sqlite(_), None) => return Err(no_writer()),
        };
        // PostgreSQL. The final columns, signal id and activity entry of what commits with its
        // row are decided first.
        let now = now_micros();
        let finishes: Vec<Option<PgFinish>> = batch
            .iter()
            .zip(outcomes)
            .map(|(d, o)| {
                let e = o?;
                let (finish, entry, signal_id) = match &e {
                    Effect::Upsert { signal, .. } => {
                        let sid = new_id(prefix::SIGNAL);
                        let meta = outcome::created_metadata(&d.source, &d.id, signal);
                        let (f, entry) = Finish::created(sid.clone(), meta);
                        (f, entry, Some(sid))
                    }
                    Effect::Filter { reason } => (Finish::filtered(reason.as_str()), None, None),
                    Effect::Reject { reason } => (Finish::failed(reason.as_str()), None, None),
                    _ => return None,
                };
                Some(PgFinish {
                    effect: e,
                    finish,
                    entry,
                    signal_id,
                })
            })
            .collect();
        if finishes.iter().all(Option::is_none) {
            // No BEGIN/COMMIT: one statement is atomic on its own, and two extra round trips
            // would lengthen the inbox commit, which the ack waits for. What follows only
            // reads committed rows or sends a wake-up.
            let mut conn = p.acquire().await?;
            return insert_deliveries_pg(&mut conn, batch, &leased, &finishes, now).await;
        }
        let mut tx = p.begin().await?;
        let out = insert_deliveries_pg(&mut tx, batch, &leased, &finishes, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Claims up to `limit` due deliveries for `owner`, leasing them until `now + lease`. Each
    /// claim counts as an attempt.
    pub async fn claim_deliveries(
        &self,
        owner: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedDelivery>> {
        let now = now_micros();
        let until = now + lease.as_micros() as i64;
        const RETURNING: &str = " RETURNING id, workspace_id, integration_id, webhook_key_id, \
             source, dedupe_key, body, headers, attempts, received_at";
        Ok(match &self.pool {
            Pool::Postgres(p) => {
                let sql = format!(
                    "UPDATE deliveries SET lease_owner = $1, lease_expires_at = $2, \
                     attempts = attempts + 1 WHERE id IN (SELECT id FROM deliveries \
                     WHERE status = 'pending' AND next_attempt_at <= $3 AND \
                     (lease_expires_at IS NULL OR lease_expires_at < $3) \
                     ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED){RETURNING}"
                );
                sqlx::query_as::<_, ClaimedDelivery>(sqlx::AssertSqlSafe(sql))
                    .bind(owner)
                    .bind(until)
                    .bind(now)
                    .bind(limit as i64)
                    .fetch_all(p)
                    .await?
            }
            Pool::Sqlite(_) => {
                let w = self.sqlite.as_ref().ok_or_else(no_writer)?;
                w.claim(owner.to_string(), now, until, limit).await?
            }
        })
    }

    /// Gives claimed-but-unprocessed deliveries back (graceful shutdown): the lease is dropped
    /// and the attempt is not counted.
    pub async fn release_deliveries(&self, owner: &str, ids: &[String]) -> Result<()> {
        let _turn = self.write_turn().await;
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            for id in ids {
                sqlx::query(
                    "UPDATE deliveries SET lease_owner = NULL, lease_expires_at = NULL, \
                     attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END \
                     WHERE id = $1 AND lease_owner = $2 AND status = 'pending'")
                    .bind(id).bind(owner).execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)?;
        Ok(())
    }

    /// Takes back the attempt counted by the current claim (rate-limit waits are not failures).
    pub async fn uncount_attempt(&self, id: &str, owner: &str) -> Result<()> {
        let _turn = self.write_turn().await;
        on_pool!(self, p => sqlx::query(
            "UPDATE deliveries SET attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END \
             WHERE id = $1 AND lease_owner = $2 AND status = 'pending'")
            .bind(id).bind(owner).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Schedules a retry (or marks the delivery dead when `dead`), if `owner` still holds it.
    pub async fn retry_delivery(
        &self,
        id: &str,
        owner: &str,
        error: &str,
        next_attempt_at: i64,
        dead: bool,
    ) -> Result<bool> {
        let status = if dead { "dead" } else { "pending" };
        let processed_at = dead.then(now_micros);
        let _turn = self.write_turn().await;
        let r = on_pool!(self, p => sqlx::query(
            "UPDATE deliveries SET status = $3, last_error = $4, next_attempt_at = $5, \
             lease_owner = NULL, lease_expires_at = NULL, processed_at = $6 \
             WHERE id = $1 AND lease_owner = $2 AND status = 'pending'")
            .bind(id).bind(owner).bind(status).bind(error).bind(next_attempt_at).bind(processed_at)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Applies a worker's [`Effect`] for one claimed delivery (see [`Store::apply_effects`]).
    pub async fn apply_effect(
        &self,
        delivery: &ClaimedDelivery,
        owner: &str,
        effect: Effect,
    ) -> Result<Applied> {
        let mut out = self.apply_effects(owner, vec![(delivery, effect)]).await?;
        Ok(out.pop().unwrap_or(Applied::LeaseLost))
    }

    /// Applies the effects of a batch of claimed deliveries in ONE transaction: for each, the
    /// signal change, the activity entry and the delivery's final status, fenced by the lease
    /// (a delivery whose lease was lost writes nothing and is reported `LeaseLost`; the others
    /// still commit). One commit (one fsync) for the whole batch.
    pub async fn apply_effects(
        &self,
        owner: &str,
        batch: Vec<(&ClaimedDelivery, Effect)>,
    ) -> Result<Vec<Applied>> {
        let p = match (&self.pool, &self.sqlite) {
            (Pool::Postgres(p), _) => p,
            (Pool::Sqlite(_), Some(w)) => {
                let items = batch
                    .into_iter()
                    .map(|(d, e)| sqlite::ApplyItem::new(d, e))
                    .collect();
                return w.apply(owner.to_string(), items).await;
            }
            (Pool::Sqlite(_), None) => return Err(no_writer()),
        };
        let batch: Vec<(&ClaimedDelivery, &Effect)> = batch.iter().map(|(d, e)| (*d, e)).collect();
        let batch = &batch[..];
        // Optimistic first: a worker nearly always still holds its leases, so skip locking the
        // rows up front (a round trip, and a row-lock WAL record per delivery) and let the final
        // UPDATE's fence check them. If any was lost, roll back and do it again pessimistically.
        if let Some(out) = apply_effects_pg(p, owner, batch, Fence::AtTheEnd).await? {
            return Ok(out);
        }
        tracing::debug!("a lease was lost during a batch; applying it again with row locks");
        apply_effects_pg(p, owner, batch, Fence::LockFirst)
            .await?
            .ok_or_else(|| StoreError::Writer("deliveries changed under their row locks".into()))
    }
}

impl Store {
    /// Deliveries, newest first, filtered and paginated by id cursor (one index range scan that
    /// stops after `limit` rows: see [`deliveries_query`]).
    pub async fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<Delivery>> {
        let q = deliveries_query(f, matches!(self.pool, Pool::Sqlite(_)));
        Ok(on_pool!(self, p => q.bound(sqlx::query_as::<_, Delivery>(
            sqlx::AssertSqlSafe(q.sql.clone()))).fetch_all(p).await)?)
    }

    /// One delivery.
    pub async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>> {
        let sql = format!("SELECT {DELIVERY_COLS} FROM deliveries WHERE id = $1");
        Ok(
            on_pool!(self, p => sqlx::query_as::<_, Delivery>(sqlx::AssertSqlSafe(sql))
            .bind(id).fetch_optional(p).await)?,
        )
    }

    /// The raw body of a delivery.
    pub async fn get_delivery_body(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(on_pool!(self, p => sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT body FROM deliveries WHERE id = $1").bind(id).fetch_optional(p).await)?)
    }

    /// Puts a delivery back in the queue to be processed again (attempts reset).
    pub async fn replay_delivery(&self, id: &str) -> Result<bool> {
        let is_pg = matches!(self.pool, Pool::Postgres(_));
        let r = on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            let r = sqlx::query(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, \
                 lease_owner = NULL, lease_expires_at = NULL, last_error = NULL, \
                 filter_reason = NULL, processed_at = NULL WHERE id = $1 AND workspace_id IS NOT NULL")
                .bind(id).bind(now_micros()).execute(&mut *tx).await?;
            if is_pg {
                sqlx::query("SELECT pg_notify('signalbox_deliveries', '')").execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(r.rows_affected())
        }.await)?;
        Ok(r == 1)
    }

    /// Counts of deliveries by status.
    pub async fn delivery_counts(&self) -> Result<Vec<(String, i64)>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, (String, i64)>(
            "SELECT status, COUNT(*) FROM deliveries GROUP BY status ORDER BY status")
            .fetch_all(p).await)?)
    }

    /// Number of deliveries waiting to be processed.
    pub async fn pending_count(&self) -> Result<i64> {
        Ok(on_pool!(self, p => sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'").fetch_one(p).await)?)
    }

    // ---------------------------------------------------------------- signals and activity

    /// Signals of a workspace, newest first (see [`signals_query`]).
    pub async fn list_signals(&self, f: &SignalFilter) -> Result<Vec<Signal>> {
        let q = signals_query(f, matches!(self.pool, Pool::Sqlite(_)));
        Ok(on_pool!(self, p => q.bound(sqlx::query_as::<_, Signal>(
            sqlx::AssertSqlSafe(q.sql.clone()))).fetch_all(p).await)?)
    }

    /// One signal.
    pub async fn get_signal(&self, id: &str) -> Result<Option<Signal>> {
        Ok(on_pool!(self, p => sqlx::query_as::<_, Signal>(
            "SELECT * FROM signals WHERE id = $1").bind(id).fetch_optional(p).await)?)
    }

    /// Counts signals per `(source, source_ref)` having more than one row (must be empty; used by
    /// tests and the benchmark's verification).
    pub async fn count_signals(&self, workspace_id: Option<&str>) -> Result<i64> {
        // Two texts, not `($1 IS NULL OR workspace_id = $1)`: that shape hides the index.
        Ok(match workspace_id {
            Some(ws) => on_pool!(self, p => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM signals WHERE workspace_id = $1")
                .bind(ws).fetch_one(p).await),
            None => on_pool!(self, p => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM signals").fetch_one(p).await),
        }?)
    }

    /// Activity of a workspace, newest first.
    pub async fn list_activity(
        &self,
        workspace_id: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Vec<Activity>> {
        let q = activity_query(workspace_id, limit, cursor);
        Ok(on_pool!(self, p => q.bound(sqlx::query_as::<_, Activity>(
            sqlx::AssertSqlSafe(q.sql.clone()))).fetch_all(p).await)?)
    }

    /// The plan the database chooses for a list query with its parameters: SQLite's
    /// `EXPLAIN QUERY PLAN` details or PostgreSQL's `EXPLAIN` lines, one per line. For tests
    /// and diagnostics.
    #[doc(hidden)]
    pub async fn explain_list(&self, q: &ListQuery) -> Result<String> {
        let lines: Vec<String> = match &self.pool {
            Pool::Sqlite(p) => {
                let sql = sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {}", q.sql));
                q.bound(sqlx::query_as::<_, (i64, i64, i64, String)>(sql))
                    .fetch_all(p)
                    .await?
                    .into_iter()
                    .map(|r| r.3)
                    .collect()
            }
            Pool::Postgres(p) => {
                let sql = sqlx::AssertSqlSafe(format!("EXPLAIN {}", q.sql));
                q.bound(sqlx::query_as::<_, (String,)>(sql))
                    .fetch_all(p)
                    .await?
                    .into_iter()
                    .map(|r| r.0)
                    .collect()
            }
        };
        Ok(lines.join("\n"))
    }

    /// Logs an activity entry outside any other transaction (admin actions).
    pub async fn log_activity(
        &self,
        workspace_id: &str,
        actor: Option<&str>,
        action: &str,
        target_type: &str,
        target_id: &str,
        metadata: &Value,
    ) -> Result<()> {
        on_pool!(self, p => async {
            let mut conn = p.acquire().await?;
            insert_activity(&mut *conn, workspace_id, actor, action, target_type, target_id,
                metadata, now_micros()).await
        }.await)?;
        Ok(())
    }

    /// A raw scalar query, for tests and diagnostics (`SELECT COUNT(*) …`).
    pub async fn scalar_i64(&self, sql: &'static str) -> Result<i64> {
        Ok(on_pool!(self, p => sqlx::query(sql).fetch_one(p).await?.try_get::<i64, _>(0))?)
    }
}

/// A delivery's raw body as stored, for `GET /api/v1/deliveries/{id}/body`.
#[derive(Debug, Clone)]
pub struct StoredBody {
    /// The bytes as received (empty once purged).
    pub body: Vec<u8>,
    /// The kept headers (JSON object text; `{}` once purged).
    pub headers: String,
    /// When retention or erasure removed body and headers (Unix µs).
    pub purged_at: Option<i64>,
}

/// What an erasure removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erased {
    /// Signals deleted.
    pub signals: u64,
    /// Deliveries whose body and headers were purged by it.
    pub deliveries: u64,
}

/// Why the node is not ready: a stable `code` for `/readyz` (public: no paths or errors) and
/// the `detail` for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// `database_unreachable`, `writer_stopped`, `disk_full`, `probe_failed` or
    /// `storage_timeout`.
    pub code: &'static str,
    /// What happened, for the operator's log.
    pub detail: String,
}

impl NotReady {
    /// A reason.
    pub fn new(code: &'static str, detail: String) -> NotReady {
        NotReady { code, detail }
    }
}

/// The free space below which a SQLite node is not ready (`/readyz` 503): 1 MiB, a few
/// checkpoints' worth of pages. Writes may still succeed for a while; a load balancer should
/// send new traffic elsewhere and the operator free space.
pub const MIN_FREE_BYTES: u64 = 1 << 20;

/// Rows per retention statement: small enough that each holds the write lock for a few
/// milliseconds at most.
pub const PURGE_BATCH: i64 = 500;

impl Store {
    // ---------------------------------------------------------------- retention and erasure

    /// The raw body, kept headers and purge time of one delivery.
    pub async fn delivery_body(&self, id: &str) -> Result<Option<StoredBody>> {
        let row = on_pool!(self, p => sqlx::query_as::<_, (Vec<u8>, String, Option<i64>)>(
            "SELECT body, headers, purged_at FROM deliveries WHERE id = $1")
            .bind(id).fetch_optional(p).await)?;
        Ok(row.map(|(body, headers, purged_at)| StoredBody {
            body,
            headers,
            purged_at,
        }))
    }

    /// Whether a delivery's body was purged (false for an unknown id).
    pub async fn delivery_purged(&self, id: &str) -> Result<bool> {
        let at = on_pool!(self, p => sqlx::query_scalar::<_, Option<i64>>(
            "SELECT purged_at FROM deliveries WHERE id = $1")
            .bind(id).fetch_optional(p).await)?;
        Ok(matches!(at, Some(Some(_))))
    }

    /// Retention, one batch: clears body and headers of at most `limit` finished (not pending)
    /// deliveries of `workspace` (`None`: deliveries that reached no workspace) received before
    /// `before` (Unix µs), oldest first; the row, its dedupe key, status and signal link stay.
    /// Returns how many rows it purged (fewer than `limit`: done). One range scan of the
    /// partial index `deliveries_purge_ws`.
    pub async fn purge_deliveries_before(
        &self,
        workspace: Option<&str>,
        before: i64,
        limit: i64,
    ) -> Result<u64> {
        // The outer predicate repeats the inner one: on PostgreSQL a row replayed (made pending
        // again) between the sub-select and the update is re-checked and left alone.
        const SQL: [&str; 2] = [
            "UPDATE deliveries SET body = $3, headers = '{}', purged_at = $4 \
             WHERE id IN (SELECT id FROM deliveries \
                 WHERE workspace_id = $5 AND purged_at IS NULL AND status <> 'pending' \
                 AND received_at < $1 ORDER BY received_at LIMIT $2) \
             AND purged_at IS NULL AND status <> 'pending'",
            "UPDATE deliveries SET body = $3, headers = '{}', purged_at = $4 \
             WHERE id IN (SELECT id FROM deliveries \
                 WHERE workspace_id IS NULL AND purged_at IS NULL AND status <> 'pending' \
                 AND received_at < $1 ORDER BY received_at LIMIT $2) \
             AND purged_at IS NULL AND status <> 'pending'",
        ];
        let sql = SQL[usize::from(workspace.is_none())];
        let _turn = self.write_turn().await;
        let r = on_pool!(self, p => {
            let q = sqlx::query(sql)
                .bind(before).bind(limit).bind(Vec::<u8>::new()).bind(now_micros());
            let q = match workspace { Some(ws) => q.bind(ws), None => q };
            q.execute(p).await.map(|r| r.rows_affected())
        })?;
        Ok(r)
    }

    /// Retention, one batch: deletes at most `limit` activity entries of `workspace` created
    /// before `before`, oldest first. Returns how many it deleted.
    pub async fn purge_activity_before(
        &self,
        workspace: &str,
        before: i64,
        limit: i64,
    ) -> Result<u64> {
        let _turn = self.write_turn().await;
        let r = on_pool!(self, p => sqlx::query(
            "DELETE FROM activity_logs WHERE id IN (SELECT id FROM activity_logs \
             WHERE workspace_id = $3 AND created_at < $1 ORDER BY created_at LIMIT $2)")
            .bind(before).bind(limit).bind(workspace)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(r)
    }

    /// The plan of the retention statements' row selection (SQLite `EXPLAIN QUERY PLAN`
    /// details, PostgreSQL `EXPLAIN` lines). For tests and diagnostics.
    #[doc(hidden)]
    pub async fn explain_purge(&self) -> Result<String> {
        const SQL: [&str; 3] = [
            "SELECT id FROM deliveries \
             WHERE workspace_id = $3 AND purged_at IS NULL AND status <> 'pending' \
             AND received_at < $1 ORDER BY received_at LIMIT $2",
            "SELECT id FROM deliveries \
             WHERE workspace_id IS NULL AND purged_at IS NULL AND status <> 'pending' \
             AND received_at < $1 ORDER BY received_at LIMIT $2",
            "SELECT id FROM activity_logs WHERE workspace_id = $3 AND created_at < $1 \
             ORDER BY created_at LIMIT $2",
        ];
        let mut lines = Vec::new();
        for sql in SQL {
            let ws = sql.contains("$3").then_some("ws_explain");
            match &self.pool {
                Pool::Sqlite(p) => {
                    let q = sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}"));
                    let q = sqlx::query_as::<_, (i64, i64, i64, String)>(q)
                        .bind(now_micros())
                        .bind(PURGE_BATCH);
                    let q = match ws {
                        Some(ws) => q.bind(ws),
                        None => q,
                    };
                    for r in q.fetch_all(p).await? {
                        lines.push(r.3);
                    }
                }
                Pool::Postgres(p) => {
                    let q = sqlx::AssertSqlSafe(format!("EXPLAIN {sql}"));
                    let q = sqlx::query_as::<_, (String,)>(q)
                        .bind(now_micros())
                        .bind(PURGE_BATCH);
                    let q = match ws {
                        Some(ws) => q.bind(ws),
                        None => q,
                    };
                    for r in q.fetch_all(p).await? {
                        lines.push(r.0);
                    }
                }
            }
        }
        Ok(lines.join("\n"))
    }

    /// Ids of the signals of `workspace_id` whose metadata names `email` as the customer
    /// (generic `customer_email`, Pylon `customerEmail`; compared case-insensitively).
    pub async fn signals_with_customer_email(
        &self,
        workspace_id: &str,
        email: &str,
    ) -> Result<Vec<String>> {
        let sql = match &self.pool {
            Pool::Sqlite(_) => {
                "SELECT id FROM signals WHERE workspace_id = $1 AND ( \
                 lower(json_extract(source_metadata, '$.customer_email')) = lower($2) OR \
                 lower(json_extract(source_metadata, '$.customerEmail')) = lower($2)) \
                 ORDER BY id"
            }
            Pool::Postgres(_) => {
                "SELECT id FROM signals WHERE workspace_id = $1 AND ( \
                 lower(source_metadata::jsonb ->> 'customer_email') = lower($2) OR \
                 lower(source_metadata::jsonb ->> 'customerEmail') = lower($2)) \
                 ORDER BY id"
            }
        };
        Ok(on_pool!(self, p => sqlx::query_scalar::<_, String>(sql)
            .bind(workspace_id).bind(email).fetch_all(p).await)?)
    }

    /// Erases signals of `workspace_id`, [`ERASE_CHUNK`] signals per transaction: purges body
    /// and headers of every delivery linked to them, empties the metadata of their activity
    /// entries (it quotes the text), deletes the signals, and logs one `signal.erased` entry per
    /// signal (no text). Ids of other workspaces are left alone. Each chunk's delivery update is
    /// one walk of the workspace's deliveries (`deliveries_workspace`; there is no `signal_id`
    /// index, which would cost ingest an entry per delivery for a rare call).
    pub async fn erase_signals(
        &self,
        workspace_id: &str,
        ids: &[String],
        actor: &str,
    ) -> Result<Erased> {
        let mut out = Erased::default();
        for chunk in ids.chunks(ERASE_CHUNK) {
            let e = self.erase_chunk(workspace_id, chunk, actor).await?;
            out.signals += e.signals;
            out.deliveries += e.deliveries;
        }
        Ok(out)
    }

    async fn erase_chunk(&self, workspace_id: &str, ids: &[String], actor: &str) -> Result<Erased> {
        let mut out = Erased::default();
        if ids.is_empty() {
            return Ok(out);
        }
        // `$4…` (`$2…` for the activity): the chunk's ids (at most ERASE_CHUNK placeholders,
        // made here, never from input).
        let list = (0..ids.len())
            .map(|i| format!("${}", i + 4))
            .collect::<Vec<_>>()
            .join(", ");
        let purge = format!(
            "UPDATE deliveries SET body = $2, headers = '{{}}', purged_at = $3 \
             WHERE workspace_id = $1 AND signal_id IN ({list}) AND purged_at IS NULL \
             RETURNING signal_id"
        );
        let scrub = format!(
            "UPDATE activity_logs SET metadata = '{{}}' WHERE workspace_id = $1 \
             AND target_type = 'signal' AND target_id IN ({})",
            (0..ids.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _turn = self.write_turn().await;
        let now = now_micros();
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            // A write first: on SQLite the transaction takes the write lock at once.
            let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(purge.clone()))
                .bind(workspace_id).bind(Vec::<u8>::new()).bind(now);
            for id in ids {
                q = q.bind(id);
            }
            let purged: Vec<String> = q.fetch_all(&mut *tx).await?;
            let mut q = sqlx::query(sqlx::AssertSqlSafe(scrub.clone())).bind(workspace_id);
            for id in ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
            for id in ids {
                let gone = sqlx::query("DELETE FROM signals WHERE id = $1 AND workspace_id = $2")
                    .bind(id).bind(workspace_id).execute(&mut *tx).await?.rows_affected();
                if gone == 0 {
                    continue;
                }
                let n = purged.iter().filter(|s| *s == id).count() as u64;
                insert_activity(&mut *tx, workspace_id, Some(actor), "signal.erased", "signal",
                    id, &serde_json::json!({"deliveries_purged": n}), now).await?;
                out.signals += gone;
            }
            out.deliveries = purged.len() as u64;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        }.await)?;
        Ok(out)
    }
}

/// Signals erased per transaction (each one holds the write lock for its statements).
pub const ERASE_CHUNK: usize = 100;

/// A list query: its SQL text, its text parameters in order, and the page size (bound last).
///
/// The lists page by keyset (`id < cursor ORDER BY id DESC LIMIT n`). The `WHERE` clause names
/// only the filters present, each `col = $k` with a bound parameter, so that the planner sees
/// the equality columns and picks the index `(those columns…, id)`: a range scan that starts
/// at the cursor and stops after `limit` rows, whatever the table's size. (`($k IS NULL OR
/// col = $k)` hides the column from the planner: SQLite then scans, and PostgreSQL's generic
/// plan does.) The indexes are in `migrations/*/…list_indexes.sql`.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// The statement.
    pub sql: String,
    /// Its text parameters, `$1`… in order.
    pub params: Vec<String>,
    /// The page size, the last parameter.
    pub limit: i64,
}

impl ListQuery {
    /// `SELECT {select} WHERE {conds…} ORDER BY id DESC LIMIT $n` with `eq` the equality
    /// filters present (in the order of the index columns), `implied` a constant condition the
    /// filters imply (a partial index's predicate, so that the planner may use it) and
    /// `cursor` the keyset bound.
    fn build(
        select: &str,
        eq: &[(&str, Option<&str>)],
        implied: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Self {
        let mut sql = format!("SELECT {select}");
        let mut params: Vec<String> = Vec::new();
        let glue = |sql: &mut String| {
            let word = if sql.contains(" WHERE ") {
                " AND "
            } else {
                " WHERE "
            };
            sql.push_str(word);
        };
        for (col, v) in eq {
            if let Some(v) = v {
                params.push(v.to_string());
                glue(&mut sql);
                sql.push_str(&format!("{col} = ${}", params.len()));
            }
        }
        if let Some(c) = implied {
            glue(&mut sql);
            sql.push_str(c);
        }
        if let Some(c) = cursor {
            params.push(c.to_string());
            glue(&mut sql);
            sql.push_str(&format!("id < ${}", params.len()));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len() + 1));
        ListQuery {
            sql,
            params,
            limit: limit as i64,
        }
    }

    /// Binds the parameters and the page size onto `q` (a query made from `self.sql`), as an
    /// unnamed (not cached) statement. PostgreSQL plans an unnamed statement for the values
    /// bound; a cached one may switch to a generic plan after five executions, which rates
    /// `status = $2` by the average status and walks the primary key, filtering, even for a
    /// status that matches nothing (seen with `plan_cache_mode = force_generic_plan`). A list
    /// call is not hot: its parse and plan (well under a millisecond) buy a plan for its values.
    fn bound<'q, DB, O>(
        &'q self,
        mut q: sqlx::query::QueryAs<'q, DB, O, <DB as sqlx::Database>::Arguments>,
    ) -> sqlx::query::QueryAs<'q, DB, O, <DB as sqlx::Database>::Arguments>
    where
        DB: sqlx::Database + sqlx::database::HasStatementCache,
        &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        for p in &self.params {
            q = q.bind(p.as_str());
        }
        q.bind(self.limit).persistent(false)
    }
}

/// The query of [`Store::list_deliveries`] on SQLite (`sqlite`) or PostgreSQL. Indexes:
/// `(workspace_id, id)`, `(workspace_id, status, id)`, `(integration_id, id)`,
/// `(integration_id, status, id)`, `(status, id)`, the primary key; `source` is checked on the
/// rows they find (not indexed: an integration implies it).
///
/// An integration's deliveries are all in its workspace and of its platform, so with
/// `integration_id` the integration's index is the one to walk, the workspace (a workspace
/// token always sends its own) and source checked on the rows it finds. SQLite, without
/// statistics, rates the workspace's index as good as the integration's, so there they are
/// written `col || '' = $k`, which no index serves. PostgreSQL is told the dependency instead
/// (`CREATE STATISTICS deliveries_integration_deps`): an expression would get a default
/// selectivity, and the estimate of too few rows for a page makes it read them all and sort.
#[doc(hidden)]
pub fn deliveries_query(f: &DeliveryFilter, sqlite: bool) -> ListQuery {
    let (ws, source) = if sqlite && f.integration_id.is_some() {
        ("workspace_id || ''", "source || ''")
    } else {
        ("workspace_id", "source")
    };
    // The status indexes skip 'processed' (migrations `…list_indexes.sql`). SQLite uses a
    // partial index only when the query has its predicate; PostgreSQL proves it from
    // `status = $k` and its value (an explicit copy would make it expect too few rows).
    let implied = f
        .status
        .as_deref()
        .filter(|s| sqlite && *s != "processed")
        .map(|_| "status <> 'processed'");
    ListQuery::build(
        &format!("{DELIVERY_COLS} FROM deliveries"),
        &[
            ("integration_id", f.integration_id.as_deref()),
            (ws, f.workspace_id.as_deref()),
            ("status", f.status.as_deref()),
            (source, f.source.as_deref()),
        ],
        implied,
        f.cursor.as_deref(),
        f.limit,
    )
}

/// The query of [`Store::list_signals`] on SQLite (`sqlite`) or PostgreSQL. Indexes:
/// `(workspace_id, id)`, `(workspace_id, source, id)`, `(workspace_id, status, id)`,
/// `(workspace_id, source, status, id)`.
#[doc(hidden)]
pub fn signals_query(f: &SignalFilter, sqlite: bool) -> ListQuery {
    // The status indexes skip 'new' (see `deliveries_query`).
    let implied = f
        .status
        .as_deref()
        .filter(|s| sqlite && *s != "new")
        .map(|_| "status <> 'new'");
    ListQuery::build(
        "* FROM signals",
        &[
            ("workspace_id", Some(f.workspace_id.as_str())),
            ("source", f.source.as_deref()),
            ("status", f.status.as_deref()),
        ],
        implied,
        f.cursor.as_deref(),
        f.limit,
    )
}

/// The query of [`Store::list_activity`]. Index: `(workspace_id, id)`.
#[doc(hidden)]
pub fn activity_query(workspace_id: &str, limit: usize, cursor: Option<&str>) -> ListQuery {
    ListQuery::build(
        "* FROM activity_logs",
        &[("workspace_id", Some(workspace_id))],
        None,
        cursor,
        limit,
    )
}

/// The error for a SQLite store whose writer thread is missing (never expected).
fn no_writer() -> StoreError {
    StoreError::Writer("the SQLite writer is not running".into())
}

/// Inserts collected activity rows with one multi-row statement.
async fn flush_activity<'e, E, DB>(
    exec: E,
    rows: Vec<[Option<String>; 7]>,
    now: i64,
) -> std::result::Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = DB>,
    DB: sqlx::Database,
    for<'a> Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut qb = sqlx::QueryBuilder::<DB>::new(
        "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, target_id, \
         metadata, created_at) ",
    );
    qb.push_values(rows, |mut b, row| {
        for v in row {
            b.push_bind(v);
        }
        b.push_bind(now);
    });
    qb.build().execute(exec).await?;
    Ok(())
}

/// Inserts one activity-log row on any executor of either backend.
#[allow(clippy::too_many_arguments)]
async fn insert_activity<'e, E, DB>(
    exec: E,
    workspace_id: &str,
    actor: Option<&str>,
    action: &str,
    target_type: &str,
    target_id: &str,
    metadata: &Value,
    now: i64,
) -> std::result::Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = DB>,
    DB: sqlx::Database,
    for<'a> String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    sqlx::query::<DB>(
        "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, target_id, \
         metadata, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(new_id(prefix::ACTIVITY))
    .bind(workspace_id.to_string())
    .bind(actor.map(str::to_string))
    .bind(action.to_string())
    .bind(target_type.to_string())
    .bind(target_id.to_string())
    .bind(metadata.to_string())
    .bind(now)
    .execute(exec)
    .await?;
    Ok(())
}
