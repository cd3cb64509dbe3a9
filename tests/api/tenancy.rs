//! Hostile tenants and Slack's multi-tenant payloads (Slack Connect, Enterprise Grid): every
//! event lands in the workspace of the installation it was delivered for, and no sequence of
//! calls a workspace token can make obtains another workspace's Slack events.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::both_backends;
use crate::helpers::*;
use crate::slack::APP_SECRET;
use crate::slack_oauth::{app_with_fake_slack, install, mount_oauth, oauth_answer};

both_backends!(
    a_workspace_token_cannot_bind_a_team_to_the_shared_app,
    reactivation_cannot_make_a_second_owner,
    oauth_install_of_a_team_owned_elsewhere_is_refused_and_revoked,
    slack_connect_lands_in_the_installing_workspace,
    an_inactive_row_does_not_hide_an_active_install,
    two_installs_in_one_shared_channel_each_get_their_own_signal,
    one_workspace_sees_a_shared_channel_message_once,
    dedupe_scope_comes_from_the_verifier_not_the_body,
    a_named_integration_of_the_shared_app_takes_only_its_own_team,
    migration_keeps_one_owner_and_rekeys_slack_signals,
    an_unproven_claim_gives_way_to_the_oauth_install,
);

async fn app_with_shared_secret(b: Backend) -> TestApp {
    spawn_app_with(b, |c| {
        c.set("slack_signing_secret", APP_SECRET);
    })
    .await
}

/// A message envelope delivered for installation `installed` of a message sent from `sender`'s
/// organisation (Slack Connect when they differ), as in Slack's shared-channel payloads.
fn shared_message(sender: &str, installed: &[&str], text: &str, ts: &str, event_id: &str) -> Value {
    let mut m = message(
        sender,
        "C0SHARED",
        "U0SENDER",
        text,
        ts,
        event_id,
        json!({"team": sender, "user_team": sender, "source_team": sender}),
    );
    m["authorizations"] = json!(
        installed
            .iter()
            .map(|t| json!({"enterprise_id": null, "team_id": t, "user_id": "U0BOT", "is_bot": true, "is_enterprise_install": false}))
            .collect::<Vec<_>>()
    );
    m["context_team_id"] = json!(installed.first().copied().unwrap_or(sender));
    m["is_ext_shared_channel"] = json!(sender != installed.first().copied().unwrap_or(sender));
    m
}

async fn signals_as(app: &TestApp, token: &str, ws: &str) -> (StatusCode, Value) {
    app.api_as(
        token,
        "GET",
        &format!("/api/v1/workspaces/{ws}/signals"),
        None,
    )
    .await
}

