//! The Pylon endpoint, end to end: signatures, replays, payload shapes, updates, messages, the
//! event filter, enrichment from a fake Pylon API (including a 429) and the shared header.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use signalbox::protocol::pylon::{dedupe_key, sign_timestamped, sign_x_pylon};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    signatures_are_verified_over_http,
    identical_replays_are_duplicates,
    every_payload_shape_becomes_a_signal,
    update_events_patch_the_ticket_signal,
    customer_messages_become_their_own_signals,
    event_filter_records_why,
    thin_payloads_are_enriched_from_the_api,
    rate_limited_lookups_are_retried_without_blocking,
    a_retry_after_date_is_honoured,
    required_shared_header_is_checked,
    html_bodies_become_tidy_text,
);

/// An app whose Pylon API is `mock`, a workspace, and a Pylon integration with an API token.
async fn app_with_pylon_api(b: Backend, mock: &MockServer) -> (TestApp, String, String) {
    let app = spawn_app_with(b, |c| {
        c.set("pylon_api_base", mock.uri());
    })
    .await;
    let ws = app.workspace("Acme").await;
    let int = pylon_integration(&app, &ws, json!({"api_token": API_TOKEN})).await;
    (app, ws, int)
}

/// Request headers as `post_raw` takes them.
type Headers = Vec<(&'static str, String)>;

const SECRET: &str = "pylon-webhook-secret-1";
const API_TOKEN: &str = "pylon-api-token-0123";

/// Creates a Pylon integration in `ws`; `extra` is merged over the defaults. Returns its id.
async fn pylon_integration(app: &TestApp, ws: &str, extra: Value) -> String {
    let mut body = json!({"platform": "pylon", "name": "Pylon", "webhook_secret": SECRET});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let v = app.integration(ws, body).await;
    assert_eq!(v["platform"], "pylon", "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn timestamped(secret: &str, ts: i64, body: &[u8]) -> Headers {
    vec![
        (
            "pylon-webhook-signature",
            sign_timestamped(secret.as_bytes(), ts, body),
        ),
        ("pylon-webhook-timestamp", ts.to_string()),
    ]
}

/// Posts `body` signed with `X-Pylon-Signature`.
async fn send(app: &TestApp, int_id: &str, body: &Value) -> (StatusCode, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let headers = vec![x_pylon_signature(SECRET, &bytes)];
    app.post_raw(&pylon_url(int_id), &headers, bytes).await
}

/// Posts `body` signed and asserts the plain `{"ok":true}` ack.
async fn send_ok(app: &TestApp, int_id: &str, body: &Value) {
    let (st, v) = send(app, int_id, body).await;
    assert_eq!((st, &v), (StatusCode::OK, &json!({"ok": true})), "{body}");
}

/// The delivery whose body was `body` (the dedupe key hashes the body).
async fn delivery_of(app: &TestApp, ws: &str, body: &Value) -> Value {
    let key = dedupe_key(&serde_json::to_vec(body).unwrap());
    delivery(&deliveries(app, &format!("workspace_id={ws}")).await, &key).clone()
}

async fn signal_by_ref(app: &TestApp, ws: &str, source_ref: &str) -> Option<Value> {
    app.signals(ws)
        .await
        .into_iter()
        .find(|s| s["source_ref"] == source_ref)
}

const HTML: &str = "<p>Tom &amp; Jerry<br>line2</p><script>x()</script>";

fn assert_converted(verbatim: &Value, what: &str) {
    let v = verbatim.as_str().unwrap();
    assert!(v.contains("Tom & Jerry"), "{what}: {v:?}");
    assert!(v.contains("line2"), "{what}: {v:?}");
    assert!(!v.contains("x()"), "{what}: {v:?}");
    assert!(
        !v.contains('<') && !v.contains("&amp;"),
        "{what}: markup left in {v:?}"
    );
    let lines: Vec<&str> = v.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines,
        vec!["Tom & Jerry", "line2"],
        "{what}: <br> is a line break"
    );
}

// ---------------------------------------------------------------------------------------------

async fn signatures_are_verified_over_http(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let auto = pylon_integration(&app, &ws, json!({})).await;
    let x_only = pylon_integration(
        &app,
        &ws,
        json!({"config": {"signature_scheme": "x-pylon-signature"}}),
    )
    .await;
    let ts_only = pylon_integration(
        &app,
        &ws,
        json!({"config": {"signature_scheme": "timestamped"}}),
    )
    .await;
    let body = serde_json::to_vec(
        &json!({"event": "issue_new", "issue_id": "iss_sig", "issue_title": "t"}),
    )
    .unwrap();
    let now = signalbox::clock::now_secs();
    let good_x = x_pylon_signature(SECRET, &body);
    let good_ts = timestamped(SECRET, now, &body);
    let other = "another-secret-999";
    let unknown = signalbox::ids::new_id("int");
    let with = |mut h: Headers, extra: (&'static str, String)| {
        h.push(extra);
        h
    };

    // ---- rejections first: none of them may write anything.
    type Case = (&'static str, String, Headers, Vec<u8>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "no signature",
            pylon_url(&auto),
            vec![],
            body.clone(),
            "missing_signature",
        ),
        (
            "blank signatures",
            pylon_url(&auto),
            vec![
                ("x-pylon-signature", " ".into()),
                ("pylon-webhook-signature", String::new()),
            ],
            body.clone(),
            "missing_signature",
        ),
        (
            "x-pylon: wrong secret",
            pylon_url(&auto),
            vec![x_pylon_signature(other, &body)],
            body.clone(),
            "invalid_signature",
        ),
        (
            "x-pylon: tampered body",
            pylon_url(&auto),
            vec![good_x.clone()],
            br#"{"event":"issue_new","issue_id":"iss_evil","issue_title":"t"}"#.to_vec(),
            "invalid_signature",
        ),
        (
            "x-pylon: not hex",
            pylon_url(&auto),
            vec![("x-pylon-signature", "zz".repeat(32))],
            body.clone(),
            "invalid_signature",
        ),
        (
            "x-pylon: sha256= prefix",
            pylon_url(&auto),
            vec![("x-pylon-signature", format!("sha256={}", good_x.1))],
            body.clone(),
            "invalid_signature",
        ),
        (
            "x-pylon: truncated",
            pylon_url(&auto),
            vec![("x-pylon-signature", good_x.1[..63].to_string())],
            body.clone(),
            "invalid_signature",
        ),
        (
            "timestamped: wrong secret",
            pylon_url(&auto),
            timestamped(other, now, &body),
            body.clone(),
            "invalid_signature",
        ),
        (
            "timestamped: tampered body",
            pylon_url(&auto),
            good_ts.clone(),
            br#"{"event":"issue_new","issue_id":"iss_evil","issue_title":"t"}"#.to_vec(),
            "invalid_signature",
        ),
        (
            "timestamped: header says another ts",
            pylon_url(&auto),
            vec![
                good_ts[0].clone(),
                ("pylon-webhook-timestamp", (now - 1).to_string()),
            ],
            body.clone(),
            "invalid_signature",
        ),
        (
            "timestamped: stale",
            pylon_url(&auto),
            timestamped(SECRET, now - 301, &body),
            body.clone(),
            "stale_timestamp",
        ),
        (
            "timestamped: future",
            pylon_url(&auto),
            timestamped(SECRET, now + 600, &body),
            body.clone(),
            "stale_timestamp",
        ),
        (
            "timestamped: no timestamp",
            pylon_url(&auto),
            vec![good_ts[0].clone()],
            body.clone(),
            "missing_signature",
        ),
        (
            "timestamped: empty hs256=",
            pylon_url(&auto),
            vec![
                ("pylon-webhook-signature", "hs256=".into()),
                good_ts[1].clone(),
            ],
            body.clone(),
            "invalid_signature",
        ),
        (
            "auto: bad timestamped wins over a good x-pylon",
            pylon_url(&auto),
            with(timestamped(other, now, &body), good_x.clone()),
            body.clone(),
            "invalid_signature",
        ),
        (
            "x-pylon-signature scheme ignores a timestamped signature",
            pylon_url(&x_only),
            good_ts.clone(),
            body.clone(),
            "missing_signature",
        ),
        (
            "timestamped scheme ignores x-pylon",
            pylon_url(&ts_only),
            vec![good_x.clone()],
            body.clone(),
            "missing_signature",
        ),
        (
            "unknown integration",
            pylon_url(&unknown),
            vec![good_x.clone()],
            body.clone(),
            "unknown_integration",
        ),
        (
            "malformed integration id",
            "/api/webhooks/pylon?integration_id=int_'%20OR%201=1--".into(),
            vec![good_x.clone()],
            body.clone(),
            "unknown_integration",
        ),
        (
            "unknown integration (path form)",
            format!("/api/webhooks/pylon/{unknown}"),
            vec![good_x.clone()],
            body.clone(),
            "unknown_integration",
        ),
    ];
    for (name, path, headers, body, code) in cases {
        let (st, v) = app.post_raw(&path, &headers, body).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{name}: {v}");
        assert_eq!(v["error"]["code"], code, "{name}: {v}");
        assert!(v["error"]["message"].is_string(), "{name}: {v}");
    }
    for path in ["/api/webhooks/pylon", "/api/webhooks/pylon?integration_id="] {
        let (st, v) = app
            .post_raw(path, std::slice::from_ref(&good_x), body.clone())
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["error"]["code"], "missing_integration_id", "{path}: {v}");
    }
    // A Slack integration's id is not a Pylon integration.
    let slack = app
        .integration(
            &ws,
            json!({"platform": "slack", "name": "S", "slack_team_id": "T0123ABCD",
                   "signing_secret": "slack-signing-secret"}),
        )
        .await;
    let (st, v) = app
        .post_raw(
            &pylon_url(slack["id"].as_str().unwrap()),
            std::slice::from_ref(&good_x),
            body.clone(),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unknown_integration");
    // A valid signature over something that is not a JSON object is a 400.
    for bad in [b"{\"issue_id\": ".to_vec(), b"[1]".to_vec()] {
        let (st, v) = app
            .post_raw(&pylon_url(&auto), &[x_pylon_signature(SECRET, &bad)], bad)
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "invalid_json", "{v}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 0);

    // ---- accepted forms (a different body each time, so none is a duplicate).
    let body_of = |n: u32| {
        serde_json::to_vec(
            &json!({"event": "issue_new", "issue_id": format!("iss_ok{n}"),
                                   "issue_title": "Accepted"}),
        )
        .unwrap()
    };
    let accepted: Vec<(&str, String, Headers, Vec<u8>)> = vec![
        (
            "x-pylon",
            pylon_url(&auto),
            vec![x_pylon_signature(SECRET, &body_of(1))],
            body_of(1),
        ),
        (
            "x-pylon, uppercase hex",
            pylon_url(&auto),
            vec![(
                "x-pylon-signature",
                sign_x_pylon(SECRET.as_bytes(), &body_of(2)).to_uppercase(),
            )],
            body_of(2),
        ),
        (
            "timestamped",
            pylon_url(&auto),
            timestamped(SECRET, now, &body_of(3)),
            body_of(3),
        ),
        (
            "timestamped, several entries",
            pylon_url(&auto),
            vec![
                (
                    "pylon-webhook-signature",
                    format!(
                        "hs256={}, {}",
                        "0".repeat(64),
                        sign_timestamped(SECRET.as_bytes(), now, &body_of(4))
                    ),
                ),
                ("pylon-webhook-timestamp", now.to_string()),
            ],
            body_of(4),
        ),
        (
            "auto: a good timestamped wins over a bad x-pylon",
            pylon_url(&auto),
            with(
                timestamped(SECRET, now, &body_of(5)),
                x_pylon_signature(other, &body_of(5)),
            ),
            body_of(5),
        ),
        (
            "x-pylon-signature scheme",
            pylon_url(&x_only),
            vec![x_pylon_signature(SECRET, &body_of(6))],
            body_of(6),
        ),
        (
            "timestamped scheme",
            pylon_url(&ts_only),
            timestamped(SECRET, now, &body_of(7)),
            body_of(7),
        ),
        (
            "path form",
            format!("/api/webhooks/pylon/{auto}"),
            vec![x_pylon_signature(SECRET, &body_of(8))],
            body_of(8),
        ),
    ];
    let n = accepted.len() as i64;
    for (name, path, headers, body) in accepted {
        let (st, v) = app.post_raw(&path, &headers, body).await;
        assert_eq!(st, StatusCode::OK, "{name}: {v}");
        assert_eq!(v, json!({"ok": true}), "{name}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, n);
    app.drain().await;
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, n);
    let signals = app.signals(&ws).await;
    assert!(
        signals.iter().all(|s| s["source"] == "pylon"),
        "{signals:?}"
    );
    assert!(
        signal_by_ref(&app, &ws, "pylon-iss_ok8").await.is_some(),
        "the path form stored a delivery for the integration"
    );

    // ---- an inactive integration is unknown, and still nothing is written.
    let (st, v) = app
        .api("DELETE", &format!("/api/v1/integrations/{auto}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let fresh = body_of(9);
    for path in [pylon_url(&auto), format!("/api/webhooks/pylon/{auto}")] {
        let (st, v) = app
            .post_raw(&path, &[x_pylon_signature(SECRET, &fresh)], fresh.clone())
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}: {v}");
        assert_eq!(v["error"]["code"], "unknown_integration", "{path}: {v}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, n);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, n);
    app.stop().await;
}

async fn identical_replays_are_duplicates(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let int = pylon_integration(&app, &ws, json!({})).await;
    let body = json!({"event": "issue_new", "issue_id": "iss_r", "issue_title": "Replay me",
                      "issue_body": "<p>Once</p>"});
    send_ok(&app, &int, &body).await;
    let (st, v) = send(&app, &int, &body).await;
    assert_eq!(
        (st, v),
        (StatusCode::OK, json!({"ok": true, "duplicate": true}))
    );
    // The same bytes under the timestamped scheme (a fresh timestamp) are still a replay.
    let bytes = serde_json::to_vec(&body).unwrap();
    let headers = timestamped(SECRET, signalbox::clock::now_secs(), &bytes);
    let (st, v) = app.post_raw(&pylon_url(&int), &headers, bytes).await;
    assert_eq!(
        (st, v),
        (StatusCode::OK, json!({"ok": true, "duplicate": true}))
    );
    app.drain().await;
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 1);
    let (st, v) = send(&app, &int, &body).await;
    assert_eq!(
        (st, v),
        (StatusCode::OK, json!({"ok": true, "duplicate": true})),
        "still a duplicate after processing"
    );
    app.drain().await;
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 1);
    assert_eq!(activity(&app, &ws, "signal.created").await.len(), 1);
    assert_eq!(activity(&app, &ws, "signal.updated").await.len(), 0);
    let s = signal_by_ref(&app, &ws, "pylon-iss_r").await.unwrap();
    assert_eq!(s["verbatim"], "Once");
    app.stop().await;
}

async fn every_payload_shape_becomes_a_signal(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let int = pylon_integration(&app, &ws, json!({})).await;
    let api_issue = |id: &str| {
        json!({
            "id": id, "number": 11, "title": "Export fails", "body_html": HTML, "state": "new",
            "priority": "high", "link": format!("https://app.usepylon.com/issues/{id}"),
            "requester": {"id": "c1", "email": "ann@acme.test", "name": "Ann"},
            "account": {"id": "acc1", "name": "Acme"}, "tags": ["bug", "export"]
        })
    };
    let mut top = api_issue("iss_top");
    top["event"] = json!("issue_new");
    let shapes = vec![
        (
            "data",
            "iss_data",
            json!({"event": "issue_new", "data": api_issue("iss_data"), "request_id": "r1"}),
        ),
        (
            "issue",
            "iss_issue",
            json!({"event": "issue_new", "issue": api_issue("iss_issue")}),
        ),
        ("top level", "iss_top", top),
        (
            "flattened",
            "iss_flat",
            json!({
                "event": "issue_new", "issue_id": "iss_flat", "issue_number": "11",
                "issue_title": "Export fails", "issue_body": HTML, "issue_status": "new",
                "issue_priority": "high", "issue_requester_email": "ann@acme.test",
                "issue_requester_name": "Ann", "issue_account_id": "acc1",
                "issue_account_name": "Acme",
                "issue_link": "https://app.usepylon.com/issues/iss_flat",
                "issue_tags": "bug, export", "unknown_field": {"ignored": true}
            }),
        ),
    ];
    for (_, _, body) in &shapes {
        send_ok(&app, &int, body).await;
    }
    // No issue id anywhere: failed, not retried.
    let no_id = json!({"event": "issue_new", "title": "Who am I?", "data": {"title": "nope"}});
    send_ok(&app, &int, &no_id).await;
    // Thin without an API token: a signal from the payload alone.
    let thin = json!({"event": "issue_new", "issue_id": "iss_thin", "issue_status": "new"});
    send_ok(&app, &int, &thin).await;
    // Only a title: the verbatim falls back to it; priority from custom_fields.
    let titled = json!({"id": "iss_titled", "title": "Only a title", "body_html": "<p> </p>",
                        "custom_fields": {"priority": {"slug": "priority", "value": "urgent"}}});
    send_ok(&app, &int, &titled).await;
    app.drain().await;

    for (shape, id, body) in &shapes {
        let s = signal_by_ref(&app, &ws, &format!("pylon-{id}"))
            .await
            .unwrap_or_else(|| panic!("{shape}: no signal"));
        assert_eq!(s["source"], "pylon", "{shape}");
        assert_eq!(s["status"], "new", "{shape}");
        assert_converted(&s["verbatim"], shape);
        let m = &s["source_metadata"];
        assert_eq!(m["ticketId"], *id, "{shape}: {m}");
        assert_eq!(m["ticketNumber"], 11, "{shape}: {m}");
        assert_eq!(m["ticketStatus"], "new", "{shape}: {m}");
        assert_eq!(m["priority"], "high", "{shape}: {m}");
        assert_eq!(m["customerEmail"], "ann@acme.test", "{shape}: {m}");
        assert_eq!(m["sourceName"], "Ann", "{shape}: {m}");
        assert_eq!(m["accountId"], "acc1", "{shape}: {m}");
        assert_eq!(m["accountName"], "Acme", "{shape}: {m}");
        assert_eq!(
            m["sourceUrl"],
            format!("https://app.usepylon.com/issues/{id}"),
            "{shape}: {m}"
        );
        assert_eq!(m["tags"], json!(["bug", "export"]), "{shape}: {m}");
        assert_eq!(m["title"], "Export fails", "{shape}: {m}");
        assert_eq!(m["event"], "issue_new", "{shape}: {m}");
        assert_eq!(m["raw_payload"], *body, "{shape}: {m}");
        let d = delivery_of(&app, &ws, body).await;
        assert_eq!(d["status"], "processed", "{shape}: {d}");
        assert_eq!(d["signal_id"], s["id"], "{shape}: {d}");
        assert_eq!(d["source"], "pylon", "{shape}: {d}");
        assert_eq!(d["integration_id"], int.as_str(), "{shape}: {d}");
    }

    let s = signal_by_ref(&app, &ws, "pylon-iss_thin").await.unwrap();
    assert_eq!(s["verbatim"], "No content");
    assert_eq!(s["source_metadata"]["ticketStatus"], "new");
    let s = signal_by_ref(&app, &ws, "pylon-iss_titled").await.unwrap();
    assert_eq!(s["verbatim"], "Only a title");
    assert_eq!(s["source_metadata"]["priority"], "urgent");

    let d = delivery_of(&app, &ws, &no_id).await;
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    assert!(d["signal_id"].is_null(), "{d}");
    let err = d["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("no issue id"), "unclear last_error: {d}");
    // It stays failed: never picked up again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let d = delivery_of(&app, &ws, &no_id).await;
    assert_eq!(
        (&d["status"], &d["attempts"]),
        (&json!("failed"), &json!(1))
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 6);
    assert_eq!(activity(&app, &ws, "signal.created").await.len(), 6);
    app.stop().await;
}

async fn update_events_patch_the_ticket_signal(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let int = pylon_integration(&app, &ws, json!({})).await;
    let first = json!({
        "event": "issue_new", "issue_id": "iss_u", "issue_title": "Login broken",
        "issue_body": "<p>Cannot log in</p>", "issue_status": "new", "issue_priority": "high",
        "issue_requester_email": "ann@acme.test", "issue_tags": ["auth"]
    });
    send_ok(&app, &int, &first).await;
    app.drain().await;
    let second = json!({
        "event": "issue_updated", "issue_id": "iss_u", "issue_title": "Login broken",
        "issue_body": "<p>Cannot log in (edited)</p>", "issue_status": "closed",
        "issue_priority": "low", "issue_tags": ["auth", "resolved"],
        "issue_assignee_email": "bob@us.test"
    });
    send_ok(&app, &int, &second).await;
    app.drain().await;

    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:?}");
    let s = &signals[0];
    assert_eq!(s["source_ref"], "pylon-iss_u");
    assert_eq!(s["verbatim"], "Cannot log in", "the ticket's text is kept");
    let m = &s["source_metadata"];
    assert_eq!(m["ticketStatus"], "closed", "{m}");
    assert_eq!(m["priority"], "low", "{m}");
    assert_eq!(m["tags"], json!(["auth", "resolved"]), "{m}");
    assert_eq!(m["assignee"], "bob@us.test", "{m}");
    assert_eq!(m["lastEvent"], "issue_updated", "{m}");
    assert_eq!(
        m["customerEmail"], "ann@acme.test",
        "kept from the first event: {m}"
    );
    for body in [&first, &second] {
        let d = delivery_of(&app, &ws, body).await;
        assert_eq!(d["status"], "processed", "{d}");
        assert_eq!(d["signal_id"], s["id"], "{d}");
    }
    let created = activity(&app, &ws, "signal.created").await;
    let updated = activity(&app, &ws, "signal.updated").await;
    assert_eq!(created.len(), 1);
    assert_eq!(updated.len(), 1, "{updated:?}");
    assert_eq!(updated[0]["target_id"], s["id"]);

    // A thin status change (no API token) updates the status without erasing what is known.
    let third = json!({"event": "issue_status_changed", "issue_id": "iss_u",
                       "issue_status": "waiting_on_you"});
    send_ok(&app, &int, &third).await;
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:?}");
    let s = &signals[0];
    assert_eq!(s["verbatim"], "Cannot log in");
    let m = &s["source_metadata"];
    assert_eq!(m["ticketStatus"], "waiting_on_you", "{m}");
    assert_eq!(m["lastEvent"], "issue_status_changed", "{m}");
    assert_eq!(m["customerEmail"], "ann@acme.test", "{m}");
    assert_eq!(m["title"], "Login broken", "{m}");
    assert_eq!(m["priority"], "low", "{m}");
    assert_eq!(activity(&app, &ws, "signal.updated").await.len(), 2);
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 3);
    app.stop().await;
}

async fn customer_messages_become_their_own_signals(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let int = pylon_integration(&app, &ws, json!({})).await;
    let ticket = json!({"event": "issue_new", "issue_id": "iss_m", "issue_title": "Slow",
                        "issue_body": "<p>Dashboard is slow</p>"});
    send_ok(&app, &int, &ticket).await;
    app.drain().await;
    let message = json!({
        "event": "issue_message_new", "issue_id": "iss_m", "message_id": "m1",
        "message_body_html": "<p>Any update?</p>", "message_is_private": false,
        "message_author_email": "ann@acme.test"
    });
    send_ok(&app, &int, &message).await;
    let private = json!({
        "event": "issue_message_new", "issue_id": "iss_m", "message_id": "m2",
        "message_body_html": "<p>Internal: customer is on the old plan</p>",
        "message_is_private": true
    });
    send_ok(&app, &int, &private).await;
    app.drain().await;

    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 2, "{signals:?}");
    let ticket_signal = signal_by_ref(&app, &ws, "pylon-iss_m").await.unwrap();
    assert_eq!(ticket_signal["verbatim"], "Dashboard is slow");
    let s = signal_by_ref(&app, &ws, "pylon-iss_m-msg-m1")
        .await
        .expect("the message signal");
    assert_eq!(s["source"], "pylon");
    assert_eq!(s["verbatim"], "Any update?");
    let m = &s["source_metadata"];
    assert_eq!(m["ticket_id"], "iss_m", "{m}");
    assert_eq!(m["message_id"], "m1", "{m}");
    assert_eq!(m["author_email"], "ann@acme.test", "{m}");
    assert_eq!(m["raw_payload"], message, "{m}");
    let d = delivery_of(&app, &ws, &message).await;
    assert_eq!(
        (&d["status"], &d["signal_id"]),
        (&json!("processed"), &s["id"])
    );

    let d = delivery_of(&app, &ws, &private).await;
    assert_eq!(d["status"], "filtered", "{d}");
    assert!(d["signal_id"].is_null(), "{d}");
    assert!(
        d["filter_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("private"),
        "{d}"
    );
    assert!(
        signal_by_ref(&app, &ws, "pylon-iss_m-msg-m2")
            .await
            .is_none()
    );
    // The ticket itself was not touched by its messages.
    assert_eq!(activity(&app, &ws, "signal.updated").await.len(), 0);
    assert_eq!(activity(&app, &ws, "signal.created").await.len(), 2);
    app.stop().await;
}

async fn event_filter_records_why(b: Backend) {
    let mock = MockServer::start().await;
    // A filtered event must not spend an API call (and a full payload needs none).
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .named("no Pylon API call")
        .mount(&mock)
        .await;
    let app = spawn_app_with(b, |c| {
        c.set("pylon_api_base", mock.uri());
    })
    .await;
    let ws = app.workspace("Acme").await;
    let int = pylon_integration(
        &app,
        &ws,
        json!({"api_token": API_TOKEN, "config": {"pylon_events": ["issue_new"]}}),
    )
    .await;
    let updated = json!({"event": "issue_updated", "issue_id": "iss_f"});
    let unnamed = json!({"issue_id": "iss_f", "issue_title": "no event name"});
    let new = json!({"event": "issue_new", "issue_id": "iss_f", "issue_title": "Kept",
                     "issue_body": "<p>Kept</p>"});
    send_ok(&app, &int, &updated).await;
    send_ok(&app, &int, &unnamed).await;
    send_ok(&app, &int, &new).await;
    app.drain().await;
    for body in [&updated, &unnamed] {
        let d = delivery_of(&app, &ws, body).await;
        assert_eq!(d["status"], "filtered", "{d}");
        assert!(d["signal_id"].is_null(), "{d}");
        let reason = d["filter_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("pylon_events"), "{d}");
    }
    let d = delivery_of(&app, &ws, &updated).await;
    assert!(
        d["filter_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("issue_updated"),
        "{d}"
    );
    let d = delivery_of(&app, &ws, &new).await;
    assert_eq!(d["status"], "processed", "{d}");
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:?}");
    assert_eq!(signals[0]["verbatim"], "Kept");
    app.stop().await;
    mock.verify().await;
}

async fn thin_payloads_are_enriched_from_the_api(b: Backend) {
    let mock = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/issues/iss_1"))
        .and(header(
            "authorization",
            format!("Bearer {API_TOKEN}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": {"id": "iss_1", "title": "Printer on fire", "body_html": "<p>Help</p>",
                     "state": "new", "requester": {"email": "a@b.test"}},
            "request_id": "req_1"
        })))
        .expect(1)
        .named("GET /issues/iss_1 with the bearer token")
        .mount(&mock)
        .await;
    Mock::given(method("GET"))
        .and(path("/issues/iss_gone"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"errors": ["not found"]})))
        .expect(1)
        .mount(&mock)
        .await;
    let (app, ws, int) = app_with_pylon_api(b, &mock).await;
    let thin = json!({"event": "issue_new", "issue_id": "iss_1"});
    send_ok(&app, &int, &thin).await;
    app.drain().await;
    let s = signal_by_ref(&app, &ws, "pylon-iss_1")
        .await
        .expect("signal for iss_1");
    assert_eq!(s["verbatim"], "Help");
    let m = &s["source_metadata"];
    assert_eq!(m["title"], "Printer on fire", "{m}");
    assert_eq!(m["customerEmail"], "a@b.test", "{m}");
    assert_eq!(m["ticketStatus"], "new", "{m}");
    assert_eq!(m["ticketId"], "iss_1", "{m}");
    assert_eq!(
        m["raw_payload"], thin,
        "the raw payload is what Pylon sent: {m}"
    );
    let d = delivery_of(&app, &ws, &thin).await;
    assert_eq!(
        (&d["status"], &d["attempts"]),
        (&json!("processed"), &json!(1))
    );
    let reqs = mock.received_requests().await.unwrap();
    let r = reqs
        .iter()
        .find(|r| r.url.path() == "/issues/iss_1")
        .unwrap();
    assert_eq!(
        r.headers.get("authorization").unwrap(),
        &format!("Bearer {API_TOKEN}")
    );

    // An issue the API does not know: the signal comes from the payload alone.
    let gone = json!({"event": "issue_new", "issue_id": "iss_gone", "issue_status": "new"});
    send_ok(&app, &int, &gone).await;
    app.drain().await;
    let s = signal_by_ref(&app, &ws, "pylon-iss_gone")
        .await
        .expect("signal for iss_gone");
    assert_eq!(s["verbatim"], "No content");
    let d = delivery_of(&app, &ws, &gone).await;
    assert_eq!(
        (&d["status"], &d["attempts"]),
        (&json!("processed"), &json!(1))
    );
    app.stop().await;
    mock.verify().await;
}

