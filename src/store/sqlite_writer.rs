//! SQLite's hot write path: one dedicated connection on its own thread.
//!
//! sqlx drives each SQLite connection from a worker thread and hands every statement (and every
//! returned row) across a channel. Under load both cores are busy, so each hand-off waits for a
//! scheduler slot, and a transaction of ten statements spent most of its time in those waits
//! while holding SQLite's single write lock (docs/PERFORMANCE.md). Here a whole transaction —
//! an inbox batch, a claim, a worker batch's outcomes — is one job: the async caller sends it
//! once and is answered once, and the statements in between run back to back on this thread
//! with cached prepared statements.
//!
//! Only the write paths that run per delivery live here; everything else (admin, reads,
//! migrations) uses the sqlx pool on the same file. In-process writers still take turns on the
//! store's async write lock, so the two never wait in SQLite's busy handler for each other.
//!
//! The SQL keeps to the text of the sqlx versions (`?N` placeholders instead of `$N`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::outcome::{self, ExistingSignal, Finish, SignalChange, json_text};
use super::{Applied, ClaimedDelivery, DeliveryStatus, NewDelivery, StoreError, Stored};
use crate::clock::{now_micros, rfc3339};
use crate::ids::{new_id, prefix};
use crate::protocol::effect::Effect;

/// One unit of work for the writer thread. Its statements run inside the cycle's transaction
/// and its caller is answered only after that transaction commits. A job can run more than once
/// (see [`run_cycle`]); only the last run's result counts.
trait Job: Send {
    /// Runs the statements and keeps the result. An error is returned as a copy as well.
    fn run(&mut self, conn: &Connection) -> rusqlite::Result<()>;
    /// Answers the caller: the job's own result if its transaction committed, else the error.
    fn answer(self: Box<Self>, committed: Result<(), &rusqlite::Error>);
}

struct Call<T, F> {
    f: F,
    result: Option<rusqlite::Result<T>>,
    /// The result, and the job's closure with everything it owns: the caller drops it on its
    /// own thread (see [`SqliteWriter::run_as`]).
    reply: oneshot::Sender<(rusqlite::Result<T>, F)>,
}

impl<T, F> Job for Call<T, F>
where
    T: Send,
    F: Fn(&Connection) -> rusqlite::Result<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let result = (self.f)(conn);
        let copy = result.as_ref().err().map(copy_error);
        self.result = Some(result);
        copy.map_or(Ok(()), Err)
    }

    fn answer(self: Box<Self>, committed: Result<(), &rusqlite::Error>) {
        let Call {
            f,
            result: outcome,
            reply,
        } = *self;
        let result = match (committed, outcome) {
            (Ok(()), Some(r)) => r,
            // The job's own error stands even if its transaction failed as a whole.
            (Err(_), Some(Err(e))) => Err(e),
            (Err(e), _) => Err(copy_error(e)),
            (Ok(()), None) => Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("the SQLite writer job did not run".into()),
            )),
        };
        let _ = reply.send((result, f));
    }
}

/// rusqlite's error is not `Clone`; keeps the SQLite code (busy, locked, constraint…) and the
/// message, which is all callers look at.
fn copy_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => rusqlite::Error::SqliteFailure(*f, msg.clone()),
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

enum Msg {
    Run(Box<dyn Job>, Priority),
    /// Stop after the queued jobs; answered once both connections are closed.
    Close(oneshot::Sender<()>),
}

/// Whether someone waits on a job to answer an HTTP request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Priority {
    /// An inbox batch (senders wait for their 200) or anything else a caller waits on.
    Ack,
    /// A worker's claim or outcomes: it may wait a moment to share the next inbox commit.
    Background,
}

/// How long a cycle of background jobs alone waits for an inbox batch to share its commit.
///
/// Under load the inbox and the workers' outcomes used to take turns: an outcome batch arrived
/// while an inbox batch was committing and was then committed alone, so 1.3 jobs shared a
/// commit and every delivery paid for two commits (two fsyncs, two sets of index tail pages).
/// An inbox batch arrives within a millisecond or two under load; when none comes (no
/// traffic) the background jobs commit after this wait.
const BACKGROUND_WAIT: Duration = Duration::from_millis(2);

/// At most this many queued jobs share one commit.
const MAX_JOBS_PER_COMMIT: usize = 64;

/// The writer connection checkpoints by itself only past this many WAL pages (16 MiB); the
/// checkpointer thread normally keeps the WAL well below it.
const WAL_BACKSTOP_PAGES: u32 = 4000;

/// The WAL file's size limit: a WAL that restarts is cut back to it (`journal_size_limit`).
const WAL_LIMIT_BYTES: i64 = 16 << 20;

/// How long a truncating checkpoint of an outgrown WAL may make the writer wait. Passive
/// checkpoints never catch up while commits keep coming or a reader pins an old snapshot, and a
/// WAL that never completes a checkpoint never restarts, so it grows without bound; past the
/// backstop the checkpointer takes the write lock for at most this long to copy the rest and
/// truncate it, and tries again later if a reader is still in the way.
const TRUNCATE_WAIT: Duration = Duration::from_millis(100);

/// Least time between two truncation attempts.
const TRUNCATE_EVERY: Duration = Duration::from_secs(1);

/// Starts the checkpointer: a thread with its own connection that copies committed WAL pages
/// into the database file (`PRAGMA wal_checkpoint(PASSIVE)`) after the writer commits.
///
/// SQLite's automatic checkpoint runs inside the committing connection, so the writer thread —
/// the one serial resource of the SQLite backend — spent a tenth of its time copying pages and
/// waiting for the database file's fsync, and every thousandth commit stalled. A passive
/// checkpoint never blocks the writer (nor waits for it), so it can run on the other core. The
/// returned sender is the writer's "I committed" signal; the thread ends when it is dropped.
fn start_checkpointer(path: &Path, failed: Arc<AtomicBool>) -> Result<Checkpointer, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Checkpoints taken here are never needed for durability (the WAL holds every commit), so
    // this connection must not checkpoint on its own nor wait for locks.
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")?;
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut last_truncate: Option<std::time::Instant> = None;
            while rx.recv().is_ok() {
                let started = std::time::Instant::now();
                let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                if let Ok((log, _)) = &r
                    && *log > i64::from(WAL_BACKSTOP_PAGES)
                    && last_truncate.is_none_or(|t| t.elapsed() >= TRUNCATE_EVERY)
                {
                    last_truncate = Some(std::time::Instant::now());
                    truncate_wal(&conn, &failed);
                }
                match r {
                    Ok((log, done)) => tracing::trace!(
                        log,
                        done,
                        us = started.elapsed().as_micros() as u64,
                        "sqlite checkpoint"
                    ),
                    Err(e) => {
                        note_io_error(&e, &failed, "checkpointer");
                        tracing::debug!(error = %e, "sqlite checkpoint skipped");
                    }
                }
                // Let a few commits gather before the next pass.
                std::thread::sleep(Duration::from_millis(25));
            }
        })
        .map_err(|e| StoreError::Writer(format!("cannot start the SQLite checkpointer: {e}")))?;
    Ok(Checkpointer { tx, thread })
}

