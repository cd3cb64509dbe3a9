//! Test harness: `spawn_app(backend)` starts the real server on port 0 over a fresh database
//! (a temp SQLite file, or a new PostgreSQL database), with its own master key and admin token.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signalbox::config::RawConfig;
use signalbox::crypto::MasterKey;
use signalbox::protocol::{pylon, slack, standard_webhooks};
use signalbox::{app::Application, state::AppState};
use tokio::sync::oneshot;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named `async fn name(backend: Backend)` once per backend. The PostgreSQL run
/// returns early (loudly) when PostgreSQL is unreachable outside CI, so the test body can
/// spawn its app unconditionally.
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
                    if $crate::helpers::postgres_available().await {
                        super::$name($crate::helpers::Backend::Postgres).await
                    }
                }
            }
        )*
    };
}

/// Runs each named `async fn name(backend: Backend)` on SQLite only: for behaviour decided
/// before the store is reached (request parsing, signature checks, HTTP limits and timeouts,
/// the OpenAPI document, routing errors), which cannot differ between the backends.
#[macro_export]
macro_rules! sqlite_only {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Backend::Sqlite).await
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

/// A one-connection pool on the test PostgreSQL server; `None` (with a loud message) when it is
/// unreachable outside CI. In CI (`CI=true`) an unreachable server fails the test.
async fn admin_pool() -> Option<sqlx::PgPool> {
    let admin = postgres_admin_url();
    let conn = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&admin)
        .await;
    match conn {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("PostgreSQL at {admin} is unreachable in CI: {e}");
            }
            eprintln!(
                "\n*** SKIPPED: PostgreSQL at {admin} is unreachable ({e}); set SIGNALBOX_TEST_POSTGRES_URL ***\n"
            );
            None
        }
    }
}

/// Whether the test PostgreSQL server answers (see [`admin_pool`]).
pub async fn postgres_available() -> bool {
    match admin_pool().await {
        Some(pool) => {
            pool.close().await;
            true
        }
        None => false,
    }
}

/// Creates a fresh PostgreSQL database and returns its URL; `None` when PostgreSQL is
/// unreachable outside CI (see [`admin_pool`]).
pub async fn fresh_postgres_url() -> Option<String> {
    let admin = postgres_admin_url();
    let pool = admin_pool().await?;
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

/// A fresh database URL for `backend` (and the temp dir holding it, for SQLite). For
/// PostgreSQL the caller has checked [`postgres_available`] (as [`both_backends!`] does).
pub async fn fresh_database(backend: Backend) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("signalbox.db").display()),
        Backend::Postgres => fresh_postgres_url()
            .await
            .expect("PostgreSQL became unreachable during the test"),
    };
    (url, dir)
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

/// Starts an app on a fresh database.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Like [`spawn_app`], with extra configuration.
pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut RawConfig)) -> TestApp {
    let (url, dir) = fresh_database(backend).await;
    let spec = new_master_keys();
    let mut raw = test_config(&url, &spec);
    tweak(&mut raw);
    start(backend, raw, url, spec, dir).await
}

/// An app with one workspace, "Acme": (app, workspace id).
pub async fn app_with_workspace(backend: Backend) -> (TestApp, String) {
    let app = spawn_app(backend).await;
    let ws = app.workspace("Acme").await;
    (app, ws)
}

