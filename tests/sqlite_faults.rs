//! SQLite storage faults. A full disk: the database lives on a small tmpfs that is filled until
//! writes fail, then freed. While full, webhooks answer 503 (never 200 for something not stored)
//! and `/readyz` answers 503; once space is back the service recovers by itself (no restart),
//! and every delivery that got a 200 is stored (needs root to mount the tmpfs; elsewhere these
//! say SKIPPED loudly). An outgrown WAL: once nothing pins it any more it is cut back to its
//! limit instead of keeping its largest size until a clean stop.

#![allow(clippy::unwrap_used)]

#[path = "api/helpers.rs"]
mod helpers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use helpers::{Backend, new_master_keys, start, test_config};
use reqwest::StatusCode;
use serde_json::json;

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct SmallDisk {
    path: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk {
                path,
                _parent: parent,
            }),
            Ok(o) => {
                eprintln!(
                    "\n*** SKIPPED: cannot mount a tmpfs (needs root): {} ***\n",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("\n*** SKIPPED: cannot run mount: {e} ***\n");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the filesystem of `dir` with `file`, leaving about `leave` bytes free.
fn fill(dir: &Path, file: &Path, leave: u64) {
    use std::io::Write;
    let free = free_bytes(dir);
    let mut f = std::fs::File::create(file).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut left = free.saturating_sub(leave);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = f.sync_all();
}

/// Appends to `file` until the filesystem refuses.
fn top_up(file: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_recovers_by_itself() {
    let Some(disk) = SmallDisk::mount("16m") else {
        return;
    };
    let dir = tempfile::tempdir_in(&disk.path).unwrap();
    let url = format!("sqlite://{}", dir.path().join("signalbox.db").display());
    let keys = new_master_keys();
    let raw = test_config(&url, &keys);
    let app = start(Backend::Sqlite, raw, url, keys, dir).await;
    let ws = app.workspace("Full").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let padding = "x".repeat(1500);
    let mut acked = Vec::new();
    let mut n = 0u64;
    let send = |n: u64| {
        let body = json!({"verbatim": format!("feedback {n} {padding}"), "source_ref": format!("ref-{n}")});
        let (app, key, secret) = (&app, key.clone(), secret.clone());
        async move {
            app.send_generic(&key, &secret, &format!("msg-{n}"), &body)
                .await
        }
    };
    // Some deliveries while there is space.
    for _ in 0..20 {
        n += 1;
        let (st, v) = send(n).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        acked.push(n);
    }
    let filler = disk.path.join("filler");
    fill(&disk.path, &filler, 256 * 1024);

    // Until the disk is full: 200s for what was stored, then 503s, never anything else.
    let started = Instant::now();
    let mut unavailable = 0;
    while unavailable < 5 && started.elapsed() < Duration::from_secs(60) {
        n += 1;
        let (st, v) = send(n).await;
        match st {
            StatusCode::OK => acked.push(n),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(v["error"]["code"], "unavailable", "{v}");
                if unavailable == 0 {
                    eprintln!("first refusal after {n}: {v}");
                    // Take what is left too, so that no checkpoint can complete (it would grow
                    // the database file) and the WAL cannot start over in its own space: the
                    // disk stays full until the test frees it.
                    top_up(&filler);
                }
                unavailable += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(unavailable >= 5, "the disk never filled ({n} sent)");
    // While full, `/readyz` answers 503 and says why (the free space is below the floor
    // whatever SQLite can still fit into its WAL).
    let ready = app
        .client
        .get(format!("{}/readyz", app.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz while the disk is full"
    );
    let v: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(v, json!({"status": "unavailable", "reason": "disk_full"}));

    // Space comes back: writes succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let mut recovered = false;
    while freed.elapsed() < Duration::from_secs(30) {
        n += 1;
        let (st, _) = send(n).await;
        if st == StatusCode::OK {
            acked.push(n);
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "no write succeeded within 30 s of freeing space");
    let recovery = freed.elapsed();
    for _ in 0..20 {
        n += 1;
        let (st, v) = send(n).await;
        assert_eq!(st, StatusCode::OK, "after recovery: {v}");
        acked.push(n);
    }
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::OK, "/readyz after recovery");

    // Nothing acknowledged was lost.
    app.drain().await;
    let stored = app.count("SELECT COUNT(*) FROM deliveries").await;
    assert_eq!(stored, acked.len() as i64, "every 200 is a stored delivery");
    let signals = app.signals(&ws).await.len();
    assert!(signals > 0);
    eprintln!(
        "disk full: {} acked, {unavailable} refused while full, recovered {recovery:?} after space came back",
        acked.len()
    );
    app.stop().await;
    drop(disk);
}

/// The wedge: a pooled connection whose COMMIT failed with `SQLITE_FULL` must not keep a
/// transaction (and the WAL write lock) open once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_failed_on_a_full_disk_leaves_no_lock_behind() {
    let Some(disk) = SmallDisk::mount("16m") else {
        return;
    };
    let dir = tempfile::tempdir_in(&disk.path).unwrap();
    let url = format!("sqlite://{}", dir.path().join("signalbox.db").display());
    let keys = new_master_keys();
    let app = start(Backend::Sqlite, test_config(&url, &keys), url, keys, dir).await;
    let ws = app.workspace("Wedge").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let signalbox::store::Pool::Sqlite(pool) = app.state.store.pool().clone() else {
        unreachable!()
    };
    let filler = disk.path.join("filler");
    fill(&disk.path, &filler, 64 * 1024);
    // A pool transaction (like the batched `last_used_at` flush) whose COMMIT needs more space
    // than is left.
    let mut failed = 0;
    for _ in 0..4 {
        let mut tx = pool.begin().await.unwrap();
        let wrote = sqlx::query("INSERT INTO readiness_probe (id, at) VALUES (7, zeroblob(1048576)) ON CONFLICT (id) DO UPDATE SET at = excluded.at")
            .execute(&mut *tx)
            .await;
        let committed = match wrote {
            Ok(_) => tx.commit().await,
            Err(e) => Err(e),
        };
        if committed.is_err() {
            failed += 1;
        }
    }
    assert!(failed > 0, "the disk never refused the write");
    std::fs::remove_file(&filler).unwrap();
    // Every pooled connection is used for a write-then-rollback (as the readiness probe does)
    // and then a commit: none may still hold the write lock.
    for _ in 0..16 {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO readiness_probe (id, at) VALUES (8, 1) ON CONFLICT (id) DO UPDATE SET at = excluded.at")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    let started = Instant::now();
    let body = json!({"verbatim": "after the disk filled"});
    let (st, v) = tokio::time::timeout(
        Duration::from_secs(8),
        app.send_generic(&key, &secret, "msg-after", &body),
    )
    .await
    .expect("a write hung behind a lock left by the failed commit");
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the write waited {:?} for a lock",
        started.elapsed()
    );
    app.stop().await;
    drop(disk);
}

/// A reader that keeps an old snapshot stops checkpoints from catching up, and the WAL grows;
/// once the reader is gone the WAL is cut back to its limit while writes go on (not only at a
/// clean stop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outgrown_wal_is_cut_back_once_nothing_pins_it() {
    const LIMIT: u64 = 16 << 20;
    let (url, dir) = helpers::fresh_database(Backend::Sqlite).await;
    let path = dir.path().join("signalbox.db");
    let wal = dir.path().join("signalbox.db-wal");
    let keys = new_master_keys();
    let app = start(Backend::Sqlite, test_config(&url, &keys), url, keys, dir).await;
    let ws = app.workspace("Pinned").await;
    let (key, secret) = app.webhook_key(&ws).await;
    // Another process's long read transaction.
    let reader = rusqlite::Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))
        .unwrap();
    let padding = "z".repeat(16_000);
    let wal_size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let mut n = 0u64;
    let send_some = |from: u64, count: u64| {
        let (app, key, secret, padding) = (&app, &key, &secret, &padding);
        futures::future::join_all((from..from + count).map(move |i| async move {
            let body = json!({"verbatim": format!("{i} {padding}")});
            let (st, v) = app
                .send_generic(key, secret, &format!("w-{i}"), &body)
                .await;
            assert_eq!(st, StatusCode::OK, "{v}");
        }))
    };
    let started = Instant::now();
    while wal_size() < LIMIT + (8 << 20) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the WAL did not outgrow its limit"
        );
        send_some(n, 16).await;
        n += 16;
    }
    let grown = wal_size();
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    // Writes go on; the WAL comes back to its limit.
    let released = Instant::now();
    let mut smallest = grown;
    while released.elapsed() < Duration::from_secs(20) && smallest > LIMIT {
        send_some(n, 4).await;
        n += 4;
        smallest = smallest.min(wal_size());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "WAL grew to {} MiB behind the reader; {} MiB {:?} after it ended",
        grown >> 20,
        smallest >> 20,
        released.elapsed()
    );
    assert!(
        smallest <= LIMIT,
        "the WAL stayed at {} MiB after the reader ended (limit {} MiB)",
        smallest >> 20,
        LIMIT >> 20
    );
    app.stop().await;
}