/// Copies what is left of an outgrown WAL into the database and truncates it, waiting at most
/// [`TRUNCATE_WAIT`] for the writer and readers (`SQLITE_BUSY` otherwise: tried again later).
/// The checkpoint syncs the WAL before copying and the database after, so commits whose
/// answers still wait for the sync thread are durable in the database file by then.
fn truncate_wal(conn: &Connection, failed: &AtomicBool) {
    let started = std::time::Instant::now();
    let _ = conn.busy_timeout(TRUNCATE_WAIT);
    let r = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    });
    let _ = conn.busy_timeout(Duration::ZERO);
    match r {
        Ok(0) => tracing::debug!(
            us = started.elapsed().as_micros() as u64,
            "outgrown SQLite WAL truncated"
        ),
        Ok(_) => tracing::debug!("outgrown SQLite WAL not truncated yet: a reader holds it"),
        Err(e) => {
            note_io_error(&e, failed, "checkpointer");
            tracing::debug!(error = %e, "outgrown SQLite WAL not truncated");
        }
    }
}

/// The checkpointer thread: `tx` is the writer's "I committed" signal; dropping it ends the
/// thread, which `thread` then joins.
struct Checkpointer {
    tx: mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// How a committed cycle becomes durable before its callers are answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Durability {
    /// `synchronous = full`: the WAL is fsynced by the [`Syncer`] thread, off the writer's path.
    GroupSync,
    /// `normal` or `extra`: SQLite's own setting, inside COMMIT.
    Sqlite(&'static str),
}

impl Durability {
    fn of(synchronous: &str) -> Durability {
        match synchronous {
            "normal" => Durability::Sqlite("NORMAL"),
            "extra" => Durability::Sqlite("EXTRA"),
            _ => Durability::GroupSync,
        }
    }

    /// The connection's `PRAGMA synchronous`.
    fn pragma(self) -> &'static str {
        match self {
            // Commits only write their frames; the syncer thread fsyncs them.
            Durability::GroupSync => "NORMAL",
            Durability::Sqlite(level) => level,
        }
    }
}

/// Makes the WAL durable; the tests replace it to slow it down or make it fail.
type SyncFn = Arc<dyn Fn(&std::fs::File) -> std::io::Result<()> + Send + Sync>;

/// fsyncs the WAL file (fdatasync: a grown file's size is flushed with it).
fn sync_wal(wal: &std::fs::File) -> std::io::Result<()> {
    wal.sync_data()
}

/// Opens the WAL file of `conn`'s database for the sync thread, once: a descriptor opened
/// later would not report a write-back error that another descriptor (the checkpointer's)
/// had already seen, and SQLite keeps this file (it deletes it only when the last connection
/// closes, after the sync thread has stopped).
fn open_wal(conn: &Connection) -> Result<std::fs::File, StoreError> {
    // A read makes sure the WAL exists; its name is the resolved database path + "-wal".
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
    let db = conn
        .path()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| StoreError::Writer("SQLite group sync needs a database file".into()))?;
    let wal = format!("{db}-wal");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .map_err(|e| StoreError::Writer(format!("cannot open the SQLite WAL {wal}: {e}")))
}

/// Records an I/O error of the writer or the checkpointer: after one, nothing written before
/// it can be promised (see [`Syncer`]), so the writer stops taking writes.
fn note_io_error(e: &rusqlite::Error, failed: &AtomicBool, whose: &str) {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure)
        && !failed.swap(true, Ordering::AcqRel)
    {
        tracing::error!(
            error = %e,
            "I/O error in the SQLite {whose}; the writer stops taking writes until the process \
             restarts"
        );
    }
}

/// Records a full disk (`SQLITE_FULL`): `/readyz` answers 503 until a transaction commits
/// again. Not a reason to stop: SQLite rolls the transaction back and nothing committed is at
/// risk, so the writer goes on and recovers by itself once space is back.
fn note_full(e: &rusqlite::Error, full: &AtomicBool) {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
        && !full.swap(true, Ordering::AcqRel)
    {
        tracing::error!(error = %e, "the SQLite disk is full; writes answer 503 until space is freed");
    }
}

