//! The smaller findings of the security review: bounded grace periods, explicitly empty secrets,
//! 403 for global actions with a scoped token, request id acceptance, SQLite file modes, and
//! secrets kept out of the CLI's `--help` and command line.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::{both_backends, sqlite_only};

both_backends!(
    grace_periods_are_at_most_thirty_days,
    explicitly_empty_secrets_are_rejected_naming_the_field,
    a_scoped_token_asking_for_a_global_action_is_forbidden,
    send_reads_its_secret_from_a_file_or_stdin,
);
// Request ids are middleware around /healthz: no store involved.
sqlite_only!(request_ids_are_echoed_only_when_short_and_plain);

const MAX_GRACE: u64 = 2_592_000;
const PYLON_SECRET: &str = "smaller-pylon-secret-1";
const SLACK_SIGNING: &str = "smaller-slack-signing-2";

/// Asserts a 400 `invalid_request` whose message contains every one of `words`.
fn assert_invalid(st: StatusCode, v: &Value, words: &[&str]) {
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    for w in words {
        assert!(msg.contains(w), "{w:?} not in {msg:?}");
    }
}

/// Seconds from now until an RFC 3339 timestamp.
fn secs_until(ts: &Value) -> i64 {
    let t = chrono::DateTime::parse_from_rfc3339(ts.as_str().unwrap()).unwrap();
    t.timestamp() - chrono::Utc::now().timestamp()
}

// ------------------------------------------------------------------------------ grace periods