/// Answers with `template` and records when each request arrived.
struct Timed {
    template: ResponseTemplate,
    at: Arc<Mutex<Vec<Instant>>>,
}

impl Respond for Timed {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.at.lock().unwrap().push(Instant::now());
        self.template.clone()
    }
}

async fn a_retry_after_date_is_honoured(b: Backend) {
    let mock = MockServer::start().await;
    let at = Arc::new(Mutex::new(Vec::new()));
    // An HTTP-date two seconds ahead (whole seconds, so 1–2 s from now).
    let when = chrono::Utc::now() + chrono::Duration::seconds(2);
    let date = when.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    Mock::given(method("GET"))
        .and(path("/issues/iss_9"))
        .respond_with(Timed {
            template: ResponseTemplate::new(429).insert_header("Retry-After", date.as_str()),
            at: at.clone(),
        })
        .up_to_n_times(1)
        .expect(1)
        .mount(&mock)
        .await;
    Mock::given(method("GET"))
        .and(path("/issues/iss_9"))
        .respond_with(Timed {
            template: ResponseTemplate::new(200).set_body_json(json!({
                "data": {"id": "iss_9", "title": "Dated", "body_html": "<p>Later</p>"}
            })),
            at: at.clone(),
        })
        .expect(1)
        .mount(&mock)
        .await;
    let (app, ws, int) = app_with_pylon_api(b, &mock).await;
    let thin = json!({"event": "issue_new", "issue_id": "iss_9"});
    send_ok(&app, &int, &thin).await;
    wait_for("the dated retry", || async {
        signal_by_ref(&app, &ws, "pylon-iss_9").await.is_some()
    })
    .await;
    let calls = at.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let gap = calls[1] - calls[0];
    // Not retried at once, and not after the 30 s used when the header cannot be read.
    assert!(
        gap >= Duration::from_millis(500) && gap < Duration::from_secs(10),
        "Retry-After: {date} gave a {gap:?} wait"
    );
}

