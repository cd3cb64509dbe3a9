//! What the load-and-verify benchmark (`bench/`, the `signalbox-bench` crate) reads and writes
//! directly, so that its SQL lives with the rest of the storage code: scratch PostgreSQL
//! databases, the verification's reads, and the rows `--scenario lists` fills. The server does
//! not use these.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::{Pool, Store, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

/// Rows per multi-row `INSERT` of [`Store::seed_rows`] (SQLite allows 32,766 parameters per
/// statement).
const SEED_CHUNK: usize = 500;

/// A database name safe to put into SQL unquoted: ASCII letters, digits and `_`, not starting
/// with a digit, at most 63 bytes (PostgreSQL's identifier limit).
fn check_database_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Db(sqlx::Error::Configuration(
            format!("{name:?} is not a plain database name").into(),
        )))
    }
}

/// One connection to the PostgreSQL server at `admin_url` (for `CREATE`/`DROP DATABASE`).
async fn admin_pool(admin_url: &str) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(admin_url)
        .await?)
}

/// Creates the empty database `name` on the PostgreSQL server `admin_url` points at (any
/// database there the user may connect to). `name`: letters, digits and `_` only.
pub async fn create_scratch_postgres_database(admin_url: &str, name: &str) -> Result<()> {
    check_database_name(name)?;
    let pool = admin_pool(admin_url).await?;
    let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await;
    pool.close().await;
    created?;
    Ok(())
}

/// Drops the database `name` on the PostgreSQL server `admin_url` points at, closing its
/// connections (`WITH (FORCE)`); nothing when it does not exist.
pub async fn drop_scratch_postgres_database(admin_url: &str, name: &str) -> Result<()> {
    check_database_name(name)?;
    let pool = admin_pool(admin_url).await?;
    let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await;
    pool.close().await;
    dropped?;
    Ok(())
}

/// One stored delivery with the creation time of its signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOutcome {
    /// The delivery's dedupe key.
    pub dedupe_key: String,
    /// `pending`, `processed`, `filtered`, `failed`, `dead`.
    pub status: String,
    /// The signal it produced or updated.
    pub signal_id: Option<String>,
    /// Receipt time, Unix µs.
    pub received_at: i64,
    /// That signal's creation time, Unix µs.
    pub signal_created_at: Option<i64>,
}

/// A workspace's deliveries and signal ids, read in one snapshot.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceSnapshot {
    /// Every delivery of the workspace.
    pub deliveries: Vec<DeliveryOutcome>,
    /// The id of every signal of the workspace.
    pub signal_ids: Vec<String>,
}

/// A signal row for [`Store::seed_rows`] (`source_metadata` `{}`, `updated_at` = `created_at`).
#[derive(Debug, Clone)]
pub struct SeedSignal<'a> {
    pub id: &'a str,
    pub workspace_id: &'a str,
    pub verbatim: String,
    pub source: &'a str,
    pub source_ref: String,
    pub status: &'a str,
    pub created_at: i64,
}

/// A delivery row for [`Store::seed_rows`] (body `{}`; `next_attempt_at`, `received_at` and
/// `processed_at` all `at`).
#[derive(Debug, Clone)]
pub struct SeedDelivery<'a> {
    pub id: &'a str,
    pub workspace_id: &'a str,
    pub integration_id: &'a str,
    pub source: &'a str,
    pub dedupe_scope: String,
    pub dedupe_key: String,
    pub status: &'a str,
    pub attempts: i64,
    pub last_error: Option<&'a str>,
    pub at: i64,
}

/// An activity entry for [`Store::seed_rows`] (no actor, metadata `{}`).
#[derive(Debug, Clone)]
pub struct SeedActivity<'a> {
    pub id: &'a str,
    pub workspace_id: &'a str,
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: &'a str,
    pub created_at: i64,
}

impl Store {
    /// Deliveries of the workspace still `pending`.
    pub async fn count_pending_deliveries(&self, workspace_id: &str) -> Result<i64> {
        const SQL: &str =
            "SELECT COUNT(*) FROM deliveries WHERE workspace_id = $1 AND status = 'pending'";
        Ok(match self.pool() {
            Pool::Sqlite(p) => {
                sqlx::query_scalar(SQL)
                    .bind(workspace_id)
                    .fetch_one(p)
                    .await?
            }
            Pool::Postgres(p) => {
                sqlx::query_scalar(SQL)
                    .bind(workspace_id)
                    .fetch_one(p)
                    .await?
            }
        })
    }