async fn a_workspace_token_cannot_bind_a_team_to_the_shared_app(b: Backend) {
    let app = app_with_shared_secret(b).await;
    let ws_a = app.workspace("Attacker").await;
    let ws_v = app.workspace("Victim").await;
    let token = app.token(&ws_a).await.1;
    // (1a) Claiming the victim's team for the shared app needs proof a token cannot give.
    let claim = json!({"platform": "slack", "name": "mine", "slack_team_id": "T0VICTIM"});
    let (st, v) = app
        .api_as(
            &token,
            "POST",
            &format!("/api/v1/workspaces/{ws_a}/integrations"),
            Some(claim.clone()),
        )
        .await;
    assert_rejected((st, v.clone()), StatusCode::FORBIDDEN, "forbidden", "claim");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/api/integrations/slack/install"),
        "{v}"
    );
    // (1b) Nor a workspace inside an enterprise, nor the enterprise itself.
    for team in ["T0GRIDWS", "E0VICTIM"] {
        let (st, v) = app
            .api_as(
                &token,
                "POST",
                &format!("/api/v1/workspaces/{ws_a}/integrations"),
                Some(json!({"platform": "slack", "name": "x", "slack_team_id": team})),
            )
            .await;
        assert_rejected((st, v), StatusCode::FORBIDDEN, "forbidden", team);
    }
    // With its own app's signing secret it may (a per-customer app: the secret proves it) …
    let own = app
        .api_as(
            &token,
            "POST",
            &format!("/api/v1/workspaces/{ws_a}/integrations"),
            Some(json!({"platform": "slack", "name": "own app", "slack_team_id": "T0VICTIM", "signing_secret": "attackers-own-secret"})),
        )
        .await;
    assert_eq!(own.0, StatusCode::CREATED, "{}", own.1);
    // … but the victim's events, signed by the shared app, never reach it.
    slack_integration(&app, &ws_v, "T0VICTIM", json!({})).await;
    let event = message(
        "T0VICTIM",
        "C0VICTIM",
        "U1",
        "our roadmap",
        "1700000100.000100",
        "Ev0VICTIM1",
        json!({}),
    );
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &event).await;
    // Posting them to the attacker's own URL does not work either: only its secret verifies.
    let url = format!(
        "{SLACK_EVENTS}?integration_id={}",
        own.1["id"].as_str().unwrap()
    );
    let (st, v) = send_slack(&app, &url, APP_SECRET, &event, &[]).await;
    assert_rejected(
        (st, v),
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
        "own url",
    );
    app.drain().await;
    let (_, mine) = signals_as(&app, &token, &ws_a).await;
    assert_eq!(mine["items"], json!([]), "the attacker got nothing");
    let victims = app.signals(&ws_v).await;
    assert_eq!(victims.len(), 1, "{victims:#?}");
    assert_eq!(victims[0]["source_metadata"]["team_id"], "T0VICTIM");
    // The victim's data is not visible to the attacker's token by id either.
    let (st, _) = app
        .api_as(
            &token,
            "GET",
            &format!("/api/v1/signals/{}", victims[0]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    app.stop().await;
}

async fn reactivation_cannot_make_a_second_owner(b: Backend) {
    let app = app_with_shared_secret(b).await;
    let ws_a = app.workspace("Former").await;
    let ws_b = app.workspace("Current").await;
    let old = slack_integration(&app, &ws_a, "T0MOVED", json!({})).await;
    let old_id = old["id"].as_str().unwrap().to_string();
    let token = app.token(&ws_a).await.1;
    // Deactivated; then the team is connected to another workspace.
    let (st, _) = app
        .api_as(
            &token,
            "DELETE",
            &format!("/api/v1/integrations/{old_id}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    slack_integration(&app, &ws_b, "T0MOVED", json!({})).await;
    // (1c) Re-activating the old one would make two owners: refused.
    let (st, v) = app
        .api_as(
            &token,
            "PATCH",
            &format!("/api/v1/integrations/{old_id}"),
            Some(json!({"is_active": true})),
        )
        .await;
    assert_rejected(
        (st, v.clone()),
        StatusCode::CONFLICT,
        "conflict",
        "reactivate",
    );
    assert!(
        !v.to_string().contains(&ws_b),
        "the other workspace stays unnamed: {v}"
    );
    // Even the admin cannot: the database holds one active integration per team.
    let (st, v) = app
        .api(
            "PATCH",
            &format!("/api/v1/integrations/{old_id}"),
            Some(json!({"is_active": true})),
        )
        .await;
    assert_rejected(
        (st, v),
        StatusCode::CONFLICT,
        "conflict",
        "admin reactivate",
    );
    let dup = app
        .api(
            "POST",
            &format!("/api/v1/workspaces/{ws_a}/integrations"),
            Some(json!({"platform": "slack", "name": "again", "slack_team_id": "T0MOVED"})),
        )
        .await;
    assert_rejected(dup, StatusCode::CONFLICT, "conflict", "admin create");
    let count = app
        .count(
            "SELECT COUNT(*) FROM integrations WHERE slack_team_id = 'T0MOVED' AND is_active = true",
        )
        .await;
    assert_eq!(count, 1);
    send_ok(
        &app,
        SLACK_EVENTS,
        APP_SECRET,
        &message(
            "T0MOVED",
            "C1",
            "U1",
            "hi",
            "1700000200.000100",
            "Ev0MOVED",
            json!({}),
        ),
    )
    .await;
    app.drain().await;
    assert_eq!(app.signals(&ws_b).await.len(), 1);
    assert!(app.signals(&ws_a).await.is_empty());
    app.stop().await;
}

async fn oauth_install_of_a_team_owned_elsewhere_is_refused_and_revoked(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws_owner = app.workspace("Owner").await;
    let ws_other = app.workspace("Other").await;
    // B owns the whole enterprise through an org-wide install.
    slack_integration(&app, &ws_owner, "E0VICTIM", json!({})).await;
    let revoked = Mock::given(method("POST"))
        .and(path("/auth.revoke"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"ok": true, "revoked": true})),
        )
        .expect(1)
        .mount_as_scoped(&slack)
        .await;
    // A installs a workspace inside that enterprise: Slack's answer names the enterprise.
    let mut answer = oauth_answer("xoxb-gridws", None, None);
    answer["team"] = json!({"id": "T0GRIDWS", "name": "Grid workspace"});
    answer["enterprise"] = json!({"id": "E0VICTIM", "name": "Victim Corp"});
    mount_oauth(&slack, answer).await;
    let (st, page) = install(&app, &ws_other, "code-1").await;
    assert_eq!(st, StatusCode::BAD_GATEWAY, "{page}");
    assert!(
        page.contains("already connected to another signalbox workspace"),
        "{page}"
    );
    drop(revoked); // verifies auth.revoke was called once with the refused token
    let n = app
        .count("SELECT COUNT(*) FROM integrations WHERE slack_team_id = 'T0GRIDWS'")
        .await;
    assert_eq!(n, 0, "nothing stored for the refused install");
    // An install link for a team owned elsewhere is refused before anyone goes to Slack.
    let (st, v) = app
        .api(
            "GET",
            &format!("/api/integrations/slack/install?workspace_id={ws_other}&team_id=E0VICTIM"),
            None,
        )
        .await;
    assert_rejected((st, v), StatusCode::CONFLICT, "conflict", "install link");
    app.stop().await;
}

async fn slack_connect_lands_in_the_installing_workspace(b: Backend) {
    let app = app_with_shared_secret(b).await;
    let ws_a = app.workspace("Installer").await;
    let ws_s = app.workspace("Sender").await;
    slack_integration(&app, &ws_a, "T0INSTALL", json!({})).await;
    // The sender's organisation is a customer too: routing by `team_id` would pick it.
    slack_integration(&app, &ws_s, "T0SENDER", json!({})).await;
    let event = shared_message(
        "T0SENDER",
        &["T0INSTALL"],
        "your export is broken",
        "1700000300.000100",
        "Ev0CONNECT",
    );
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &event).await;
    app.drain().await;
    let got = app.signals(&ws_a).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    let meta = &got[0]["source_metadata"];
    assert_eq!(meta["team_id"], "T0INSTALL");
    assert_eq!(meta["user_team"], "T0SENDER");
    assert_eq!(meta["source_team"], "T0SENDER");
    assert_eq!(meta["is_ext_shared_channel"], true);
    assert_eq!(got[0]["source_ref"], "slack-C0SHARED-1700000300.000100");
    assert!(
        app.signals(&ws_s).await.is_empty(),
        "the sender's tenant got nothing"
    );
    app.stop().await;
}