async fn rate_limited_lookups_are_retried_without_blocking(b: Backend) {
    let mock = MockServer::start().await;
    let at = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("GET"))
        .and(path("/issues/iss_1"))
        .and(header(
            "authorization",
            format!("Bearer {API_TOKEN}").as_str(),
        ))
        .respond_with(Timed {
            template: ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_json(json!({"errors": ["rate limited"]})),
            at: at.clone(),
        })
        .up_to_n_times(1)
        .expect(1)
        .named("429 once")
        .mount(&mock)
        .await;
    Mock::given(method("GET"))
        .and(path("/issues/iss_1"))
        .and(header(
            "authorization",
            format!("Bearer {API_TOKEN}").as_str(),
        ))
        .respond_with(Timed {
            template: ResponseTemplate::new(200).set_body_json(json!({
                "data": {"id": "iss_1", "title": "Printer on fire", "body_html": "<p>Help</p>",
                         "state": "new", "requester": {"email": "a@b.test"}}
            })),
            at: at.clone(),
        })
        .expect(1)
        .named("then 200")
        .mount(&mock)
        .await;
    // One worker: if it slept on Retry-After, nothing else could be processed meanwhile.
    let app = spawn_app_with(b, |c| {
        c.set("pylon_api_base", mock.uri())
            .set("worker_concurrency", "1");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let int = pylon_integration(&app, &ws, json!({"api_token": API_TOKEN})).await;
    let thin = json!({"event": "issue_new", "issue_id": "iss_1"});
    send_ok(&app, &int, &thin).await;
    wait_for("the first (rate-limited) lookup", || async {
        let d = delivery_of(&app, &ws, &thin).await;
        // Waiting out a rate limit is not counted as a failed attempt.
        d["attempts"] == 0
            && d["status"] == "pending"
            && d["last_error"].as_str().is_some_and(|e| e.contains("429"))
    })
    .await;
    let first_call = at.lock().unwrap()[0];
    // Other work goes on while the thin delivery waits for its retry.
    let full = json!({"event": "issue_new", "issue_id": "iss_2", "issue_title": "Other",
                      "issue_body": "<p>Not thin</p>"});
    send_ok(&app, &int, &full).await;
    wait_for("the full payload's signal", || async {
        signal_by_ref(&app, &ws, "pylon-iss_2").await.is_some()
    })
    .await;
    let waited = first_call.elapsed();
    let d = delivery_of(&app, &ws, &thin).await;
    assert_eq!(
        d["status"], "pending",
        "the full payload waited for the rate-limited one ({waited:?} after the 429): {d}"
    );
    assert_eq!(at.lock().unwrap().len(), 1, "retried before Retry-After");

    app.drain().await;
    let d = delivery_of(&app, &ws, &thin).await;
    assert_eq!(d["status"], "processed", "{d}");
    assert_eq!(d["attempts"], 1, "only the successful try counts: {d}");
    let calls = at.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let gap = calls[1] - calls[0];
    assert!(
        gap >= Duration::from_millis(900),
        "Retry-After: 1 not honoured, retried after {gap:?}"
    );
    let s = signal_by_ref(&app, &ws, "pylon-iss_1").await.unwrap();
    assert_eq!(s["verbatim"], "Help");
    assert_eq!(s["source_metadata"]["title"], "Printer on fire");
    assert_eq!(s["source_metadata"]["customerEmail"], "a@b.test");
    assert_eq!(d["signal_id"], s["id"]);
    let other = signal_by_ref(&app, &ws, "pylon-iss_2").await.unwrap();
    assert_eq!(other["verbatim"], "Not thin");
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 2);
    let metrics = app.metrics().await;
    let line = metrics
        .lines()
        .find(|l| l.contains("api_calls") && l.contains("rate_limited"))
        .unwrap_or_default();
    assert!(
        line.ends_with(" 1"),
        "no rate_limited API call counted: {line:?}"
    );
    app.stop().await;
    mock.verify().await;
}

