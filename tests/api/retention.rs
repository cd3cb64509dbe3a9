//! Retention (`SIGNALBOX_RETENTION`) and erasure: purged bodies, kept dedupe keys, erased
//! signals and customers, end to end.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    retention_purges_old_finished_deliveries_and_keeps_dedupe,
    deleting_a_signal_erases_it_and_its_delivery_bodies,
    erasure_by_customer_email_erases_exactly_the_matching_signals,
    purge_statements_use_their_indexes,
    a_workspace_can_keep_less_or_more_than_the_server,
);

async fn purge_statements_use_their_indexes(b: Backend) {
    let app = spawn_app(b).await;
    let plan = app.state.store.explain_purge().await.unwrap();
    // PostgreSQL plans an empty table with a sequential scan; its plan on 200,000 rows is in
    // docs/PERFORMANCE.md. SQLite's plan does not depend on the table's size.
    if b == Backend::Sqlite {
        // Per workspace, and for deliveries that reached none (the NULL prefix): one range
        // of the (workspace, time) indexes each.
        let range = "USING INDEX deliveries_purge_ws (workspace_id=? AND received_at<?)";
        assert_eq!(plan.matches(range).count(), 2, "{plan}");
        assert!(
            plan.contains("USING INDEX activity_logs_purge_ws (workspace_id=? AND created_at<?)"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
    }
    app.stop().await;
}

/// The deliveries of `ws` by dedupe key (the generic `webhook-id`).
async fn delivery_of(app: &TestApp, ws: &str, msg_id: &str) -> Value {
    delivery(
        &deliveries(app, &format!("workspace_id={ws}")).await,
        msg_id,
    )
    .clone()
}

/// `GET /api/v1/deliveries/{id}/body` with `token`: status, content type, bytes.
async fn body_as(app: &TestApp, token: &str, id: &str) -> (StatusCode, String, Vec<u8>) {
    let resp = app
        .client
        .get(format!("{}/api/v1/deliveries/{id}/body", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let st = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (st, ct, resp.bytes().await.unwrap().to_vec())
}

async fn body(app: &TestApp, id: &str) -> (StatusCode, String, Vec<u8>) {
    body_as(app, ADMIN_TOKEN, id).await
}

fn assert_purged(r: &(StatusCode, String, Vec<u8>)) {
    assert_eq!(r.0, StatusCode::GONE, "{}", String::from_utf8_lossy(&r.2));
    let v: Value = serde_json::from_slice(&r.2).unwrap();
    assert_eq!(v["error"]["code"], "purged", "{v}");
}

/// Sends exact bytes as a signed generic delivery.
async fn send_raw(app: &TestApp, key: &str, secret: &str, msg_id: &str, bytes: &[u8]) -> Value {
    let ts = signalbox::clock::now_secs();
    let headers = generic_headers(secret, msg_id, ts, bytes);
    let (st, v) = app
        .post_raw(
            &format!("/api/webhooks/signals?key_id={key}"),
            &headers,
            bytes.to_vec(),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

async fn retention_purges_old_finished_deliveries_and_keeps_dedupe(b: Backend) {
    // 20 s: the purge runs every 5 s; what the test sends now stays for the whole test.
    let app = spawn_app_with(b, |c| {
        c.set("retention", "20s");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let old = br#"{"verbatim": "old feedback",  "source_ref": "old"}"#;
    let new = "{ \"verbatim\":\"new feedback \u{e9}\" ,\"source_ref\":\"new\" }".as_bytes();
    let waiting = br#"{"verbatim": "still pending", "source_ref": "waiting"}"#;
    assert_eq!(
        send_raw(&app, &key, &secret, "msg_old", old).await,
        json!({"ok": true})
    );
    send_raw(&app, &key, &secret, "msg_new", new).await;
    send_raw(&app, &key, &secret, "msg_waiting", waiting).await;
    app.drain().await;
    let d_old = delivery_of(&app, &ws, "msg_old").await;
    let d_new = delivery_of(&app, &ws, "msg_new").await;
    let d_wait = delivery_of(&app, &ws, "msg_waiting").await;
    let (id_old, id_new, id_wait) = (
        d_old["id"].as_str().unwrap(),
        d_new["id"].as_str().unwrap(),
        d_wait["id"].as_str().unwrap(),
    );
    // Before any purge the body is the exact bytes, with their content type.
    let r = body(&app, id_old).await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(r.2, old.to_vec());
    let old_signal = d_old["signal_id"].as_str().unwrap().to_string();

    // Backdate: the old delivery and its activity entry an hour ago; one delivery made pending
    // again (due far in the future, so no worker takes it) an hour ago too.
    let hour_ago = signalbox::clock::now_micros() - 3_600_000_000;
    exec_sql(
        &app.state.store,
        &format!("UPDATE deliveries SET received_at = {hour_ago} WHERE id = '{id_old}'"),
    )
    .await;
    exec_sql(
        &app.state.store,
        &format!(
            "UPDATE activity_logs SET created_at = {hour_ago} WHERE target_id = '{old_signal}'"
        ),
    )
    .await;
    exec_sql(
        &app.state.store,
        &format!(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = {}, \
             received_at = {hour_ago} WHERE id = '{id_wait}'",
            hour_ago + 7_200_000_000
        ),
    )
    .await;
    let old_activity = || async {
        activity_all(&app, &ws)
            .await
            .iter()
            .filter(|a| a["target_id"] == old_signal.as_str())
            .count()
    };
    assert!(old_activity().await >= 1);

    wait_for("the old delivery to be purged", || async {
        body(&app, id_old).await.0 == StatusCode::GONE
    })
    .await;
    assert_purged(&body(&app, id_old).await);
    // Headers went with the body; the row, its status and its signal link stay.
    wait_for("old activity to be deleted", || async {
        old_activity().await == 0
    })
    .await;
    let d = delivery_of(&app, &ws, "msg_old").await;
    assert_eq!(d["status"], "processed");
    assert_eq!(d["signal_id"], old_signal.as_str());
    // The newer delivery: the exact bytes as received, with their content type.
    let r = body(&app, id_new).await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(r.1, "application/json");
    assert_eq!(r.2, new.to_vec());
    // A pending delivery is never purged, however old.
    let r = body(&app, id_wait).await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(r.2, waiting.to_vec());
    // Newer activity stays.
    assert!(!activity_all(&app, &ws).await.is_empty());

    // The sender's retry of the purged delivery is still a duplicate: no second signal.
    assert_eq!(
        send_raw(&app, &key, &secret, "msg_old", old).await,
        json!({"ok": true, "duplicate": true})
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM deliveries WHERE dedupe_key = 'msg_old'")
            .await,
        1
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 3);
    // A purged delivery cannot be replayed (there is nothing to process).
    let (st, v) = app
        .api("POST", &format!("/api/v1/deliveries/{id_old}/replay"), None)
        .await;
    assert_eq!(st, StatusCode::GONE, "{v}");
    assert_eq!(v["error"]["code"], "purged");
    app.stop().await;
}

async fn deleting_a_signal_erases_it_and_its_delivery_bodies(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let other = app.workspace("Other").await;
    let (_, other_token) = app.token(&other).await;
    let (key, secret) = app.webhook_key(&ws).await;
    let body1 = json!({"verbatim": "secret roadmap complaint", "source_ref": "t-1",
        "customer_email": "jane@acme.test"});
    let keep = json!({"verbatim": "unrelated", "source_ref": "t-2"});
    assert_eq!(
        app.send_generic(&key, &secret, "msg_1", &body1).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.send_generic(&key, &secret, "msg_2", &keep).await.0,
        StatusCode::OK
    );
    app.drain().await;
    let d1 = delivery_of(&app, &ws, "msg_1").await;
    let d2 = delivery_of(&app, &ws, "msg_2").await;
    let sig = d1["signal_id"].as_str().unwrap().to_string();
    let dlv = d1["id"].as_str().unwrap().to_string();

    // Another workspace's token cannot see it, let alone erase it.
    let (st, _) = app
        .api_as(
            &other_token,
            "DELETE",
            &format!("/api/v1/signals/{sig}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(
        body_as(&app, &other_token, &dlv).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(body(&app, &dlv).await.0, StatusCode::OK);

    let (st, v) = app
        .api("DELETE", &format!("/api/v1/signals/{sig}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (st, _) = app
        .api("GET", &format!("/api/v1/signals/{sig}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_purged(&body(&app, &dlv).await);
    let (st, _) = app
        .api("DELETE", &format!("/api/v1/signals/{sig}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The other signal and its body are untouched.
    assert_eq!(app.signals(&ws).await.len(), 1);
    assert_eq!(
        body(&app, d2["id"].as_str().unwrap()).await.2,
        keep.to_string().into_bytes()
    );
    // The activity log records the erasure and no longer quotes the text.
    let log = activity_all(&app, &ws).await;
    let erased = log
        .iter()
        .find(|a| a["action"] == "signal.erased" && a["target_id"] == sig.as_str())
        .expect("signal.erased entry");
    assert_eq!(erased["metadata"]["deliveries_purged"], 1);
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains("secret roadmap"), "{text}");
    // The retry of an erased signal's delivery is still a duplicate.
    assert_eq!(
        app.send_generic(&key, &secret, "msg_1", &body1).await.1,
        json!({"ok": true, "duplicate": true})
    );
    app.drain().await;
    assert_eq!(app.signals(&ws).await.len(), 1);
    app.stop().await;
}

async fn erasure_by_customer_email_erases_exactly_the_matching_signals(b: Backend) {
    let app = spawn_app(b).await;
    let wa = app.workspace("Alpha").await;
    let wb = app.workspace("Beta").await;
    let (_, token_a) = app.token(&wa).await;
    let (_, token_b) = app.token(&wb).await;
    let (ka, sa) = app.webhook_key(&wa).await;
    let (kb, sb) = app.webhook_key(&wb).await;
    let send = |k: &str, s: &str, id: &str, v: Value| {
        let (k, s, id) = (k.to_string(), s.to_string(), id.to_string());
        let app = &app;
        async move {
            let (st, r) = app.send_generic(&k, &s, &id, &v).await;
            assert_eq!(st, StatusCode::OK, "{r}");
        }
    };
    send(
        &ka,
        &sa,
        "a1",
        json!({"verbatim": "jane one", "source_ref": "a1",
        "customer_email": "jane@acme.test"}),
    )
    .await;
    send(
        &ka,
        &sa,
        "a2",
        json!({"verbatim": "jane two", "source_ref": "a2",
        "customer_email": "Jane@Acme.test"}),
    )
    .await;
    send(
        &ka,
        &sa,
        "a3",
        json!({"verbatim": "bob", "source_ref": "a3",
        "customer_email": "bob@acme.test"}),
    )
    .await;
    send(
        &ka,
        &sa,
        "a4",
        json!({"verbatim": "mentions jane in the text only",
        "source_ref": "a4"}),
    )
    .await;
    send(
        &kb,
        &sb,
        "b1",
        json!({"verbatim": "jane elsewhere", "source_ref": "b1",
        "customer_email": "jane@acme.test"}),
    )
    .await;
    app.drain().await;
    let body_b1 = delivery_of(&app, &wb, "b1").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let jane = json!({"customer_email": "jane@acme.test"});

    // Another workspace's token: 404, nothing erased.
    let (st, _) = app
        .api_as(
            &token_b,
            "POST",
            &format!("/api/v1/workspaces/{wa}/erasure"),
            Some(jane.clone()),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(app.signals(&wa).await.len(), 4);
    let (st, v) = app
        .api(
            "POST",
            &format!("/api/v1/workspaces/{wa}/erasure"),
            Some(json!({"customer_email": ""})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // The workspace's own token erases in its workspace.
    let (st, v) = app
        .api_as(
            &token_a,
            "POST",
            &format!("/api/v1/workspaces/{wa}/erasure"),
            Some(jane.clone()),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"signals_erased": 2, "deliveries_purged": 2}));
    let left: Vec<String> = app
        .signals(&wa)
        .await
        .iter()
        .map(|s| s["source_ref"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&"a3".to_string()) && left.contains(&"a4".to_string()));
    for id in ["a1", "a2"] {
        let d = delivery_of(&app, &wa, id).await;
        assert_purged(&body(&app, d["id"].as_str().unwrap()).await);
    }
    // Nothing of the other workspace.
    assert_eq!(app.signals(&wb).await.len(), 1);
    assert_eq!(body(&app, &body_b1).await.0, StatusCode::OK);
    // Logged with the counts, never the email.
    let log = activity_all(&app, &wa).await;
    let entry = log
        .iter()
        .find(|a| a["action"] == "workspace.erasure")
        .expect("workspace.erasure entry");
    assert_eq!(entry["metadata"]["signals_erased"], 2);
    assert_eq!(entry["metadata"]["deliveries_purged"], 2);
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.to_lowercase().contains("jane@acme.test"), "{text}");
    assert!(!text.contains("jane one"), "{text}");
    // Again: nothing left to erase.
    let (st, v) = app
        .api(
            "POST",
            &format!("/api/v1/workspaces/{wa}/erasure"),
            Some(jane),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v, json!({"signals_erased": 0, "deliveries_purged": 0}));

    // More signals than one erasure transaction takes (ERASE_CHUNK).
    let many = signalbox::store::ERASE_CHUNK + 5;
    for i in 0..many {
        send(
            &ka,
            &sa,
            &format!("m{i}"),
            json!({"verbatim": format!("many {i}"),
            "source_ref": format!("m{i}"), "customer_email": "many@acme.test"}),
        )
        .await;
    }
    app.drain().await;
    let (st, v) = app
        .api(
            "POST",
            &format!("/api/v1/workspaces/{wa}/erasure"),
            Some(json!({"customer_email": "many@acme.test"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"signals_erased": many, "deliveries_purged": many})
    );
    assert_eq!(app.signals(&wa).await.len(), 2);
    app.stop().await;
}

/// Backdates every delivery and activity entry of `ws` by `secs`.
async fn backdate(app: &TestApp, ws: &str, secs: i64) {
    let by = secs * 1_000_000;
    exec_sql(
        &app.state.store,
        &format!(
            "UPDATE deliveries SET received_at = received_at - {by} WHERE workspace_id = '{ws}'"
        ),
    )
    .await;
    exec_sql(
        &app.state.store,
        &format!(
            "UPDATE activity_logs SET created_at = created_at - {by} WHERE workspace_id = '{ws}'"
        ),
    )
    .await;
}

async fn a_workspace_can_keep_less_or_more_than_the_server(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("retention", "1h");
    })
    .await;
    let short = app.workspace("Short").await;
    let forever = app.workspace("Forever").await;
    let default = app.workspace("Default").await;
    let (_, token) = app.token(&short).await;
    let patch = |who: &str, ws: &str, body: Value| {
        let (who, path) = (who.to_string(), format!("/api/v1/workspaces/{ws}"));
        let app = &app;
        async move { app.api_as(&who, "PATCH", &path, Some(body)).await }
    };

    // The server's retention shows as what applies until a workspace sets its own.
    let (st, v) = app
        .api("GET", &format!("/api/v1/workspaces/{default}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["retention"], Value::Null, "{v}");
    assert_eq!(v["effective_retention"], "1h", "{v}");

    // A workspace token may shorten its own retention, never lengthen it past the server's.
    for longer in ["keep", "2h", "61m"] {
        let (st, v) = patch(&token, &short, json!({"retention": longer})).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{longer}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("1h"),
            "{v}"
        );
    }
    let (st, v) = patch(&token, &short, json!({"retention": "20s"})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["retention"], "20s", "{v}");
    assert_eq!(v["effective_retention"], "20s", "{v}");
    assert_eq!(v["name"], "Short", "{v}");
    // … and cannot touch another workspace's.
    let (st, _) = patch(&token, &forever, json!({"retention": "10s"})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The admin token may keep a workspace's data for longer, or forever.
    let (st, v) = patch(ADMIN_TOKEN, &forever, json!({"retention": "keep"})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["retention"], "keep", "{v}");
    assert_eq!(v["effective_retention"], "keep", "{v}");

    // What cannot be done is refused, and nothing changes.
    for bad in [
        json!({"retention": 20}),
        json!({"retention": "20 seconds"}),
        json!({"retention": "0s"}),
        json!({"name": null}),
        json!({"name": ""}),
        json!({"retention_days": 3}),
    ] {
        let (st, v) = patch(ADMIN_TOKEN, &short, bad.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request", "{bad}: {v}");
    }
    let (_, v) = app
        .api("GET", &format!("/api/v1/workspaces/{short}"), None)
        .await;
    assert_eq!(
        (v["name"].as_str(), v["retention"].as_str()),
        (Some("Short"), Some("20s"))
    );
    let changes: Vec<Value> = activity_all(&app, &short)
        .await
        .into_iter()
        .filter(|a| a["action"] == "workspace.updated")
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["metadata"], json!({"retention": "20s"}));

    // One delivery in each, ten minutes old: only the 20-second workspace loses its body.
    let mut ids = Vec::new();
    for ws in [&short, &forever, &default] {
        let (key, secret) = app.webhook_key(ws).await;
        send_raw(
            &app,
            &key,
            &secret,
            "msg_1",
            br#"{"verbatim": "a customer said this"}"#,
        )
        .await;
        app.drain().await;
        ids.push(
            delivery_of(&app, ws, "msg_1").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        backdate(&app, ws, 600).await;
    }
    wait_for("the short workspace's delivery to be purged", || async {
        body(&app, &ids[0]).await.0 == StatusCode::GONE
    })
    .await;
    wait_for("the short workspace's activity to be deleted", || async {
        activity_all(&app, &short).await.is_empty()
    })
    .await;
    assert_eq!(body(&app, &ids[1]).await.0, StatusCode::OK);
    assert_eq!(body(&app, &ids[2]).await.0, StatusCode::OK);

    // Two hours old: the server's hour applies to the default workspace; "keep" keeps.
    backdate(&app, &forever, 7200).await;
    backdate(&app, &default, 7200).await;
    wait_for("the default workspace's delivery to be purged", || async {
        body(&app, &ids[2]).await.0 == StatusCode::GONE
    })
    .await;
    assert_eq!(body(&app, &ids[1]).await.0, StatusCode::OK);
    assert!(!activity_all(&app, &forever).await.is_empty());

    // Back to the server's retention: `null`.
    let (st, v) = patch(&token, &short, json!({"retention": null})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["retention"], Value::Null, "{v}");
    assert_eq!(v["effective_retention"], "1h", "{v}");
    app.stop().await;
}
