//! How the SQLite writer's commits become durable: the WAL fsync on its own thread (group sync,
//! so the writer commits the next batch meanwhile and answers wait for a sync that covers
//! them), the checkpointer thread, the WAL's size limits, and how an fsync or I/O error or a
//! full disk stops or flags the writer.

use super::*;

/// The writer connection checkpoints by itself only past this many WAL pages (16 MiB); the
/// checkpointer thread normally keeps the WAL well below it.
pub(super) const WAL_BACKSTOP_PAGES: u32 = 4000;

/// The WAL file's size limit: a WAL that restarts is cut back to it (`journal_size_limit`).
pub(super) const WAL_LIMIT_BYTES: i64 = 16 << 20;

/// How long a truncating checkpoint of an outgrown WAL may make the writer wait. Passive
/// checkpoints never catch up while commits keep coming or a reader pins an old snapshot, and a
/// WAL that never completes a checkpoint never restarts, so it grows without bound; past the
/// backstop the checkpointer takes the write lock for at most this long to copy the rest and
/// truncate it, and tries again later if a reader is still in the way.
pub(super) const TRUNCATE_WAIT: Duration = Duration::from_millis(100);

/// Least time between two truncation attempts.
pub(super) const TRUNCATE_EVERY: Duration = Duration::from_secs(1);

/// Starts the checkpointer: a thread with its own connection that copies committed WAL pages
/// into the database file (`PRAGMA wal_checkpoint(PASSIVE)`) after the writer commits.
///
/// SQLite's automatic checkpoint runs inside the committing connection, so the writer thread —
/// the one serial resource of the SQLite backend — would spend its time copying pages and
/// waiting for the database file's fsync, and stall some commits. A passive
/// checkpoint never blocks the writer (nor waits for it), so it can run on the other core. The
/// returned sender is the writer's "I committed" signal; the thread ends when it is dropped.
pub(super) fn start_checkpointer(
    path: &Path,
    failed: Arc<AtomicBool>,
) -> Result<Checkpointer, StoreError> {
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
pub(super) fn truncate_wal(conn: &Connection, failed: &AtomicBool) {
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
pub(super) struct Checkpointer {
    pub(super) tx: mpsc::SyncSender<()>,
    pub(super) thread: std::thread::JoinHandle<()>,
}

/// How a committed cycle becomes durable before its callers are answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Durability {
    /// `synchronous = full`: the WAL is fsynced by the [`Syncer`] thread, off the writer's path.
    GroupSync,
    /// `normal` or `extra`: SQLite's own setting, inside COMMIT.
    Sqlite(&'static str),
}

impl Durability {
    pub(super) fn of(synchronous: &str) -> Durability {
        match synchronous {
            "normal" => Durability::Sqlite("NORMAL"),
            "extra" => Durability::Sqlite("EXTRA"),
            _ => Durability::GroupSync,
        }
    }

    /// The connection's `PRAGMA synchronous`.
    pub(super) fn pragma(self) -> &'static str {
        match self {
            // Commits only write their frames; the syncer thread fsyncs them.
            Durability::GroupSync => "NORMAL",
            Durability::Sqlite(level) => level,
        }
    }
}

/// Makes the WAL durable; the tests replace it to slow it down or make it fail.
pub(super) type SyncFn = Arc<dyn Fn(&std::fs::File) -> std::io::Result<()> + Send + Sync>;

/// fsyncs the WAL file (fdatasync: a grown file's size is flushed with it).
pub(super) fn sync_wal(wal: &std::fs::File) -> std::io::Result<()> {
    wal.sync_data()
}

/// Opens the WAL file of `conn`'s database for the sync thread, once: a descriptor opened
/// later would not report a write-back error that another descriptor (the checkpointer's)
/// had already seen, and SQLite keeps this file (it deletes it only when the last connection
/// closes, after the sync thread has stopped).
pub(super) fn open_wal(conn: &Connection) -> Result<std::fs::File, StoreError> {
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
pub(super) fn note_io_error(e: &rusqlite::Error, failed: &AtomicBool, whose: &str) {
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
pub(super) fn note_full(e: &rusqlite::Error, full: &AtomicBool) {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
        && !full.swap(true, Ordering::AcqRel)
    {
        tracing::error!(error = %e, "the SQLite disk is full; writes answer 503 until space is freed");
    }
}

/// The group-sync thread (`synchronous = full`, the default).
///
/// With SQLite's own `FULL`, COMMIT fsyncs the WAL on the writer thread — the backend's one
/// serial resource — which would sit idle for each fsync, a large part of a cycle under load,
/// while the next requests queue behind it. Instead the writer connection commits with `NORMAL` (its frames are written to the WAL
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
pub(super) struct Syncer {
    pub(super) tx: mpsc::Sender<Vec<Box<dyn Job>>>,
    pub(super) thread: std::thread::JoinHandle<()>,
}

impl Syncer {
    pub(super) fn start(
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
pub(super) const STOPPED: &str = "an earlier fsync or I/O error stopped the writer";

/// The error a job gets when its commit could not be made durable.
pub(super) fn sync_failure(e: &std::io::Error) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
        Some(format!("the SQLite WAL could not be synced to disk: {e}")),
    )
}
