//! Test harness: `spawn_app(backend)` starts the real server on port 0 over a fresh database
//! (a temp SQLite file, or a new PostgreSQL database), with its own master key and admin token.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signalbox::config::RawConfig;
use signalbox::crypto::MasterKey;
use signalbox::protocol::standard_webhooks;
use signalbox::{app::Application, state::AppState};
use tokio::sync::oneshot;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named `async fn name(backend: Backend)` once per backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            }
        )*
    };
}

/// The PostgreSQL server used by tests.
pub fn postgres_admin_url() -> String {
    std::env::var("SIGNALBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Creates a fresh PostgreSQL database and returns its URL; `None` (with a loud message) when
/// PostgreSQL is unreachable outside CI. In CI (`CI=true`) an unreachable server fails the test.
pub async fn fresh_postgres_url() -> Option<String> {
    let admin = postgres_admin_url();
    let conn = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&admin)
        .await;
    let pool = match conn {
        Ok(p) => p,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("PostgreSQL at {admin} is unreachable in CI: {e}");
            }
            eprintln!(
                "\n*** SKIPPED: PostgreSQL at {admin} is unreachable ({e}); set SIGNALBOX_TEST_POSTGRES_URL ***\n"
            );
            return None;
        }
    };
    let name = format!(
        "sbx_test_{}",
        signalbox::ids::new_id("db").trim_start_matches("db_")
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin.clone());
    Some(format!("{base}/{name}"))
}

/// Drops the test database behind `url` (a finished test's; a failed test keeps its database
/// for inspection).
pub async fn drop_postgres_database(url: &str) {
    let Some((_, name)) = url.rsplit_once('/') else {
        return;
    };
    if !name.starts_with("sbx_test_") {
        return;
    }
    let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_admin_url())
        .await
    else {
        return;
    };
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await;
    pool.close().await;
}

/// A fresh database URL for `backend` (and the temp dir holding it, for SQLite).
pub async fn fresh_database(backend: Backend) -> Option<(String, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("signalbox.db").display()),
        Backend::Postgres => fresh_postgres_url().await?,
    };
    Some((url, dir))
}

/// Runs one statement on `store`'s database (to write rows as an older release did).
pub async fn exec_sql(store: &signalbox::store::Store, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match store.pool() {
        signalbox::store::Pool::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        signalbox::store::Pool::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }
    .unwrap();
}

/// A running app.
pub struct TestApp {
    pub backend: Backend,
    pub base: String,
    pub state: AppState,
    pub client: reqwest::Client,
    pub db_url: String,
    pub master_keys: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
}

/// Base configuration of a test app (port 0, fast polling, explicit keys).
pub fn test_config(db_url: &str, master_keys: &str) -> RawConfig {
    let mut raw = RawConfig::defaults();
    raw.set("database_url", db_url)
        .set("bind", "127.0.0.1:0")
        .set("admin_token", ADMIN_TOKEN)
        .set("master_keys", master_keys)
        .set("poll_interval_ms", "100")
        .set("retry_base_delay_ms", "50")
        .set("retry_max_delay_secs", "1")
        .set("worker_concurrency", "2")
        .set("shutdown_timeout_secs", "5")
        .set("db_max_connections", "9");
    raw
}

/// A fresh `SIGNALBOX_MASTER_KEYS` value (one key, `k1`).
pub fn new_master_keys() -> String {
    use secrecy::ExposeSecret;
    MasterKey::generate("k1")
        .to_spec()
        .expose_secret()
        .to_string()
}

/// Starts an app on a fresh database; `None` when the backend is unavailable (outside CI).
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

/// Like [`spawn_app`], with extra configuration.
pub async fn spawn_app_with(
    backend: Backend,
    tweak: impl FnOnce(&mut RawConfig),
) -> Option<TestApp> {
    let (url, dir) = fresh_database(backend).await?;
    let spec = new_master_keys();
    let mut raw = test_config(&url, &spec);
    tweak(&mut raw);
    Some(start(backend, raw, url, spec, dir).await)
}

