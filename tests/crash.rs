//! Crash safety: the real `signalbox serve` binary under signed load is killed with SIGKILL at
//! random moments and restarted; afterwards every delivery that got a 2xx is stored exactly once
//! and became exactly one signal. Both backends. Short by default (3 kills); set
//! `SIGNALBOX_CRASH_KILLS` and `SIGNALBOX_CRASH_SENDERS` for the long version.

#![allow(clippy::unwrap_used)]

#[path = "api/helpers.rs"]
mod helpers;

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::free_port;

use helpers::{ADMIN_TOKEN, Backend, fresh_database, generic_headers};
use rand::Rng;
use serde_json::json;

struct Server {
    port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Server {
    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_signalbox"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        for _ in 0..300 {
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{}/readyz", self.port))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not become ready");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn crash_and_recover(b: Backend, two_nodes: bool) {
    if b == Backend::Postgres && !helpers::postgres_available().await {
        return;
    }
    let (db_url, _dir) = fresh_database(b).await;
    let keys = helpers::new_master_keys();
    let node = |port: u16| Server {
        port,
        env: vec![
            ("SIGNALBOX_DATABASE_URL".into(), db_url.clone()),
            ("SIGNALBOX_BIND".into(), format!("127.0.0.1:{port}")),
            ("SIGNALBOX_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("SIGNALBOX_MASTER_KEYS".into(), keys.clone()),
            ("SIGNALBOX_LEASE_SECS".into(), "2".into()),
            ("SIGNALBOX_POLL_INTERVAL_MS".into(), "100".into()),
        ],
        child: None,
    };
    let port = free_port();
    let mut server = node(port);
    // Multi-node: a second, independent node on the same database shares the load.
    let mut second = two_nodes.then(|| node(free_port()));
    signalbox::state::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    server.spawn();
    server.wait_ready(&client).await;
    if let Some(n) = second.as_mut() {
        n.spawn();
        n.wait_ready(&client).await;
    }
    let base = format!("http://127.0.0.1:{port}");
    let bases: Vec<String> = std::iter::once(base.clone())
        .chain(
            second
                .as_ref()
                .map(|n| format!("http://127.0.0.1:{}", n.port)),
        )
        .collect();
    let ws: serde_json::Value = client
        .post(format!("{base}/api/v1/workspaces"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "crash"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ws = ws["id"].as_str().unwrap().to_string();
    let key: serde_json::Value = client
        .post(format!("{base}/api/v1/workspaces/{ws}/webhook-keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key_id, secret) = (
        key["id"].as_str().unwrap().to_string(),
        key["secret"].as_str().unwrap().to_string(),
    );

    let acked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders = env_num("SIGNALBOX_CRASH_SENDERS", 8);
    let mut tasks = Vec::new();
    for s in 0..senders {
        let base = bases[s as usize % bases.len()].clone();
        let (client, key_id, secret) = (client.clone(), key_id.clone(), secret.clone());
        let (acked, sent, stop) = (acked.clone(), sent.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("s{s}-{i}");
                let body = json!({"verbatim": format!("crash test {id}")})
                    .to_string()
                    .into_bytes();
                let headers = generic_headers(&secret, &id, signalbox::clock::now_secs(), &body);
                let mut req = client
                    .post(format!("{base}/api/webhooks/signals?key_id={key_id}"))
                    .body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().unwrap().insert(id);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    let kills = env_num("SIGNALBOX_CRASH_KILLS", 3);
    if let Some(n) = second.as_mut() {
        // Kill the second node for good mid-way: its share of the load fails over to nothing
        // (senders see errors), and whatever it had claimed is taken over by the first node.
        tokio::time::sleep(Duration::from_millis(500)).await;
        n.kill();
    }
    for _ in 0..kills {
        let wait = rand::thread_rng().gen_range(200..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill();
        server.spawn();
        server.wait_ready(&client).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());

    // Verify on the database once everything is processed.
    let mut raw = signalbox::config::RawConfig::defaults();
    raw.set("database_url", &db_url).set("master_keys", &keys);
    let store = signalbox::store::Store::connect(&raw.build().unwrap())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while store.pending_count().await.unwrap() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "backlog never drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut delivered = HashSet::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_deliveries(&signalbox::store::DeliveryFilter {
                workspace_id: Some(ws.clone()),
                cursor: cursor.clone(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        for d in &page {
            assert_eq!(d.status, "processed", "{d:?}");
            assert!(d.signal_id.is_some());
            assert!(
                delivered.insert(d.dedupe_key.clone()),
                "delivery {} stored twice",
                d.dedupe_key
            );
        }
        if page.len() < 1000 {
            break;
        }
        cursor = page.last().map(|d| d.id.clone());
    }
    let lost: Vec<_> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged deliveries lost: {lost:?}",
        lost.len()
    );
    let signals = store.count_signals(Some(&ws)).await.unwrap();
    assert_eq!(
        signals,
        delivered.len() as i64,
        "one signal per stored delivery"
    );
    let created = store
        .scalar_i64("SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.created'")
        .await
        .unwrap();
    assert_eq!(created, signals, "one signal.created entry per signal");
    eprintln!(
        "crash test ({b:?}, two nodes: {two_nodes}): {kills} kills survived, {} requests sent, {} acked, {} stored, {signals} signals, 0 lost, 0 duplicated",
        sent.load(Ordering::Relaxed),
        acked.len(),
        delivered.len()
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_under_load_loses_nothing_sqlite() {
    crash_and_recover(Backend::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_under_load_loses_nothing_postgres() {
    crash_and_recover(Backend::Postgres, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_postgres_one_killed_lose_and_duplicate_nothing() {
    crash_and_recover(Backend::Postgres, true).await;
}
