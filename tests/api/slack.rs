//! The Slack Events API endpoint, end to end: the three ways to configure it (per-customer app,
//! app-level secret, team lookup), retries, filtering, edits and deletes, uninstalls and the
//! rejections a caller sees.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use signalbox::protocol::slack;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    url_verification_is_verified_in_every_mode,
    per_integration_message_becomes_a_readable_signal,
    a_claimed_delivery_is_processed_like_a_handed_over_one,
    app_level_secret_routes_by_team,
    team_lookup_verifies_with_the_teams_own_secret,
    retry_storm_makes_one_delivery_and_one_signal,
    channel_allow_list_filters_other_channels,
    bot_messages_and_joins_are_filtered,
    edits_and_deletes_update_the_same_signal,
    uninstall_and_revoked_tokens_deactivate_and_later_events_are_filtered,
    app_uninstalled_wipes_the_token_of_an_already_inactive_integration,
    unknown_event_and_envelope_types_are_acknowledged_and_filtered,
    stale_timestamps_and_invalid_json_are_rejected,
);

pub(crate) const APP_SECRET: &str = "app-level-secret-123";

// ---------------------------------------------------------------------------------------------
// Helpers (the Slack senders shared with other files are in helpers.rs)
// ---------------------------------------------------------------------------------------------

fn url_verification(challenge: &str) -> Value {
    json!({"token": "XXYYZZ", "challenge": challenge, "type": "url_verification"})
}

async fn get_integration(app: &TestApp, id: &Value) -> Value {
    let (st, v) = app
        .api(
            "GET",
            &format!("/api/v1/integrations/{}", id.as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

async fn url_verification_is_verified_in_every_mode(b: Backend) {
    // Per-customer app and team lookup (no app-level secret).
    let (app, ws) = app_with_workspace(b).await;
    let secret = "per-customer-secret-1";
    let integ = slack_integration(&app, &ws, "T0URLVER", json!({"signing_secret": secret})).await;
    let challenge = url_verification("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P");
    for (mode, path) in [
        ("per-integration", url_for(&integ)),
        ("team lookup", SLACK_EVENTS.into()),
    ] {
        let (st, v) = send_slack(&app, &path, secret, &challenge, &[]).await;
        assert_eq!(st, StatusCode::OK, "{mode}: {v}");
        assert_eq!(
            v,
            json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}),
            "{mode}"
        );
        let unsigned = app
            .post_raw(&path, &[], challenge.to_string().into_bytes())
            .await;
        assert_rejected(
            unsigned,
            StatusCode::UNAUTHORIZED,
            "missing_signature",
            mode,
        );
        let wrong = send_slack(&app, &path, "someone-elses-secret", &challenge, &[]).await;
        assert_rejected(wrong, StatusCode::UNAUTHORIZED, "invalid_signature", mode);
    }
    let unknown = send_slack(
        &app,
        &format!("{SLACK_EVENTS}?integration_id=int_01m8m7bfnrfyhvmry5qcb9n2qs"),
        secret,
        &challenge,
        &[],
    )
    .await;
    assert_rejected(
        unknown,
        StatusCode::UNAUTHORIZED,
        "unknown_integration",
        "unknown integration",
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 0);
    app.stop().await;

    // One distributed app: the app-level secret verifies.
    let app = spawn_app_with(b, |c| {
        c.set("slack_signing_secret", APP_SECRET);
    })
    .await;
    let ws = app.workspace("Acme").await;
    slack_integration(&app, &ws, "T0URLVER", json!({})).await;
    let (st, v) = send_slack(&app, SLACK_EVENTS, APP_SECRET, &challenge, &[]).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["challenge"], challenge["challenge"]);
    let unsigned = app
        .post_raw(SLACK_EVENTS, &[], challenge.to_string().into_bytes())
        .await;
    assert_rejected(
        unsigned,
        StatusCode::UNAUTHORIZED,
        "missing_signature",
        "app-level",
    );
    let wrong = send_slack(&app, SLACK_EVENTS, "per-customer-secret-1", &challenge, &[]).await;
    assert_rejected(
        wrong,
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
        "app-level",
    );
    let stale = send_bytes(
        &app,
        SLACK_EVENTS,
        APP_SECRET,
        now() - 301,
        challenge.to_string().into_bytes(),
        &[],
    )
    .await;
    assert_rejected(
        stale,
        StatusCode::UNAUTHORIZED,
        "stale_timestamp",
        "app-level",
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    app.stop().await;
}

async fn per_integration_message_becomes_a_readable_signal(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "acme-signing-secret";
    let integ = slack_integration(
        &app,
        &ws,
        "T0ACME",
        json!({"signing_secret": secret, "slack_bot_user_id": "U0SBXBOT"}),
    )
    .await;
    let raw = "Hi <@U1> see <https://x.test|docs> &amp; more";
    let body = message(
        "T0ACME",
        "C0GENERAL",
        "U1",
        raw,
        "1700000000.000100",
        "Ev02PERINT",
        json!({}),
    );
    send_ok(&app, &url_for(&integ), secret, &body).await;
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 1);
    app.drain().await;

    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:#?}");
    let s = &signals[0];
    assert_eq!(s["source"], "slack");
    assert_eq!(s["source_ref"], "slack-C0GENERAL-1700000000.000100");
    assert_eq!(s["verbatim"], "Hi @U1 see docs (https://x.test) & more");
    assert_eq!(s["status"], "new");
    assert_eq!(s["workspace_id"], ws.as_str());
    let m = &s["source_metadata"];
    assert_eq!(m["team_id"], "T0ACME");
    assert_eq!(m["channel_id"], "C0GENERAL");
    assert_eq!(m["channel_type"], "channel");
    assert_eq!(m["user_id"], "U1");
    assert_eq!(m["message_ts"], "1700000000.000100");
    assert_eq!(m["event_id"], "Ev02PERINT");
    assert_eq!(m["event_time"], 1_700_000_000);
    assert_eq!(m["raw_text"], raw);
    assert_eq!(m["is_ext_shared_channel"], false);
    assert_eq!(m["externalId"], "T0ACME/C0GENERAL/1700000000.000100");

    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert_eq!(d["status"], "processed");
    assert_eq!(d["source"], "slack");
    assert_eq!(d["dedupe_key"], "Ev02PERINT");
    assert_eq!(d["integration_id"], integ["id"]);
    assert_eq!(d["signal_id"], s["id"]);

    let created = activity(&app, &ws, "signal.created").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["target_id"], s["id"]);

    // A thread reply, and a file shared without text: named, never linked.
    let reply = message(
        "T0ACME",
        "C0GENERAL",
        "U2",
        "replying in the thread",
        "1700000000.000200",
        "Ev02REPLY",
        json!({"thread_ts": "1700000000.000100", "parent_user_id": "U1"}),
    );
    send_ok(&app, &url_for(&integ), secret, &reply).await;
    let file = message(
        "T0ACME",
        "C0GENERAL",
        "U2",
        "",
        "1700000000.000300",
        "Ev02FILE",
        json!({"subtype": "file_share", "upload": false, "files": [{
            "id": "F0REPORT", "name": "report.pdf", "title": "Report",
            "mimetype": "application/pdf",
            "url_private": "https://files.slack.com/files-pri/T0ACME-F0REPORT/report.pdf"
        }]}),
    );
    send_ok(&app, &url_for(&integ), secret, &file).await;
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 3, "{signals:#?}");
    let by_ref = |r: &str| {
        signals
            .iter()
            .find(|s| s["source_ref"] == r)
            .unwrap_or_else(|| panic!("no signal {r}"))
            .clone()
    };
    let r = by_ref("slack-C0GENERAL-1700000000.000200");
    assert_eq!(r["verbatim"], "replying in the thread");
    assert_eq!(r["source_metadata"]["thread_ts"], "1700000000.000100");
    let f = by_ref("slack-C0GENERAL-1700000000.000300");
    assert_eq!(f["verbatim"], "[file] report.pdf");
    assert_eq!(
        f["source_metadata"]["files"],
        json!([{"id": "F0REPORT", "name": "report.pdf"}])
    );
    assert!(!f.to_string().contains("files.slack.com"), "{f}");
    app.stop().await;
}

