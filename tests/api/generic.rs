//! The generic signed endpoint, end to end.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;
use crate::{both_backends, sqlite_only};

both_backends!(
    signed_delivery_becomes_a_signal,
    rejected_requests_write_nothing,
    invalid_json_after_a_valid_signature_is_400,
    duplicate_webhook_ids_make_one_signal,
    storage_down_answers_503,
    svix_header_names_are_the_same_scheme,
    a_stale_timestamp_says_how_far_off_and_the_window,
);
// The body limit is enforced while the body is read, before the key is looked up.
sqlite_only!(oversized_bodies_get_413);

async fn signed_delivery_becomes_a_signal(b: Backend) {
    let (app, ws, key, secret) = app_with_key(b).await;
    let body = json!({
        "verbatim": "Exporting to CSV times out",
        "source_ref": "ticket-42",
        "source_name": "Jane",
        "customer_email": "jane@acme.test",
        "metadata": {"plan": "pro"}
    });
    let (st, v) = app.send_generic(&key, &secret, "msg_1", &body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"ok": true}));
    // The delivery row exists as soon as the 200 is out.
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 1);
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1);
    let s = &signals[0];
    assert_eq!(s["verbatim"], "Exporting to CSV times out");
    assert_eq!(s["source"], "webhook");
    assert_eq!(s["source_ref"], "ticket-42");
    assert_eq!(s["status"], "new");
    assert_eq!(s["workspace_id"], ws.as_str());
    assert_eq!(s["source_metadata"]["customer_email"], "jane@acme.test");
    assert_eq!(s["source_metadata"]["metadata"]["plan"], "pro");
    assert!(s["id"].as_str().unwrap().starts_with("sig_"));
    // The delivery points at it, and the activity log says so.
    let (_, d) = app
        .api(
            "GET",
            &format!("/api/v1/deliveries?workspace_id={ws}"),
            None,
        )
        .await;
    let d = &d["items"][0];
    assert_eq!(d["status"], "processed");
    assert_eq!(d["signal_id"], s["id"]);
    assert_eq!(d["dedupe_key"], "msg_1");
    let (_, a) = app
        .api("GET", &format!("/api/v1/workspaces/{ws}/activity"), None)
        .await;
    let created: Vec<_> = a["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "signal.created")
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["target_id"], s["id"]);
    // Without source_ref the webhook-id is the signal's dedupe key.
    let (st, _) = app
        .send_generic(&key, &secret, "msg_2", &json!({"verbatim": "second"}))
        .await;
    assert_eq!(st, StatusCode::OK);
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals[0]["source_ref"], "msg_2");
    app.stop().await;
}