/// The group-sync thread (`synchronous = full`, the default).
///
/// With SQLite's own `FULL`, COMMIT fsyncs the WAL on the writer thread — the backend's one
/// serial resource — which then sat idle for the fsync (a median 1.7 ms, p90 2.3 ms on the
/// development machine: a third of a cycle under load) while the next requests queued behind
/// it. Instead the writer connection commits with `NORMAL` (its frames are written to the WAL
/// file but not synced) and hands the cycle's jobs to this thread, which fsyncs the WAL once for
/// every cycle committed since its last pass and only then answers them; the writer commits the
/// next cycle meanwhile. An fsync that starts after a commit's frames were written makes that
/// commit, and every one before it in the file, survive an OS crash or a power loss (WAL
/// recovery replays frames up to the last complete commit it finds; the checkpointer syncs the
/// WAL before it copies frames into the database file, and the WAL is only restarted over
/// frames already synced into it, with its new header synced first). So an answer promises
/// what `FULL` promised, on storage with powersafe overwrite (SQLite's default on unix): under
/// `NORMAL` SQLite does not pad the last frame of a commit to a sector boundary.
///
/// One thing differs: other connections of this process can read a commit up to one fsync
/// before it is durable. Nothing is acknowledged on the strength of such a read: the inbox
/// answers a sender from this thread's answer, and a worker's outcome is written by a later
/// cycle, which cannot survive a crash that the row it depends on does not.
///
/// A failed fsync — or any I/O error the writer or the checkpointer sees — stops the writer for
/// good (every later job fails; a restart recovers from what is on disk): after one, Linux may
/// have dropped the dirty pages it could not write, and a later fsync that succeeds does not
/// bring them back, so no later answer could be trusted. The WAL is opened once, before any
/// commit, so that its descriptor sees every write-back error (see [`open_wal`]).
struct Syncer {
    tx: mpsc::Sender<Vec<Box<dyn Job>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Syncer {
    fn start(
        wal: std::fs::File,
        sync: SyncFn,
        failed: Arc<AtomicBool>,
    ) -> Result<Syncer, StoreError> {
        let (tx, rx) = mpsc::channel::<Vec<Box<dyn Job>>>();
        let thread = std::thread::Builder::new()
            .name("sqlite-sync".into())
            .spawn(move || {
                while let Ok(mut jobs) = rx.recv() {
                    // Every cycle committed so far shares this fsync.
                    while let Ok(more) = rx.try_recv() {
                        jobs.extend(more);
                    }
                    let started = Instant::now();
                    let synced = if failed.load(Ordering::Acquire) {
                        Err(std::io::Error::other(STOPPED))
                    } else {
                        sync(&wal)
                    };
                    match synced {
                        Ok(()) => {
                            tracing::trace!(
                                jobs = jobs.len(),
                                us = started.elapsed().as_micros() as u64,
                                "sqlite wal synced"
                            );
                            for job in jobs {
                                job.answer(Ok(()));
                            }
                        }
                        Err(e) => {
                            if !failed.swap(true, Ordering::AcqRel) {
                                tracing::error!(
                                    error = %e,
                                    "fsync of the SQLite WAL failed; the writer stops taking \
                                     writes until the process restarts"
                                );
                            }
                            let e = sync_failure(&e);
                            for job in jobs {
                                job.answer(Err(&e));
                            }
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Writer(format!("cannot start the SQLite sync thread: {e}")))?;
        Ok(Syncer { tx, thread })
    }
}

/// Why a job fails once the writer has stopped (see [`Syncer`]).
const STOPPED: &str = "an earlier fsync or I/O error stopped the writer";

/// The error a job gets when its commit could not be made durable.
fn sync_failure(e: &std::io::Error) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
        Some(format!("the SQLite WAL could not be synced to disk: {e}")),
    )
}

/// Handle to the writer thread. Cheap to clone; the thread ends when [`SqliteWriter::close`] is
/// called or the last handle is dropped.
#[derive(Clone)]
pub(super) struct SqliteWriter {
    tx: mpsc::Sender<Msg>,
    /// Transactions committed or attempted so far (one per cycle of queued jobs); the tests
    /// read it to check that queued jobs share a commit.
    #[cfg_attr(not(test), allow(dead_code))]
    cycles: Arc<std::sync::atomic::AtomicU64>,
    /// Set once an fsync or I/O error has stopped the writer (see [`Syncer`]).
    failed: Arc<AtomicBool>,
    /// Set while the disk is full: the last transaction failed with `SQLITE_FULL` and none has
    /// committed since (readiness probes then commit through the writer to find out).
    full: Arc<AtomicBool>,
    /// The directory holding the database (its filesystem's free space is a readiness input).
    dir: std::path::PathBuf,
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteWriter")
    }
}

/// A delivery to insert, with the lease it gets at insert time (hand-off), if any.
pub(super) struct InsertRow {
    pub d: NewDelivery,
    pub lease: Option<(String, i64)>,
    /// The outcome to commit with the row when it is new (the row must be leased).
    pub finish: Option<ApplyItem>,
}

/// One claimed delivery's outcome to commit.
pub(super) struct ApplyItem {
    pub id: String,
    pub workspace_id: Option<String>,
    pub integration_id: Option<String>,
    pub source: String,
    pub effect: Effect,
    /// For an upsert: the signal's metadata and the `signal.created` entry's metadata, as JSON
    /// text. Serialising them is the caller's work, not the writer thread's: that thread is the
    /// backend's one serial resource (for a Pylon ticket, JSON output was a tenth of its time).
    upsert_json: Option<(String, String)>,
}

impl ApplyItem {
    /// The item for `d` and its effect, with its JSON serialised on the calling thread.
    pub fn new(d: &ClaimedDelivery, effect: Effect) -> ApplyItem {
        Self::of(&d.id, &d.workspace_id, &d.integration_id, &d.source, effect)
    }

    /// The item for a delivery not stored yet, finished in its insert's transaction.
    pub fn for_new(d: &NewDelivery, effect: Effect) -> ApplyItem {
        Self::of(&d.id, &d.workspace_id, &d.integration_id, &d.source, effect)
    }

    fn of(
        id: &str,
        workspace_id: &Option<String>,
        integration_id: &Option<String>,
        source: &str,
        effect: Effect,
    ) -> ApplyItem {
        let upsert_json = match &effect {
            Effect::Upsert { signal, .. } => Some((
                json_text(&signal.metadata),
                outcome::created_metadata(source, id, signal),
            )),
            _ => None,
        };
        ApplyItem {
            id: id.to_string(),
            workspace_id: workspace_id.clone(),
            integration_id: integration_id.clone(),
            source: source.to_string(),
            effect,
            upsert_json,
        }
    }
}

impl SqliteWriter {
    /// Opens the connection and starts the thread. `turn` is the store's write lock.
    pub fn open(
        path: &Path,
        synchronous: &str,
        turn: Arc<tokio::sync::Mutex<()>>,
    ) -> Result<SqliteWriter, StoreError> {
        Self::open_with_wait(path, synchronous, turn, BACKGROUND_WAIT)
    }

    /// [`SqliteWriter::open`] with another background wait (the tests use long ones).
    fn open_with_wait(
        path: &Path,
        synchronous: &str,
        turn: Arc<tokio::sync::Mutex<()>>,
        background_wait: Duration,
    ) -> Result<SqliteWriter, StoreError> {
        Self::open_with(path, synchronous, turn, background_wait, Arc::new(sync_wal))
    }

    /// [`SqliteWriter::open_with_wait`] with another way to sync the WAL (the tests slow it
    /// down or make it fail).
    fn open_with(
        path: &Path,
        synchronous: &str,
        turn: Arc<tokio::sync::Mutex<()>>,
        background_wait: Duration,
        sync: SyncFn,
    ) -> Result<SqliteWriter, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let durability = Durability::of(synchronous);
        // Checkpoints run on their own thread (below); this connection checkpoints only when the
        // WAL has grown past WAL_BACKSTOP_PAGES, which restarts the WAL from its start.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; \
             PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}; \
             PRAGMA journal_size_limit = {WAL_LIMIT_BYTES};",
            durability.pragma()
        ))?;
        conn.set_prepared_statement_cache_capacity(32);
        let failed: Arc<AtomicBool> = Default::default();
        let syncer = match durability {
            Durability::GroupSync => Some(Syncer::start(open_wal(&conn)?, sync, failed.clone())?),
            Durability::Sqlite(_) => None,
        };
        let checkpoints = start_checkpointer(path, failed.clone())?;
        let stopped = failed.clone();
        let full: Arc<AtomicBool> = Default::default();
        let filling = full.clone();
        let (tx, rx) = mpsc::channel::<Msg>();
        let cycles: Arc<std::sync::atomic::AtomicU64> = Default::default();
        let counted = cycles.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                serve(
                    conn,
                    rx,
                    turn,
                    Threads {
                        checkpointer: checkpoints,
                        syncer,
                        failed: stopped,
                        full: filling,
                    },
                    &counted,
                    background_wait,
                )
            })
            .map_err(|e| StoreError::Writer(format!("cannot start the SQLite writer: {e}")))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        Ok(SqliteWriter {
            tx,
            cycles,
            failed,
            full,
            dir,
        })
    }

    /// False once an fsync or I/O error has stopped the writer: every write fails until the
    /// process restarts (`/readyz` says so).
    pub fn takes_writes(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    /// True while the disk is full: the writer's last transaction failed with `SQLITE_FULL`
    /// and none has committed since.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Bytes free to unprivileged writers on the filesystem holding the database (`None` when
    /// the filesystem cannot say), and that directory.
    pub fn free_bytes(&self) -> (Option<u64>, &Path) {
        let free = rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        (free, &self.dir)
    }

    /// Commits a one-row write through the writer (the readiness probe while the disk is full:
    /// unlike a rolled-back probe, a commit needs space). Success clears [`Self::is_full`].
    pub async fn probe_commit(&self) -> Result<(), StoreError> {
        // 64 KiB committed, then removed in a second transaction: pages freed in the
        // transaction that wrote them need not reach the WAL, and a probe that fits in the few
        // pages a full disk still has would say "ready" while deliveries fail.
        self.run(|c| {
            c.execute_batch(
                "INSERT INTO readiness_probe (id, at) VALUES (2, zeroblob(65536)) \
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            )
        })
        .await?;
        self.run(|c| c.execute_batch("DELETE FROM readiness_probe WHERE id = 2"))
            .await
    }

    /// Runs `f` on the writer thread and returns its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.run_as(Priority::Ack, f).await
    }

    /// Runs `f` on the writer thread with `priority` and returns its result.
    async fn run_as<T: Send + 'static>(
        &self,
        priority: Priority,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, wait) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Call {
            f,
            result: None,
            reply,
        });
        self.tx
            .send(Msg::Run(job, priority))
            .map_err(|_| StoreError::Writer("the SQLite writer has stopped".into()))?;
        match wait.await {
            // The job's data (rows, outcomes) was allocated on this side; it is freed here too,
            // not on the writer's threads: memory freed by another thread comes back to the
            // allocating thread's heap late and cold. (In a Slack run mimalloc's share of the
            // request threads' samples fell from 9.5 % to 8.1 % of the machine's; throughput
            // moved less than the noise.)
            Ok((r, f)) => {
                drop(f);
                r.map_err(StoreError::from_rusqlite)
            }
            Err(_) => Err(StoreError::Writer(
                "the SQLite writer stopped before answering".into(),
            )),
        }
    }

    /// Stops the thread after the jobs already queued and returns once the writer's and the
    /// checkpointer's connections are closed (the last one to close checkpoints the WAL and
    /// removes it, so nothing may still be doing that when the caller moves on).
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }

    /// Inserts an inbox batch, and the outcomes of its new rows that carry one, in one
    /// transaction (see `Store::insert_and_finish`).
    pub async fn insert_deliveries(
        &self,
        rows: Vec<InsertRow>,
    ) -> Result<Vec<(Stored, Option<Applied>)>, StoreError> {
        self.run(move |conn| insert_deliveries(conn, &rows)).await
    }

    /// Claims due deliveries (see `Store::claim_deliveries`).
    pub async fn claim(
        &self,
        owner: String,
        now: i64,
        until: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        self.run_as(Priority::Background, move |conn| {
            claim(conn, &owner, now, until, limit)
        })
        .await
    }

    /// Commits a worker batch's outcomes in one transaction (see `Store::apply_effects`).
    pub async fn apply(
        &self,
        owner: String,
        items: Vec<ApplyItem>,
    ) -> Result<Vec<Applied>, StoreError> {
        self.run_as(Priority::Background, move |conn| {
            apply(conn, &owner, &items)
        })
        .await
    }
}