/// A local worker gets the receiver's parse of the envelope with the delivery; a worker that
/// claims it from the database (another node, a restart, a retry) parses the stored body. Both
/// must come to the same effect.
async fn a_claimed_delivery_is_processed_like_a_handed_over_one(b: Backend) {
    // No workers: the delivery stays in the inbox for the test to claim.
    let app = spawn_app_with(b, |c| {
        c.set("worker_concurrency", "0");
    })
    .await;
    let ws = app.workspace("Acme").await;
    let secret = "acme-signing-secret";
    let integ = slack_integration(&app, &ws, "T0ACME", json!({"signing_secret": secret})).await;
    let body = message(
        "T0ACME",
        "C0GENERAL",
        "U1",
        "exports fail with a 502 &amp; <https://x.test|docs>",
        "1700000000.000200",
        "Ev02CLAIMED",
        json!({"thread_ts": "1700000000.000100"}),
    );
    send_ok(&app, &url_for(&integ), secret, &body).await;
    let store = &app.state.store;
    let mut claimed = store
        .claim_deliveries("worker-t", 10, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let from_db = claimed.remove(0);
    assert!(matches!(from_db.parsed, signalbox::store::Parsed::None));
    let mut handed = from_db.clone();
    handed.parsed = signalbox::store::Parsed::SlackEnvelope(std::sync::Arc::new(
        slack::parse_envelope(&from_db.body).unwrap(),
    ));
    let effect = signalbox::sources::process(&app.state, &from_db)
        .await
        .unwrap();
    let effect_handed = signalbox::sources::process(&app.state, &handed)
        .await
        .unwrap();
    assert_eq!(effect, effect_handed);
    let signalbox::protocol::Effect::Upsert { signal, .. } = &effect else {
        panic!("expected a signal, got {effect:?}");
    };
    assert_eq!(
        signal.verbatim,
        "exports fail with a 502 & docs (https://x.test)"
    );
    assert_eq!(signal.metadata["thread_ts"], "1700000000.000100");
    let applied = store
        .apply_effect(&from_db, "worker-t", effect)
        .await
        .unwrap();
    assert!(
        matches!(applied, signalbox::store::Applied::Done { .. }),
        "{applied:?}"
    );
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:#?}");
    assert_eq!(
        signals[0]["verbatim"],
        "exports fail with a 502 & docs (https://x.test)"
    );
}

async fn app_level_secret_routes_by_team(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("slack_signing_secret", APP_SECRET);
    })
    .await;
    let ws_a = app.workspace("Alpha").await;
    let ws_b = app.workspace("Bravo").await;
    // Created without their own signing secret: the app-level one covers them.
    let a = slack_integration(&app, &ws_a, "T0ALPHA", json!({})).await;
    let bravo = slack_integration(&app, &ws_b, "T0BRAVO", json!({})).await;
    assert_eq!(a["has_webhook_secret"], false);

    // Routed by team_id.
    let by_team = message(
        "T0ALPHA",
        "C0ONE",
        "U1",
        "hello alpha",
        "1700000001.000100",
        "Ev03TEAM",
        json!({}),
    );
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &by_team).await;

    // team_id is someone else's (a shared channel): routed by authorizations[0].team_id.
    let mut shared = message(
        "T0SOMEONEELSE",
        "C0SHARED",
        "U2",
        "hello bravo",
        "1700000002.000100",
        "Ev03AUTH",
        json!({}),
    );
    shared["authorizations"][0]["team_id"] = json!("T0BRAVO");
    shared["is_ext_shared_channel"] = json!(true);
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &shared).await;

    // A validly signed event for a team we do not know: acknowledged, recorded as filtered.
    let unknown = message(
        "T0NOBODY",
        "C0ONE",
        "U3",
        "who am I",
        "1700000003.000100",
        "Ev03UNKNOWN",
        json!({}),
    );
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &unknown).await;

    // The app-level secret is the only one accepted here.
    let forged = message(
        "T0ALPHA",
        "C0ONE",
        "U1",
        "forged",
        "1700000004.000100",
        "Ev03FORGED",
        json!({}),
    );
    let res = send_slack(&app, SLACK_EVENTS, "not-the-app-secret", &forged, &[]).await;
    assert_rejected(res, StatusCode::UNAUTHORIZED, "invalid_signature", "forged");

    app.drain().await;
    let sa = app.signals(&ws_a).await;
    assert_eq!(sa.len(), 1, "{sa:#?}");
    assert_eq!(sa[0]["verbatim"], "hello alpha");
    assert_eq!(sa[0]["source_ref"], "slack-C0ONE-1700000001.000100");
    let sb = app.signals(&ws_b).await;
    assert_eq!(sb.len(), 1, "{sb:#?}");
    assert_eq!(sb[0]["verbatim"], "hello bravo");
    assert_eq!(sb[0]["source_metadata"]["channel_id"], "C0SHARED");
    assert_eq!(sb[0]["source_metadata"]["is_ext_shared_channel"], true);
    assert_eq!(app.count("SELECT COUNT(*) FROM signals").await, 2);

    let all = deliveries(&app, "").await;
    assert_eq!(all.len(), 3, "{all:#?}");
    assert_eq!(delivery(&all, "Ev03TEAM")["integration_id"], a["id"]);
    assert_eq!(delivery(&all, "Ev03AUTH")["integration_id"], bravo["id"]);
    let filtered = deliveries(&app, "status=filtered").await;
    assert_eq!(filtered.len(), 1, "{filtered:#?}");
    let f = delivery(&filtered, "Ev03UNKNOWN");
    assert!(f["workspace_id"].is_null(), "{f}");
    assert!(f["signal_id"].is_null(), "{f}");
    let reason = f["filter_reason"].as_str().unwrap();
    assert!(reason.contains("T0NOBODY"), "{reason}");
    app.stop().await;
}