async fn an_inactive_row_does_not_hide_an_active_install(b: Backend) {
    let app = app_with_shared_secret(b).await;
    let ws = app.workspace("Grid").await;
    // An old workspace install, deactivated, next to the active org-wide install.
    let old = slack_integration(&app, &ws, "T0GRIDWS", json!({})).await;
    let (st, _) = app
        .api(
            "DELETE",
            &format!("/api/v1/integrations/{}", old["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let org = slack_integration(&app, &ws, "E0ORG", json!({})).await;
    let mut event = message(
        "T0GRIDWS",
        "C0GRID",
        "U1",
        "from the grid",
        "1700000400.000100",
        "Ev0GRID",
        json!({}),
    );
    event["enterprise_id"] = json!("E0ORG");
    event["context_team_id"] = json!("T0GRIDWS");
    event["context_enterprise_id"] = json!("E0ORG");
    event["authorizations"] = json!([{"enterprise_id": "E0ORG", "team_id": "T0GRIDWS", "user_id": "U0BOT", "is_bot": true, "is_enterprise_install": true}]);
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &event).await;
    // Slack Connect: the first candidate (the context team) has only an inactive row; the
    // authorization names the active one.
    let mut event = shared_message(
        "T0ELSEWHERE",
        &["E0ORG"],
        "second",
        "1700000401.000100",
        "Ev0GRID2",
    );
    event["authorizations"][0]["enterprise_id"] = json!("E0ORG");
    event["authorizations"][0]["team_id"] = Value::Null;
    event["authorizations"][0]["is_enterprise_install"] = json!(true);
    event["context_team_id"] = json!("T0GRIDWS");
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &event).await;
    app.drain().await;
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    for key in ["Ev0GRID", "Ev0GRID2"] {
        let one = delivery(&d, key);
        assert_eq!(one["status"], "processed", "{one:#}");
        assert_eq!(one["integration_id"], org["id"], "{one:#}");
    }
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), 2, "{signals:#?}");
    let teams: Vec<&Value> = signals
        .iter()
        .map(|s| &s["source_metadata"]["team_id"])
        .collect();
    assert!(teams.iter().all(|t| *t == "T0GRIDWS"), "{teams:?}");
    app.stop().await;
}