/// The writer's helper threads.
struct Threads {
    checkpointer: Checkpointer,
    /// `None` when SQLite syncs inside COMMIT (`normal`, `extra`).
    syncer: Option<Syncer>,
    /// Set by the syncer when an fsync failed: no write is taken after that.
    failed: Arc<AtomicBool>,
    /// See [`SqliteWriter::is_full`].
    full: Arc<AtomicBool>,
}

fn serve(
    conn: Connection,
    rx: mpsc::Receiver<Msg>,
    turn: Arc<tokio::sync::Mutex<()>>,
    threads: Threads,
    cycles: &std::sync::atomic::AtomicU64,
    background_wait: Duration,
) {
    let Threads {
        checkpointer:
            Checkpointer {
                tx: checkpoints,
                thread: checkpointer,
            },
        syncer,
        failed,
        full,
    } = threads;
    // Answers the jobs of a committed cycle: at once, or once the syncer has made it durable.
    let committed = |jobs: Vec<Box<dyn Job>>| match &syncer {
        Some(s) => {
            if let Err(mpsc::SendError(jobs)) = s.tx.send(jobs) {
                let e = sync_failure(&std::io::Error::other("the sync thread has stopped"));
                for job in jobs {
                    job.answer(Err(&e));
                }
            }
        }
        None => {
            for job in jobs {
                job.answer(Ok(()));
            }
        }
    };
    let mut jobs: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_JOBS_PER_COMMIT);
    let mut closing = None;
    while closing.is_none() {
        // Wait for one job, then take every job queued behind it: they share one commit.
        let mut ack = match rx.recv() {
            Ok(Msg::Run(job, p)) => {
                jobs.push(job);
                p == Priority::Ack
            }
            Ok(Msg::Close(done)) => {
                closing = Some(done);
                break;
            }
            Err(_) => break,
        };
        let mut wait_until = None;
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            let next = if ack {
                rx.try_recv().map_err(|_| ())
            } else {
                // Only background jobs so far: give an inbox batch a moment to join them.
                let until = *wait_until.get_or_insert_with(|| Instant::now() + background_wait);
                match until.checked_duration_since(Instant::now()) {
                    Some(left) => rx.recv_timeout(left).map_err(|_| ()),
                    None => rx.try_recv().map_err(|_| ()),
                }
            };
            match next {
                Ok(Msg::Run(job, p)) => {
                    jobs.push(job);
                    ack |= p == Priority::Ack;
                }
                Ok(Msg::Close(done)) => {
                    closing = Some(done);
                    break;
                }
                Err(()) => break,
            }
        }
        if failed.load(Ordering::Acquire) {
            let e = sync_failure(&std::io::Error::other(STOPPED));
            for job in jobs.drain(..) {
                job.answer(Err(&e));
            }
            continue;
        }
        // Not inside a runtime: blocking on the async lock is allowed here.
        let turn = turn.blocking_lock();
        let started = std::time::Instant::now();
        let n = jobs.len();
        let outcome = run_cycle(&conn, &mut jobs);
        cycles.fetch_add(1, Ordering::Relaxed);
        if let Err(f) = &outcome {
            note_io_error(f.error(), &failed, "writer");
            note_full(f.error(), &full);
        }
        match outcome {
            Ok(()) => {
                full.store(false, Ordering::Release);
                // Full means a checkpoint is already due to run.
                let _ = checkpoints.try_send(());
                committed(std::mem::replace(
                    &mut jobs,
                    Vec::with_capacity(MAX_JOBS_PER_COMMIT),
                ));
            }
            Err(Failed::Job(_)) if n > 1 => {
                // One job's failure must not fail the jobs that merely shared its transaction:
                // run each again in a transaction of its own.
                tracing::debug!(
                    jobs = n,
                    "a SQLite writer job failed; running its batch one by one"
                );
                let mut done = Vec::with_capacity(n);
                for mut job in jobs.drain(..) {
                    let alone = run_cycle(&conn, std::slice::from_mut(&mut job));
                    cycles.fetch_add(1, Ordering::Relaxed);
                    match alone {
                        Ok(()) => done.push(job),
                        // It wrote nothing: no need to wait for a sync to say so.
                        Err(f) => {
                            note_io_error(f.error(), &failed, "writer");
                            note_full(f.error(), &full);
                            job.answer(Err(f.error()));
                        }
                    }
                }
                if !done.is_empty() {
                    full.store(false, Ordering::Release);
                    let _ = checkpoints.try_send(());
                    committed(done);
                }
            }
            Err(f) => {
                // BEGIN or COMMIT failed (busy, I/O): every job shares that fate.
                for job in jobs.drain(..) {
                    job.answer(Err(f.error()));
                }
            }
        }
        drop(turn);
        tracing::trace!(
            jobs = n,
            us = started.elapsed().as_micros() as u64,
            "sqlite writer commit"
        );
    }
    // Answer what the syncer still holds, close the checkpointer's connection, then this one,
    // then say so.
    if let Some(Syncer { tx, thread }) = syncer {
        drop(tx);
        if thread.join().is_err() {
            tracing::warn!("the SQLite sync thread panicked");
        }
    }
    drop(checkpoints);
    if checkpointer.join().is_err() {
        tracing::warn!("the SQLite checkpointer thread panicked");
    }
    drop(conn);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Runs `jobs` in one transaction and commits. On any error the whole transaction is rolled