async fn team_lookup_verifies_with_the_teams_own_secret(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let other_ws = app.workspace("Other").await;
    slack_integration(
        &app,
        &ws,
        "T0LOOK",
        json!({"signing_secret": "lookup-secret-1"}),
    )
    .await;
    slack_integration(
        &app,
        &other_ws,
        "T0OTHER",
        json!({"signing_secret": "other-team-secret"}),
    )
    .await;

    let good = message(
        "T0LOOK",
        "C0ONE",
        "U1",
        "found by team",
        "1700000010.000100",
        "Ev04GOOD",
        json!({}),
    );
    send_ok(&app, SLACK_EVENTS, "lookup-secret-1", &good).await;

    // Another secret (including another tenant's) does not verify this team's events.
    for secret in ["someone-elses-secret", "other-team-secret"] {
        let body = message(
            "T0LOOK",
            "C0ONE",
            "U1",
            "forged",
            "1700000011.000100",
            "Ev04FORGED",
            json!({}),
        );
        let res = send_slack(&app, SLACK_EVENTS, secret, &body, &[]).await;
        assert_rejected(res, StatusCode::UNAUTHORIZED, "invalid_signature", secret);
    }
    // Unsigned.
    let res = app
        .post_raw(SLACK_EVENTS, &[], good.to_string().into_bytes())
        .await;
    assert_rejected(
        res,
        StatusCode::UNAUTHORIZED,
        "missing_signature",
        "unsigned",
    );
    // An unknown team cannot be verified in this mode.
    let unknown = message(
        "T0UNKNOWN",
        "C0ONE",
        "U1",
        "who",
        "1700000012.000100",
        "Ev04UNKNOWN",
        json!({}),
    );
    let res = send_slack(&app, SLACK_EVENTS, "lookup-secret-1", &unknown, &[]).await;
    assert_rejected(
        res,
        StatusCode::UNAUTHORIZED,
        "unknown_integration",
        "unknown team",
    );

    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:#?}");
    assert_eq!(signals[0]["verbatim"], "found by team");
    assert!(app.signals(&other_ws).await.is_empty());
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 1);
    app.stop().await;
}

