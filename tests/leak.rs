//! Secrets never leak: a full create → deliver → rotate → process → list flow runs while every
//! log line (TRACE, all targets) is captured; no secret value may appear in the logs, nor in any
//! API response except the creation responses that show a secret once.
//!
//! Its own test binary, so it can install the process-wide tracing subscriber.

#![allow(clippy::unwrap_used)]

#[path = "api/helpers.rs"]
mod helpers;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use reqwest::StatusCode;
use serde_json::{Value, json};
use signalbox::protocol::standard_webhooks;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;
use wiremock::matchers::{header, method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

use helpers::*;

both_backends!(a_full_flow_leaks_no_secret);

// ------------------------------------------------------------------------------------ capture

/// An in-memory log sink shared by every writer the subscriber makes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the global TRACE subscriber once; returns the buffer it writes to.
fn captured_logs() -> Capture {
    static LOGS: OnceLock<Capture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let sink = Capture::default();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_ansi(false)
            .with_writer(sink.clone())
            .try_init()
            .expect("no other global subscriber");
        sink
    })
    .clone()
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

// ------------------------------------------------------------------------------------ flow

const PYLON_SECRET: &str = "leak-pylon-webhook-secret-AAA";
const PYLON_SECRET_NEW: &str = "leak-pylon-webhook-secret-BBB";
const PYLON_TOKEN: &str = "leak-pylon-api-token-CCC";
const PYLON_HEADER: &str = "leak-pylon-shared-header-DDD";
const SLACK_SIGNING: &str = "leak-slack-signing-secret-EEE";
const SLACK_BOT: &str = "xoxb-leak-slack-bot-token-FFF";
const SLACK_CLIENT_SECRET: &str = "leak-slack-client-secret-GGG";
const TEAM: &str = "T0LEAK001";

/// Every API response of the flow, split into the ones allowed to show a secret once.
#[derive(Default)]
struct Responses {
    checked: Mutex<Vec<(String, String)>>,
    one_time: Mutex<Vec<(String, String)>>,
}

impl Responses {
    fn record(&self, one_time: bool, what: String, body: &Value) {
        let list = if one_time {
            &self.one_time
        } else {
            &self.checked
        };
        list.lock().unwrap().push((what, body.to_string()));
    }
}

