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

mod durability;
mod rows;

use durability::*;
pub(super) use rows::{ApplyItem, InsertRow};
use rows::{apply, claim, insert_deliveries};

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
/// Without this wait the inbox and the workers' outcomes would take turns: an outcome batch
/// arriving while an inbox batch commits would commit alone, and every delivery would pay for
/// two commits (two fsyncs, two sets of index tail pages).
/// An inbox batch arrives within a millisecond or two under load; when none comes (no
/// traffic) the background jobs commit after this wait.
const BACKGROUND_WAIT: Duration = Duration::from_millis(2);

/// At most this many queued jobs share one commit.
const MAX_JOBS_PER_COMMIT: usize = 64;

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
            // allocating thread's heap late and cold.
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
/// sub-journal, which is costly on this thread; a failed job is rare enough to re-run the
/// others alone.)
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