    /// Every delivery of the workspace with its signal's creation time, and every signal id of
    /// the workspace. Both reads in one snapshot, so a signal committed in between (with its
    /// delivery, in one transaction) is never mistaken for one without a delivery.
    pub async fn workspace_snapshot(&self, workspace_id: &str) -> Result<WorkspaceSnapshot> {
        const ROWS: &str = "SELECT d.dedupe_key, d.status, d.signal_id, d.received_at, s.created_at \
             FROM deliveries d LEFT JOIN signals s ON s.id = d.signal_id WHERE d.workspace_id = $1";
        const SIGNALS: &str = "SELECT id FROM signals WHERE workspace_id = $1";
        type T = (String, String, Option<String>, i64, Option<i64>);
        let (rows, signal_ids): (Vec<T>, Vec<String>) = match self.pool() {
            Pool::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let rows = sqlx::query_as(ROWS)
                    .bind(workspace_id)
                    .fetch_all(&mut *tx)
                    .await?;
                let signals = sqlx::query_scalar(SIGNALS)
                    .bind(workspace_id)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.rollback().await?;
                (rows, signals)
            }
            Pool::Postgres(p) => {
                let mut tx = p
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?;
                let rows = sqlx::query_as(ROWS)
                    .bind(workspace_id)
                    .fetch_all(&mut *tx)
                    .await?;
                let signals = sqlx::query_scalar(SIGNALS)
                    .bind(workspace_id)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.rollback().await?;
                (rows, signals)
            }
        };
        Ok(WorkspaceSnapshot {
            deliveries: rows
                .into_iter()
                .map(
                    |(dedupe_key, status, signal_id, received_at, signal_created_at)| {
                        DeliveryOutcome {
                            dedupe_key,
                            status,
                            signal_id,
                            received_at,
                            signal_created_at,
                        }
                    },
                )
                .collect(),
            signal_ids,
        })
    }

    /// Writes the rows directly, in order, in one transaction of batched multi-row `INSERT`s
    /// (not through the pipeline), and on PostgreSQL runs `ANALYZE` on the three tables as
    /// autovacuum would after such a load. SQLite is left without statistics, as a production
    /// database is (signalbox does not run `ANALYZE` there). For timing the read paths on large
    /// tables.
    pub async fn seed_rows(
        &self,
        signals: &[SeedSignal<'_>],
        deliveries: &[SeedDelivery<'_>],
        activity: &[SeedActivity<'_>],
    ) -> Result<()> {
        macro_rules! seed_on {
            ($p:expr, $db:ty) => {{
                let mut tx = $p.begin().await?;
                for chunk in signals.chunks(SEED_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, \
                         source_metadata, status, created_at, updated_at) ",
                    );
                    q.push_values(chunk, |mut b, s| {
                        b.push_bind(s.id)
                            .push_bind(s.workspace_id)
                            .push_bind(s.verbatim.as_str())
                            .push_bind(s.source)
                            .push_bind(s.source_ref.as_str())
                            .push_bind("{}")
                            .push_bind(s.status)
                            .push_bind(s.created_at)
                            .push_bind(s.created_at);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                for chunk in deliveries.chunks(SEED_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO deliveries (id, workspace_id, integration_id, source, \
                         dedupe_scope, dedupe_key, body, status, attempts, next_attempt_at, \
                         last_error, received_at, processed_at) ",
                    );
                    q.push_values(chunk, |mut b, d| {
                        b.push_bind(d.id)
                            .push_bind(d.workspace_id)
                            .push_bind(d.integration_id)
                            .push_bind(d.source)
                            .push_bind(d.dedupe_scope.as_str())
                            .push_bind(d.dedupe_key.as_str())
                            .push_bind(b"{}".as_slice())
                            .push_bind(d.status)
                            .push_bind(d.attempts)
                            .push_bind(d.at)
                            .push_bind(d.last_error)
                            .push_bind(d.at)
                            .push_bind(d.at);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                for chunk in activity.chunks(SEED_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, \
                         target_id, metadata, created_at) ",
                    );
                    q.push_values(chunk, |mut b, a| {
                        b.push_bind(a.id)
                            .push_bind(a.workspace_id)
                            .push_bind(None::<&str>)
                            .push_bind(a.action)
                            .push_bind(a.target_type)
                            .push_bind(a.target_id)
                            .push_bind("{}")
                            .push_bind(a.created_at);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }};
        }
        match self.pool() {
            Pool::Sqlite(p) => seed_on!(p, sqlx::Sqlite),
            Pool::Postgres(p) => {
                seed_on!(p, sqlx::Postgres);
                sqlx::query("ANALYZE signals, deliveries, activity_logs")
                    .execute(p)
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_database_names_reach_sql() {
        assert!(check_database_name("sbx_bench_01KBX0ABC").is_ok());
        for bad in ["", "1db", "a-b", "a;DROP", "a b", "\"x\"", &"x".repeat(64)] {
            assert!(check_database_name(bad).is_err(), "{bad:?}");
        }
    }
}
