//! Slack OAuth install, token rotation and enrichment, against a local fake Slack (wiremock).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    install_flow_creates_an_encrypted_integration_once,
    bad_reused_expired_or_denied_states_store_nothing,
    tokens_near_expiry_are_refreshed_once_even_concurrently,
    token_expired_triggers_a_refresh_and_a_retry,
    failed_refresh_marks_needs_reauth_but_signals_still_flow,
    enrichment_adds_names_and_permalink,
    rate_limited_enrichment_still_yields_the_signal_promptly,
);

static NEXT_TS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
pub(crate) const APP_SECRET: &str = "app-level-signing-secret";
const CLIENT_SECRET: &str = "client-secret-xyz";

pub(crate) async fn app_with_fake_slack(b: Backend) -> (TestApp, MockServer) {
    let slack = MockServer::start().await;
    let uri = slack.uri();
    let app = spawn_app_with(b, move |c| {
        c.set("slack_client_id", "123.456")
            .set("slack_client_secret", CLIENT_SECRET)
            .set("slack_api_base", &uri)
            .set("slack_signing_secret", APP_SECRET)
            .set("public_url", "https://signals.example.test");
    })
    .await;
    (app, slack)
}

pub(crate) fn oauth_answer(access: &str, refresh: Option<&str>, expires_in: Option<i64>) -> Value {
    let mut v = json!({
        "ok": true, "access_token": access, "token_type": "bot", "scope": "channels:history,users:read",
        "bot_user_id": "U0BOT", "app_id": "A0APP", "team": {"id": "T0TEAM", "name": "Softball Team"},
        "enterprise": null, "authed_user": {"id": "U1234"}
    });
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    if let Some(e) = expires_in {
        v["expires_in"] = json!(e);
    }
    v
}