/// back. (No savepoint per job: SQLite copies every page a savepoint touches to its
/// sub-journal, which cost a tenth of this thread's time; a failed job is instead rare enough
/// to re-run the others alone.)
fn run_cycle(conn: &Connection, jobs: &mut [Box<dyn Job>]) -> Result<(), Failed> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(Failed::Transaction)?;
    for job in jobs.iter_mut() {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(conn)));
        let failed = match done {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => {
                // The caller sees its reply dropped; never keep a panicked job's writes.
                tracing::error!("a SQLite writer job panicked; its transaction was rolled back");
                Some(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some("a SQLite writer job panicked".into()),
                ))
            }
        };
        if let Some(e) = failed {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(Failed::Job(e));
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        return Err(Failed::Transaction(e));
    }
    Ok(())
}

/// Why a writer transaction did not commit.
enum Failed {
    /// A job's statements failed (the job keeps its own error).
    Job(rusqlite::Error),
    /// Beginning or committing the transaction failed.
    Transaction(rusqlite::Error),
}

impl Failed {
    fn error(&self) -> &rusqlite::Error {
        match self {
            Failed::Job(e) | Failed::Transaction(e) => e,
        }
    }
}

fn insert_deliveries(
    conn: &Connection,
    rows: &[InsertRow],
) -> rusqlite::Result<Vec<(Stored, Option<Applied>)>> {
    let mut out = Vec::with_capacity(rows.len());
    // New rows to finish now (their index in `out`, the outcome), and their lease holder: all
    // leased rows of a batch share one, the local hand-off owner.
    let mut to_finish: Vec<(usize, &ApplyItem)> = Vec::new();
    let mut holder = None;
    {
        let mut insert = conn.prepare_cached(
            "INSERT INTO deliveries (id, workspace_id, integration_id, webhook_key_id, \
             source, dedupe_scope, dedupe_key, body, headers, status, attempts, \
             next_attempt_at, filter_reason, received_at, processed_at, lease_owner, \
             lease_expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?14, ?11, ?12, ?11, ?13, ?15, ?16) \
             ON CONFLICT (dedupe_scope, dedupe_key) DO NOTHING",
        )?;
        let mut existing = conn.prepare_cached(
            "SELECT id FROM deliveries WHERE dedupe_scope = ?1 AND dedupe_key = ?2",
        )?;
        for InsertRow { d, lease, finish } in rows {
            let (owner, until) = match lease {
                Some((o, u)) => (Some(o.as_str()), Some(*u)),
                None => (None, None),
            };
            let n = insert.execute(params![
                d.id,
                d.workspace_id,
                d.integration_id,
                d.webhook_key_id,
                d.source,
                d.dedupe_scope,
                d.dedupe_key,
                &d.body[..],
                d.headers,
                d.status.as_str(),
                d.received_at,
                d.filter_reason,
                (d.status != DeliveryStatus::Pending).then_some(d.received_at),
                i32::from(lease.is_some()),
                owner,
                until,
            ])?;
            if n == 1 {
                if let (Some(item), Some(owner)) = (finish, owner) {
                    to_finish.push((out.len(), item));
                    holder = Some(owner);
                }
                out.push((Stored::New(d.id.clone()), None));
            } else {
                let id: String =
                    existing.query_row(params![d.dedupe_scope, d.dedupe_key], |r| r.get(0))?;
                out.push((Stored::Duplicate(id), None));
            }
        }
    }
    // In insert order, so that an edit finishes after the message it edits.
    if let Some(owner) = holder {
        let applied = apply(conn, owner, to_finish.iter().map(|(_, item)| *item))?;
        for ((i, _), a) in to_finish.iter().zip(applied) {
            out[*i].1 = Some(a);
        }
    }
    Ok(out)
}