async fn grace_periods_are_at_most_thirty_days(b: Backend) {
    let app = spawn_app(b).await;
    let ws = app.workspace("Grace").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let rotate = |grace: Value| {
        let app = &app;
        let key = key.clone();
        async move {
            app.api(
                "POST",
                &format!("/api/v1/webhook-keys/{key}/rotate"),
                Some(json!({ "grace_period_secs": grace })),
            )
            .await
        }
    };
    // 9e12 s used to keep the old secret valid for ever; 9.3e12 s wrapped negative (and
    // panicked in a debug build); one second over the bound is refused too.
    for bad in [
        json!(9_000_000_000_000u64),
        json!(9_223_372_036_855u64),
        json!(MAX_GRACE + 1),
    ] {
        let (st, v) = rotate(bad.clone()).await;
        assert_invalid(st, &v, &["grace_period_secs", "2592000"]);
    }
    // Nothing rotated: the original secret still verifies and there is no previous secret.
    let (st, _) = app
        .send_generic(
            &key,
            &secret,
            "msg_grace_1",
            &json!({"verbatim": "still valid"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, keys) = app
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/webhook-keys"),
            None,
        )
        .await;
    assert!(
        keys["items"][0]["previous_secret_valid_until"].is_null(),
        "{keys}"
    );
    // Exactly 30 days is allowed and lands 30 days ahead.
    let (st, v) = rotate(json!(MAX_GRACE)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let left = secs_until(&v["previous_secret_valid_until"]);
    assert!(
        (MAX_GRACE as i64 - 60..=MAX_GRACE as i64).contains(&left),
        "{v}"
    );
    let (st, _) = app
        .send_generic(
            &key,
            &secret,
            "msg_grace_2",
            &json!({"verbatim": "in grace"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);

    // The same bound on an integration's secret rotation (PATCH secrets).
    let int = app
        .integration_id(
            &ws,
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET}),
        )
        .await;
    let patch = |secrets: Value| {
        let app = &app;
        let int = int.clone();
        async move {
            app.api(
                "PATCH",
                &format!("/api/v1/integrations/{int}"),
                Some(json!({ "secrets": secrets })),
            )
            .await
        }
    };
    for bad in [
        json!(9_000_000_000_000u64),
        json!(9_223_372_036_855u64),
        json!(MAX_GRACE + 1),
    ] {
        let (st, v) =
            patch(json!({"webhook_secret": "smaller-pylon-new-3", "grace_period_secs": bad})).await;
        assert_invalid(st, &v, &["grace_period_secs", "2592000"]);
        // An out-of-range grace is refused even without a new secret.
        let (st, v) = patch(json!({"grace_period_secs": bad})).await;
        assert_invalid(st, &v, &["grace_period_secs"]);
    }
    let (_, v) = app
        .api("GET", &format!("/api/v1/integrations/{int}"), None)
        .await;
    assert!(v["previous_secret_valid_until"].is_null(), "{v}");
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    let (st, v) =
        patch(json!({"webhook_secret": "smaller-pylon-new-3", "grace_period_secs": MAX_GRACE}))
            .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let left = secs_until(&v["previous_secret_valid_until"]);
    assert!(
        (MAX_GRACE as i64 - 60..=MAX_GRACE as i64).contains(&left),
        "{v}"
    );
    assert_eq!(
        send_pylon_ticket(&app, &int, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send_pylon_ticket(&app, &int, "smaller-pylon-new-3").await.0,
        StatusCode::OK
    );
    app.stop().await;
}

// ------------------------------------------------------------------------------ empty secrets

async fn explicitly_empty_secrets_are_rejected_naming_the_field(b: Backend) {
    let app = spawn_app(b).await;
    let ws = app.workspace("Empty").await;
    let create = |body: Value| {
        let app = &app;
        let ws = ws.clone();
        async move {
            app.api(
                "POST",
                &format!("/api/v1/workspaces/{ws}/integrations"),
                Some(body),
            )
            .await
        }
    };
    for blank in ["", "   ", "\t\n"] {
        // Without an app-level signing secret, "" used to pass the required check and create
        // an integration without any secret.
        let (st, v) = create(
            json!({"platform": "slack", "name": "S", "slack_team_id": "T0EMPTY1",
                                    "signing_secret": blank}),
        )
        .await;
        assert_invalid(st, &v, &["signing_secret"]);
        let (st, v) = create(
            json!({"platform": "slack", "name": "S", "slack_team_id": "T0EMPTY1",
                                    "signing_secret": SLACK_SIGNING, "bot_token": blank}),
        )
        .await;
        assert_invalid(st, &v, &["bot_token"]);
        let (st, v) =
            create(json!({"platform": "pylon", "name": "P", "webhook_secret": blank})).await;
        assert_invalid(st, &v, &["webhook_secret"]);
        let (st, v) = create(
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET,
                                    "api_token": blank}),
        )
        .await;
        assert_invalid(st, &v, &["api_token"]);
        let (st, v) = create(
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET,
                                    "required_header_value": blank}),
        )
        .await;
        assert_invalid(st, &v, &["required_header_value"]);
        let (st, v) = create(
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET,
                                    "config": {"required_header": "authorization"},
                                    "required_header_value": blank}),
        )
        .await;
        assert_invalid(st, &v, &["required_header_value"]);
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM integrations").await, 0);

    // PATCH secrets: an empty new secret is refused (it used to be ignored silently) …
    let slack = app
        .integration_id(
            &ws,
            json!({"platform": "slack", "name": "S", "slack_team_id": "T0EMPTY1",
                   "signing_secret": SLACK_SIGNING, "bot_token": "xoxb-smaller-bot-4"}),
        )
        .await;
    let pylon = app
        .integration_id(
            &ws,
            json!({"platform": "pylon", "name": "P", "webhook_secret": PYLON_SECRET,
                   "api_token": "pylon-smaller-token-5"}),
        )
        .await;
    let patch = |id: &str, secrets: Value| {
        let app = &app;
        let id = id.to_string();
        async move {
            app.api(
                "PATCH",
                &format!("/api/v1/integrations/{id}"),
                Some(json!({ "secrets": secrets })),
            )
            .await
        }
    };
    for blank in ["", "  "] {
        let (st, v) = patch(&slack, json!({"signing_secret": blank})).await;
        assert_invalid(st, &v, &["signing_secret"]);
        let (st, v) = patch(&pylon, json!({"webhook_secret": blank})).await;
        assert_invalid(st, &v, &["webhook_secret"]);
        let (st, v) = patch(&pylon, json!({"required_header_value": blank})).await;
        assert_invalid(st, &v, &["required_header_value"]);
    }
    assert_eq!(
        send_pylon_ticket(&app, &pylon, PYLON_SECRET).await.0,
        StatusCode::OK
    );
    // … but an empty api_token/bot_token still clears the token (documented).
    let (st, v) = patch(&pylon, json!({"api_token": ""})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["has_access_token"], false, "{v}");
    let (st, v) = patch(&slack, json!({"bot_token": "  "})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["has_access_token"], false, "{v}");
    assert_eq!(v["has_webhook_secret"], true, "{v}");
    app.stop().await;
}

// ------------------------------------------------------------------------------ 403 forbidden

