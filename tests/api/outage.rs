//! Storage outages: PostgreSQL becomes unreachable under load (a TCP proxy in front of it is cut),
//! and a SQLite database that is locked by someone else. Webhooks answer 503 (never 200),
//! `/readyz` goes 503, nothing acknowledged is lost, and the service recovers without a restart.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::helpers::*;

/// A TCP proxy that can be cut: while down it cuts every open connection and leaves new ones
/// unanswered.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    cut: Arc<Notify>,
}

impl Proxy {
    async fn start(target: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(Notify::new());
        let (d, c) = (down.clone(), cut.clone());
        tokio::spawn(async move {
            // While down, new connections are accepted and never answered (a partition: a
            // connecting client waits for its own timeout rather than being refused at once).
            let mut held = Vec::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    held.push(inbound);
                    continue;
                }
                held.clear();
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = c.notified() => {}
                    }
                });
            }
        });
        Proxy { port, down, cut }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut.notify_waiters();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_503_and_recovers_without_restart() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let db = url.rsplit_once('/').unwrap().1.to_string();
    let user_host = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let user = user_host.split('@').next().unwrap();
    let proxied = format!("postgres://{user}@127.0.0.1:{}/{db}", proxy.port);
    let keys = new_master_keys();
    let mut raw = test_config(&proxied, &keys);
    // Work a worker had claimed when the database vanished is retried once its lease expires.
    raw.set("db_max_connections", "4")
        .set("lease_secs", "2")
        .set("storage_deadline_ms", "800");
    let app = start(
        Backend::Postgres,
        raw,
        proxied,
        keys,
        tempfile::tempdir().unwrap(),
    )
    .await;
    let ws = app.workspace("Outage").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let mut acked = HashSet::new();
    let mut refused = 0;
    let ready = |app: &TestApp| {
        let (c, b) = (app.client.clone(), app.base.clone());
        async move { c.get(format!("{b}/readyz")).send().await.unwrap().status() }
    };
    assert_eq!(ready(&app).await, StatusCode::OK);
    for i in 0..30 {
        let id = format!("before-{i}");
        let (st, _) = app
            .send_generic(&key, &secret, &id, &json!({"verbatim": id}))
            .await;
        assert_eq!(st, StatusCode::OK);
        acked.insert(id);
    }
    proxy.set_down(true);
    // Every answer comes within the storage deadline (800 ms here; the pool would wait 5 s),
    // and once the first failure opened the breaker, at once.
    let mut slowest_after_first = Duration::ZERO;
    for i in 0..30 {
        let id = format!("during-{i}");
        let asked = std::time::Instant::now();
        let (st, v) = app
            .send_generic(&key, &secret, &id, &json!({"verbatim": id}))
            .await;
        let took = asked.elapsed();
        assert!(took < Duration::from_millis(1500), "{id} took {took:?}");
        if i >= 5 {
            slowest_after_first = slowest_after_first.max(took);
        }
        assert_ne!(
            st,
            StatusCode::OK,
            "a delivery was acknowledged while the database was down: {v}"
        );
        if st == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(v["error"]["code"], "unavailable");
            refused += 1;
        }
    }
    assert_eq!(refused, 30);
    assert!(
        slowest_after_first < Duration::from_millis(500),
        "with the breaker open a 503 took {slowest_after_first:?}"
    );
    let asked = std::time::Instant::now();
    assert_eq!(ready(&app).await, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "/readyz took {:?}",
        asked.elapsed()
    );
    proxy.set_down(false);
    // Recovers by itself: readiness, new deliveries, and the backlog.
    wait_for("readiness to come back", || async {
        ready(&app).await == StatusCode::OK
    })
    .await;
    for i in 0..30 {
        let id = format!("after-{i}");
        let mut ok = false;
        for _ in 0..50 {
            let (st, _) = app
                .send_generic(&key, &secret, &id, &json!({"verbatim": id}))
                .await;
            if st == StatusCode::OK {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "{id} never accepted after recovery");
        acked.insert(id);
    }
    app.drain().await;
    let signals = app.signals(&ws).await;
    let got: HashSet<String> = signals
        .iter()
        .map(|s| s["verbatim"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got, acked,
        "every acknowledged delivery became exactly one signal"
    );
    assert_eq!(signals.len(), acked.len());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_sqlite_database_answers_503_not_200() {
    // A worker blocked by the lock gives up on its batch; the batch is retried once the lease
    // expires, so keep the lease short here.
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.set("lease_secs", "2");
    })
    .await;
    let ws = app.workspace("Locked").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let (st, _) = app
        .send_generic(&key, &secret, "ok-1", &json!({"verbatim": "ok"}))
        .await;
    assert_eq!(st, StatusCode::OK);
    // Another process holds the write lock for longer than our busy timeout.
    let path = app.db_url.trim_start_matches("sqlite://").to_string();
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
    use sqlx::ConnectOptions;
    let mut other = opts.connect().await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();
    let (st, v) = app
        .send_generic(&key, &secret, "locked-1", &json!({"verbatim": "locked"}))
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);
    let (st, _) = app
        .send_generic(&key, &secret, "locked-1", &json!({"verbatim": "locked"}))
        .await;
    assert_eq!(
        st,
        StatusCode::OK,
        "the same delivery is accepted once the lock is gone"
    );
    // Writers that were stuck behind the lock give up (busy timeout) and retry: allow for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while app.state.store.pending_count().await.unwrap() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "backlog never drained after the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.signals(&ws).await.len(), 2);
    app.stop().await;
}