fn claim(
    conn: &Connection,
    owner: &str,
    now: i64,
    until: i64,
    limit: usize,
) -> rusqlite::Result<Vec<ClaimedDelivery>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE deliveries SET lease_owner = ?1, lease_expires_at = ?2, \
         attempts = attempts + 1 WHERE id IN (SELECT id FROM deliveries \
         WHERE status = 'pending' AND next_attempt_at <= ?3 AND \
         (lease_expires_at IS NULL OR lease_expires_at < ?3) \
         ORDER BY next_attempt_at LIMIT ?4) RETURNING id, workspace_id, integration_id, \
         webhook_key_id, source, dedupe_key, body, headers, attempts, received_at",
    )?;
    let mut rows: Vec<ClaimedDelivery> = stmt
        .query_map(params![owner, until, now, limit as i64], |r| {
            Ok(ClaimedDelivery {
                id: r.get(0)?,
                workspace_id: r.get(1)?,
                integration_id: r.get(2)?,
                webhook_key_id: r.get(3)?,
                source: r.get(4)?,
                dedupe_key: r.get(5)?,
                body: r.get::<_, Vec<u8>>(6)?.into(),
                headers: r.get(7)?,
                attempts: r.get(8)?,
                received_at: r.get(9)?,
                parsed: Default::default(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.sort_by_key(|d| d.received_at);
    Ok(rows)
}

fn apply<'a>(
    conn: &Connection,
    owner: &str,
    items: impl IntoIterator<Item = &'a ApplyItem>,
) -> rusqlite::Result<Vec<Applied>> {
    let now = now_micros();
    let now_s = rfc3339(now);
    let mut out = Vec::new();
    // Under SQLite's single write lock no lease changes while we hold it, so checking the lease
    // first is as good as fencing the final UPDATE.
    let mut held = conn.prepare_cached(
        "SELECT 1 FROM deliveries WHERE id = ?1 AND lease_owner = ?2 AND status = 'pending'",
    )?;
    let mut insert_signal = conn.prepare_cached(
        "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, \
         source_metadata, status, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'new', ?7, ?7) \
         ON CONFLICT (workspace_id, source, source_ref) DO NOTHING",
    )?;
    let mut find_signal = conn.prepare_cached(
        "SELECT id, verbatim, source_metadata FROM signals WHERE workspace_id = ?1 \
         AND source = ?2 AND source_ref = ?3",
    )?;
    let mut insert_activity = conn.prepare_cached(
        "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, target_id, \
         metadata, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut finish = conn.prepare_cached(
        "UPDATE deliveries SET status = ?2, signal_id = ?3, filter_reason = ?4, \
         last_error = ?5, processed_at = ?6, lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = ?1",
    )?;
    for item in items {
        if !held.exists(params![item.id, owner])? {
            out.push(Applied::LeaseLost);
            continue;
        }
        let ws = item.workspace_id.as_deref().unwrap_or_default();
        let source = item.source.as_str();
        let (done, entry) = match &item.effect {
            Effect::Upsert { signal, .. } => {
                // Insert first (the common case, a new signal); merge only on conflict. Ids are
                // made here, under the write lock, so that id order is commit order.
                let serialised;
                let (metadata, created) = match &item.upsert_json {
                    Some((m, c)) => (m.as_str(), Some(c)),
                    None => {
                        serialised = signal.metadata.to_string();
                        (serialised.as_str(), None)
                    }
                };
                let id = new_id(prefix::SIGNAL);
                let n = insert_signal.execute(params![
                    id,
                    ws,
                    signal.verbatim,
                    source,
                    signal.source_ref,
                    metadata,
                    now
                ])?;
                if n == 1 {
                    let created = created
                        .cloned()
                        .unwrap_or_else(|| outcome::created_metadata(source, &item.id, signal));
                    Finish::created(id, created)
                } else {
                    let existing = find_signal
                        .query_row(params![ws, source, signal.source_ref], row3)
                        .optional()?;
                    let (change, done) =
                        outcome::on_existing(&item.effect, source, &item.id, existing, &now_s);
                    write_change(conn, change, now)?;
                    done
                }
            }
            Effect::MarkDeleted { source_ref, .. } => {
                let existing = find_signal
                    .query_row(params![ws, source, source_ref], row3)
                    .optional()?;
                let (change, done) =
                    outcome::on_existing(&item.effect, source, &item.id, existing, &now_s);
                write_change(conn, change, now)?;
                done
            }
            Effect::Filter { reason } => (Finish::filtered(reason.as_str()), None),
            Effect::Reject { reason } => (Finish::failed(reason.as_str()), None),
            Effect::DeactivateIntegration { reason } => match &item.integration_id {
                Some(int_id) => {
                    let changed = conn
                        .prepare_cached(
                            "UPDATE integrations SET is_active = 0, access_token_enc = NULL, \
                             refresh_token_enc = NULL, token_expires_at = NULL, \
                             updated_at = ?2 WHERE id = ?1 \
                             AND (is_active = 1 OR access_token_enc IS NOT NULL)",
                        )?
                        .execute(params![int_id, now])?;
                    if changed == 1 {
                        Finish::deactivated(source, int_id, reason, &item.id)
                    } else {
                        (Finish::processed(), None)
                    }
                }
                None => (Finish::no_integration(reason), None),
            },
        };
        if let Some(e) = entry {
            insert_activity.execute(params![
                new_id(prefix::ACTIVITY),
                ws,
                e.actor,
                e.action,
                e.target_type,
                e.target_id,
                e.metadata,
                now
            ])?;
        }
        finish.execute(params![
            item.id,
            done.status.as_str(),
            done.signal_id,
            done.filter_reason,
            done.last_error,
            now
        ])?;
        out.push(Applied::Done {
            status: done.status,
            signal_id: done.signal_id,
            action: done.action,
        });
    }
    Ok(out)
}

fn row3(r: &rusqlite::Row<'_>) -> rusqlite::Result<ExistingSignal> {
    Ok(ExistingSignal {
        id: r.get(0)?,
        verbatim: r.get(1)?,
        metadata: r.get(2)?,
    })
}

/// Runs the write [`outcome::on_existing`] decided on an existing signal.
fn write_change(conn: &Connection, change: Option<SignalChange>, now: i64) -> rusqlite::Result<()> {
    match change {
        Some(SignalChange::Edit {
            id,
            verbatim,
            metadata,
        }) => {
            conn.prepare_cached(
                "UPDATE signals SET verbatim = ?2, source_metadata = ?3, updated_at = ?4 \
                 WHERE id = ?1",
            )?
            .execute(params![id, verbatim, metadata, now])?;
        }
        Some(SignalChange::Delete { id, metadata }) => {
            conn.prepare_cached(
                "UPDATE signals SET source_metadata = ?2, updated_at = ?3, status = 'deleted' \
                 WHERE id = ?1",
            )?
            .execute(params![id, metadata, now])?;
        }
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn writer() -> (tempfile::TempDir, SqliteWriter, Arc<tokio::sync::Mutex<()>>) {
        writer_waiting(BACKGROUND_WAIT)
    }

    fn writer_waiting(
        wait: Duration,
    ) -> (tempfile::TempDir, SqliteWriter, Arc<tokio::sync::Mutex<()>>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("w.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY);")
            .expect("schema");
        drop(conn);
        let turn: Arc<tokio::sync::Mutex<()>> = Default::default();
        let w = SqliteWriter::open_with_wait(&path, "full", turn.clone(), wait).expect("writer");
        (dir, w, turn)
    }

    fn insert(w: &SqliteWriter, k: i64) -> impl Future<Output = Result<usize, StoreError>> + use<> {
        let w = w.clone();
        async move {
            w.run(move |c| c.execute("INSERT INTO t (k) VALUES (?1)", params![k]))
                .await
        }
    }

    fn insert_in_background(
        w: &SqliteWriter,
        k: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + use<> {
        let w = w.clone();
        async move {
            w.run_as(Priority::Background, move |c| {
                c.execute("INSERT INTO t (k) VALUES (?1)", params![k])
            })
            .await
        }
    }

    #[tokio::test]
    async fn background_jobs_wait_for_the_next_ack_job_and_share_its_commit() {
        let (_dir, w, _turn) = writer_waiting(Duration::from_secs(30));
        let before = w.cycles.load(Ordering::Relaxed);
        let outcomes = tokio::spawn(insert_in_background(&w, 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !outcomes.is_finished(),
            "a background job alone waits for an inbox batch"
        );
        assert_eq!(insert(&w, 2).await.expect("ack job"), 1);
        assert_eq!(outcomes.await.expect("join").expect("background job"), 1);
        assert_eq!(
            w.cycles.load(Ordering::Relaxed) - before,
            1,
            "both committed in one transaction"
        );
        assert_eq!(keys(&w).await, vec![1, 2]);
    }

    #[tokio::test]
    async fn background_jobs_commit_alone_when_no_ack_job_comes() {
        let (_dir, w, _turn) = writer_waiting(Duration::from_millis(50));
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(insert_in_background(&w, 1), insert_in_background(&w, 2));
        assert_eq!((a.expect("first"), b.expect("second")), (1, 1));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!(keys(&w).await, vec![1, 2]);
    }

    #[tokio::test]
    async fn close_returns_after_queued_jobs_commit_and_both_connections_close() {
        let (dir, w, _turn) = writer();
        let queued = tokio::spawn(insert(&w, 7));
        // Let the job reach the queue, and the checkpointer run at least once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.close().await;
        assert_eq!(queued.await.expect("join").expect("queued job"), 1);
        // The last connection to close checkpoints the WAL into the file and removes it, so its
        // absence right after close() shows no connection is still open (or still closing).
        let wal = dir.path().join("w.db-wal");
        assert!(
            !wal.exists(),
            "{} still exists after close()",
            wal.display()
        );
        let conn = Connection::open(dir.path().join("w.db")).expect("reopen");
        let k: i64 = conn
            .query_row("SELECT k FROM t", [], |r| r.get(0))
            .expect("the committed row");
        assert_eq!(k, 7);
        let after = insert(&w, 8).await;
        assert!(
            matches!(&after, Err(StoreError::Writer(m)) if m.contains("stopped")),
            "{after:?}"
        );
        // Closing again is harmless.
        w.close().await;
    }

    fn new_db() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("w.db");
        Connection::open(&path)
            .expect("open")
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY);")
            .expect("schema");
        (dir, path)
    }

    /// A writer whose WAL syncs say when they start and wait until the test lets them finish.
    struct GatedSync {
        dir: tempfile::TempDir,
        w: SqliteWriter,
        started: std::sync::Mutex<mpsc::Receiver<()>>,
        go: mpsc::SyncSender<()>,
        syncs: Arc<std::sync::atomic::AtomicU64>,
    }

    impl GatedSync {
        fn new() -> GatedSync {
            let (dir, path) = new_db();
            let (go, gate) = mpsc::sync_channel::<()>(16);
            let (said, started) = mpsc::sync_channel::<()>(16);
            let gate = std::sync::Mutex::new(gate);
            let syncs: Arc<std::sync::atomic::AtomicU64> = Default::default();
            let counted = syncs.clone();
            let wal_path = dir.path().join("w.db-wal");
            let sync: SyncFn = Arc::new(move |wal: &std::fs::File| {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::MetadataExt;
                    let held = wal.metadata()?.ino();
                    let named = std::fs::metadata(&wal_path)?.ino();
                    assert_eq!(held, named, "the sync thread must hold the database's WAL");
                }
                let _ = said.send(());
                let _ = gate.lock().expect("gate").recv();
                sync_wal(wal)?;
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            });
            let w =
                SqliteWriter::open_with(&path, "full", Default::default(), BACKGROUND_WAIT, sync)
                    .expect("writer");
            GatedSync {
                dir,
                w,
                started: std::sync::Mutex::new(started),
                go,
                syncs,
            }
        }

        /// Waits until a sync has started (and is held at the gate).
        async fn sync_started(&self) {
            for _ in 0..500 {
                if self.started.lock().expect("started").try_recv().is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("no WAL sync started");
        }

        fn syncs(&self) -> u64 {
            self.syncs.load(Ordering::SeqCst)
        }
    }

    fn committed_keys(dir: &tempfile::TempDir) -> Vec<i64> {
        let conn = Connection::open(dir.path().join("w.db")).expect("reader");
        let mut s = conn.prepare("SELECT k FROM t ORDER BY k").expect("select");
        s.query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("keys")
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn an_answer_waits_for_its_wal_sync_while_the_writer_commits_the_next_cycle() {
        let g = GatedSync::new();
        let first = tokio::spawn(insert(&g.w, 1));
        g.sync_started().await;
        // Committed (another connection reads it) but not answered: its sync has not finished.
        assert_eq!(committed_keys(&g.dir), vec![1]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished(), "answered before its WAL was synced");
        // The writer is not held up by that sync: the next job commits meanwhile.
        let second = tokio::spawn(insert(&g.w, 2));
        until("the second commit", || committed_keys(&g.dir) == vec![1, 2]).await;
        assert!(!first.is_finished() && !second.is_finished());
        assert_eq!(g.syncs(), 0);
        // The first sync finishes: the first job is answered, not the second, whose commit came
        // after that sync had started.
        g.go.send(()).expect("let the first sync finish");
        assert_eq!(first.await.expect("join").expect("first insert"), 1);
        g.sync_started().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "answered by a sync that began before its commit"
        );
        assert_eq!(g.syncs(), 1);
        g.go.send(()).expect("let the second sync finish");
        assert_eq!(second.await.expect("join").expect("second insert"), 1);
        assert_eq!(g.syncs(), 2);
        // Closing waits for the sync of what is still unanswered.
        let third = tokio::spawn(insert(&g.w, 3));
        g.sync_started().await;
        g.go.send(()).expect("let the third sync finish");
        g.w.close().await;
        assert_eq!(third.await.expect("join").expect("third insert"), 1);
        assert_eq!(g.syncs(), 3);
    }

    #[tokio::test]
    async fn a_failed_wal_sync_fails_its_jobs_and_every_later_write() {
        let (dir, path) = new_db();
        let fail = Arc::new(AtomicBool::new(false));
        let failing = fail.clone();
        let sync: SyncFn = Arc::new(move |wal: &std::fs::File| {
            if failing.load(Ordering::SeqCst) {
                Err(std::io::Error::other("EIO (test)"))
            } else {
                sync_wal(wal)
            }
        });
        let w = SqliteWriter::open_with(&path, "full", Default::default(), BACKGROUND_WAIT, sync)
            .expect("writer");
        assert_eq!(insert(&w, 1).await.expect("a synced insert"), 1);
        assert!(w.takes_writes());
        fail.store(true, Ordering::SeqCst);
        let lost = insert(&w, 2).await;
        let msg = format!("{lost:?}");
        assert!(
            msg.contains("could not be synced"),
            "the caller must hear the sync failed: {msg}"
        );
        // It was committed, just not made durable: the sender's retry will find it.
        assert_eq!(committed_keys(&dir), vec![1, 2]);
        // Even once fsync works again, the writer takes no more writes.
        assert!(
            !w.takes_writes(),
            "a stopped writer must say so (readiness)"
        );
        fail.store(false, Ordering::SeqCst);
        let later = insert(&w, 3).await;
        assert!(
            format!("{later:?}").contains("could not be synced"),
            "{later:?}"
        );
        assert_eq!(
            committed_keys(&dir),
            vec![1, 2],
            "a write after a failed sync ran"
        );
        w.close().await;
    }

    #[tokio::test]
    async fn each_level_sets_the_connection_and_only_full_uses_the_sync_thread() {
        for (level, pragma) in [("full", 1), ("normal", 1), ("extra", 3)] {
            let (_dir, path) = new_db();
            let used = Arc::new(AtomicBool::new(false));
            let flag = used.clone();
            let sync: SyncFn = Arc::new(move |wal: &std::fs::File| {
                flag.store(true, Ordering::SeqCst);
                sync_wal(wal)
            });
            let w =
                SqliteWriter::open_with(&path, level, Default::default(), BACKGROUND_WAIT, sync)
                    .expect("writer");
            assert_eq!(insert(&w, 1).await.expect(level), 1);
            let mode = w
                .run(|c| c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0)))
                .await
                .expect("pragma");
            assert_eq!(mode, pragma, "{level}");
            assert_eq!(used.load(Ordering::SeqCst), level == "full", "{level}");
            w.close().await;
        }
    }

    async fn keys(w: &SqliteWriter) -> Vec<i64> {
        w.run(|c| {
            let mut s = c.prepare("SELECT k FROM t ORDER BY k")?;
            s.query_map([], |r| r.get(0))?.collect()
        })
        .await
        .expect("read")
    }

    #[tokio::test]
    async fn queued_jobs_share_a_commit_and_a_failing_one_fails_alone() {
        let (_dir, w, turn) = writer();
        insert(&w, 1).await.expect("first insert");
        // Hold the write turn so the next jobs queue up behind one another.
        let held = turn.lock().await;
        let before = w.cycles.load(Ordering::Relaxed);
        let jobs: Vec<_> = [2, 1, 3, 4]
            .into_iter()
            .map(|k| tokio::spawn(insert(&w, k)))
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        let mut results = Vec::new();
        for j in jobs {
            results.push(j.await.expect("join"));
        }
        assert!(
            results[0].is_ok() && results[2].is_ok() && results[3].is_ok(),
            "{results:?}"
        );
        assert!(
            matches!(results[1], Err(StoreError::Conflict)),
            "a duplicate key is refused: {results:?}"
        );
        assert_eq!(
            keys(&w).await,
            vec![1, 2, 3, 4],
            "the other jobs' rows committed"
        );
        // One shared attempt (at most two: the first job may have been taken alone before the
        // others queued), then one transaction each after the failure.
        let used = w.cycles.load(Ordering::Relaxed) - before;
        assert!((5..=6).contains(&used), "{used} transactions");
    }

    #[tokio::test]
    async fn jobs_queued_together_commit_once() {
        let (_dir, w, turn) = writer();
        let held = turn.lock().await;
        let before = w.cycles.load(Ordering::Relaxed);
        let jobs: Vec<_> = (10..20).map(|k| tokio::spawn(insert(&w, k))).collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        for j in jobs {
            assert_eq!(j.await.expect("join").expect("insert"), 1);
        }
        let used = w.cycles.load(Ordering::Relaxed) - before;
        assert!(used <= 2, "ten queued jobs took {used} transactions");
        assert_eq!(keys(&w).await, (10..20).collect::<Vec<_>>());
    }
}