async fn rejected_requests_write_nothing(b: Backend) {
    let (app, _, key, secret) = app_with_key(b).await;
    let body = json!({"verbatim": "x"}).to_string().into_bytes();
    let now = signalbox::clock::now_secs();
    let path = format!("/api/webhooks/signals?key_id={key}");
    let good = generic_headers(&secret, "m1", now, &body);
    let other_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, String, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no headers",
            vec![],
            body.clone(),
            path.clone(),
            "missing_signature",
        ),
        (
            "no signature",
            good[..2].to_vec(),
            body.clone(),
            path.clone(),
            "missing_signature",
        ),
        (
            "empty v1,",
            vec![
                good[0].clone(),
                good[1].clone(),
                ("webhook-signature", "v1,".into()),
            ],
            body.clone(),
            path.clone(),
            "invalid_signature",
        ),
        (
            "garbled",
            vec![
                good[0].clone(),
                good[1].clone(),
                ("webhook-signature", "v1,not base64!".into()),
            ],
            body.clone(),
            path.clone(),
            "invalid_signature",
        ),
        (
            "other body",
            good.clone(),
            b"{\"verbatim\":\"y\"}".to_vec(),
            path.clone(),
            "invalid_signature",
        ),
        (
            "wrong secret",
            generic_headers(other_secret, "m1", now, &body),
            body.clone(),
            path.clone(),
            "invalid_signature",
        ),
        (
            "stale",
            generic_headers(&secret, "m1", now - 301, &body),
            body.clone(),
            path.clone(),
            "stale_timestamp",
        ),
        (
            "future",
            generic_headers(&secret, "m1", now + 600, &body),
            body.clone(),
            path.clone(),
            "stale_timestamp",
        ),
        (
            "non-numeric ts",
            vec![
                good[0].clone(),
                ("webhook-timestamp", "soon".into()),
                good[2].clone(),
            ],
            body.clone(),
            path.clone(),
            "invalid_signature",
        ),
        (
            "unknown key",
            good.clone(),
            body.clone(),
            "/api/webhooks/signals?key_id=whk_01m8m7bfnrfyhvmry5qcb9n2qs".into(),
            "unknown_integration",
        ),
        (
            "sql-looking key",
            good.clone(),
            body.clone(),
            "/api/webhooks/signals?key_id=whk_'%20OR%201=1--".into(),
            "unknown_integration",
        ),
    ];
    for (name, headers, body, path, code) in cases {
        let (st, v) = app.post_raw(&path, &headers, body).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{name}: {v}");
        assert_eq!(v["error"]["code"], code, "{name}: {v}");
        assert!(v["error"]["message"].is_string(), "{name}");
    }
    let (st, v) = app
        .post_raw("/api/webhooks/signals", &good, body.clone())
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "missing_integration_id");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("required"),
        "{v}"
    );
    // An empty `key_id=` says so, instead of calling it missing.
    for empty in ["key_id=", "key_id=%20"] {
        let (st, v) = app
            .post_raw(
                &format!("/api/webhooks/signals?{empty}"),
                &good,
                body.clone(),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "missing_integration_id");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("is empty"),
            "{v}"
        );
    }
    // A deactivated key stops working.
    let (st, _) = app
        .api("DELETE", &format!("/api/v1/webhook-keys/{key}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = app.post_raw(&path, &good, body.clone()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "unknown_integration");
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 0);
    // Rejections are counted by reason.
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(
            "signalbox_rejections_total{source=\"webhook\",reason=\"stale_timestamp\"} 2"
        ),
        "{metrics}"
    );
    app.stop().await;
}

async fn oversized_bodies_get_413(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("max_body_bytes", "2048");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let big = json!({"verbatim": "x".repeat(5000)})
        .to_string()
        .into_bytes();
    let headers = generic_headers(&secret, "big", signalbox::clock::now_secs(), &big);
    let (st, v) = app
        .post_raw(
            &format!("/api/webhooks/signals?key_id={key}"),
            &headers,
            big.clone(),
        )
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    // Chunked (no Content-Length) bodies are capped while reading.
    let stream = futures::stream::iter(
        big.chunks(500)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let mut req = app
        .client
        .post(format!("{}/api/webhooks/signals?key_id={key}", app.base))
        .body(reqwest::Body::wrap_stream(stream));
    for (k, v) in &headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    app.stop().await;
}

async fn invalid_json_after_a_valid_signature_is_400(b: Backend) {
    let (app, _, key, secret) = app_with_key(b).await;
    let path = format!("/api/webhooks/signals?key_id={key}");
    let now = signalbox::clock::now_secs();
    for (body, code) in [
        (b"{\"verbatim\": ".to_vec(), "invalid_json"),
        (b"[1,2]".to_vec(), "invalid_json"),
        (vec![0xff, 0xfe, b'{'], "invalid_json"),
        (b"{\"text\": \"no verbatim\"}".to_vec(), "invalid_payload"),
        (b"{\"verbatim\": 42}".to_vec(), "invalid_payload"),
    ] {
        let headers = generic_headers(&secret, "m", now, &body);
        let (st, v) = app.post_raw(&path, &headers, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    app.stop().await;
}

async fn duplicate_webhook_ids_make_one_signal(b: Backend) {
    let (app, _, key, secret) = app_with_key(b).await;
    let body = json!({"verbatim": "same thing"});
    let (st, v) = app.send_generic(&key, &secret, "dup-1", &body).await;
    assert_eq!((st, v), (StatusCode::OK, json!({"ok": true})));
    let (st, v) = app.send_generic(&key, &secret, "dup-1", &body).await;
    assert_eq!(
        (st, v),
        (StatusCode::OK, json!({"ok": true, "duplicate": true}))
    );
    // 20 concurrent copies of a new id: exactly one is new.
    let futs = (0..20).map(|_| app.send_generic(&key, &secret, "dup-2", &body));
    let results = futures::future::join_all(futs).await;
    assert!(
        results.iter().all(|(st, _)| *st == StatusCode::OK),
        "{results:?}"
    );
    let fresh = results
        .iter()
        .filter(|(_, v)| v.get("duplicate").is_none())
        .count();
    assert_eq!(fresh, 1, "{results:?}");
    app.drain().await;
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 2);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 2);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.created'")
            .await,
        2
    );
    app.stop().await;
}

