//! Credentials end to end: encryption at rest, envelope tampering, master keys and their
//! rotation, secret rotation with a grace period, the credential cache (one and two nodes),
//! tenant isolation with scoped tokens, and API responses that never contain a secret.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use signalbox::app::Application;
use signalbox::crypto::MasterKey;
use signalbox::protocol::{pylon, standard_webhooks};
use signalbox::store::Pool;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    no_secret_is_stored_in_plaintext,
    a_ciphertext_copied_into_another_row_does_not_verify_and_blocks_startup,
    master_keys_must_decrypt_the_data_and_rotate_while_serving,
    rotated_secrets_keep_verifying_for_the_grace_period_only,
    deactivation_is_immediate_on_the_same_node,
    a_second_node_stops_accepting_a_deactivated_integration,
    scoped_tokens_see_only_their_workspace,
    every_admin_route_requires_a_token,
);

// ------------------------------------------------------------------------------------ helpers

const PYLON_SECRET: &str = "pylon-secret-PLAINTEXT-1";
const PYLON_TOKEN: &str = "pylon-api-PLAINTEXT-2";
const SLACK_SIGNING: &str = "slack-signing-PLAINTEXT-3";
const SLACK_BOT: &str = "xoxb-slack-bot-PLAINTEXT-4";
const PYLON_HEADER: &str = "pylon-header-PLAINTEXT-5";
const PYLON_SECRET_NEW: &str = "pylon-secret-PLAINTEXT-6";

/// The `ID:BASE64` spec of a fresh master key.
fn key_spec(id: &str) -> String {
    use secrecy::ExposeSecret;
    MasterKey::generate(id)
        .to_spec()
        .expose_secret()
        .to_string()
}

/// Sends a generic delivery with a fresh message id.
async fn send_webhook(app: &TestApp, key: &str, secret: &str) -> (StatusCode, Value) {
    let n = uniq();
    app.send_generic(
        key,
        secret,
        &n,
        &json!({"verbatim": format!("feedback {n}")}),
    )
    .await
}

/// Asserts a webhook request was refused with 401 and `code`.
#[track_caller]
fn assert_refused(r: &(StatusCode, Value), code: &str, what: &str) {
    assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{what}: {}", r.1);
    assert_eq!(r.1["error"]["code"], code, "{what}: {}", r.1);
}

/// Runs `SELECT id, {column} FROM {table}` on either backend.
async fn column(app: &TestApp, table: &str, col: &str) -> Vec<(String, Option<String>)> {
    let sql = format!("SELECT id, {col} FROM {table} ORDER BY id");
    match app.state.store.pool() {
        Pool::Sqlite(p) => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(p)
            .await
            .unwrap(),
        Pool::Postgres(p) => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(p)
            .await
            .unwrap(),
    }
}

/// The value of `table.col` in row `id`.
async fn cell(app: &TestApp, table: &str, col: &str, id: &str) -> Option<String> {
    column(app, table, col)
        .await
        .into_iter()
        .find(|(rid, _)| rid == id)
        .unwrap_or_else(|| panic!("no row {id} in {table}"))
        .1
}

/// `UPDATE {table} SET {col} = value WHERE id = id`, bypassing the service.
async fn set_cell(app: &TestApp, table: &str, col: &str, id: &str, value: &str) {
    let n = match app.state.store.pool() {
        Pool::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET {col} = ?1 WHERE id = ?2"
        )))
        .bind(value)
        .bind(id)
        .execute(p)
        .await
        .unwrap()
        .rows_affected(),
        Pool::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET {col} = $1 WHERE id = $2"
        )))
        .bind(value)
        .bind(id)
        .execute(p)
        .await
        .unwrap()
        .rows_affected(),
    };
    assert_eq!(n, 1);
}

/// Every row of every table of a PostgreSQL database, as JSON text.
async fn postgres_dump(app: &TestApp) -> String {
    let Pool::Postgres(p) = app.state.store.pool() else {
        unreachable!()
    };
    let tables: Vec<(String,)> =
        sqlx::query_as("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(p)
            .await
            .unwrap();
    assert!(tables.iter().any(|(t,)| t == "integrations"));
    let mut out = String::new();
    for (t,) in tables {
        let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM \"{t}\" t"
        )))
        .fetch_all(p)
        .await
        .unwrap();
        for (r,) in rows {
            out.push_str(&r);
            out.push('\n');
        }
    }
    out
}

/// `Application::build` on `db_url` with `master_keys`, expected to fail; returns the message.
async fn build_error(db_url: &str, master_keys: &str) -> String {
    let cfg = test_config(db_url, master_keys).build().unwrap();
    match Application::build(cfg).await {
        Ok(_) => panic!("the app started with keys that cannot decrypt the stored secrets"),
        Err(e) => format!("{e:#}"),
    }
}

/// Config of a node on an existing database.
fn node_config(db_url: &str, master_keys: &str, ttl_secs: &str) -> signalbox::config::RawConfig {
    let mut raw = test_config(db_url, master_keys);
    raw.set("credential_cache_ttl_secs", ttl_secs);
    raw
}

/// Records every API response body, to check that none contains a secret.
struct Recorder<'a> {
    app: &'a TestApp,
    seen: Mutex<Vec<(String, String)>>,
}

impl<'a> Recorder<'a> {
    fn new(app: &'a TestApp) -> Self {
        Recorder {
            app,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// An admin call whose response is recorded.
    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.api_as(ADMIN_TOKEN, method, path, body).await
    }

    /// A call with `token` whose response is recorded.
    async fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let r = self.app.api_as(token, method, path, body).await;
        self.record(&format!("{method} {path}"), &r.1);
        r
    }