async fn retry_storm_makes_one_delivery_and_one_signal(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "storm-signing-secret";
    let integ = slack_integration(&app, &ws, "T0STORM", json!({"signing_secret": secret})).await;
    let path = url_for(&integ);
    let body = message(
        "T0STORM",
        "C0ONE",
        "U1",
        "retry me",
        "1700000020.000100",
        "Ev05STORM",
        json!({}),
    );
    // The first delivery, then Slack's three retries (each freshly signed).
    let (st, v) = send_slack(&app, &path, secret, &body, &[]).await;
    assert_eq!((st, v), (StatusCode::OK, json!({"ok": true})));
    for n in 1..=3 {
        let retry = [
            ("x-slack-retry-num", n.to_string()),
            ("x-slack-retry-reason", "http_timeout".to_string()),
        ];
        let (st, v) = send_slack(&app, &path, secret, &body, &retry).await;
        assert_eq!(
            (st, v),
            (StatusCode::OK, json!({"ok": true, "duplicate": true})),
            "retry {n}"
        );
    }
    // Ten concurrent copies.
    let retry = [
        ("x-slack-retry-num", "1".to_string()),
        ("x-slack-retry-reason", "http_error".to_string()),
    ];
    let results =
        futures::future::join_all((0..10).map(|_| send_slack(&app, &path, secret, &body, &retry)))
            .await;
    for (st, v) in &results {
        assert_eq!(
            (*st, v),
            (StatusCode::OK, &json!({"ok": true, "duplicate": true}))
        );
    }
    // Ten concurrent first deliveries of another event: exactly one is new.
    let other = message(
        "T0STORM",
        "C0ONE",
        "U1",
        "racing copies",
        "1700000021.000100",
        "Ev05RACE",
        json!({}),
    );
    let results =
        futures::future::join_all((0..10).map(|_| send_slack(&app, &path, secret, &other, &[])))
            .await;
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
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!(delivery(&d, "Ev05STORM")["status"], "processed");
    assert_eq!(delivery(&d, "Ev05RACE")["status"], "processed");
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 2, "{signals:#?}");
    assert_eq!(
        signals
            .iter()
            .filter(|s| s["source_ref"] == "slack-C0ONE-1700000020.000100")
            .count(),
        1
    );
    assert_eq!(activity(&app, &ws, "signal.created").await.len(), 2);
    let m = app.metrics().await;
    assert!(
        m.contains("signalbox_slack_retries_total{reason=\"http_timeout\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("signalbox_slack_retries_total{reason=\"http_error\"} 10"),
        "{m}"
    );
    app.stop().await;
}

async fn channel_allow_list_filters_other_channels(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "allow-list-secret";
    let integ = slack_integration(
        &app,
        &ws,
        "T0ALLOW",
        json!({"signing_secret": secret, "config": {"slack_channels": ["C1ALLOWED"]}}),
    )
    .await;
    assert_eq!(integ["config"]["slack_channels"], json!(["C1ALLOWED"]));
    let path = url_for(&integ);
    let allowed = message(
        "T0ALLOW",
        "C1ALLOWED",
        "U1",
        "in the allowed channel",
        "1700000030.000100",
        "Ev06ALLOWED",
        json!({}),
    );
    let elsewhere = message(
        "T0ALLOW",
        "C2ELSEWHERE",
        "U1",
        "somewhere else",
        "1700000031.000100",
        "Ev06ELSEWHERE",
        json!({}),
    );
    send_ok(&app, &path, secret, &allowed).await;
    send_ok(&app, &path, secret, &elsewhere).await;
    app.drain().await;

    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:#?}");
    assert_eq!(signals[0]["verbatim"], "in the allowed channel");
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(delivery(&d, "Ev06ALLOWED")["status"], "processed");
    let f = delivery(&d, "Ev06ELSEWHERE");
    assert_eq!(f["status"], "filtered");
    assert!(f["signal_id"].is_null());
    let reason = f["filter_reason"].as_str().unwrap();
    assert!(reason.contains("C2ELSEWHERE"), "{reason}");
    app.stop().await;
}