async fn two_installs_in_one_shared_channel_each_get_their_own_signal(b: Backend) {
    let app = app_with_shared_secret(b).await;
    let ws_a = app.workspace("Alpha").await;
    let ws_b = app.workspace("Bravo").await;
    slack_integration(&app, &ws_a, "T0ALPHA", json!({})).await;
    slack_integration(&app, &ws_b, "T0BRAVO", json!({})).await;
    let event = shared_message(
        "T0CUSTOMER",
        &["T0ALPHA", "T0BRAVO"],
        "seen by both vendors",
        "1700000500.000100",
        "Ev0BOTH",
    );
    send_ok(&app, SLACK_EVENTS, APP_SECRET, &event).await;
    // Slack's retry is a duplicate for both.
    let (st, v) = send_slack(&app, SLACK_EVENTS, APP_SECRET, &event, &[]).await;
    assert_eq!(
        (st, v),
        (StatusCode::OK, json!({"ok": true, "duplicate": true}))
    );
    app.drain().await;
    for (ws, team) in [(&ws_a, "T0ALPHA"), (&ws_b, "T0BRAVO")] {
        let got = app.signals(ws).await;
        assert_eq!(got.len(), 1, "{team}: {got:#?}");
        assert_eq!(got[0]["source_metadata"]["team_id"], team);
        let d = deliveries(&app, &format!("workspace_id={ws}")).await;
        assert_eq!(d.len(), 1, "{d:#?}");
    }
    // Neither token sees the other's signal.
    let token_a = app.token(&ws_a).await.1;
    let (st, _) = signals_as(&app, &token_a, &ws_b).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    app.stop().await;
}

async fn one_workspace_sees_a_shared_channel_message_once(b: Backend) {
    let app = app_with_shared_secret(b).await;
    let ws = app.workspace("Two teams").await;
    slack_integration(&app, &ws, "T0ONE", json!({})).await;
    slack_integration(&app, &ws, "T0TWO", json!({})).await;
    // One event naming both installations, and the same message delivered for each one.
    send_ok(
        &app,
        SLACK_EVENTS,
        APP_SECRET,
        &shared_message(
            "T0ONE",
            &["T0ONE", "T0TWO"],
            "once",
            "1700000600.000100",
            "Ev0ONCE",
        ),
    )
    .await;
    send_ok(
        &app,
        SLACK_EVENTS,
        APP_SECRET,
        &shared_message("T0ONE", &["T0TWO"], "once", "1700000600.000100", "Ev0ONCE2"),
    )
    .await;
    app.drain().await;
    let got = app.signals(&ws).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    let d = deliveries(&app, &format!("workspace_id={ws}")).await;
    assert_eq!(
        d.len(),
        2,
        "one delivery per event for the workspace: {d:#?}"
    );
    app.stop().await;
}