async fn required_shared_header_is_checked(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let int = pylon_integration(
        &app,
        &ws,
        json!({"required_header_value": "Bearer s3cret-token",
               "config": {"required_header": "authorization"}}),
    )
    .await;
    let (st, v) = app
        .api("GET", &format!("/api/v1/integrations/{int}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["has_required_header_value"], true, "{v}");
    assert!(
        !v.to_string().contains("s3cret-token"),
        "secret leaked: {v}"
    );
    let body = serde_json::to_vec(&json!({"event": "issue_new", "issue_id": "iss_h",
                                          "issue_title": "Header"}))
    .unwrap();
    let sig = x_pylon_signature(SECRET, &body);
    let auth = |v: &str| ("authorization", v.to_string());
    let cases: Vec<(&str, Headers, &str)> = vec![
        ("header missing", vec![sig.clone()], "missing_signature"),
        (
            "wrong value",
            vec![sig.clone(), auth("Bearer wrong-token")],
            "invalid_signature",
        ),
        (
            "value prefix only",
            vec![sig.clone(), auth("Bearer s3cret")],
            "invalid_signature",
        ),
        (
            "right header, bad signature",
            vec![
                x_pylon_signature("another-secret-999", &body),
                auth("Bearer s3cret-token"),
            ],
            "invalid_signature",
        ),
        (
            "right header, no signature",
            vec![auth("Bearer s3cret-token")],
            "missing_signature",
        ),
    ];
    for (name, headers, code) in cases {
        let (st, v) = app.post_raw(&pylon_url(&int), &headers, body.clone()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{name}: {v}");
        assert_eq!(v["error"]["code"], code, "{name}: {v}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    let (st, v) = app
        .post_raw(
            &pylon_url(&int),
            &[sig.clone(), auth("Bearer s3cret-token")],
            body.clone(),
        )
        .await;
    assert_eq!((st, v), (StatusCode::OK, json!({"ok": true})));
    app.drain().await;
    assert!(signal_by_ref(&app, &ws, "pylon-iss_h").await.is_some());
    // The header's value is never stored with the delivery.
    assert_eq!(
        app.count("SELECT COUNT(*) FROM deliveries WHERE headers LIKE '%s3cret%'")
            .await,
        0
    );
    app.stop().await;
}

async fn html_bodies_become_tidy_text(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let int = pylon_integration(&app, &ws, json!({})).await;
    let cases = [
        (
            "entities and nbsp",
            "<p>Tom &amp; Jerry&nbsp;say &lt;hi&gt; &quot;ok&quot; &eacute;</p>",
            "Tom & Jerry say <hi> \"ok\" \u{e9}",
        ),
        (
            "paragraphs, list, style",
            "<style>p { color: red }</style><p>First</p><p>Second</p><ul><li>one</li><li>two</li></ul>",
            "First\n\nSecond\n\none\ntwo",
        ),
    ];
    for (i, (_, html, _)) in cases.iter().enumerate() {
        let body =
            json!({"event": "issue_new", "issue_id": format!("iss_h{i}"), "issue_body": html});
        send_ok(&app, &int, &body).await;
    }
    // A body of ~1 MB of nested <div>s (under the 1 MiB request cap) converts quickly.
    let bomb = format!("<p>Start &amp; end</p>{}bottom", "<div>".repeat(200_000));
    let body = json!({"event": "issue_new", "issue_id": "iss_bomb", "issue_body": bomb});
    let started = Instant::now();
    send_ok(&app, &int, &body).await;
    app.drain().await;
    let took = started.elapsed();
    for (i, (name, _, expected)) in cases.iter().enumerate() {
        let s = signal_by_ref(&app, &ws, &format!("pylon-iss_h{i}"))
            .await
            .unwrap();
        let v = s["verbatim"].as_str().unwrap();
        if name.starts_with("paragraphs") {
            let lines: Vec<&str> = v.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            assert_eq!(
                lines,
                vec!["First", "Second", "one", "two"],
                "{name}: {v:?}"
            );
            assert!(!v.contains("color"), "{name}: {v:?}");
        } else {
            assert_eq!(v, *expected, "{name}");
        }
    }
    let s = signal_by_ref(&app, &ws, "pylon-iss_bomb").await.unwrap();
    let v = s["verbatim"].as_str().unwrap();
    assert!(v.starts_with("Start & end"), "{:?}", &v[..v.len().min(200)]);
    assert!(!v.contains("<div>"), "markup left in the bomb's text");
    assert!(
        took < Duration::from_secs(10),
        "the nested-div body took {took:?}"
    );
    let d = delivery_of(&app, &ws, &body).await;
    assert_eq!(
        (&d["status"], &d["attempts"]),
        (&json!("processed"), &json!(1))
    );
    app.stop().await;
}