    fn record(&self, what: &str, body: &Value) {
        self.seen
            .lock()
            .unwrap()
            .push((what.to_string(), body.to_string()));
    }

    /// Asserts that no recorded response contains any of `secrets`.
    fn assert_no_secret(&self, secrets: &[&str]) {
        let seen = self.seen.lock().unwrap();
        assert!(seen.len() > 5, "too few responses recorded");
        for (what, body) in seen.iter() {
            for s in secrets {
                assert!(
                    !body.contains(s),
                    "the response to {what} contains a secret ({s}): {body}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------ tests

async fn no_secret_is_stored_in_plaintext(b: Backend) {
    let app = spawn_app(b).await;
    let rec = Recorder::new(&app);
    let ws = app.workspace("Acme-Workspace-MARKER").await;
    // One-time secret: the creation response is the only place it is shown.
    let (key, whsec) = app.webhook_key(&ws).await;
    let (st, pylon_int) = rec
        .api(
            "POST",
            &format!("/api/v1/workspaces/{ws}/integrations"),
            Some(json!({
                "platform": "pylon", "name": "Pylon Prod",
                "webhook_secret": PYLON_SECRET, "api_token": PYLON_TOKEN,
                "config": {"required_header": "x-shared"}, "required_header_value": PYLON_HEADER,
            })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{pylon_int}");
    assert_eq!(pylon_int["has_webhook_secret"], true);
    assert_eq!(pylon_int["has_access_token"], true);
    assert_eq!(pylon_int["has_required_header_value"], true);
    let pylon_id = pylon_int["id"].as_str().unwrap().to_string();
    let (st, slack_int) = rec
        .api(
            "POST",
            &format!("/api/v1/workspaces/{ws}/integrations"),
            Some(json!({
                "platform": "slack", "name": "Slack Prod", "slack_team_id": "T0PLAIN01",
                "signing_secret": SLACK_SIGNING, "bot_token": SLACK_BOT,
            })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{slack_int}");
    let slack_id = slack_int["id"].as_str().unwrap().to_string();

    // The secrets work (so they are stored, just not readable).
    let body = pylon_ticket();
    let sig = pylon::sign_x_pylon(PYLON_SECRET.as_bytes(), &body);
    let (st, v) = app
        .post_raw(
            &format!("/api/webhooks/pylon?integration_id={pylon_id}"),
            &[
                ("x-pylon-signature", sig),
                ("x-shared", PYLON_HEADER.into()),
            ],
            body,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = send_slack_message(&app, &slack_id, "T0PLAIN01", SLACK_SIGNING).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let r = send_webhook(&app, &key, &whsec).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    // Rotate both with a grace period, so the "previous" columns hold values too.
    let (st, v) = rec
        .api(
            "PATCH",
            &format!("/api/v1/integrations/{pylon_id}"),
            Some(
                json!({"secrets": {"webhook_secret": PYLON_SECRET_NEW, "grace_period_secs": 3600}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, rotated) = app
        .api(
            "POST",
            &format!("/api/v1/webhook-keys/{key}/rotate"),
            Some(json!({"grace_period_secs": 3600})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{rotated}");
    let whsec_new = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(whsec_new, whsec);
    app.drain().await;

    // Every response so far (except the one-time ones) and the listings: no secret.
    for path in [
        format!("/api/v1/workspaces/{ws}/integrations"),
        "/api/v1/integrations".to_string(),
        format!("/api/v1/integrations/{pylon_id}"),
        format!("/api/v1/integrations/{slack_id}"),
        format!("/api/v1/workspaces/{ws}/webhook-keys"),
        format!("/api/v1/workspaces/{ws}/activity"),
        format!("/api/v1/workspaces/{ws}/signals"),
        format!("/api/v1/deliveries?workspace_id={ws}"),
        format!("/api/v1/workspaces/{ws}"),
    ] {
        let (st, v) = rec.api("GET", &path, None).await;
        assert_eq!(st, StatusCode::OK, "{path}: {v}");
    }
    let secrets = [
        PYLON_SECRET,
        PYLON_TOKEN,
        SLACK_SIGNING,
        SLACK_BOT,
        PYLON_HEADER,
        PYLON_SECRET_NEW,
        whsec.as_str(),
        whsec_new.as_str(),
        ADMIN_TOKEN,
    ];
    rec.assert_no_secret(&secrets);
    let (_, keys) = rec
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/webhook-keys"),
            None,
        )
        .await;
    assert!(keys["items"][0].get("secret").is_none(), "{keys}");

    // Every encrypted column holds an envelope under the configured key.
    let mut envelopes = 0;
    for (table, col) in signalbox::store::ENCRYPTED_COLUMNS {
        for (id, v) in column(&app, table, col).await {
            let Some(v) = v else { continue };
            envelopes += 1;
            assert!(v.starts_with("sbx1:k1:"), "{table}.{col}[{id}] = {v}");
        }
    }
    // key: current + previous; pylon: current + previous + token + header; slack: secret + token.
    assert_eq!(envelopes, 8);
    // Scoped tokens are stored as hashes.
    let (st, tok) = app
        .api("POST", &format!("/api/v1/workspaces/{ws}/tokens"), None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{tok}");
    let token = tok["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("sbx_"));
    let hashes = column(&app, "api_tokens", "token_hash").await;
    assert_eq!(hashes.len(), 1);
    assert_ne!(hashes[0].1.as_deref(), Some(token.as_str()));

    // The raw stored bytes: no plaintext anywhere.
    let mut needles: Vec<Vec<u8>> = secrets[..8].iter().map(|s| s.as_bytes().to_vec()).collect();
    needles.push(token.as_bytes().to_vec());
    // The raw HMAC keys behind the whsec_ secrets must not be stored either.
    for s in [&whsec, &whsec_new] {
        needles.push(standard_webhooks::decode_secret(s).unwrap());
        needles.push(s.trim_start_matches("whsec_").as_bytes().to_vec());
    }
    let stored: Vec<u8> = match b {
        Backend::Postgres => {
            let dump = postgres_dump(&app).await;
            app.stop().await;
            dump.into_bytes()
        }
        Backend::Sqlite => {
            let dir = app.stop_keep_dir().await;
            let mut bytes = Vec::new();
            let mut files = Vec::new();
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().to_string();
                if name.starts_with("signalbox.db") {
                    bytes.extend(std::fs::read(&path).unwrap());
                    files.push(name);
                }
            }
            assert!(files.contains(&"signalbox.db".to_string()), "{files:?}");
            bytes
        }
    };
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    // Sanity: we are looking at the data.
    assert!(contains(&stored, b"Acme-Workspace-MARKER"));
    assert!(contains(&stored, b"sbx1:k1:"));
    for n in &needles {
        assert!(
            !contains(&stored, n),
            "the database contains a secret in plaintext: {}",
            String::from_utf8_lossy(n)
        );
    }
}

async fn a_ciphertext_copied_into_another_row_does_not_verify_and_blocks_startup(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let one = app
        .integration_id(
            &ws,
            json!({"platform": "pylon", "name": "One", "webhook_secret": "first-secret-111"}),
        )
        .await;
    let two = app
        .integration_id(
            &ws,
            json!({"platform": "pylon", "name": "Two", "webhook_secret": "second-secret-222"}),
        )
        .await;
    let r = send_pylon_ticket(&app, &one, "first-secret-111").await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let r = send_pylon_ticket(&app, &two, "second-secret-222").await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    // Copy one's ciphertext into two's row, behind the service's back.
    let env = cell(&app, "integrations", "webhook_secret_enc", &one)
        .await
        .unwrap();
    set_cell(&app, "integrations", "webhook_secret_enc", &two, &env).await;
    // Drop the cached entry (what a NOTIFY or the TTL would do) so the row is read again.
    app.state.creds.invalidate(&two);
    let r = send_pylon_ticket(&app, &two, "first-secret-111").await;
    assert_refused(&r, "invalid_signature", "one's secret on two's row");
    let r = send_pylon_ticket(&app, &two, "second-secret-222").await;
    assert_refused(
        &r,
        "invalid_signature",
        "two's own secret, now undecryptable",
    );
    // The untouched integration still works.
    let r = send_pylon_ticket(&app, &one, "first-secret-111").await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    // Another column of the same row: the API token's ciphertext as the webhook secret.
    let three = app.integration_id(&ws,
            json!({"platform": "pylon", "name": "Three", "webhook_secret": "third-secret-333", "api_token": "third-token-333"})).await;
    let token_env = cell(&app, "integrations", "access_token_enc", &three)
        .await
        .unwrap();
    set_cell(
        &app,
        "integrations",
        "webhook_secret_enc",
        &three,
        &token_env,
    )
    .await;
    app.state.creds.invalidate(&three);
    let r = send_pylon_ticket(&app, &three, "third-token-333").await;
    assert_refused(
        &r,
        "invalid_signature",
        "token ciphertext in the secret column",
    );

    // Plaintext written straight into the column is never taken as the secret.
    let (key, whsec) = app.webhook_key(&ws).await;
    assert_eq!(send_webhook(&app, &key, &whsec).await.0, StatusCode::OK);
    set_cell(&app, "webhook_keys", "secret_enc", &key, &whsec).await;
    app.state.creds.invalidate(&key);
    let r = send_webhook(&app, &key, &whsec).await;
    assert_refused(&r, "invalid_signature", "plaintext key secret");
    set_cell(
        &app,
        "integrations",
        "webhook_secret_enc",
        &one,
        "first-secret-111",
    )
    .await;
    app.state.creds.invalidate(&one);
    let r = send_pylon_ticket(&app, &one, "first-secret-111").await;
    assert_refused(&r, "invalid_signature", "plaintext integration secret");
    app.drain().await;

    // A restart refuses: stored secrets cannot be decrypted.
    let (url, keys) = (app.db_url.clone(), app.master_keys.clone());
    let _dir = app.stop_keep_dir().await;
    let e = build_error(&url, &keys).await;
    assert!(e.contains("cannot be decrypted"), "{e}");
    assert!(
        [&one, &two, &three, &key]
            .iter()
            .any(|id| e.contains(id.as_str())),
        "the message names a bad row: {e}"
    );
    assert!(!e.contains(&keys) && !e.contains(&whsec), "{e}");
}

async fn master_keys_must_decrypt_the_data_and_rotate_while_serving(b: Backend) {
    // TTL 0: every request reads (and decrypts) the rows, so rotation is exercised for real.
    let app = spawn_app_with(b, |c| {
        c.set("credential_cache_ttl_secs", "0");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, whsec) = app.webhook_key(&ws).await;
    let int = app.integration_id(&ws,
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET, "api_token": PYLON_TOKEN})).await;
    let slack_int = app.integration_id(&ws,
            json!({"platform": "slack", "name": "S", "slack_team_id": "T0ROT0001", "signing_secret": SLACK_SIGNING})).await;
    assert_eq!(send_webhook(&app, &key, &whsec).await.0, StatusCode::OK);
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    app.drain().await;
    let (url, old) = (app.db_url.clone(), app.master_keys.clone());
    let dir = app.stop_keep_dir().await;

    // A different key: refuses to start, and says what to do.
    let other = key_spec("k9");
    let e = build_error(&url, &other).await;
    assert!(e.contains("SIGNALBOX_MASTER_KEYS"), "{e}");
    assert!(e.contains("cannot be decrypted"), "{e}");
    assert!(
        e.contains("k1"),
        "the message names the missing key id: {e}"
    );
    assert!(!e.contains(&other) && !e.contains(&old), "{e}");

    // New key first, old one after: starts, and old envelopes still decrypt.
    let new = key_spec("k2");
    let both = format!("{new},{old}");
    let app = start(b, node_config(&url, &both, "0"), url.clone(), both, dir).await;
    assert_eq!(send_webhook(&app, &key, &whsec).await.0, StatusCode::OK);
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    let r = send_slack_message(&app, &slack_int, "T0ROT0001", SLACK_SIGNING).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    // New values are sealed under the active key.
    let (key2, whsec2) = app.webhook_key(&ws).await;
    let ids = |vals: &[signalbox::store::EncryptedValue]| -> BTreeSet<String> {
        vals.iter()
            .map(|v| {
                signalbox::crypto::envelope_key_id(&v.value)
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let store = &app.state.store;
    let before = store.encrypted_values().await.unwrap();
    assert_eq!(ids(&before), BTreeSet::from(["k1".into(), "k2".into()]));
    let old_count = before
        .iter()
        .filter(|v| signalbox::crypto::envelope_key_id(&v.value) == Some("k1"))
        .count();
    // key secret, pylon secret + token, slack secret
    assert_eq!(old_count, 4);

    // Rotate while requests keep flowing.
    let done = AtomicBool::new(false);
    let keyring = app.state.creds.keyring().clone();
    let (rotation, statuses) = tokio::join!(
        async {
            let r = signalbox::credentials::rotate_all(store, &keyring).await;
            done.store(true, Ordering::SeqCst);
            r
        },
        async {
            let mut out = Vec::new();
            while !done.load(Ordering::SeqCst) || out.len() < 9 {
                out.push(("webhook", send_webhook(&app, &key, &whsec).await));
                out.push(("pylon", send_pylon_ticket(&app, &int, PYLON_SECRET).await));
                out.push((
                    "slack",
                    send_slack_message(&app, &slack_int, "T0ROT0001", SLACK_SIGNING).await,
                ));
            }
            out
        }
    );
    let (rotated, skipped) = rotation.unwrap();
    assert_eq!((rotated, skipped), (old_count, before.len() - old_count));
    for (what, (st, v)) in &statuses {
        assert_eq!(*st, StatusCode::OK, "{what} during rotation: {v}");
    }
    let after = store.encrypted_values().await.unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(ids(&after), BTreeSet::from(["k2".to_string()]));
    for v in &after {
        assert!(v.value.starts_with("sbx1:k2:"), "{v:?}");
    }
    // Re-running rotates nothing.
    let again = signalbox::credentials::rotate_all(store, &keyring)
        .await
        .unwrap();
    assert_eq!(again, (0, after.len()));
    assert_eq!(send_webhook(&app, &key, &whsec).await.0, StatusCode::OK);
    assert_eq!(send_webhook(&app, &key2, &whsec2).await.0, StatusCode::OK);
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    app.drain().await;
    let dir = app.stop_keep_dir().await;

    // Now the new key alone is enough, and the old one alone is not.
    let e = build_error(&url, &old).await;
    assert!(e.contains("SIGNALBOX_MASTER_KEYS"), "{e}");
    let app = start(b, node_config(&url, &new, "0"), url.clone(), new, dir).await;
    assert_eq!(send_webhook(&app, &key, &whsec).await.0, StatusCode::OK);
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    let r = send_slack_message(&app, &slack_int, "T0ROT0001", SLACK_SIGNING).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    app.drain().await;
    app.stop().await;
}

async fn rotated_secrets_keep_verifying_for_the_grace_period_only(b: Backend) {
    let app = spawn_app(b).await;
    let rec = Recorder::new(&app);
    let ws = app.workspace("Acme").await;
    let (_, int) = rec
        .api(
            "POST",
            &format!("/api/v1/workspaces/{ws}/integrations"),
            Some(json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET})),
        )
        .await;
    let int = int["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/integrations/{int}");
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );

    // New secret with an hour of grace: both verify.
    let (st, v) = rec
        .api(
            "PATCH",
            &path,
            Some(
                json!({"secrets": {"webhook_secret": PYLON_SECRET_NEW, "grace_period_secs": 3600}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["previous_secret_valid_until"].is_string(), "{v}");
    let r = send_pylon_ticket(&app, &int, PYLON_SECRET).await;
    assert_eq!(r.0, StatusCode::OK, "old secret during grace: {}", r.1);
    let r = send_pylon_ticket(&app, &int, PYLON_SECRET_NEW).await;
    assert_eq!(r.0, StatusCode::OK, "new secret: {}", r.1);
    let r = send_pylon_ticket(&app, &int, "some-other-secret").await;
    assert_refused(&r, "invalid_signature", "unrelated secret");

    // The same secret again with no grace ends the grace period now.
    let (st, v) = rec
        .api(
            "PATCH",
            &path,
            Some(json!({"secrets": {"webhook_secret": PYLON_SECRET_NEW, "grace_period_secs": 0}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["previous_secret_valid_until"].is_null(), "{v}");
    let r = send_pylon_ticket(&app, &int, PYLON_SECRET).await;
    assert_refused(&r, "invalid_signature", "old secret after grace 0");
    let r = send_pylon_ticket(&app, &int, PYLON_SECRET_NEW).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    // A short grace runs out by itself.
    let third = "pylon-secret-PLAINTEXT-7";
    let (st, v) = rec
        .api(
            "PATCH",
            &path,
            Some(json!({"secrets": {"webhook_secret": third, "grace_period_secs": 2}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = send_pylon_ticket(&app, &int, PYLON_SECRET_NEW).await;
    assert_eq!(r.0, StatusCode::OK, "previous secret within 2 s: {}", r.1);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let r = send_pylon_ticket(&app, &int, PYLON_SECRET_NEW).await;
    assert_refused(&r, "invalid_signature", "previous secret after its grace");
    assert_eq!(send_pylon_ticket(&app, &int, third).await.0, StatusCode::OK);

    // Generic webhook keys: /rotate shows the new secret once.
    let (key, s1) = app.webhook_key(&ws).await;
    assert_eq!(send_webhook(&app, &key, &s1).await.0, StatusCode::OK);
    let rotate = format!("/api/v1/webhook-keys/{key}/rotate");
    let (st, v) = app
        .api("POST", &rotate, Some(json!({"grace_period_secs": 3600})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let s2 = v["secret"].as_str().unwrap().to_string();
    assert!(s2.starts_with("whsec_") && s2 != s1, "{v}");
    assert!(v["previous_secret_valid_until"].is_string(), "{v}");
    assert_eq!(send_webhook(&app, &key, &s1).await.0, StatusCode::OK);
    assert_eq!(send_webhook(&app, &key, &s2).await.0, StatusCode::OK);
    let (st, keys) = rec
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/webhook-keys"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(keys["items"][0].get("secret").is_none(), "{keys}");
    // Rotating with no grace: only the newest secret verifies.
    let (st, v) = app
        .api("POST", &rotate, Some(json!({"grace_period_secs": 0})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let s3 = v["secret"].as_str().unwrap().to_string();
    assert!(v["previous_secret_valid_until"].is_null(), "{v}");
    assert_refused(
        &send_webhook(&app, &key, &s1).await,
        "invalid_signature",
        "first key secret",
    );
    assert_refused(
        &send_webhook(&app, &key, &s2).await,
        "invalid_signature",
        "second key secret after grace 0",
    );
    assert_eq!(send_webhook(&app, &key, &s3).await.0, StatusCode::OK);
    // An empty body uses the default grace (24 h): the previous secret keeps working.
    let (st, v) = app.api("POST", &rotate, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let s4 = v["secret"].as_str().unwrap().to_string();
    assert_eq!(send_webhook(&app, &key, &s3).await.0, StatusCode::OK);
    assert_eq!(send_webhook(&app, &key, &s4).await.0, StatusCode::OK);
    app.drain().await;

    for p in [
        format!("/api/v1/workspaces/{ws}/webhook-keys"),
        format!("/api/v1/workspaces/{ws}/integrations"),
        format!("/api/v1/workspaces/{ws}/activity"),
        path.clone(),
    ] {
        let (st, v) = rec.api("GET", &p, None).await;
        assert_eq!(st, StatusCode::OK, "{p}: {v}");
    }
    rec.assert_no_secret(&[
        PYLON_SECRET,
        PYLON_SECRET_NEW,
        third,
        &s1,
        &s2,
        &s3,
        &s4,
        ADMIN_TOKEN,
    ]);
    app.stop().await;
}

async fn deactivation_is_immediate_on_the_same_node(b: Backend) {
    // A long TTL: only invalidation can make the change visible in time.
    let app = spawn_app_with(b, |c| {
        c.set("credential_cache_ttl_secs", "300");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let int = app
        .integration_id(
            &ws,
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET}),
        )
        .await;
    let slack_int = app.integration_id(&ws,
            json!({"platform": "slack", "name": "S", "slack_team_id": "T0CACHE01", "signing_secret": SLACK_SIGNING})).await;
    let (key, whsec) = app.webhook_key(&ws).await;
    // Warm the cache.
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    assert_eq!(send_webhook(&app, &key, &whsec).await.0, StatusCode::OK);
    let r = send_slack_message(&app, &slack_int, "T0CACHE01", SLACK_SIGNING).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    let (st, v) = app
        .api("DELETE", &format!("/api/v1/integrations/{int}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["is_active"], false);
    assert_refused(
        &send_pylon_ticket(&app, &int, PYLON_SECRET).await,
        "unknown_integration",
        "deactivated Pylon integration",
    );
    let (st, v) = app
        .api("DELETE", &format!("/api/v1/webhook-keys/{key}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_refused(
        &send_webhook(&app, &key, &whsec).await,
        "unknown_integration",
        "deleted webhook key",
    );
    // A deactivated Slack integration acknowledges (Slack would disable the app) but stores
    // nothing to process.
    let (st, v) = app
        .api(
            "PATCH",
            &format!("/api/v1/integrations/{slack_int}"),
            Some(json!({"is_active": false})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = send_slack_message(&app, &slack_int, "T0CACHE01", SLACK_SIGNING).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    app.drain().await;
    let (_, d) = app
        .api(
            "GET",
            &format!("/api/v1/deliveries?integration_id={slack_int}"),
            None,
        )
        .await;
    let items = d["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{d}");
    assert_eq!(items[0]["status"], "filtered", "newest first: {d}");
    assert_eq!(items[0]["filter_reason"], "integration is inactive", "{d}");

    // Reactivation is immediate too.
    let (st, v) = app
        .api(
            "PATCH",
            &format!("/api/v1/integrations/{int}"),
            Some(json!({"is_active": true})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    app.drain().await;
    app.stop().await;
}

/// Sends until `refused` holds for the response; returns how long it took (panics after `max`).
async fn until_refused<F, Fut>(what: &str, max: Duration, mut send: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (StatusCode, Value)>,
{
    let started = Instant::now();
    loop {
        let (st, v) = send().await;
        if st == StatusCode::UNAUTHORIZED {
            return started.elapsed();
        }
        assert_eq!(st, StatusCode::OK, "{what}: {v}");
        assert!(
            started.elapsed() < max,
            "{what}: still accepted after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_second_node_stops_accepting_a_deactivated_integration(b: Backend) {
    // PostgreSQL: a TTL of 300 s, so only NOTIFY can explain a quick refusal. SQLite has no
    // cross-node notification: the TTL (1 s) bounds the delay.
    let ttl = match b {
        Backend::Postgres => "300",
        Backend::Sqlite => "1",
    };
    let a = spawn_app_with(b, |c| {
        c.set("credential_cache_ttl_secs", ttl);
    })
    .await;
    let node_b = start(
        b,
        node_config(&a.db_url, &a.master_keys, ttl),
        a.db_url.clone(),
        a.master_keys.clone(),
        tempfile::tempdir().unwrap(),
    )
    .await;
    let ws = a.workspace("Acme").await;
    let int = a
        .integration_id(
            &ws,
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET}),
        )
        .await;
    let (key, whsec) = a.webhook_key(&ws).await;
    // Warm node B's cache.
    let r = send_pylon_ticket(&node_b, &int, PYLON_SECRET).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    let r = send_webhook(&node_b, &key, &whsec).await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);

    let max = match b {
        Backend::Postgres => Duration::from_secs(2),
        Backend::Sqlite => Duration::from_millis(2500),
    };
    // Deactivate on node A; node B follows.
    let (st, v) = a
        .api("DELETE", &format!("/api/v1/integrations/{int}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let took = until_refused("node B, deactivated integration", max, || {
        send_pylon_ticket(&node_b, &int, PYLON_SECRET)
    })
    .await;
    assert_refused(
        &send_pylon_ticket(&node_b, &int, PYLON_SECRET).await,
        "unknown_integration",
        "node B",
    );
    eprintln!("node B refused the deactivated integration after {took:?}");
    let (st, v) = a
        .api("DELETE", &format!("/api/v1/webhook-keys/{key}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    until_refused("node B, deleted key", max, || {
        send_webhook(&node_b, &key, &whsec)
    })
    .await;
    assert_refused(
        &send_webhook(&node_b, &key, &whsec).await,
        "unknown_integration",
        "node B",
    );

    // Reactivation and a secret change without grace reach node B the same way.
    let (st, v) = a
        .api(
            "PATCH",
            &format!("/api/v1/integrations/{int}"),
            Some(json!({"is_active": true})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let started = Instant::now();
    loop {
        let r = send_pylon_ticket(&node_b, &int, PYLON_SECRET).await;
        if r.0 == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < max,
            "node B still refuses a reactivated integration: {}",
            r.1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, v) = a
        .api(
            "PATCH",
            &format!("/api/v1/integrations/{int}"),
            Some(json!({"secrets": {"webhook_secret": PYLON_SECRET_NEW, "grace_period_secs": 0}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    until_refused("node B, replaced secret", max, || {
        send_pylon_ticket(&node_b, &int, PYLON_SECRET)
    })
    .await;
    assert_eq!(
        send_pylon_ticket(&node_b, &int, PYLON_SECRET_NEW).await.0,
        StatusCode::OK
    );
    a.drain().await;
    node_b.stop().await;
    a.stop().await;
}

async fn scoped_tokens_see_only_their_workspace(b: Backend) {
    let app = spawn_app(b).await;
    let rec = Recorder::new(&app);
    let wa = app.workspace("Alpha").await;
    let wb = app.workspace("Beta").await;
    let (key_a, sec_a) = app.webhook_key(&wa).await;
    let (key_b, sec_b) = app.webhook_key(&wb).await;
    let int_a = app
        .integration_id(
            &wa,
            json!({"platform": "pylon", "name": "PA", "webhook_secret": "alpha-pylon-secret"}),
        )
        .await;
    let int_b = app
        .integration_id(
            &wb,
            json!({"platform": "pylon", "name": "PB", "webhook_secret": "beta-pylon-secret"}),
        )
        .await;
    assert_eq!(send_webhook(&app, &key_a, &sec_a).await.0, StatusCode::OK);
    assert_eq!(send_webhook(&app, &key_b, &sec_b).await.0, StatusCode::OK);
    app.drain().await;
    let only = |v: &Value| -> String {
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{v}");
        items[0]["id"].as_str().unwrap().to_string()
    };
    let (_, d) = app
        .api(
            "GET",
            &format!("/api/v1/deliveries?workspace_id={wa}"),
            None,
        )
        .await;
    let dlv_a = only(&d);
    let (_, d) = app
        .api(
            "GET",
            &format!("/api/v1/deliveries?workspace_id={wb}"),
            None,
        )
        .await;
    let dlv_b = only(&d);
    let sig_a = app.signals(&wa).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sig_b = app.signals(&wb).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (tok_a_id, tok_a) = app.token(&wa).await;
    let (tok_b_id, tok_b) = app.token(&wb).await;
    assert!(tok_a.starts_with("sbx_"));
    let (_, before_b) = app
        .api("GET", &format!("/api/v1/deliveries/{dlv_b}"), None)
        .await;

    // Every endpoint on B's objects: 404 with A's token.
    let patch = json!({"name": "pwned"});
    let secrets =
        json!({"secrets": {"webhook_secret": "attacker-secret-1", "grace_period_secs": 0}});
    let new_int = json!({"platform": "pylon", "name": "X", "webhook_secret": "attacker-secret-2"});
    let cross: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/api/v1/workspaces/{wb}"), None),
        ("GET", format!("/api/v1/workspaces/{wb}/signals"), None),
        ("GET", format!("/api/v1/workspaces/{wb}/activity"), None),
        ("GET", format!("/api/v1/workspaces/{wb}/webhook-keys"), None),
        (
            "POST",
            format!("/api/v1/workspaces/{wb}/webhook-keys"),
            Some(json!({})),
        ),
        ("GET", format!("/api/v1/workspaces/{wb}/integrations"), None),
        (
            "POST",
            format!("/api/v1/workspaces/{wb}/integrations"),
            Some(new_int),
        ),
        ("GET", format!("/api/v1/workspaces/{wb}/tokens"), None),
        ("POST", format!("/api/v1/workspaces/{wb}/tokens"), None),
        ("GET", format!("/api/v1/integrations/{int_b}"), None),
        (
            "PATCH",
            format!("/api/v1/integrations/{int_b}"),
            Some(patch),
        ),
        (
            "PATCH",
            format!("/api/v1/integrations/{int_b}"),
            Some(secrets),
        ),
        ("DELETE", format!("/api/v1/integrations/{int_b}"), None),
        ("DELETE", format!("/api/v1/webhook-keys/{key_b}"), None),
        (
            "POST",
            format!("/api/v1/webhook-keys/{key_b}/rotate"),
            Some(json!({"grace_period_secs": 0})),
        ),
        ("DELETE", format!("/api/v1/tokens/{tok_b_id}"), None),
        ("GET", format!("/api/v1/signals/{sig_b}"), None),
        ("GET", format!("/api/v1/deliveries/{dlv_b}"), None),
        ("POST", format!("/api/v1/deliveries/{dlv_b}/replay"), None),
        ("GET", format!("/api/v1/deliveries?workspace_id={wb}"), None),
    ];
    for (m, p, body) in cross {
        let (st, v) = rec.api_as(&tok_a, m, &p, body).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{m} {p} with A's token: {v}");
        assert_eq!(v["error"]["code"], "not_found", "{m} {p}: {v}");
        // The answer names only what the request named (the same answer as for a missing id).
        let text = v.to_string();
        assert!(
            (p.contains(&wb) || !text.contains(&wb)) && !text.contains("Beta"),
            "{m} {p}: {v}"
        );
    }
    // Filters naming B's objects find nothing.
    for p in [
        format!("/api/v1/deliveries?integration_id={int_b}"),
        "/api/v1/deliveries?source=webhook".to_string(),
    ] {
        let (st, v) = rec.api_as(&tok_a, "GET", &p, None).await;
        assert_eq!(st, StatusCode::OK, "{p}: {v}");
        assert!(!v.to_string().contains(&wb), "{p}: {v}");
    }

    // Listings show only A.
    let (st, v) = rec.api_as(&tok_a, "GET", "/api/v1/workspaces", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(only(&v), wa);
    let (st, v) = rec.api_as(&tok_a, "GET", "/api/v1/deliveries", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(only(&v), dlv_a);
    let (st, v) = rec
        .api_as(&tok_a, "GET", "/api/v1/integrations", None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(only(&v), int_a);

    // A's own objects work.
    let own: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/api/v1/workspaces/{wa}"), None),
        ("GET", format!("/api/v1/workspaces/{wa}/signals"), None),
        ("GET", format!("/api/v1/workspaces/{wa}/activity"), None),
        ("GET", format!("/api/v1/workspaces/{wa}/webhook-keys"), None),
        ("GET", format!("/api/v1/workspaces/{wa}/integrations"), None),
        ("GET", format!("/api/v1/workspaces/{wa}/tokens"), None),
        ("GET", format!("/api/v1/integrations/{int_a}"), None),
        (
            "PATCH",
            format!("/api/v1/integrations/{int_a}"),
            Some(json!({"name": "PA renamed"})),
        ),
        ("GET", format!("/api/v1/signals/{sig_a}"), None),
        ("GET", format!("/api/v1/deliveries/{dlv_a}"), None),
        ("POST", format!("/api/v1/deliveries/{dlv_a}/replay"), None),
        ("GET", format!("/api/v1/deliveries?workspace_id={wa}"), None),
    ];
    for (m, p, body) in own {
        let (st, v) = rec.api_as(&tok_a, m, &p, body).await;
        assert_eq!(st, StatusCode::OK, "{m} {p} with A's token: {v}");
    }
    let (st, v) = app
        .api_as(
            &tok_a,
            "POST",
            &format!("/api/v1/webhook-keys/{key_a}/rotate"),
            Some(json!({"grace_period_secs": 60})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let sec_a2 = v["secret"].as_str().unwrap().to_string();
    assert_eq!(v["workspace_id"], wa.as_str());
    let (st, v) = app
        .api_as(
            &tok_a,
            "POST",
            &format!("/api/v1/workspaces/{wa}/webhook-keys"),
            Some(json!({"name": "second"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let sec_a3 = v["secret"].as_str().unwrap().to_string();
    assert_eq!(v["workspace_id"], wa.as_str());

    // A scoped token cannot create workspaces or tokens, even in its own workspace.
    let (st, v) = rec
        .api_as(
            &tok_a,
            "POST",
            "/api/v1/workspaces",
            Some(json!({"name": "Evil"})),
        )
        .await;
    assert!(
        st == StatusCode::NOT_FOUND || st == StatusCode::FORBIDDEN,
        "{st}: {v}"
    );
    let (st, v) = rec
        .api_as(
            &tok_a,
            "POST",
            &format!("/api/v1/workspaces/{wa}/tokens"),
            None,
        )
        .await;
    assert!(
        st == StatusCode::NOT_FOUND || st == StatusCode::FORBIDDEN,
        "{st}: {v}"
    );
    assert!(v.get("token").is_none(), "{v}");
    assert_eq!(app.count("SELECT COUNT(*) FROM workspaces").await, 2);
    assert_eq!(app.count("SELECT COUNT(*) FROM api_tokens").await, 2);

    // B is untouched by all of the above.
    let (_, ib) = rec
        .api("GET", &format!("/api/v1/integrations/{int_b}"), None)
        .await;
    assert_eq!(ib["name"], "PB", "{ib}");
    assert_eq!(ib["is_active"], true, "{ib}");
    assert!(ib["previous_secret_valid_until"].is_null(), "{ib}");
    let r = send_pylon_ticket(&app, &int_b, "beta-pylon-secret").await;
    assert_eq!(
        r.0,
        StatusCode::OK,
        "B's integration still has its secret: {}",
        r.1
    );
    assert_eq!(send_webhook(&app, &key_b, &sec_b).await.0, StatusCode::OK);
    let (_, after_b) = app
        .api("GET", &format!("/api/v1/deliveries/{dlv_b}"), None)
        .await;
    assert_eq!(after_b, before_b, "B's delivery was not replayed");
    let (st, v) = rec
        .api_as(&tok_b, "GET", &format!("/api/v1/workspaces/{wb}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "B's token still works: {v}");
    let (_, acts) = rec
        .api("GET", &format!("/api/v1/workspaces/{wb}/activity"), None)
        .await;
    assert!(
        !acts.to_string().contains(&tok_a_id),
        "A's token acted on B: {acts}"
    );

    // A revoked token is refused.
    let (st, v) = rec
        .api("DELETE", &format!("/api/v1/tokens/{tok_a_id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = rec
        .api_as(&tok_a, "GET", &format!("/api/v1/workspaces/{wa}"), None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    let (_, toks) = rec
        .api("GET", &format!("/api/v1/workspaces/{wa}/tokens"), None)
        .await;
    assert!(toks["items"][0]["revoked_at"].is_string(), "{toks}");
    app.drain().await;

    rec.assert_no_secret(&[
        &tok_a,
        &tok_b,
        &sec_a,
        &sec_b,
        &sec_a2,
        &sec_a3,
        "alpha-pylon-secret",
        "beta-pylon-secret",
        "attacker-secret-1",
        "attacker-secret-2",
        ADMIN_TOKEN,
    ]);
    app.stop().await;
}

/// Every operation the server routes, as (method, path template, needs a token), read from
/// the OpenAPI document the router is built with (so a new route cannot be missed). Webhook
/// receivers and Slack's OAuth redirect are authenticated by the sender, not a bearer token,
/// and are left out.
fn routes() -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for (m, path, op) in documented_operations() {
        let tags = op.tags.clone().unwrap_or_default();
        let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
        if secured || tags.iter().any(|t| t == "probes") {
            out.push((m.to_string(), path, secured));
        }
    }
    out
}

async fn every_admin_route_requires_a_token(b: Backend) {
    let app = spawn_app(b).await;
    let routes = routes();
    assert!(
        routes.len() >= 30,
        "only {} operations: {routes:?}",
        routes.len()
    );
    let public: BTreeSet<&str> = routes
        .iter()
        .filter(|r| !r.2)
        .map(|r| r.1.as_str())
        .collect();
    assert_eq!(
        public,
        BTreeSet::from(["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"]),
        "only the probes and the document are public"
    );
    // Real ids, so a 401 cannot be a 404 in disguise.
    let f = Fixture::create(&app).await;
    let (ws, key, secret, int) = (&f.ws, &f.key, &f.secret, &f.integration);
    let (_, revoked) = app
        .api("POST", &format!("/api/v1/workspaces/{ws}/tokens"), None)
        .await;
    let revoked_token = revoked["token"].as_str().unwrap().to_string();
    let (st, _) = app
        .api(
            "DELETE",
            &format!("/api/v1/tokens/{}", revoked["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);

    let bad_auth: Vec<Option<String>> = vec![
        None,
        Some("Bearer ".into()),
        Some("Bearer wrong-token-0123456789".into()),
        Some(format!("Bearer {ADMIN_TOKEN}x")),
        Some(format!("Basic {ADMIN_TOKEN}")),
        Some(ADMIN_TOKEN.to_string()),
        Some("Bearer sbx_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()),
        Some(format!("Bearer {revoked_token}")),
    ];
    for (method, template, secured) in &routes {
        let method = method.as_str();
        let path = f.fill(template);
        let public = !secured;
        for auth in &bad_auth {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut req = app.client.request(m, format!("{}{path}", app.base));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            if matches!(method, "POST" | "PATCH") {
                req = req.json(&json!({"name": "x"}));
            }
            let resp = req.send().await.unwrap();
            let st = resp.status();
            let text = resp.text().await.unwrap();
            if public {
                assert_eq!(st, StatusCode::OK, "{method} {path} is public: {text}");
            } else {
                assert_eq!(
                    st,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with {auth:?}: {text}"
                );
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["code"], "unauthorized", "{method} {path}");
            }
        }
    }
    // Nothing was changed by the refused requests.
    assert_eq!(app.count("SELECT COUNT(*) FROM workspaces").await, 1);
    let (_, i) = app
        .api("GET", &format!("/api/v1/integrations/{int}"), None)
        .await;
    assert_eq!(i["is_active"], true);
    assert_eq!(i["name"], "P");
    assert_eq!(send_webhook(&app, key, secret).await.0, StatusCode::OK);
    app.drain().await;
    app.stop().await;
}