async fn bot_messages_and_joins_are_filtered(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "bot-filter-secret";
    let integ = slack_integration(
        &app,
        &ws,
        "T0BOTS",
        json!({"signing_secret": secret, "slack_bot_user_id": "U0OURBOT"}),
    )
    .await;
    let path = url_for(&integ);
    let cases = [
        (
            "Ev07BOTID",
            "U9",
            json!({"bot_id": "B0123", "bot_profile": {"id": "B0123", "app_id": "A0OTHER", "name": "ci"}}),
            "bot",
        ),
        (
            "Ev07BOTMSG",
            "U9",
            json!({"subtype": "bot_message", "user": null, "username": "github", "icons": {}}),
            "bot",
        ),
        ("Ev07OWNBOT", "U0OURBOT", json!({}), "own bot"),
        (
            "Ev07JOIN",
            "U5",
            json!({"subtype": "channel_join", "inviter": "U1", "text": "<@U5|cal> has joined the channel"}),
            "channel_join",
        ),
    ];
    for (i, (event_id, user, extra, _)) in cases.iter().enumerate() {
        let body = message(
            "T0BOTS",
            "C0ONE",
            user,
            "automated text",
            &format!("1700000040.00010{i}"),
            event_id,
            extra.clone(),
        );
        send_ok(&app, &path, secret, &body).await;
    }
    // A person's message in the same channel still goes through.
    let human = message(
        "T0BOTS",
        "C0ONE",
        "U1",
        "a person wrote this",
        "1700000041.000100",
        "Ev07HUMAN",
        json!({}),
    );
    send_ok(&app, &path, secret, &human).await;
    app.drain().await;

    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:#?}");
    assert_eq!(signals[0]["verbatim"], "a person wrote this");
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(delivery(&d, "Ev07HUMAN")["status"], "processed");
    for (event_id, _, _, why) in cases {
        let f = delivery(&d, event_id);
        assert_eq!(f["status"], "filtered", "{event_id}: {f}");
        let reason = f["filter_reason"].as_str().unwrap();
        assert!(reason.contains(why), "{event_id}: {reason}");
    }
    app.stop().await;
}