async fn a_scoped_token_asking_for_a_global_action_is_forbidden(b: Backend) {
    let app = spawn_app(b).await;
    let ws = app.workspace("Scoped").await;
    let other = app.workspace("Other").await;
    let (st, v) = app
        .api("POST", &format!("/api/v1/workspaces/{ws}/tokens"), None)
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let forbidden = |st: StatusCode, v: &Value| {
        assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(v["error"]["code"], "forbidden", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("admin token"), "{msg}");
    };
    let (st, v) = app
        .api_as(
            &token,
            "POST",
            "/api/v1/workspaces",
            Some(json!({"name": "Evil"})),
        )
        .await;
    forbidden(st, &v);
    let (st, v) = app
        .api_as(
            &token,
            "POST",
            &format!("/api/v1/workspaces/{ws}/tokens"),
            None,
        )
        .await;
    forbidden(st, &v);
    assert!(v.get("token").is_none(), "{v}");
    // Another workspace stays invisible (tenant isolation: 404, as for all its objects).
    let (st, v) = app
        .api_as(
            &token,
            "POST",
            &format!("/api/v1/workspaces/{other}/tokens"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert!(v.get("token").is_none(), "{v}");
    assert_eq!(app.count("SELECT COUNT(*) FROM workspaces").await, 2);
    assert_eq!(app.count("SELECT COUNT(*) FROM api_tokens").await, 1);
    // The scoped token still works for its own workspace, and unknown routes are still 404.
    let (st, v) = app
        .api_as(&token, "GET", &format!("/api/v1/workspaces/{ws}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = app.api("GET", "/api/v1/nowhere", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    app.stop().await;
}

// ------------------------------------------------------------------------------ request ids

async fn request_ids_are_echoed_only_when_short_and_plain(b: Backend) {
    let app = spawn_app(b).await;
    let echoed = |id: Option<String>| {
        let app = &app;
        async move {
            let mut req = app.client.get(format!("{}/healthz", app.base));
            if let Some(id) = id {
                req = req.header("x-request-id", id);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let all: Vec<String> = resp
                .headers()
                .get_all("x-request-id")
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            assert_eq!(all.len(), 1, "{all:?}");
            all[0].clone()
        }
    };
    for ok in ["abc-123", "A.b_C-9", &"x".repeat(64)] {
        assert_eq!(echoed(Some(ok.to_string())).await, ok);
    }
    let generated = echoed(None).await;
    assert!(acceptable(&generated), "{generated}");
    for bad in [
        "x".repeat(65),
        "y".repeat(8000),
        "has space".to_string(),
        "quote\"and{braces}".to_string(),
        "a/b".to_string(),
    ] {
        let got = echoed(Some(bad.clone())).await;
        assert_ne!(got, bad);
        assert!(acceptable(&got), "{got}");
        assert_ne!(got, generated, "a fresh id each time");
    }
    // Two ids: neither is trusted.
    let resp = app
        .client
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "first-1")
        .header("x-request-id", "second-2")
        .send()
        .await
        .unwrap();
    let got = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(got != "first-1" && got != "second-2", "{got}");
    app.stop().await;
}

fn acceptable(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

// ------------------------------------------------------------------------------ SQLite modes

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_sqlite_database_and_its_wal_and_shm_are_private() {
    use std::os::unix::fs::PermissionsExt;
    // The regression shows only when the umask lets group/others read (0022, the usual one).
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|m| u32::from_str_radix(m.trim(), 8).ok())
        });
    if let Some(m) = umask.filter(|m| m & 0o044 == 0o044) {
        eprintln!("note: umask {m:o} already hides files from group/others");
    }
    let app = spawn_app(Backend::Sqlite).await;
    // The app is running: the database is open in WAL mode, so -wal and -shm exist.
    let (st, _) = app
        .api("POST", "/api/v1/workspaces", Some(json!({"name": "Modes"})))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let db = app.dir.path().join("signalbox.db");
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{path} has mode {mode:o}");
    }
    app.stop().await;
}

// ------------------------------------------------------------------------------ CLI secrets

fn signalbox_cli(dir: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_signalbox"));
    cmd.current_dir(dir)
        .env_remove("SIGNALBOX_SEND_SECRET")
        .env_remove("SIGNALBOX_CONFIG")
        .env("RUST_LOG", "error")
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn send_help_does_not_print_the_secret_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["slack", "webhook", "pylon"] {
        let out = signalbox_cli(dir.path())
            .args(["send", sub, "--help"])
            .env("SIGNALBOX_SEND_SECRET", "visible-secret-123")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("visible-secret-123"),
            "send {sub} --help: {text}"
        );
        assert!(text.contains("SIGNALBOX_SEND_SECRET"), "{text}");
        assert!(text.contains("--secret-file"), "{text}");
    }
}