/// Starts an app from a complete raw config.
pub async fn start(
    backend: Backend,
    raw: RawConfig,
    db_url: String,
    master_keys: String,
    dir: tempfile::TempDir,
) -> TestApp {
    let cfg = raw.build().unwrap();
    let app = Application::build(cfg).await.unwrap();
    let addr = app.local_addr();
    let state = app.state().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        backend,
        base: format!("http://{addr}"),
        state,
        client: reqwest::Client::new(),
        db_url,
        master_keys,
        shutdown: Some(tx),
        handle: Some(handle),
        dir,
    }
}

impl TestApp {
    /// Stops the app gracefully and waits for it.
    pub async fn stop(self) {
        let (backend, url) = (self.backend, self.db_url.clone());
        self.stop_keep_dir().await;
        if backend == Backend::Postgres {
            drop_postgres_database(&url).await;
        }
    }

    /// Stops the app and hands back its temp dir (so a restart can reuse a SQLite file).
    pub async fn stop_keep_dir(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
        self.dir
    }

    /// An admin API call with the global token.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.api_as(ADMIN_TOKEN, method, path, body).await
    }

    /// An admin API call with `token`.
    pub async fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .client
            .request(m, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a workspace; returns its id.
    pub async fn workspace(&self, name: &str) -> String {
        let (st, v) = self
            .api("POST", "/api/v1/workspaces", Some(json!({"name": name})))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// Creates a webhook key; returns (id, secret).
    pub async fn webhook_key(&self, ws: &str) -> (String, String) {
        let (st, v) = self
            .api(
                "POST",
                &format!("/api/v1/workspaces/{ws}/webhook-keys"),
                Some(json!({})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        (
            v["id"].as_str().unwrap().into(),
            v["secret"].as_str().unwrap().into(),
        )
    }

    /// Creates an integration; returns its JSON.
    pub async fn integration(&self, ws: &str, body: Value) -> Value {
        let (st, v) = self
            .api(
                "POST",
                &format!("/api/v1/workspaces/{ws}/integrations"),
                Some(body),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v
    }

    /// Posts raw bytes with headers to `path`.
    pub async fn post_raw(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Sends a signed generic delivery.
    pub async fn send_generic(
        &self,
        key_id: &str,
        secret: &str,
        msg_id: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        let bytes = body.to_string().into_bytes();
        let ts = signalbox::clock::now_secs();
        let headers = generic_headers(secret, msg_id, ts, &bytes);
        self.post_raw(
            &format!("/api/webhooks/signals?key_id={key_id}"),
            &headers,
            bytes,
        )
        .await
    }

    /// `SELECT COUNT(*) …` on the app's database.
    pub async fn count(&self, sql: &'static str) -> i64 {
        self.state.store.scalar_i64(sql).await.unwrap()
    }

    /// Mints a workspace-scoped token for `ws`: (id, token).
    pub async fn token(&self, ws: &str) -> (String, String) {
        let (st, v) = self
            .api(
                "POST",
                &format!("/api/v1/workspaces/{ws}/tokens"),
                Some(json!({"name": "test"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap().to_string(),
        )
    }

    /// Waits until no delivery is pending (the pipeline drained).
    pub async fn drain(&self) {
        wait_for("the inbox to drain", || async {
            self.state.store.pending_count().await.unwrap() == 0
        })
        .await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Signals of a workspace via the API.
    pub async fn signals(&self, ws: &str) -> Vec<Value> {
        let (st, v) = self
            .api(
                "GET",
                &format!("/api/v1/workspaces/{ws}/signals?limit=500"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["items"].as_array().unwrap().clone()
    }
}

/// Standard Webhooks headers for a body.
pub fn generic_headers(
    secret: &str,
    msg_id: &str,
    ts: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let key = standard_webhooks::decode_secret(secret).unwrap();
    vec![
        ("webhook-id", msg_id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        (
            "webhook-signature",
            standard_webhooks::sign(&key, msg_id, ts, body),
        ),
    ]
}

/// Polls `cond` until true (10 s at most, else panics naming `what`).
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