async fn edits_and_deletes_update_the_same_signal(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "edit-delete-secret";
    let integ = slack_integration(&app, &ws, "T0EDIT", json!({"signing_secret": secret})).await;
    let path = url_for(&integ);
    let ts = "1700000050.000100";
    let original = message(
        "T0EDIT",
        "C0ONE",
        "U1",
        "first text",
        ts,
        "Ev08ORIG",
        json!({}),
    );
    send_ok(&app, &path, secret, &original).await;
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1);
    let id = signals[0]["id"].clone();

    // The message is edited.
    let changed = |event_id: &str, msg_ts: &str, old: &str, new: &str| {
        envelope(
            "T0EDIT",
            event_id,
            json!({
                "type": "message",
                "subtype": "message_changed",
                "hidden": true,
                "channel": "C0ONE",
                "channel_type": "channel",
                "ts": "1700000060.000200",
                "event_ts": "1700000060.000200",
                "message": {
                    "type": "message", "user": "U1", "text": new, "ts": msg_ts,
                    "edited": {"user": "U1", "ts": "1700000060.000000"}
                },
                "previous_message": {"type": "message", "user": "U1", "text": old, "ts": msg_ts}
            }),
        )
    };
    send_ok(
        &app,
        &path,
        secret,
        &changed("Ev08EDIT", ts, "first text", "second &amp; better"),
    )
    .await;
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "{signals:#?}");
    let s = &signals[0];
    assert_eq!(s["id"], id);
    assert_eq!(s["verbatim"], "second & better");
    assert_eq!(s["source_ref"], format!("slack-C0ONE-{ts}"));
    let m = &s["source_metadata"];
    assert_eq!(m["edits"][0]["verbatim"], "first text", "{m}");
    assert_eq!(m["raw_text"], "second &amp; better");
    let updated = activity(&app, &ws, "signal.updated").await;
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0]["target_id"], id);

    // Slack also sends message_changed when only a link unfurl changed: nothing to record.
    let mut unfurl = changed(
        "Ev08UNFURL",
        ts,
        "second &amp; better",
        "second &amp; better",
    );
    unfurl["event"]["message"]["attachments"] =
        json!([{"from_url": "https://x.test", "title": "X", "id": 1}]);
    send_ok(&app, &path, secret, &unfurl).await;
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals[0]["verbatim"], "second & better");
    assert_eq!(
        signals[0]["source_metadata"]["edits"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(activity(&app, &ws, "signal.updated").await.len(), 1);

    // Then deleted: marked, never removed.
    let deleted = envelope(
        "T0EDIT",
        "Ev08DELETE",
        json!({
            "type": "message",
            "subtype": "message_deleted",
            "hidden": true,
            "channel": "C0ONE",
            "channel_type": "channel",
            "ts": "1700000070.000300",
            "event_ts": "1700000070.000300",
            "deleted_ts": ts,
            "previous_message": {"type": "message", "user": "U1", "text": "second &amp; better", "ts": ts}
        }),
    );
    send_ok(&app, &path, secret, &deleted).await;
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 1, "a deleted message is still listed");
    let s = &signals[0];
    assert_eq!(s["id"], id);
    assert_eq!(s["source_metadata"]["deleted"], true, "{s}");
    assert_eq!(s["status"], "deleted", "{s}");
    assert_eq!(s["verbatim"], "second & better");
    assert_eq!(s["source_metadata"]["edits"][0]["verbatim"], "first text");
    let del = activity(&app, &ws, "signal.deleted").await;
    assert_eq!(del.len(), 1);
    assert_eq!(del[0]["target_id"], id);

    // An edit of a message we never saw creates it.
    let unseen_ts = "1700000080.000400";
    send_ok(
        &app,
        &path,
        secret,
        &changed("Ev08UNSEEN", unseen_ts, "lost", "edited before we saw it"),
    )
    .await;
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 2, "{signals:#?}");
    let created = signals
        .iter()
        .find(|s| s["source_ref"] == format!("slack-C0ONE-{unseen_ts}"))
        .unwrap();
    assert_eq!(created["verbatim"], "edited before we saw it");
    assert_eq!(created["status"], "new");
    let c = activity(&app, &ws, "signal.created").await;
    assert_eq!(c.len(), 2);

    // An edit whose `message` carries no ts (Slack's SDK fixtures have such) uses the
    // previous message's; one with neither is recorded as failed once, never retried.
    let mut no_ts = changed(
        "Ev08NOTS",
        unseen_ts,
        "edited before we saw it",
        "edited again",
    );
    no_ts["event"]["message"]
        .as_object_mut()
        .unwrap()
        .remove("ts");
    send_ok(&app, &path, secret, &no_ts).await;
    let mut neither = changed("Ev08NEITHER", unseen_ts, "x", "y");
    neither["event"]["message"]
        .as_object_mut()
        .unwrap()
        .remove("ts");
    neither["event"]["previous_message"]
        .as_object_mut()
        .unwrap()
        .remove("ts");
    send_ok(&app, &path, secret, &neither).await;
    app.drain().await;
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(delivery(&d, "Ev08NOTS")["status"], "processed");
    let bad = delivery(&d, "Ev08NEITHER");
    assert_eq!(bad["status"], "failed", "{bad:#}");
    assert_eq!(bad["attempts"], 1, "{bad:#}");
    let signals = app.signals(&ws).await;
    let edited = signals
        .iter()
        .find(|s| s["source_ref"] == format!("slack-C0ONE-{unseen_ts}"))
        .unwrap();
    assert_eq!(edited["verbatim"], "edited again");
    assert!(c.iter().any(|e| e["target_id"] == created["id"]));

    // A delete of a message we never saw has nothing to mark.
    let orphan = envelope(
        "T0EDIT",
        "Ev08ORPHAN",
        json!({"type": "message", "subtype": "message_deleted", "hidden": true, "channel": "C0ONE",
               "channel_type": "channel", "ts": "1700000090.000500", "deleted_ts": "1600000000.000001"}),
    );
    send_ok(&app, &path, secret, &orphan).await;
    app.drain().await;
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(delivery(&d, "Ev08ORPHAN")["status"], "filtered");
    for key in [
        "Ev08ORIG",
        "Ev08EDIT",
        "Ev08UNFURL",
        "Ev08DELETE",
        "Ev08UNSEEN",
        "Ev08NOTS",
    ] {
        assert_eq!(delivery(&d, key)["status"], "processed", "{key}");
    }
    assert_eq!(app.signals(&ws).await.len(), 2);
    app.stop().await;
}