async fn send_reads_its_secret_from_a_file_or_stdin(b: Backend) {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app(b).await;
    let ws = app.workspace("Cli").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret.txt");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let send = |verbatim: &str| {
        let mut cmd = signalbox_cli(dir.path());
        cmd.args([
            "send",
            "webhook",
            "--key-id",
            &key,
            "--verbatim",
            verbatim,
            "--url",
            &app.base,
        ]);
        cmd
    };
    // From a file (one trailing newline trimmed).
    let out = send("from a file")
        .arg("--secret-file")
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // From stdin.
    let mut child = send("from stdin")
        .args(["--secret-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(secret.as_bytes()).await.unwrap();
    stdin.write_all(b"\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The file's content is what signs: a wrong one is refused by the server.
    let wrong = dir.path().join("wrong.txt");
    let (_, other) = app.webhook_key(&ws).await;
    std::fs::write(&wrong, &other).unwrap();
    let out = send("wrong secret")
        .arg("--secret-file")
        .arg(&wrong)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    // A missing file, or a flag and a file together, fail before sending, naming what is wrong.
    let missing = dir.path().join("missing.txt");
    let out = send("missing")
        .arg("--secret-file")
        .arg(&missing)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    let out = send("both")
        .args(["--secret", &secret, "--secret-file"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--secret-file") && err.contains("--secret "),
        "{err}"
    );

    app.drain().await;
    let texts: Vec<String> = app
        .signals(&ws)
        .await
        .iter()
        .map(|s| s["verbatim"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    for t in ["from a file", "from stdin"] {
        assert!(
            texts.iter().any(|x| x.contains(t)),
            "{t} missing in {texts:?}"
        );
    }
    app.stop().await;
}

/// `signalbox … | head` must not panic when the reader goes away: it ends quietly with success.
#[test]
fn a_closed_stdout_pipe_ends_the_command_quietly() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("pipe.db").display());
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_signalbox"))
            .args(["keys", "generate"])
            .env("SIGNALBOX_DATABASE_URL", &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the command writes.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.status.success(), "{:?}: {stderr}", out.status);
    }
}

/// A taken address is named in the error, with what to do about it.
#[test]
fn an_address_in_use_is_named_with_the_setting_to_change() {
    use std::process::Command;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_signalbox"))
        .arg("serve")
        .current_dir(dir.path())
        .env(
            "SIGNALBOX_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("s.db").display()),
        )
        .env("SIGNALBOX_BIND", &addr)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("SIGNALBOX_BIND"), "{stderr}");
    drop(taken);
}

/// A filter value that matches nothing by construction (`source=jira`) is a 400 naming the
/// allowed values, on the API and in the CLI, not an empty list that looks like "no data".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_filter_values_are_refused_naming_the_allowed_ones() {
    let app = spawn_app(Backend::Sqlite).await;
    let ws = app.workspace("Filters").await;
    for (path, allowed) in [
        (
            format!("/api/v1/workspaces/{ws}/signals?source=jira"),
            "slack",
        ),
        (
            format!("/api/v1/workspaces/{ws}/signals?status=open"),
            "triaged",
        ),
        ("/api/v1/deliveries?status=done".to_string(), "processed"),
        ("/api/v1/deliveries?source=jira".to_string(), "pylon"),
    ] {
        let (st, v) = app.api("GET", &path, None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(allowed),
            "{path}: {v}"
        );
    }
    let (st, _) = app
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/signals?source=slack&status=deleted"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_signalbox"))
        .args(["signals", "list", "--workspace", &ws, "--source", "jira"])
        .env("SIGNALBOX_DATABASE_URL", &app.db_url)
        .env("SIGNALBOX_MASTER_KEYS", &app.master_keys)
        .output()
        .unwrap();
    assert!(!out.status.success(), "signals list --source jira exited 0");
    assert!(String::from_utf8_lossy(&out.stderr).contains("webhook"));
    app.stop().await;
}

/// A 401 says where a token comes from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_explained() {
    let app = spawn_app(Backend::Sqlite).await;
    for token in [None, Some("not-a-token")] {
        let mut req = app.client.get(format!("{}/api/v1/workspaces", app.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("SIGNALBOX_ADMIN_TOKEN") && msg.contains("token create"),
            "{msg}"
        );
    }
    app.stop().await;
}