async fn dedupe_scope_comes_from_the_verifier_not_the_body(b: Backend) {
    let app = spawn_app(b).await;
    let ws_a = app.workspace("A").await;
    let ws_b = app.workspace("B").await;
    let a = slack_integration(
        &app,
        &ws_a,
        "T0AAA",
        json!({"signing_secret": "secret-of-a-1"}),
    )
    .await;
    let bb = slack_integration(
        &app,
        &ws_b,
        "T0BBB",
        json!({"signing_secret": "secret-of-b-1"}),
    )
    .await;
    // A sends an event with B's next event id and B's app id first: B's real event must still
    // be stored, not answered as A's duplicate.
    let forged = message(
        "T0AAA",
        "C1",
        "U1",
        "squat",
        "1700000700.000100",
        "Ev0SAME",
        json!({}),
    );
    let url_a = format!(
        "{SLACK_EVENTS}?integration_id={}",
        a["id"].as_str().unwrap()
    );
    let url_b = format!(
        "{SLACK_EVENTS}?integration_id={}",
        bb["id"].as_str().unwrap()
    );
    send_ok(&app, &url_a, "secret-of-a-1", &forged).await;
    let real = message(
        "T0BBB",
        "C2",
        "U2",
        "real",
        "1700000701.000100",
        "Ev0SAME",
        json!({}),
    );
    send_ok(&app, &url_b, "secret-of-b-1", &real).await;
    // Team-lookup mode (no id in the URL) scopes by the integration whose secret verified.
    let real2 = message(
        "T0BBB",
        "C2",
        "U2",
        "real 2",
        "1700000702.000100",
        "Ev0SAME2",
        json!({}),
    );
    let forged2 = message(
        "T0AAA",
        "C1",
        "U1",
        "squat 2",
        "1700000703.000100",
        "Ev0SAME2",
        json!({}),
    );
    send_ok(&app, SLACK_EVENTS, "secret-of-a-1", &forged2).await;
    send_ok(&app, SLACK_EVENTS, "secret-of-b-1", &real2).await;
    app.drain().await;
    let got = app.signals(&ws_b).await;
    assert_eq!(got.len(), 2, "{got:#?}");
    app.stop().await;
}

async fn a_named_integration_of_the_shared_app_takes_only_its_own_team(b: Backend) {
    let app = app_with_shared_secret(b).await;
    let ws_a = app.workspace("A").await;
    let ws_v = app.workspace("V").await;
    let a = slack_integration(&app, &ws_a, "T0AAA", json!({})).await;
    slack_integration(&app, &ws_v, "T0VICTIM", json!({})).await;
    // An event for another team, signed by the shared app, sent to A's integration URL.
    let url_a = format!(
        "{SLACK_EVENTS}?integration_id={}",
        a["id"].as_str().unwrap()
    );
    let event = message(
        "T0VICTIM",
        "C1",
        "U1",
        "not yours",
        "1700000800.000100",
        "Ev0NOTA",
        json!({}),
    );
    send_ok(&app, &url_a, APP_SECRET, &event).await;
    let own = message(
        "T0AAA",
        "C1",
        "U1",
        "yours",
        "1700000801.000100",
        "Ev0ISA",
        json!({}),
    );
    send_ok(&app, &url_a, APP_SECRET, &own).await;
    app.drain().await;
    let got = app.signals(&ws_a).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["verbatim"], "yours");
    assert!(app.signals(&ws_v).await.is_empty());
    app.stop().await;
}