async fn uninstall_and_revoked_tokens_deactivate_and_later_events_are_filtered(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "uninstall-secret";
    let integ = slack_integration(
        &app,
        &ws,
        "T0GONE",
        json!({"signing_secret": secret, "bot_token": "xoxb-1111-2222-uninstall"}),
    )
    .await;
    assert_eq!(integ["is_active"], true);
    assert_eq!(integ["has_access_token"], true);
    let path = url_for(&integ);

    send_ok(
        &app,
        &path,
        secret,
        &envelope(
            "T0GONE",
            "Ev09UNINSTALL",
            json!({"type": "app_uninstalled"}),
        ),
    )
    .await;
    app.drain().await;
    let now_integ = get_integration(&app, &integ["id"]).await;
    assert_eq!(now_integ["is_active"], false, "{now_integ}");
    assert_eq!(now_integ["has_access_token"], false, "{now_integ}");
    let deact = activity(&app, &ws, "integration.deactivated").await;
    assert_eq!(deact.len(), 1, "{deact:#?}");
    assert_eq!(deact[0]["target_id"], integ["id"]);

    // Later events for that team: acknowledged, recorded as filtered, never 4xx.
    let later = message(
        "T0GONE",
        "C0ONE",
        "U1",
        "after uninstall",
        "1700000100.000100",
        "Ev09LATER1",
        json!({}),
    );
    send_ok(&app, &path, secret, &later).await;
    let later_lookup = message(
        "T0GONE",
        "C0ONE",
        "U1",
        "after uninstall, by team",
        "1700000101.000100",
        "Ev09LATER2",
        json!({}),
    );
    send_ok(&app, SLACK_EVENTS, secret, &later_lookup).await;

    // tokens_revoked: user tokens alone change nothing; a bot token deactivates.
    let secret2 = "revoke-secret-2";
    let integ2 = slack_integration(
        &app,
        &ws,
        "T0REVOKE",
        json!({"signing_secret": secret2, "bot_token": "xoxb-3333-4444-revoke"}),
    )
    .await;
    let path2 = url_for(&integ2);
    send_ok(
        &app,
        &path2,
        secret2,
        &envelope(
            "T0REVOKE",
            "Ev09USERTOKENS",
            json!({"type": "tokens_revoked", "tokens": {"oauth": ["U7"], "bot": []}}),
        ),
    )
    .await;
    app.drain().await;
    assert_eq!(
        get_integration(&app, &integ2["id"]).await["is_active"],
        true
    );
    send_ok(
        &app,
        &path2,
        secret2,
        &envelope(
            "T0REVOKE",
            "Ev09BOTTOKENS",
            json!({"type": "tokens_revoked", "tokens": {"oauth": ["U7"], "bot": ["U0SBXBOT"]}}),
        ),
    )
    .await;
    app.drain().await;
    let now_integ2 = get_integration(&app, &integ2["id"]).await;
    assert_eq!(now_integ2["is_active"], false, "{now_integ2}");
    assert_eq!(now_integ2["has_access_token"], false, "{now_integ2}");
    // app_uninstalled arriving after tokens_revoked (Slack does not order them) changes nothing.
    send_ok(
        &app,
        &path2,
        secret2,
        &envelope(
            "T0REVOKE",
            "Ev09UNINSTALL2",
            json!({"type": "app_uninstalled"}),
        ),
    )
    .await;
    let later2 = message(
        "T0REVOKE",
        "C0ONE",
        "U1",
        "after revoke",
        "1700000102.000100",
        "Ev09LATER3",
        json!({}),
    );
    send_ok(&app, SLACK_EVENTS, secret2, &later2).await;
    app.drain().await;

    let deact = activity(&app, &ws, "integration.deactivated").await;
    assert_eq!(deact.len(), 2, "{deact:#?}");
    assert_eq!(
        deact
            .iter()
            .filter(|e| e["target_id"] == integ2["id"])
            .count(),
        1
    );
    assert!(app.signals(&ws).await.is_empty());
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    for key in ["Ev09LATER1", "Ev09LATER2", "Ev09LATER3"] {
        let f = delivery(&d, key);
        assert_eq!(f["status"], "filtered", "{key}: {f}");
        assert_eq!(f["filter_reason"], "integration is inactive", "{key}: {f}");
    }
    assert_eq!(delivery(&d, "Ev09USERTOKENS")["status"], "filtered");
    assert_eq!(delivery(&d, "Ev09UNINSTALL")["status"], "processed");
    assert_eq!(delivery(&d, "Ev09BOTTOKENS")["status"], "processed");
    app.stop().await;
}