/// An app with workspace "Acme" and one webhook key: (app, workspace id, key id, secret).
pub async fn app_with_key(backend: Backend) -> (TestApp, String, String, String) {
    let (app, ws) = app_with_workspace(backend).await;
    let (key, secret) = app.webhook_key(&ws).await;
    (app, ws, key, secret)
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

    /// Creates an integration; returns its id.
    pub async fn integration_id(&self, ws: &str, body: Value) -> String {
        self.integration(ws, body).await["id"]
            .as_str()
            .unwrap()
            .to_string()
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

    /// A GET of `path` without a token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
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

/// Every operation of the OpenAPI document the router is built from: (method, path template,
/// operation).
pub fn documented_operations() -> Vec<(&'static str, String, utoipa::openapi::path::Operation)> {
    let doc = signalbox::http::api::document();
    let mut out = Vec::new();
    for (path, item) in &doc.paths.paths {
        let ops = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
            ("HEAD", &item.head),
            ("OPTIONS", &item.options),
            ("TRACE", &item.trace),
        ];
        for (method, op) in ops {
            if let Some(op) = op {
                out.push((method, path.clone(), op.clone()));
            }
        }
    }
    out
}

/// One of each thing an admin route can name, all in workspace "Acme": a webhook key, a
/// delivery sent with it (processed) and its signal, a Pylon integration and a token.
pub struct Fixture {
    pub ws: String,
    pub key: String,
    pub secret: String,
    pub delivery: String,
    pub signal: String,
    pub integration: String,
    pub token: String,
}

impl Fixture {
    /// Creates them on `app`.
    pub async fn create(app: &TestApp) -> Fixture {
        let (ws, key, secret) = {
            let ws = app.workspace("Acme").await;
            let (key, secret) = app.webhook_key(&ws).await;
            (ws, key, secret)
        };
        let body = json!({"verbatim": format!("fixture {}", uniq())});
        let (st, v) = app.send_generic(&key, &secret, &uniq(), &body).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        app.drain().await;
        let delivery = deliveries(app, "").await[0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let signal = app.signals(&ws).await[0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let integration = app
            .integration_id(
                &ws,
                json!({"platform": "pylon", "name": "P", "webhook_secret": "fixture-pylon-secret"}),
            )
            .await;
        let (token, _) = app.token(&ws).await;
        Fixture {
            ws,
            key,
            secret,
            delivery,
            signal,
            integration,
            token,
        }
    }

    /// The id `kind` (a path segment: `workspaces`, `webhook-keys`, …) names.
    pub fn id(&self, kind: &str) -> &str {
        match kind {
            "workspaces" => &self.ws,
            "webhook-keys" => &self.key,
            "integrations" => &self.integration,
            "tokens" => &self.token,
            "signals" => &self.signal,
            "deliveries" => &self.delivery,
            other => panic!("the fixture has no {other}"),
        }
    }

    /// A path template of the OpenAPI document with its parameters filled: `{ws}` with the
    /// workspace, `{integration_id}` with the integration, `{id}` with the id of what the
    /// segment before it names.
    pub fn fill(&self, template: &str) -> String {
        let segments: Vec<&str> = template.split('/').collect();
        let mut out = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            out.push(match *seg {
                "{ws}" => self.ws.clone(),
                "{integration_id}" => self.integration.clone(),
                "{id}" => self.id(segments[i - 1]).to_string(),
                s => {
                    assert!(!s.contains('{'), "unknown parameter {s} in {template}");
                    s.to_string()
                }
            });
        }
        out.join("/")
    }
}

// ------------------------------------------------------------------------------------- Slack

pub const SLACK_EVENTS: &str = "/api/webhooks/slack/events";
pub const SLACK_APP_ID: &str = "A0SIGNALBOX";

pub fn now() -> i64 {
    signalbox::clock::now_secs()
}

/// The per-customer URL of an integration.
pub fn url_for(integration: &Value) -> String {
    format!(
        "{SLACK_EVENTS}?integration_id={}",
        integration["id"].as_str().unwrap()
    )
}

/// Sets (or, for `null`, removes) each key of `extra` in the object `target`.
pub fn merge(target: &mut Value, extra: Value) {
    let (Some(t), Value::Object(extra)) = (target.as_object_mut(), extra) else {
        return;
    };
    for (k, v) in extra {
        if v.is_null() {
            t.remove(&k);
        } else {
            t.insert(k, v);
        }
    }
}

/// An `event_callback` envelope around `event`, shaped like Slack's documented example.
pub fn envelope(team: &str, event_id: &str, event: Value) -> Value {
    json!({
        "token": "XXYYZZ",
        "team_id": team,
        "api_app_id": SLACK_APP_ID,
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1_700_000_000,
        "authorizations": [{
            "enterprise_id": null,
            "team_id": team,
            "user_id": "U0SBXBOT",
            "is_bot": true,
            "is_enterprise_install": false
        }],
        "is_ext_shared_channel": false,
        "event_context": "4-eyJldCI6Im1lc3NhZ2UiLCJ0aWQiOiJUMSJ9"
    })
}

/// A channel `message` event inside an envelope; `extra` is merged into the event (a `null`
/// value removes the field).
pub fn message(
    team: &str,
    channel: &str,
    user: &str,
    text: &str,
    ts: &str,
    event_id: &str,
    extra: Value,
) -> Value {
    let mut event = json!({
        "type": "message",
        "channel": channel,
        "user": user,
        "text": text,
        "ts": ts,
        "event_ts": ts,
        "channel_type": "channel",
        "client_msg_id": format!("cm-{event_id}")
    });
    merge(&mut event, extra);
    envelope(team, event_id, event)
}

/// Slack's two signing headers for `body` at `ts`.
pub fn slack_headers(secret: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("x-slack-request-timestamp", ts.to_string()),
        (
            "x-slack-signature",
            slack::sign(secret.as_bytes(), ts, body),
        ),
    ]
}

/// Posts raw `body` to `path`, signed with `secret` at `ts`, plus `extra` headers.
pub async fn send_bytes(
    app: &TestApp,
    path: &str,
    secret: &str,
    ts: i64,
    body: Vec<u8>,
    extra: &[(&'static str, String)],
) -> (StatusCode, Value) {
    let mut headers = slack_headers(secret, ts, &body);
    headers.extend_from_slice(extra);
    app.post_raw(path, &headers, body).await
}

/// Posts `body` to `path` signed (now) with `secret`, plus `extra` headers.
pub async fn send_slack(
    app: &TestApp,
    path: &str,
    secret: &str,
    body: &Value,
    extra: &[(&'static str, String)],
) -> (StatusCode, Value) {
    send_bytes(
        app,
        path,
        secret,
        now(),
        body.to_string().into_bytes(),
        extra,
    )
    .await
}

/// Sends and expects a fresh `200 {"ok": true}`.
pub async fn send_ok(app: &TestApp, path: &str, secret: &str, body: &Value) {
    let (st, v) = send_slack(app, path, secret, body, &[]).await;
    assert_eq!((st, &v), (StatusCode::OK, &json!({"ok": true})), "{body}");
}

/// Mounts the Slack Web API calls that enrich a message on `slack`: users.info (user
/// U0JANE, "Jane Doe"; only for bearer `token` when one is given), conversations.info
/// (C0FEED, "feedback") and chat.getPermalink (answering `permalink`).
pub async fn mount_slack_names(slack: &wiremock::MockServer, token: Option<&str>, permalink: &str) {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, ResponseTemplate};
    let mut users = Mock::given(method("POST")).and(path("/users.info"));
    if let Some(token) = token {
        users = users.and(header("authorization", format!("Bearer {token}").as_str()));
    }
    users
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"ok": true, "user": {"id": "U0JANE", "name": "jane", "profile": {"display_name": "Jane Doe"}}}),
        ))
        .mount(slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/conversations.info"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"ok": true, "channel": {"id": "C0FEED", "name": "feedback"}}),
            ),
        )
        .mount(slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/chat.getPermalink"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"ok": true, "permalink": permalink})),
        )
        .mount(slack)
        .await;
}

