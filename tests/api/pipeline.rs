//! The inbox and the workers: crash safety, graceful shutdown, retries, replay, pagination.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use signalbox::protocol::{Effect, Merge, NewSignal};
use signalbox::store::{Applied, DeliveryStatus};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    a_worker_dying_between_claim_and_commit_leaves_it_to_be_processed_once,
    graceful_shutdown_with_work_in_flight_loses_nothing,
    replay_reprocesses_without_duplicating,
    listing_paginates_with_a_cursor,
    admin_api_requires_a_token,
    failing_deliveries_back_off_and_die,
    one_batch_applies_its_items_in_order,
    an_outcome_decided_at_the_edge_commits_with_its_delivery,
    an_outcome_that_cannot_commit_still_stores_its_delivery,
    an_inbox_batch_finishes_its_outcomes_in_order,
    a_refused_outcome_does_not_fail_its_batch_mates,
);

async fn a_worker_dying_between_claim_and_commit_leaves_it_to_be_processed_once(b: Backend) {
    // No workers in the app: the test plays them.
    let app = spawn_app_with(b, |c| {
        c.set("worker_concurrency", "0");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, secret) = app.webhook_key(&ws).await;
    let (st, _) = app
        .send_generic(&key, &secret, "m1", &json!({"verbatim": "crash me"}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let store = &app.state.store;
    // Worker A claims with a short lease, then "dies" (never commits).
    let a = store
        .claim_deliveries("worker-a", 10, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    // While A's lease holds, nobody else can claim it.
    assert!(
        store
            .claim_deliveries("worker-b", 10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // After expiry worker B claims it again and processes it.
    let claimed = store
        .claim_deliveries("worker-b", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        claimed[0].attempts, 2,
        "the dead worker's claim counted as an attempt"
    );
    signalbox::worker::handle(&app.state, "worker-b", claimed[0].clone()).await;
    // A comes back to life and tries to commit its stale work: fenced off, nothing written.
    let effect = Effect::Upsert {
        signal: NewSignal {
            source_ref: "m1".into(),
            verbatim: "crash me".into(),
            metadata: json!({}),
        },
        merge: Merge::Keep,
    };
    let late = store.apply_effect(&a[0], "worker-a", effect).await.unwrap();
    assert_eq!(late, Applied::LeaseLost);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.created'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM deliveries WHERE status = 'processed'")
            .await,
        1
    );
    app.stop().await;
}

async fn graceful_shutdown_with_work_in_flight_loses_nothing(b: Backend) {
    let (app, ws, key, secret) = app_with_key(b).await;
    let base = app.base.clone();
    let client = app.client.clone();
    // Fire 200 deliveries and stop the server while they are in flight.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (client, base, key, secret) =
            (client.clone(), base.clone(), key.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"verbatim": format!("message {i}")})
                .to_string()
                .into_bytes();
            let headers = generic_headers(
                &secret,
                &format!("m{i}"),
                signalbox::clock::now_secs(),
                &body,
            );
            let mut req = client
                .post(format!("{base}/api/webhooks/signals?key_id={key}"))
                .body(body);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            match req.send().await {
                Ok(r) if r.status() == StatusCode::OK => Some(format!("m{i}")),
                _ => None,
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let db_url = app.db_url.clone();
    let keys = app.master_keys.clone();
    let dir = app.stop_keep_dir().await;
    let mut acked = Vec::new();
    for t in tasks {
        if let Some(id) = t.await.unwrap() {
            acked.push(id);
        }
    }
    assert!(
        !acked.is_empty(),
        "some requests should have been acknowledged before shutdown"
    );
    // Restart on the same database: every acknowledged delivery is there and becomes a signal.
    let app = start(
        b,
        test_config(&db_url, &keys),
        db_url.clone(),
        keys.clone(),
        dir,
    )
    .await;
    app.drain().await;
    let stored = app.count("SELECT COUNT(*) FROM deliveries").await;
    assert!(
        stored >= acked.len() as i64,
        "{stored} stored < {} acked",
        acked.len()
    );
    let signals = app.count("SELECT COUNT(*) FROM signals").await;
    assert_eq!(
        signals, stored,
        "every stored delivery became exactly one signal"
    );
    for id in &acked {
        let (st, v) = app
            .api(
                "GET",
                &format!("/api/v1/deliveries?workspace_id={ws}&limit=500"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert!(
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["dedupe_key"] == id.as_str() && d["status"] == "processed"),
            "{id} lost"
        );
    }
    app.stop().await;
}

async fn replay_reprocesses_without_duplicating(b: Backend) {
    let (app, _, key, secret) = app_with_key(b).await;
    app.send_generic(&key, &secret, "r1", &json!({"verbatim": "replay me"}))
        .await;
    app.drain().await;
    let (_, list) = app.api("GET", "/api/v1/deliveries", None).await;
    let id = list["items"][0]["id"].as_str().unwrap().to_string();
    let (st, v) = app
        .api("POST", &format!("/api/v1/deliveries/{id}/replay"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    wait_for("the replay to finish", || async {
        let (_, d) = app
            .api("GET", &format!("/api/v1/deliveries/{id}"), None)
            .await;
        d["status"] == "processed" && d["attempts"] == 1
    })
    .await;
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 1);
    let (st, v) = app
        .api(
            "POST",
            "/api/v1/deliveries/dlv_01m8m7bfnrfyhvmry5qcb9n2qs/replay",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    app.stop().await;
}

async fn listing_paginates_with_a_cursor(b: Backend) {
    let (app, ws, key, secret) = app_with_key(b).await;
    for i in 0..7 {
        app.send_generic(
            &key,
            &secret,
            &format!("p{i}"),
            &json!({"verbatim": format!("n{i}")}),
        )
        .await;
    }
    app.drain().await;
    let mut seen = Vec::new();
    let mut ids = Vec::new();
    let mut cursor = String::new();
    loop {
        let (st, v) = app
            .api(
                "GET",
                &format!("/api/v1/workspaces/{ws}/signals?limit=3&source=webhook&cursor={cursor}"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        for s in v["items"].as_array().unwrap() {
            seen.push(s["verbatim"].as_str().unwrap().to_string());
            ids.push(s["id"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    // Workers run concurrently, so creation order is not send order; but pages are newest
    // first and every signal appears exactly once.
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "ids strictly descending: {ids:?}"
    );
    seen.sort();
    assert_eq!(seen, vec!["n0", "n1", "n2", "n3", "n4", "n5", "n6"]);
    let (_, v) = app
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/signals?source=slack"),
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 0);
    app.stop().await;
}

async fn admin_api_requires_a_token(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    for (m, p) in [
        ("GET", "/api/v1/workspaces".to_string()),
        ("POST", "/api/v1/workspaces".to_string()),
        ("GET", format!("/api/v1/workspaces/{ws}/signals")),
        ("GET", "/api/v1/deliveries".to_string()),
    ] {
        let (st, v) = app
            .api_as("wrong-token", m, &p, Some(json!({"name": "x"})))
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{m} {p}");
        assert_eq!(v["error"]["code"], "unauthorized");
        let resp = app
            .client
            .request(
                reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                format!("{}{p}", app.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "{m} {p} without a token"
        );
    }
    for p in ["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"] {
        let resp = app.get(p).await;
        assert_eq!(resp.status(), StatusCode::OK, "{p}");
    }
    app.stop().await;
}

async fn failing_deliveries_back_off_and_die(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("worker_concurrency", "0").set("max_attempts", "3");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, secret) = app.webhook_key(&ws).await;
    app.send_generic(&key, &secret, "f1", &json!({"verbatim": "x"}))
        .await;
    let store = &app.state.store;
    // Simulate a transient failure three times through the worker's retry path.
    for attempt in 1..=3 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let claimed = loop {
            let c = store
                .claim_deliveries("w", 1, Duration::from_secs(30))
                .await
                .unwrap();
            if !c.is_empty() {
                break c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "retry never became due"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(claimed[0].attempts, attempt);
        let dead = attempt >= 3;
        assert!(
            store
                .retry_delivery(
                    &claimed[0].id,
                    "w",
                    "upstream failed",
                    signalbox::clock::now_micros() + 20_000,
                    dead
                )
                .await
                .unwrap()
        );
    }
    let (_, v) = app.api("GET", "/api/v1/deliveries?status=dead", None).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["items"][0]["last_error"], "upstream failed");
    assert_eq!(v["items"][0]["attempts"], 3);
    // A dead delivery is not claimed again until replayed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        store
            .claim_deliveries("w", 1, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    let (st, _) = app
        .api("GET", "/api/v1/deliveries?status=bogus", None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    app.stop().await;
}

/// A worker batch commits in one transaction, but its items must act as if applied one after
/// another: an edit after the create of the same message, a delete of a message the batch has
/// not created yet, a delivery whose lease another worker holds.
async fn one_batch_applies_its_items_in_order(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("worker_concurrency", "0");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, secret) = app.webhook_key(&ws).await;
    for i in 1..=5 {
        let (st, _) = app
            .send_generic(&key, &secret, &format!("m{i}"), &json!({"verbatim": "x"}))
            .await;
        assert_eq!(st, StatusCode::OK);
    }
    let store = &app.state.store;
    let mine = store
        .claim_deliveries("worker-a", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(mine.len(), 5);
    let (st, _) = app
        .send_generic(&key, &secret, "m6", &json!({"verbatim": "x"}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let theirs = store
        .claim_deliveries("worker-b", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(theirs.len(), 1);
    let upsert = |r: &str, v: &str, merge| Effect::Upsert {
        signal: NewSignal {
            source_ref: r.into(),
            verbatim: v.into(),
            metadata: json!({"k": v}),
        },
        merge,
    };
    let delete = |r: &str| Effect::MarkDeleted {
        source_ref: r.into(),
        metadata: json!({}),
    };
    let effects = [
        upsert("X", "first", Merge::Keep),
        upsert("X", "edited", Merge::Edit),
        delete("X"),
        delete("Y"), // Y does not exist yet: filtered
        upsert("Y", "why", Merge::Keep),
        upsert("Z", "not mine", Merge::Keep),
    ];
    let batch: Vec<_> = mine.iter().chain(theirs.iter()).zip(effects).collect();
    let out = store.apply_effects("worker-a", batch).await.unwrap();
    let summary: Vec<_> = out
        .iter()
        .map(|a| match a {
            Applied::Done { status, action, .. } => (Some(*status), *action),
            Applied::LeaseLost => (None, None),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (Some(DeliveryStatus::Processed), Some("signal.created")),
            (Some(DeliveryStatus::Processed), Some("signal.updated")),
            (Some(DeliveryStatus::Processed), Some("signal.deleted")),
            (Some(DeliveryStatus::Filtered), None),
            (Some(DeliveryStatus::Processed), Some("signal.created")),
            (None, None),
        ]
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 2);
    let signals = app.signals(&ws).await;
    let by_ref = |r: &str| {
        signals
            .iter()
            .find(|s| s["source_ref"] == r)
            .unwrap_or_else(|| panic!("signal {r} in {signals:?}"))
    };
    assert_eq!(by_ref("X")["verbatim"], "edited");
    assert_eq!(by_ref("X")["source_metadata"]["deleted"], true);
    assert_eq!(by_ref("Y")["verbatim"], "why");
    assert_ne!(by_ref("Y")["source_metadata"]["deleted"], true);
    for (sql, n) in [
        (
            "SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.created'",
            2,
        ),
        (
            "SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.updated'",
            1,
        ),
        (
            "SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.deleted'",
            1,
        ),
    ] {
        assert_eq!(app.count(sql).await, n, "{sql}");
    }
    // The fenced-off delivery is untouched: still pending, leased to worker-b.
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM deliveries WHERE status = 'pending' AND lease_owner = 'worker-b'"
        )
        .await,
        1
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM deliveries WHERE status = 'processed'")
            .await,
        4
    );
    app.stop().await;
}

/// A generic delivery's signal needs no I/O to decide: on SQLite the receiver's outcome commits
/// in the inbox transaction, so the signal exists when the 200 arrives; on PostgreSQL a worker
/// commits it moments later. Either way: one signal, the delivery processed on its first
/// attempt, counted once, and a re-send is a duplicate that changes nothing.
async fn an_outcome_decided_at_the_edge_commits_with_its_delivery(b: Backend) {
    let (app, ws, key, secret) = app_with_key(b).await;
    let body = json!({"verbatim": "Export is slow", "source_ref": "t-1"});
    let (st, v) = app.send_generic(&key, &secret, "edge-1", &body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    if b == Backend::Sqlite {
        // No waiting: committed with the row.
        let signals = app.signals(&ws).await;
        assert_eq!(signals.len(), 1, "{signals:?}");
        assert_eq!(signals[0]["verbatim"], "Export is slow");
    }
    app.drain().await;
    wait_for("the signal", || async { app.signals(&ws).await.len() == 1 }).await;
    let d = delivery_by_key(&app, "edge-1").await;
    assert_eq!(d["status"], "processed", "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    assert_eq!(d["signal_id"], app.signals(&ws).await[0]["id"], "{d}");
    let (st, v) = app.send_generic(&key, &secret, "edge-1", &body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["duplicate"], true, "{v}");
    app.drain().await;
    assert_eq!(app.signals(&ws).await.len(), 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 1);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("signalbox_deliveries_total{source=\"webhook\",outcome=\"processed\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

/// If a receiver's outcome cannot be committed (here a trigger refuses one signal), the inbox
/// stores the batch without outcomes: both senders get their 200, the other delivery of the
/// same moment still becomes its signal, and the refused one waits, stored, for a worker to
/// retry it with the error on record.
async fn an_outcome_that_cannot_commit_still_stores_its_delivery(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("max_attempts", "2");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, secret) = app.webhook_key(&ws).await;
    refuse_boom_signals(&app).await;
    let boom = json!({"verbatim": "boom", "source_ref": "b"});
    let fine = json!({"verbatim": "fine", "source_ref": "f"});
    let (a, c) = tokio::join!(
        app.send_generic(&key, &secret, "boom-1", &boom),
        app.send_generic(&key, &secret, "fine-1", &fine),
    );
    assert_eq!(a.0, StatusCode::OK, "{}", a.1);
    assert_eq!(c.0, StatusCode::OK, "{}", c.1);
    wait_for("the fine signal", || async {
        app.signals(&ws).await.len() == 1
    })
    .await;
    assert_eq!(app.signals(&ws).await[0]["verbatim"], "fine");
    wait_for("the refused delivery to be retried and die", || async {
        delivery_by_key(&app, "boom-1").await["status"] == "dead"
    })
    .await;
    let d = delivery_by_key(&app, "boom-1").await;
    assert!(
        d["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("boom refused"),
        "{d}"
    );
    assert_eq!(app.signals(&ws).await.len(), 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 2);
    app.stop().await;
}

/// The delivery with this dedupe key, as the API lists it.
async fn delivery_by_key(app: &TestApp, key: &str) -> serde_json::Value {
    delivery(&deliveries(app, "").await, key).clone()
}

/// `insert_and_finish` on both backends: a batch's outcomes act in batch order with the
/// worker's rules (a create, then an edit of it, which PostgreSQL finishes through its merge
/// path), a duplicate's outcome is dropped, filters and rejections are final at once, a row
/// without an outcome stays pending, and nothing stays leased.
async fn an_inbox_batch_finishes_its_outcomes_in_order(b: Backend) {
    use signalbox::store::{InsertLease, NewDelivery, Parsed, Stored};
    let app = spawn_app_with(b, |c| {
        c.set("worker_concurrency", "0");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let store = &app.state.store;
    let row = |key: &str, outcome: Option<Effect>| NewDelivery {
        id: signalbox::ids::new_id("dlv"),
        workspace_id: Some(ws.clone()),
        integration_id: None,
        webhook_key_id: None,
        source: "webhook".into(),
        dedupe_scope: "scope".into(),
        dedupe_key: key.into(),
        body: bytes::Bytes::from_static(b"{}"),
        headers: "{}".into(),
        status: DeliveryStatus::Pending,
        filter_reason: None,
        received_at: signalbox::clock::now_micros(),
        parsed: Parsed::default(),
        outcome,
    };
    let upsert = |r: &str, v: &str, merge| Effect::Upsert {
        signal: NewSignal {
            source_ref: r.into(),
            verbatim: v.into(),
            metadata: json!({"k": v}),
        },
        merge,
    };
    let until = signalbox::clock::now_micros() + 30_000_000;
    // (new?, (status, action) of the outcome committed with it)
    type Summary = Vec<(bool, Option<(DeliveryStatus, Option<&'static str>)>)>;
    let summary = |out: &[(Stored, Option<Applied>)]| -> Summary {
        out.iter()
            .map(|(s, a)| {
                (
                    matches!(s, Stored::New(_)),
                    a.as_ref().map(|a| match a {
                        Applied::Done { status, action, .. } => (*status, *action),
                        Applied::LeaseLost => panic!("lease lost in {out:?}"),
                    }),
                )
            })
            .collect()
    };
    // A signal that exists before the batch.
    let first = [row("w", None)];
    let first_refs: Vec<&NewDelivery> = first.iter().collect();
    let out = store
        .insert_and_finish(
            &first_refs,
            Some(InsertLease {
                owner: "inbox",
                until,
                rows: &[true],
            }),
            vec![Some(upsert("W", "old", Merge::Keep))],
        )
        .await
        .unwrap();
    assert_eq!(
        summary(&out),
        vec![(
            true,
            Some((DeliveryStatus::Processed, Some("signal.created")))
        )]
    );
    let outcomes = vec![
        Some(upsert("X", "first", Merge::Keep)),
        Some(upsert("X", "edited", Merge::Edit)),
        Some(upsert("X", "re-sent copy", Merge::Edit)), // a duplicate delivery
        Some(Effect::filter("from a bot")),
        Some(Effect::reject("not a message")),
        None,
        Some(upsert("W", "old", Merge::Keep)), // the same signal again: nothing changes
    ];
    let rows = [
        row("x1", None),
        row("x2", None),
        row("x1", None),
        row("f", None),
        row("r", None),
        row("p", None),
        row("w2", None),
    ];
    let refs: Vec<&NewDelivery> = rows.iter().collect();
    let leased = [true, true, true, true, true, false, true];
    let out = store
        .insert_and_finish(
            &refs,
            Some(InsertLease {
                owner: "inbox",
                until,
                rows: &leased,
            }),
            outcomes,
        )
        .await
        .unwrap();
    use DeliveryStatus::*;
    assert_eq!(
        summary(&out),
        vec![
            (true, Some((Processed, Some("signal.created")))),
            (true, Some((Processed, Some("signal.updated")))),
            (false, None),
            (true, Some((Filtered, None))),
            (true, Some((Failed, None))),
            (true, None),
            (true, Some((Processed, None))),
        ]
    );
    assert!(matches!(&out[2].0, Stored::Duplicate(id) if *id == rows[0].id));
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 2, "{signals:?}");
    let x = signals.iter().find(|s| s["source_ref"] == "X").unwrap();
    assert_eq!(x["verbatim"], "edited");
    let w = signals.iter().find(|s| s["source_ref"] == "W").unwrap();
    assert_eq!(w["verbatim"], "old");
    for (key, status) in [
        ("x1", "processed"),
        ("x2", "processed"),
        ("f", "filtered"),
        ("r", "failed"),
        ("p", "pending"),
        ("w2", "processed"),
    ] {
        let d = delivery_by_key(&app, key).await;
        assert_eq!(d["status"], status, "{d}");
        if status != "pending" {
            assert_eq!(d["attempts"], 1, "{d}");
            assert!(d["processed_at"].is_string(), "{d}");
        }
    }
    assert_eq!(delivery_by_key(&app, "x2").await["signal_id"], x["id"]);
    assert_eq!(delivery_by_key(&app, "w2").await["signal_id"], w["id"]);
    assert_eq!(
        delivery_by_key(&app, "f").await["filter_reason"],
        "from a bot"
    );
    assert_eq!(
        delivery_by_key(&app, "r").await["last_error"],
        "not a message"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM deliveries WHERE lease_owner IS NOT NULL")
            .await,
        0
    );
    for (sql, n) in [
        (
            "SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.created'",
            2,
        ),
        (
            "SELECT COUNT(*) FROM activity_logs WHERE action = 'signal.updated'",
            1,
        ),
        (
            "SELECT COUNT(*) FROM activity_logs WHERE action LIKE 'signal.%'",
            3,
        ),
    ] {
        assert_eq!(app.count(sql).await, n, "{sql}");
    }
    app.stop().await;
}

/// Installs a trigger that refuses any signal whose verbatim is `boom`.
async fn refuse_boom_signals(app: &TestApp) {
    let refuse = match app.backend {
        Backend::Sqlite => {
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON signals WHEN NEW.verbatim = 'boom' \
             BEGIN SELECT RAISE(ABORT, 'boom refused'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION refuse_boom() RETURNS trigger AS $$ BEGIN \
             IF NEW.verbatim = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER refuse_boom BEFORE INSERT ON signals FOR EACH ROW \
             EXECUTE FUNCTION refuse_boom();"
        }
    };
    match app.state.store.pool() {
        signalbox::store::Pool::Sqlite(p) => {
            sqlx::raw_sql(refuse).execute(p).await.unwrap();
        }
        signalbox::store::Pool::Postgres(p) => {
            sqlx::raw_sql(refuse).execute(p).await.unwrap();
        }
    }
}

/// A worker batch commits in one transaction; when the database refuses one delivery's
/// outcome, the others of its batch still commit and only that one is retried.
async fn a_refused_outcome_does_not_fail_its_batch_mates(b: Backend) {
    // No local workers: nothing is decided at the edge and the test drives the worker itself.
    let app = spawn_app_with(b, |c| {
        c.set("worker_concurrency", "0");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let (key, secret) = app.webhook_key(&ws).await;
    refuse_boom_signals(&app).await;
    for (id, text) in [("a", "fine one"), ("boom", "boom"), ("c", "fine two")] {
        let (st, v) = app
            .send_generic(
                &key,
                &secret,
                id,
                &json!({"verbatim": text, "source_ref": id}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let claimed = app
        .state
        .store
        .claim_deliveries("w", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    signalbox::worker::handle_batch(&app.state, "w", claimed).await;
    let mut texts: Vec<String> = app
        .signals(&ws)
        .await
        .iter()
        .map(|s| s["verbatim"].as_str().unwrap().to_string())
        .collect();
    texts.sort();
    assert_eq!(texts, ["fine one", "fine two"]);
    assert_eq!(delivery_by_key(&app, "a").await["status"], "processed");
    assert_eq!(delivery_by_key(&app, "c").await["status"], "processed");
    let d = delivery_by_key(&app, "boom").await;
    assert_eq!(d["status"], "pending", "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    assert!(
        d["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("boom refused"),
        "{d}"
    );
    app.stop().await;
}