/// Runs the migrations before the tenancy one, writes rows as an older release did, then the
/// rest: duplicate owners are reduced to one and Slack signals are re-keyed without a clash.
async fn migration_keeps_one_owner_and_rekeys_slack_signals(b: Backend) {
    use signalbox::store::{Pool, Store};
    let (url, _dir) = fresh_database(b).await;
    let cfg = test_config(&url, &new_master_keys()).build().unwrap();
    let store = Store::connect_without_migrating(&cfg).await.unwrap();
    let (dir, before) = match b {
        Backend::Sqlite => ("migrations/sqlite", 2),
        Backend::Postgres => ("migrations/postgres", 3),
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut old = sqlx::migrate::Migrator::new(path).await.unwrap();
    old.migrations = old.migrations[..before].to_vec().into();
    let rows = [
        "INSERT INTO workspaces VALUES ('ws_1', 'one', 1, 1), ('ws_2', 'two', 1, 1)",
        // Two active owners of one team: the OAuth-installed one stays.
        "INSERT INTO integrations (id, workspace_id, platform, name, slack_team_id, is_active, created_at, updated_at, created_by) \
         VALUES ('int_1old', 'ws_2', 'slack', 'installed', 'T0DUP', true, 1, 1, 'oauth'), \
                ('int_2new', 'ws_1', 'slack', 'claimed', 'T0DUP', true, 2, 2, 'tok_x'), \
                ('int_3own', 'ws_1', 'slack', 'own app', 'T0DUP', true, 3, 3, 'tok_x')",
        "UPDATE integrations SET webhook_secret_enc = 'sbx1:k1:x' WHERE id = 'int_3own'",
        "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, created_at, updated_at) VALUES \
         ('sig_1', 'ws_1', 'a', 'slack', 'slack-T0A-C1-1.000001', 1, 1), \
         ('sig_2', 'ws_1', 'b', 'slack', 'slack-T0B-C1-1.000001', 1, 1), \
         ('sig_3', 'ws_2', 'c', 'slack', 'slack-T0A-C1-1.000001', 1, 1), \
         ('sig_4', 'ws_1', 'd', 'webhook', 'ext-ref-with-dashes', 1, 1)",
    ];
    match store.pool() {
        Pool::Sqlite(p) => old.run(p).await.unwrap(),
        Pool::Postgres(p) => old.run(p).await.unwrap(),
    }
    for sql in rows {
        exec_sql(&store, sql).await;
    }
    store.migrate().await.unwrap();
    let active = store
        .scalar_i64(
            "SELECT COUNT(*) FROM integrations WHERE is_active = true \
             AND id IN ('int_1old', 'int_3own')",
        )
        .await
        .unwrap();
    // The OAuth install keeps the team, the claim is deactivated, and a per-customer app (its
    // own signing secret) is not the shared app's.
    assert_eq!(active, 2);
    let claim = store
        .scalar_i64("SELECT COUNT(*) FROM integrations WHERE is_active = true AND id = 'int_2new'")
        .await
        .unwrap();
    assert_eq!(claim, 0);
    let refs = store
        .scalar_i64(
            "SELECT COUNT(*) FROM signals WHERE (id = 'sig_1' AND source_ref = 'slack-C1-1.000001') \
             OR (id = 'sig_2' AND source_ref = 'slack-T0B-C1-1.000001') \
             OR (id = 'sig_3' AND source_ref = 'slack-C1-1.000001') \
             OR (id = 'sig_4' AND source_ref = 'ext-ref-with-dashes')",
        )
        .await
        .unwrap();
    assert_eq!(
        refs, 4,
        "re-keyed: the oldest of a clash, per workspace; others untouched"
    );
    store.close().await;
    if b == Backend::Postgres {
        drop_postgres_database(&url).await;
    }
}

async fn an_unproven_claim_gives_way_to_the_oauth_install(b: Backend) {
    let (app, slack) = app_with_fake_slack(b).await;
    let ws_a = app.workspace("Claimed before proof was needed").await;
    let ws_v = app.workspace("Real owner").await;
    // A claim an older release let a workspace token make: no secret, created by a token.
    let claim = slack_integration(&app, &ws_a, "T0TEAM", json!({})).await;
    let (token_id, _) = app.token(&ws_a).await;
    exec_sql(
        &app.state.store,
        &format!(
            "UPDATE integrations SET created_by = '{token_id}' WHERE id = '{}'",
            claim["id"].as_str().unwrap()
        ),
    )
    .await;
    // The team's admin installs into the real owner's workspace (the fake Slack answers T0TEAM).
    mount_oauth(&slack, oauth_answer("xoxb-real", None, None)).await;
    let (st, page) = install(&app, &ws_v, "code-real").await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let (_, old) = app
        .api(
            "GET",
            &format!("/api/v1/integrations/{}", claim["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(old["is_active"], false, "{old}");
    send_ok(
        &app,
        SLACK_EVENTS,
        crate::slack_oauth::APP_SECRET,
        &message(
            "T0TEAM",
            "C1",
            "U1",
            "mine",
            "1700000900.000100",
            "Ev0REAL",
            json!({}),
        ),
    )
    .await;
    app.drain().await;
    assert_eq!(app.signals(&ws_v).await.len(), 1);
    assert!(app.signals(&ws_a).await.is_empty());
    app.stop().await;
}