async fn app_uninstalled_wipes_the_token_of_an_already_inactive_integration(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "paused-secret-1";
    let integ = slack_integration(
        &app,
        &ws,
        "T0PAUSED",
        json!({"signing_secret": secret, "bot_token": "xoxb-5555-6666-paused"}),
    )
    .await;
    // An administrator pauses the integration: its token is kept for when it is resumed.
    let (st, v) = app
        .api(
            "DELETE",
            &format!("/api/v1/integrations/{}", integ["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["is_active"], false);
    assert_eq!(v["has_access_token"], true);
    // Then the customer uninstalls the app: the token is dead and must be wiped all the same.
    send_ok(
        &app,
        &url_for(&integ),
        secret,
        &envelope(
            "T0PAUSED",
            "Ev09bUNINSTALL",
            json!({"type": "app_uninstalled"}),
        ),
    )
    .await;
    app.drain().await;
    let now_integ = get_integration(&app, &integ["id"]).await;
    assert_eq!(now_integ["is_active"], false);
    assert_eq!(
        now_integ["has_access_token"], false,
        "app_uninstalled must wipe the token even when the integration was already inactive: {now_integ}"
    );
    app.stop().await;
}

async fn unknown_event_and_envelope_types_are_acknowledged_and_filtered(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "unknown-types-secret";
    let integ = slack_integration(&app, &ws, "T0ODD", json!({"signing_secret": secret})).await;
    let path = url_for(&integ);
    let reaction = envelope(
        "T0ODD",
        "Ev10REACTION",
        json!({"type": "reaction_added", "user": "U1", "reaction": "thumbsup",
               "item_user": "U2", "item": {"type": "message", "channel": "C0ONE", "ts": "1700000110.000100"},
               "event_ts": "1700000111.000100"}),
    );
    let new_subtype = message(
        "T0ODD",
        "C0ONE",
        "U1",
        "huddle notes",
        "1700000112.000100",
        "Ev10SUBTYPE",
        json!({"subtype": "huddle_thread"}),
    );
    let odd_envelope = json!({"token": "XXYYZZ", "type": "brand_new_envelope", "team_id": "T0ODD",
                              "api_app_id": SLACK_APP_ID, "payload": {"x": [1, 2, 3]}});
    let no_type = json!({"team_id": "T0ODD", "api_app_id": SLACK_APP_ID});
    let rate_limited = json!({"token": "XXYYZZ", "type": "app_rate_limited", "team_id": "T0ODD",
                              "minute_rate_limited": 1_518_467_820, "api_app_id": SLACK_APP_ID});
    for body in [
        &reaction,
        &new_subtype,
        &odd_envelope,
        &no_type,
        &rate_limited,
    ] {
        send_ok(&app, &path, secret, body).await;
    }
    app.drain().await;

    assert!(app.signals(&ws).await.is_empty());
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(d.len(), 5, "{d:#?}");
    for x in &d {
        assert_eq!(x["status"], "filtered", "{x}");
    }
    let reason = |key: &str| {
        delivery(&d, key)["filter_reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason("Ev10REACTION").contains("reaction_added"));
    assert!(reason("Ev10SUBTYPE").contains("huddle_thread"));
    assert!(reason("app_rate_limited:T0ODD:1518467820").contains("app_rate_limited"));
    assert!(
        d.iter().any(|x| x["filter_reason"]
            .as_str()
            .unwrap()
            .contains("brand_new_envelope")),
        "{d:#?}"
    );
    let m = app.metrics().await;
    assert!(
        m.contains("signalbox_slack_app_rate_limited_total 1"),
        "{m}"
    );
    app.stop().await;
}

async fn stale_timestamps_and_invalid_json_are_rejected(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let secret = "timing-secret-1";
    let integ = slack_integration(&app, &ws, "T0TIME", json!({"signing_secret": secret})).await;
    let body = message(
        "T0TIME",
        "C0ONE",
        "U1",
        "on time?",
        "1700000120.000100",
        "Ev11TIME",
        json!({}),
    )
    .to_string()
    .into_bytes();
    for (mode, path) in [
        ("per-integration", url_for(&integ)),
        ("team lookup", SLACK_EVENTS.into()),
    ] {
        for offset in [-600, 600] {
            let res = send_bytes(&app, &path, secret, now() + offset, body.clone(), &[]).await;
            assert_rejected(
                res,
                StatusCode::UNAUTHORIZED,
                "stale_timestamp",
                &format!("{mode} {offset}"),
            );
        }
        // A signature over another body.
        let headers = slack_headers(secret, now(), b"{\"type\":\"event_callback\"}");
        let res = app.post_raw(&path, &headers, body.clone()).await;
        assert_rejected(res, StatusCode::UNAUTHORIZED, "invalid_signature", mode);
        // A timestamp that is not a number.
        let mut headers = slack_headers(secret, now(), &body);
        headers[0].1 = "soon".into();
        let res = app.post_raw(&path, &headers, body.clone()).await;
        assert_rejected(res, StatusCode::UNAUTHORIZED, "invalid_signature", mode);
        // Validly signed, but not a JSON object.
        for bad in [&b"{\"type\": "[..], &b"[1, 2]"[..], &[0xff, 0xfe, b'{'][..]] {
            let res = send_bytes(&app, &path, secret, now(), bad.to_vec(), &[]).await;
            assert_rejected(res, StatusCode::BAD_REQUEST, "invalid_json", mode);
        }
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    // Within the tolerance it goes through.
    let (st, v) = send_bytes(&app, &url_for(&integ), secret, now() - 250, body, &[]).await;
    assert_eq!((st, v), (StatusCode::OK, json!({"ok": true})));
    let m = app.metrics().await;
    assert!(
        m.contains("signalbox_rejections_total{source=\"slack\",reason=\"stale_timestamp\"} 4"),
        "{m}"
    );
    app.stop().await;

    // The same with the app-level secret.
    let app = spawn_app_with(b, |c| {
        c.set("slack_signing_secret", APP_SECRET);
    })
    .await;
    let body = message(
        "T0TIME",
        "C0ONE",
        "U1",
        "on time?",
        "1700000120.000100",
        "Ev11TIME",
        json!({}),
    )
    .to_string()
    .into_bytes();
    for offset in [-600, 600] {
        let res = send_bytes(
            &app,
            SLACK_EVENTS,
            APP_SECRET,
            now() + offset,
            body.clone(),
            &[],
        )
        .await;
        assert_rejected(
            res,
            StatusCode::UNAUTHORIZED,
            "stale_timestamp",
            &format!("app-level {offset}"),
        );
    }
    for bad in [&b"{\"type\": "[..], &b"\"just a string\""[..]] {
        let res = send_bytes(&app, SLACK_EVENTS, APP_SECRET, now(), bad.to_vec(), &[]).await;
        assert_rejected(res, StatusCode::BAD_REQUEST, "invalid_json", "app-level");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    app.stop().await;
}