/// Creates a Slack integration for `team` in `ws`; `extra` is merged into the request.
pub async fn slack_integration(app: &TestApp, ws: &str, team: &str, extra: Value) -> Value {
    let mut body =
        json!({"platform": "slack", "name": format!("Slack {team}"), "slack_team_id": team});
    merge(&mut body, extra);
    app.integration(ws, body).await
}

/// `GET /api/v1/deliveries?{query}`.
pub async fn deliveries(app: &TestApp, query: &str) -> Vec<Value> {
    let (st, v) = app
        .api(
            "GET",
            &format!("/api/v1/deliveries?limit=500&{query}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().clone()
}

/// The delivery with dedupe key `key` among `list`.
pub fn delivery<'a>(list: &'a [Value], key: &str) -> &'a Value {
    list.iter()
        .find(|d| d["dedupe_key"] == key)
        .unwrap_or_else(|| panic!("no delivery {key} in {list:#?}"))
}

/// Activity entries of `ws`, newest first.
pub async fn activity_all(app: &TestApp, ws: &str) -> Vec<Value> {
    let (st, v) = app
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/activity?limit=500"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().clone()
}

/// Activity entries of `ws` with `action`.
pub async fn activity(app: &TestApp, ws: &str, action: &str) -> Vec<Value> {
    let mut all = activity_all(app, ws).await;
    all.retain(|e| e["action"] == action);
    all
}

/// Asserts a refusal: `status` and error `code`.
pub fn assert_rejected(res: (StatusCode, Value), status: StatusCode, code: &str, what: &str) {
    let (st, v) = res;
    assert_eq!(st, status, "{what}: {v}");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
}

/// A unique suffix (dedupe keys hash the body, so bodies must differ).
pub fn uniq() -> String {
    signalbox::ids::new_id("t")
}

/// A Slack channel `message` from `team` with a fresh event id and text, signed (now) with
/// `secret`, to the per-customer URL of `integration`.
pub async fn send_slack_message(
    app: &TestApp,
    integration: &str,
    team: &str,
    secret: &str,
) -> (StatusCode, Value) {
    let n = uniq();
    let body = message(
        team,
        "C0123ABCD",
        "U0USER",
        &format!("hello {n}"),
        "1355517523.000005",
        &format!("Ev{n}"),
        json!({}),
    );
    let path = format!("{SLACK_EVENTS}?integration_id={integration}");
    send_slack(app, &path, secret, &body, &[]).await
}

// ------------------------------------------------------------------------------------- Pylon

/// The Pylon receiver's URL for `integration`.
pub fn pylon_url(integration: &str) -> String {
    format!("/api/webhooks/pylon?integration_id={integration}")
}

/// The `X-Pylon-Signature` header for `body`.
pub fn x_pylon_signature(secret: &str, body: &[u8]) -> (&'static str, String) {
    (
        "x-pylon-signature",
        pylon::sign_x_pylon(secret.as_bytes(), body),
    )
}

/// A unique `issue_new` body that is not "thin" (the worker makes no API call for it).
pub fn pylon_ticket() -> Vec<u8> {
    let n = uniq();
    json!({
        "event": "issue_new",
        "data": {"id": format!("iss_{n}"), "title": format!("Ticket {n}"), "body_html": "<p>Export fails</p>"}
    })
    .to_string()
    .into_bytes()
}

/// Sends a fresh [`pylon_ticket`] signed (`X-Pylon-Signature`) with `secret`.
pub async fn send_pylon_ticket(
    app: &TestApp,
    integration: &str,
    secret: &str,
) -> (StatusCode, Value) {
    let body = pylon_ticket();
    let sig = x_pylon_signature(secret, &body);
    app.post_raw(&pylon_url(integration), &[sig], body).await
}

// ----------------------------------------------------------------------------------- generic

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