/// An API call with `token`, recorded.
async fn call(
    app: &TestApp,
    seen: &Responses,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Value {
    let (st, v) = app.api_as(token, method, path, body).await;
    assert!(st.is_success(), "{method} {path}: {st} {v}");
    seen.record(false, format!("{method} {path}"), &v);
    v
}

/// An API call whose response shows a secret once (key/token creation, key rotation).
async fn call_once(
    app: &TestApp,
    seen: &Responses,
    method: &str,
    path: &str,
    body: Value,
) -> Value {
    let (st, v) = app.api(method, path, Some(body)).await;
    assert!(st.is_success(), "{method} {path}: {st} {v}");
    seen.record(true, format!("{method} {path}"), &v);
    v
}

/// A webhook post, recorded.
async fn post(
    app: &TestApp,
    seen: &Responses,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> StatusCode {
    let (st, v) = app.post_raw(path, headers, body).await;
    seen.record(false, format!("POST {path}"), &v);
    st
}

async fn send_pylon(
    app: &TestApp,
    seen: &Responses,
    int: &str,
    secret: &str,
    body: Value,
) -> StatusCode {
    let body = body.to_string().into_bytes();
    let headers = [
        x_pylon_signature(secret, &body),
        ("x-shared-secret", PYLON_HEADER.to_string()),
    ];
    post(app, seen, &pylon_url(int), &headers, body).await
}

async fn send_slack(
    app: &TestApp,
    seen: &Responses,
    int: &str,
    secret: &str,
    n: u32,
) -> StatusCode {
    let body = message(
        TEAM,
        "C0LEAK001",
        "U0LEAK",
        &format!("slack feedback {n}"),
        &format!("1700000000.00000{n}"),
        &format!("Ev0LEAK{n}"),
        json!({}),
    )
    .to_string()
    .into_bytes();
    let headers = slack_headers(secret, now(), &body);
    let path = format!("{SLACK_EVENTS}?integration_id={int}");
    post(app, seen, &path, &headers, body).await
}

async fn send_generic(
    app: &TestApp,
    seen: &Responses,
    key: &str,
    secret: &str,
    msg: &str,
) -> StatusCode {
    let body =
        json!({"verbatim": format!("generic feedback {msg}"), "customer_email": "jane@acme.test"})
            .to_string()
            .into_bytes();
    let headers = generic_headers(secret, msg, signalbox::clock::now_secs(), &body);
    post(
        app,
        seen,
        &format!("/api/webhooks/signals?key_id={key}"),
        &headers,
        body,
    )
    .await
}

async fn a_full_flow_leaks_no_secret(b: Backend) {
    let logs = captured_logs();
    // A fake Pylon API: thin payloads are enriched with the integration's API token.
    let pylon_api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path_regex("^/issues/.+"))
        .and(header("authorization", format!("Bearer {PYLON_TOKEN}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": {"id": "iss_thin", "title": "From the API", "body_html": "<p>Enriched body</p>"}
        })))
        .mount(&pylon_api)
        .await;
    // A fake Slack Web API: Slack signals are enriched with the bot token.
    let slack_api = MockServer::start().await;
    Mock::given(path_regex("^/api/.+"))
        .and(header("authorization", format!("Bearer {SLACK_BOT}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "ok": true,
            "user": {"id": "U0LEAK", "name": "jane", "real_name": "Jane Doe", "profile": {"display_name": "jane", "real_name": "Jane Doe"}},
            "channel": {"id": "C0LEAK001", "name": "feedback"},
            "permalink": "https://acme.slack.com/archives/C0LEAK001/p1700000000000001",
        })))
        .mount(&slack_api)
        .await;
    let app = spawn_app_with(b, |c| {
        c.set("pylon_api_base", pylon_api.uri())
            .set("slack_api_base", format!("{}/api", slack_api.uri()))
            .set("slack_client_id", "123.456")
            .set("slack_client_secret", SLACK_CLIENT_SECRET);
    })
    .await;
    let seen = Responses::default();
    let admin = ADMIN_TOKEN;

    // Create.
    let ws = call(
        &app,
        &seen,
        admin,
        "POST",
        "/api/v1/workspaces",
        Some(json!({"name": "Acme"})),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let k = call_once(
        &app,
        &seen,
        "POST",
        &format!("/api/v1/workspaces/{ws}/webhook-keys"),
        json!({"name": "crm"}),
    )
    .await;
    let key = k["id"].as_str().unwrap().to_string();
    let whsec = k["secret"].as_str().unwrap().to_string();
    let p = call(
        &app,
        &seen,
        admin,
        "POST",
        &format!("/api/v1/workspaces/{ws}/integrations"),
        Some(json!({
            "platform": "pylon", "name": "Pylon", "webhook_secret": PYLON_SECRET, "api_token": PYLON_TOKEN,
            "config": {"required_header": "x-shared-secret"}, "required_header_value": PYLON_HEADER,
        })),
    )
    .await;
    let pylon_int = p["id"].as_str().unwrap().to_string();
    let s = call(
        &app,
        &seen,
        admin,
        "POST",
        &format!("/api/v1/workspaces/{ws}/integrations"),
        Some(json!({
            "platform": "slack", "name": "Slack", "slack_team_id": TEAM,
            "signing_secret": SLACK_SIGNING, "bot_token": SLACK_BOT, "slack_bot_user_id": "U0BOT",
        })),
    )
    .await;
    let slack_int = s["id"].as_str().unwrap().to_string();
    let t = call_once(
        &app,
        &seen,
        "POST",
        &format!("/api/v1/workspaces/{ws}/tokens"),
        json!({"name": "ci"}),
    )
    .await;
    let scoped = t["token"].as_str().unwrap().to_string();
    let scoped_id = t["id"].as_str().unwrap().to_string();

    // Deliver: generic, Pylon (full and thin), Slack; plus refused ones (logged as rejections).
    assert_eq!(
        send_generic(&app, &seen, &key, &whsec, "msg_leak_1").await,
        StatusCode::OK
    );
    let full = json!({"event": "issue_new", "data": {"id": "iss_full", "title": "Export", "body_html": "<p>CSV export times out</p>"}});
    assert_eq!(
        send_pylon(&app, &seen, &pylon_int, PYLON_SECRET, full).await,
        StatusCode::OK
    );
    let thin = json!({"event": "issue_new", "issue_id": "iss_thin"});
    assert_eq!(
        send_pylon(&app, &seen, &pylon_int, PYLON_SECRET, thin).await,
        StatusCode::OK
    );
    assert_eq!(
        send_slack(&app, &seen, &slack_int, SLACK_SIGNING, 1).await,
        StatusCode::OK
    );
    let wrong = "leak-wrong-secret-000";
    assert_eq!(
        send_slack(&app, &seen, &slack_int, wrong, 2).await,
        StatusCode::UNAUTHORIZED
    );
    let other =
        json!({"event": "issue_new", "data": {"id": "iss_x", "title": "x", "body_html": "x"}});
    assert_eq!(
        send_pylon(&app, &seen, &pylon_int, wrong, other).await,
        StatusCode::UNAUTHORIZED
    );
    let other_whsec = standard_webhooks::generate_secret();
    assert_eq!(
        send_generic(&app, &seen, &key, &other_whsec, "msg_leak_bad").await,
        StatusCode::UNAUTHORIZED
    );
    let (st, _) = app
        .api_as("wrong-admin-token-0000", "GET", "/api/v1/workspaces", None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // Rotate a Pylon secret (with grace) and the webhook key.
    call(
        &app,
        &seen,
        admin,
        "PATCH",
        &format!("/api/v1/integrations/{pylon_int}"),
        Some(json!({"secrets": {"webhook_secret": PYLON_SECRET_NEW, "grace_period_secs": 600}})),
    )
    .await;
    let r = call_once(
        &app,
        &seen,
        "POST",
        &format!("/api/v1/webhook-keys/{key}/rotate"),
        json!({"grace_period_secs": 600}),
    )
    .await;
    let whsec_new = r["secret"].as_str().unwrap().to_string();
    assert_eq!(
        send_generic(&app, &seen, &key, &whsec_new, "msg_leak_2").await,
        StatusCode::OK
    );
    assert_eq!(
        send_generic(&app, &seen, &key, &whsec, "msg_leak_3").await,
        StatusCode::OK
    );
    let again = json!({"event": "issue_new", "data": {"id": "iss_new", "title": "Again", "body_html": "<p>after rotation</p>"}});
    assert_eq!(
        send_pylon(&app, &seen, &pylon_int, PYLON_SECRET_NEW, again).await,
        StatusCode::OK
    );

    // Let the workers process everything.
    app.drain().await;
    assert!(
        !pylon_api.received_requests().await.unwrap().is_empty(),
        "the thin Pylon payload was enriched through the API (with the token)"
    );
    let slack_calls = slack_api.received_requests().await.unwrap();
    assert!(
        slack_calls
            .iter()
            .any(|r| r.headers.get("authorization").is_some()),
        "the Slack signal was enriched through the API (with the bot token): {slack_calls:?}"
    );

    // List everything, with the admin token and with the scoped token.
    for token in [admin, scoped.as_str()] {
        for p in [
            "/api/v1/workspaces".to_string(),
            format!("/api/v1/workspaces/{ws}"),
            format!("/api/v1/workspaces/{ws}/webhook-keys"),
            format!("/api/v1/workspaces/{ws}/integrations"),
            "/api/v1/integrations".to_string(),
            format!("/api/v1/integrations/{pylon_int}"),
            format!("/api/v1/integrations/{slack_int}"),
            format!("/api/v1/workspaces/{ws}/tokens"),
            format!("/api/v1/workspaces/{ws}/signals"),
            format!("/api/v1/workspaces/{ws}/activity"),
            "/api/v1/deliveries".to_string(),
        ] {
            call(&app, &seen, token, "GET", &p, None).await;
        }
    }
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 7, "{signals:?}");
    assert!(
        signals.iter().any(|s| s["verbatim"] == "Enriched body"),
        "{signals:?}"
    );
    let deliveries = call(
        &app,
        &seen,
        admin,
        "GET",
        "/api/v1/deliveries?limit=500",
        None,
    )
    .await;
    for d in deliveries["items"].as_array().unwrap() {
        let id = d["id"].as_str().unwrap();
        call(
            &app,
            &seen,
            admin,
            "GET",
            &format!("/api/v1/deliveries/{id}"),
            None,
        )
        .await;
    }
    for s in &signals {
        let id = s["id"].as_str().unwrap();
        call(
            &app,
            &seen,
            &scoped,
            "GET",
            &format!("/api/v1/signals/{id}"),
            None,
        )
        .await;
    }
    let dlv = deliveries["items"][0]["id"].as_str().unwrap().to_string();
    call(
        &app,
        &seen,
        admin,
        "POST",
        &format!("/api/v1/deliveries/{dlv}/replay"),
        None,
    )
    .await;
    app.drain().await;
    // Deactivate, revoke; the probes and metrics are responses too.
    call(
        &app,
        &seen,
        admin,
        "DELETE",
        &format!("/api/v1/integrations/{slack_int}"),
        None,
    )
    .await;
    call(
        &app,
        &seen,
        admin,
        "DELETE",
        &format!("/api/v1/tokens/{scoped_id}"),
        None,
    )
    .await;
    for p in ["/healthz", "/readyz", "/metrics"] {
        let resp = app.get(p).await;
        assert_eq!(resp.status(), StatusCode::OK);
        seen.record(
            false,
            format!("GET {p}"),
            &Value::String(resp.text().await.unwrap()),
        );
    }

    // Debug views of the running state redact too.
    let debug_views = format!("{:?}\n{:?}", app.state.cfg, app.state.creds.keyring());
    let master_keys = app.master_keys.clone();
    app.stop().await;

    // ---------------------------------------------------------------- assertions
    let (_, master_b64) = master_keys.split_once(':').unwrap();
    let mut secrets: Vec<(&str, String)> = vec![
        ("pylon webhook secret", PYLON_SECRET.into()),
        ("rotated pylon webhook secret", PYLON_SECRET_NEW.into()),
        ("pylon api token", PYLON_TOKEN.into()),
        ("pylon shared header", PYLON_HEADER.into()),
        ("slack signing secret", SLACK_SIGNING.into()),
        ("slack bot token", SLACK_BOT.into()),
        ("slack client secret", SLACK_CLIENT_SECRET.into()),
        ("admin token", ADMIN_TOKEN.into()),
        ("master key spec", master_keys.clone()),
        ("master key base64", master_b64.to_string()),
        ("scoped token", scoped.clone()),
        ("webhook key secret", whsec.clone()),
        ("rotated webhook key secret", whsec_new.clone()),
        ("wrong secret tried", wrong.into()),
        ("wrong whsec tried", other_whsec.clone()),
    ];
    for (what, s) in [
        ("webhook key secret", &whsec),
        ("rotated webhook key secret", &whsec_new),
    ] {
        secrets.push((what, s.trim_start_matches("whsec_").to_string()));
    }

    let text = logs.text();
    assert!(
        text.contains("delivery stored"),
        "logs were not captured ({} bytes)",
        text.len()
    );
    for needle in [
        " TRACE ",
        "delivery processed",
        "sqlx::query",
        "signalbox listening",
    ] {
        assert!(
            text.contains(needle),
            "the logs of the flow were not all captured (no {needle:?})"
        );
    }
    for (what, s) in &secrets {
        if let Some(at) = text.find(s.as_str()) {
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!(
                "the {what} appears in the logs:\n{}",
                &text[line_start..line_end]
            );
        }
        assert!(
            !debug_views.contains(s.as_str()),
            "the {what} appears in a Debug view: {debug_views}"
        );
    }

    let checked = seen.checked.lock().unwrap();
    assert!(
        checked.len() > 40,
        "only {} responses checked",
        checked.len()
    );
    for (what, body) in checked.iter() {
        for (name, s) in &secrets {
            assert!(
                !body.contains(s.as_str()),
                "the response to {what} contains the {name}: {body}"
            );
        }
    }
    // The one-time responses show only their own secret.
    let one_time = seen.one_time.lock().unwrap();
    assert_eq!(one_time.len(), 3);
    for (what, body) in one_time.iter() {
        let own = [whsec.as_str(), whsec_new.as_str(), scoped.as_str()];
        for (name, s) in &secrets {
            if own.iter().any(|o| o.contains(s.as_str())) {
                continue;
            }
            assert!(
                !body.contains(s.as_str()),
                "the response to {what} contains the {name}: {body}"
            );
        }
    }
}