async fn storage_down_answers_503(b: Backend) {
    let (app, _, key, secret) = app_with_key(b).await;
    // Warm the credential cache, then take storage away.
    let (st, _) = app
        .send_generic(&key, &secret, "before", &json!({"verbatim": "ok"}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::OK);
    app.state.store.close().await;
    let (st, v) = app
        .send_generic(&key, &secret, "during", &json!({"verbatim": "lost?"}))
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "unavailable");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
}

/// Svix and its libraries send `svix-id`, `svix-timestamp` and `svix-signature`: the same
/// scheme, accepted like the `webhook-*` names (and deduplicated on the same id).
async fn svix_header_names_are_the_same_scheme(b: Backend) {
    let (app, ws, key, secret) = app_with_key(b).await;
    let body = serde_json::to_vec(&json!({"verbatim": "sent by a Svix library"})).unwrap();
    let svix = |id: &str, sig: Option<&str>| {
        let mut h: Vec<(&'static str, String)> =
            generic_headers(&secret, id, signalbox::clock::now_secs(), &body)
                .into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        "webhook-id" => "svix-id",
                        "webhook-timestamp" => "svix-timestamp",
                        _ => "svix-signature",
                    };
                    (k, v)
                })
                .collect();
        if let Some(sig) = sig {
            h.retain(|(k, _)| *k != "svix-signature");
            h.push(("svix-signature", sig.to_string()));
        }
        h
    };
    let path = format!("/api/webhooks/signals?key_id={key}");
    let (st, v) = app
        .post_raw(&path, &svix("msg_svix_1", None), body.clone())
        .await;
    assert_eq!(
        (st, v.clone()),
        (StatusCode::OK, json!({"ok": true})),
        "{v}"
    );
    let (st, v) = app
        .post_raw(&path, &svix("msg_svix_1", None), body.clone())
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["duplicate"], true, "{v}");
    // A wrong signature under the svix name is refused like any other.
    let (st, v) = app
        .post_raw(
            &path,
            &svix(
                "msg_svix_2",
                Some("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            ),
            body.clone(),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "invalid_signature", "{v}");
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:?}");
    assert_eq!(signals[0]["verbatim"], "sent by a Svix library");
    assert_eq!(signals[0]["source_ref"], "msg_svix_1");
    app.stop().await;
}

async fn a_stale_timestamp_says_how_far_off_and_the_window(b: Backend) {
    let (app, _, key, secret) = app_with_key(b).await;
    let body = br#"{"verbatim": "late"}"#.to_vec();
    let path = format!("/api/webhooks/signals?key_id={key}");
    let now = signalbox::clock::now_secs();
    for (ts, says) in [
        (now - 3600, "behind"),
        (now + 3600, "ahead of"),
        (now * 1000, "milliseconds"),
    ] {
        let h = generic_headers(&secret, "msg_late", ts, &body);
        let (st, v) = app.post_raw(&path, &h, body.clone()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["error"]["code"], "stale_timestamp", "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains(&ts.to_string()) && m.contains("±300 s") && m.contains(says),
            "{m}"
        );
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    app.stop().await;
}