/// Runs the install flow; returns (status, page text).
pub(crate) async fn install(app: &TestApp, ws: &str, code: &str) -> (StatusCode, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client
        .get(format!(
            "{}/api/integrations/slack/install?workspace_id={ws}",
            app.base
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let state = loc
        .split("state=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_string();
    callback(app, &format!("code={code}&state={state}")).await
}

pub(crate) async fn callback(app: &TestApp, query: &str) -> (StatusCode, String) {
    let resp = app.get(&format!("/api/webhooks/slack/oauth?{query}")).await;
    (resp.status(), resp.text().await.unwrap())
}

pub(crate) async fn slack_integrations(app: &TestApp, ws: &str) -> Vec<Value> {
    let (_, v) = app
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/integrations"),
            None,
        )
        .await;
    v["items"].as_array().unwrap().clone()
}

async fn send_message(app: &TestApp, event_id: &str, text: &str) -> StatusCode {
    let now = signalbox::clock::now_secs();
    let body = json!({
        "token": "x", "team_id": "T0TEAM", "api_app_id": "A0APP", "type": "event_callback",
        "event_id": event_id, "event_time": now,
        "event": {"type": "message", "channel": "C0FEED", "user": "U0JANE", "text": text,
                  "ts": format!("{now}.{:06}", NEXT_TS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
                  "channel_type": "channel"}
    })
    .to_string()
    .into_bytes();
    let sig = signalbox::protocol::slack::sign(APP_SECRET.as_bytes(), now, &body);
    let (st, _) = app
        .post_raw(
            "/api/webhooks/slack/events",
            &[
                ("x-slack-request-timestamp", now.to_string()),
                ("x-slack-signature", sig),
            ],
            body,
        )
        .await;
    st
}

pub(crate) async fn mount_oauth(slack: &MockServer, answer: Value) {
    Mock::given(method("POST"))
        .and(path("/oauth.v2.access"))
        .and(body_string_contains("grant_type=authorization_code"))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .mount(slack)
        .await;
}

async fn mount_names(slack: &MockServer, token: &str) {
    mount_slack_names(
        slack,
        Some(token),
        "https://softball.slack.com/archives/C0FEED/p1",
    )
    .await;
}

async fn install_flow_creates_an_encrypted_integration_once(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws = app.workspace("Acme").await;
    // The authorize redirect carries everything Slack needs.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client
        .get(format!(
            "{}/api/integrations/slack/install?workspace_id={ws}",
            app.base
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        loc.starts_with("https://slack.com/oauth/v2/authorize?client_id=123.456&scope="),
        "{loc}"
    );
    assert!(loc.contains("channels%3Ahistory%2Cgroups%3Ahistory%2Cim%3Ahistory%2Cmpim%3Ahistory%2Cchannels%3Aread%2Cgroups%3Aread%2Cusers%3Aread"), "{loc}");
    assert!(
        loc.contains(
            "redirect_uri=https%3A%2F%2Fsignals.example.test%2Fapi%2Fwebhooks%2Fslack%2Foauth"
        ),
        "{loc}"
    );
    // Without a token the install link is refused.
    let resp = client
        .get(format!(
            "{}/api/integrations/slack/install?workspace_id={ws}",
            app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Client credentials go by HTTP Basic (base64 of "123.456:client-secret-xyz").
    Mock::given(method("POST"))
        .and(path("/oauth.v2.access"))
        .and(header(
            "authorization",
            "Basic MTIzLjQ1NjpjbGllbnQtc2VjcmV0LXh5eg==",
        ))
        .and(body_string_contains("code=code-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(oauth_answer(
            "xoxb-first",
            Some("xoxe-1-r1"),
            Some(43200),
        )))
        .expect(1)
        .mount(&slack)
        .await;
    let (st, page) = install(&app, &ws, "code-1").await;
    assert_eq!(st, StatusCode::OK, "{page}");
    assert!(page.contains("Slack connected"), "{page}");
    let ints = slack_integrations(&app, &ws).await;
    assert_eq!(ints.len(), 1);
    let i = &ints[0];
    assert_eq!(i["platform"], "slack");
    assert_eq!(i["slack_team_id"], "T0TEAM");
    assert_eq!(i["slack_team_name"], "Softball Team");
    assert_eq!(i["slack_bot_user_id"], "U0BOT");
    assert_eq!(i["has_access_token"], true);
    assert_eq!(i["has_refresh_token"], true);
    assert!(i["token_expires_at"].is_string());
    assert!(!i.to_string().contains("xoxb-first"));
    let (_, act) = app
        .api("GET", &format!("/api/v1/workspaces/{ws}/activity"), None)
        .await;
    assert!(
        act["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "integration.installed")
    );
    let raw = app
        .state
        .store
        .get_integration(i["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(raw.access_token_enc.unwrap().starts_with("sbx1:"));

    // Re-installing updates the same integration.
    mount_oauth(&slack, oauth_answer("xoxb-second", None, None)).await;
    let (st, _) = install(&app, &ws, "code-2").await;
    assert_eq!(st, StatusCode::OK);
    let ints = slack_integrations(&app, &ws).await;
    assert_eq!(ints.len(), 1, "re-install must not duplicate");
    assert_eq!(ints[0]["id"], i["id"]);
    assert_eq!(ints[0]["has_refresh_token"], false);
    app.stop().await;
}

async fn bad_reused_expired_or_denied_states_store_nothing(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws = app.workspace("Acme").await;
    mount_oauth(&slack, oauth_answer("xoxb-x", None, None)).await;
    let (st, page) = callback(&app, "code=c&state=never-issued").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(page.contains("expired or already used"), "{page}");
    let (st, page) = callback(&app, "error=access_denied&state=whatever").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(page.contains("cancelled"), "{page}");
    // An expired state.
    app.state
        .store
        .insert_oauth_state(
            &signalbox::protocol::sha256_hex(b"old-state"),
            &ws,
            "admin",
            signalbox::clock::now_micros() - 1,
        )
        .await
        .unwrap();
    let (st, _) = callback(&app, "code=c&state=old-state").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(slack_integrations(&app, &ws).await.is_empty());
    // A used state cannot be used again.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client
        .get(format!(
            "{}/api/integrations/slack/install?workspace_id={ws}",
            app.base
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let state = loc.split("state=").nth(1).unwrap().to_string();
    let (st, _) = callback(&app, &format!("code=c1&state={state}")).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = callback(&app, &format!("code=c2&state={state}")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(slack_integrations(&app, &ws).await.len(), 1);
    app.stop().await;
}

async fn tokens_near_expiry_are_refreshed_once_even_concurrently(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws = app.workspace("Acme").await;
    // Expires in one hour: inside the two-hour refresh margin.
    mount_oauth(
        &slack,
        oauth_answer("xoxe.xoxb-old", Some("xoxe-1-old"), Some(3600)),
    )
    .await;
    assert_eq!(install(&app, &ws, "c").await.0, StatusCode::OK);
    let id = slack_integrations(&app, &ws).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    Mock::given(method("POST"))
        .and(path("/oauth.v2.access"))
        .and(body_string_contains("grant_type=refresh_token"))
        .and(body_string_contains("refresh_token=xoxe-1-old"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(oauth_answer(
                    "xoxe.xoxb-new",
                    Some("xoxe-1-new"),
                    Some(43200),
                ))
                .set_delay(Duration::from_millis(200)),
        )
        .expect(1)
        .mount(&slack)
        .await;
    // Ten concurrent users of the token on this node, and (PostgreSQL) ten on a second node.
    let second = if b == Backend::Postgres {
        let raw = test_config(&app.db_url, &app.master_keys);
        let mut raw = raw;
        raw.set("slack_client_id", "123.456")
            .set("slack_client_secret", CLIENT_SECRET)
            .set("slack_api_base", slack.uri());
        Some(
            start(
                b,
                raw,
                app.db_url.clone(),
                app.master_keys.clone(),
                tempfile::tempdir().unwrap(),
            )
            .await,
        )
    } else {
        None
    };
    let mut futs = Vec::new();
    for _ in 0..10 {
        futs.push(signalbox::sources::slack::bot_token(&app.state, &id, false));
    }
    if let Some(s) = &second {
        for _ in 0..10 {
            futs.push(signalbox::sources::slack::bot_token(&s.state, &id, false));
        }
    }
    let tokens = futures::future::join_all(futs).await;
    use secrecy::ExposeSecret;
    for t in &tokens {
        assert_eq!(
            t.as_ref().map(|t| t.expose_secret().to_string()).as_deref(),
            Some("xoxe.xoxb-new")
        );
    }
    let i = app.state.store.get_integration(&id).await.unwrap().unwrap();
    assert!(i.token_expires_at.unwrap() > signalbox::clock::now_micros() + 11 * 3600 * 1_000_000);
    if let Some(s) = second {
        s.stop().await;
    }
    slack.verify().await;
    app.stop().await;
}

async fn token_expired_triggers_a_refresh_and_a_retry(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws = app.workspace("Acme").await;
    mount_oauth(
        &slack,
        oauth_answer("xoxe.xoxb-old", Some("xoxe-1-old"), Some(43200)),
    )
    .await;
    assert_eq!(install(&app, &ws, "c").await.0, StatusCode::OK);
    Mock::given(method("POST"))
        .and(path("/users.info"))
        .and(header("authorization", "Bearer xoxe.xoxb-old"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": false, "error": "token_expired"})),
        )
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/oauth.v2.access"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(oauth_answer(
            "xoxe.xoxb-new",
            Some("xoxe-1-new"),
            Some(43200),
        )))
        .expect(1)
        .mount(&slack)
        .await;
    mount_names(&slack, "xoxe.xoxb-new").await;
    assert_eq!(
        send_message(&app, "EvEXP1", "hello <@U0JANE>").await,
        StatusCode::OK
    );
    app.drain().await;
    let s = &app.signals(&ws).await[0];
    assert_eq!(s["verbatim"], "hello @Jane Doe");
    assert_eq!(s["source_metadata"]["user_name"], "Jane Doe");
    slack.verify().await;
    app.stop().await;
}

async fn failed_refresh_marks_needs_reauth_but_signals_still_flow(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws = app.workspace("Acme").await;
    mount_oauth(
        &slack,
        oauth_answer("xoxe.xoxb-old", Some("xoxe-1-old"), Some(60)),
    )
    .await;
    assert_eq!(install(&app, &ws, "c").await.0, StatusCode::OK);
    Mock::given(method("POST"))
        .and(path("/oauth.v2.access"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": false, "error": "invalid_refresh_token"})),
        )
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/users.info"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"ok": false, "error": "invalid_auth"})),
        )
        .expect(0)
        .mount(&slack)
        .await;
    assert_eq!(
        send_message(&app, "EvRE1", "still here").await,
        StatusCode::OK
    );
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1);
    assert_eq!(signals[0]["verbatim"], "still here");
    assert_eq!(
        signals[0]["source_metadata"]["enrichment"]["status"],
        "partial"
    );
    let i = &slack_integrations(&app, &ws).await[0];
    assert_eq!(i["needs_reauth"], true, "{i}");
    let (_, act) = app
        .api("GET", &format!("/api/v1/workspaces/{ws}/activity"), None)
        .await;
    assert!(
        act["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "integration.needs_reauth")
    );
    // Later messages keep flowing, without touching the dead token.
    assert_eq!(
        send_message(&app, "EvRE2", "and again").await,
        StatusCode::OK
    );
    app.drain().await;
    assert_eq!(app.signals(&ws).await.len(), 2);
    slack.verify().await;
    app.stop().await;
}

async fn enrichment_adds_names_and_permalink(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws = app.workspace("Acme").await;
    mount_oauth(&slack, oauth_answer("xoxb-token", None, None)).await;
    assert_eq!(install(&app, &ws, "c").await.0, StatusCode::OK);
    mount_names(&slack, "xoxb-token").await;
    assert_eq!(
        send_message(&app, "EvEN1", "<@U0JANE> says see <#C0FEED>").await,
        StatusCode::OK
    );
    app.drain().await;
    let s = &app.signals(&ws).await[0];
    assert_eq!(s["verbatim"], "@Jane Doe says see #feedback");
    let m = &s["source_metadata"];
    assert_eq!(m["user_name"], "Jane Doe");
    assert_eq!(m["channel_name"], "feedback");
    assert_eq!(
        m["permalink"],
        "https://softball.slack.com/archives/C0FEED/p1"
    );
    assert_eq!(m["enrichment"]["status"], "ok");
    assert_eq!(m["raw_text"], "<@U0JANE> says see <#C0FEED>");
    app.stop().await;
}

async fn rate_limited_enrichment_still_yields_the_signal_promptly(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws = app.workspace("Acme").await;
    mount_oauth(&slack, oauth_answer("xoxb-token", None, None)).await;
    assert_eq!(install(&app, &ws, "c").await.0, StatusCode::OK);
    Mock::given(method("POST"))
        .and(path("/users.info"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "30"))
        .expect(1)
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/conversations.info"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": true, "channel": {"name": "feedback"}})),
        )
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/chat.getPermalink"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": true, "permalink": "https://x/p"})),
        )
        .mount(&slack)
        .await;
    let started = std::time::Instant::now();
    assert_eq!(send_message(&app, "EvRL1", "first").await, StatusCode::OK);
    app.drain().await;
    assert_eq!(send_message(&app, "EvRL2", "second").await, StatusCode::OK);
    app.drain().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a 30 s Retry-After must not hold signals back"
    );
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 2);
    for s in &signals {
        let m = &s["source_metadata"];
        assert_eq!(m["channel_name"], "feedback", "other methods keep working");
        assert_eq!(m["enrichment"]["status"], "partial");
        assert!(
            m["enrichment"]["errors"].to_string().contains("users.info"),
            "{m}"
        );
        assert!(m.get("user_name").is_none());
    }
    // users.info was called once: the second message respected Retry-After.
    slack.verify().await;
    app.stop().await;
}
