//! Hostile tenants, the cheap-request side: an unsigned Slack `url_verification` in team-lookup
//! mode must cost no database read and no HMAC per integration, a signed one no table scan per
//! request, and an unsigned header must never become a `/metrics` label value.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use signalbox::protocol::slack;
use signalbox::store::Pool;
use sqlx::Connection;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    team_lookup_url_verification_reads_no_table_per_request,
    retry_reason_labels_come_from_a_closed_set,
);

const INTEGRATIONS: usize = 300;
const CHALLENGE: &str = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P";

fn secret(i: usize) -> String {
    format!("amplification-secret-{i:03}")
}

fn challenge_body() -> Vec<u8> {
    json!({"token": "XXYYZZ", "challenge": CHALLENGE, "type": "url_verification"})
        .to_string()
        .into_bytes()
}

/// Request headers.
type Headers = Vec<(&'static str, String)>;

/// `x-slack-request-timestamp` and `x-slack-signature` as given.
fn headers(ts: impl ToString, sig: impl ToString) -> Headers {
    vec![
        ("x-slack-request-timestamp", ts.to_string()),
        ("x-slack-signature", sig.to_string()),
    ]
}

/// Creates `INTEGRATIONS` Slack integrations (team `T0AMP{i}`, secret [`secret`]`(i)`).
async fn many_slack_integrations(app: &TestApp) {
    let ws = app.workspace("Amplification").await;
    for chunk in (0..INTEGRATIONS).collect::<Vec<_>>().chunks(10) {
        futures::future::join_all(chunk.iter().map(|i| {
            app.integration(
                &ws,
                json!({"platform": "slack", "name": format!("Slack {i}"),
                       "slack_team_id": format!("T0AMP{i:03}"), "signing_secret": secret(*i)}),
            )
        }))
        .await;
    }
}

/// Posts to the team-lookup endpoint; a request that waits on the (PostgreSQL) lock of the
/// `integrations` table never answers, and fails here instead of hanging the test.
async fn post(app: &TestApp, headers: &[(&str, String)], what: &str) -> (StatusCode, Value) {
    tokio::time::timeout(
        Duration::from_secs(30),
        app.post_raw(SLACK_EVENTS, headers, challenge_body()),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("{what}: no answer while `integrations` was locked: it read the table")
    })
}

fn assert_rejected(res: (StatusCode, Value), code: &str, what: &str) {
    assert_eq!(res.0, StatusCode::UNAUTHORIZED, "{what}: {}", res.1);
    assert_eq!(res.1["error"]["code"], code, "{what}: {}", res.1);
}

/// Requests refused by the cheap checks (headers, timestamp window, signature shape), with the
/// code each is refused with.
fn refused_cheaply(body: &[u8]) -> Vec<(&'static str, Headers, &'static str)> {
    let ts = now();
    let good = slack::sign(secret(7).as_bytes(), ts, body);
    let stale_ts = ts - 3_600;
    vec![
        ("unsigned", vec![], "missing_signature"),
        (
            "no timestamp",
            vec![("x-slack-signature", good.clone())],
            "missing_signature",
        ),
        (
            "stale, correctly signed",
            headers(stale_ts, slack::sign(secret(7).as_bytes(), stale_ts, body)),
            "stale_timestamp",
        ),
        (
            "from the future",
            headers(ts + 3_600, good.clone()),
            "stale_timestamp",
        ),
        (
            "not a timestamp",
            headers("soon", good.clone()),
            "invalid_signature",
        ),
        (
            "v1 scheme",
            headers(ts, good.replacen("v0=", "v1=", 1)),
            "invalid_signature",
        ),
        (
            "63 hex digits",
            headers(ts, &good[..good.len() - 1]),
            "invalid_signature",
        ),
        (
            "65 hex digits",
            headers(ts, format!("{good}0")),
            "invalid_signature",
        ),
        (
            "not hex",
            headers(ts, format!("v0={}", "zz".repeat(32))),
            "invalid_signature",
        ),
    ]
}

/// With 300 Slack integrations and no app-level secret: requests that cannot verify are refused
/// without loading anything, and signed ones verify from the cached list; neither reads the
/// `integrations` table per request (both: the rows are deactivated behind the cache's back
/// and signed requests still verify, and the credential cache's store-read counter does not
/// move; PostgreSQL: the table is locked `ACCESS EXCLUSIVE` meanwhile).
async fn team_lookup_url_verification_reads_no_table_per_request(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("credential_cache_ttl_secs", "3600");
    })
    .await;
    many_slack_integrations(&app).await;
    let body = challenge_body();
    let creds = &app.state.creds;

    // Refused before any lookup: not even the list is loaded.
    creds.invalidate_all();
    let before = creds.cache_entry_count();
    for _ in 0..5 {
        for (what, h, code) in refused_cheaply(&body) {
            assert_rejected(post(&app, &h, what).await, code, what);
        }
    }
    let after = creds.cache_entry_count();
    assert_eq!(after.store_reads, before.store_reads, "{after:?}");
    assert_eq!(after.slack_lists, 0, "{after:?}");

    // The first signed request loads the list once. On PostgreSQL the invalidations of the
    // integrations just created arrive through LISTEN/NOTIFY and may still be on their way: one
    // landing during a load keeps that load from being cached, so the warm-up is repeated until
    // the list stays, and each attempt must have read the table exactly once.
    let mut attempts = 0;
    let warm = loop {
        attempts += 1;
        let ts = now();
        let (st, v) = post(
            &app,
            &headers(ts, slack::sign(secret(0).as_bytes(), ts, &body)),
            "warm-up",
        )
        .await;
        assert_eq!((st, v), (StatusCode::OK, json!({"challenge": CHALLENGE})));
        let warm = creds.cache_entry_count();
        if warm.slack_lists == 1 || attempts == 20 {
            break warm;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(warm.store_reads, after.store_reads + attempts, "{warm:?}");
    assert_eq!(warm.slack_lists, 1, "{warm:?}");

    // From now on no request may read the table. Behind the cache's back (no invalidation),
    // every integration is deactivated: a request that reads the table finds no secret.
    let deactivated = match app.state.store.pool() {
        Pool::Sqlite(p) => sqlx::query("UPDATE integrations SET is_active = 0")
            .execute(p)
            .await
            .unwrap()
            .rows_affected(),
        Pool::Postgres(p) => sqlx::query("UPDATE integrations SET is_active = FALSE")
            .execute(p)
            .await
            .unwrap()
            .rows_affected(),
    };
    assert_eq!(deactivated, INTEGRATIONS as u64);
    // PostgreSQL: and the table is locked, so that any read at all waits.
    let mut lock = match b {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query("LOCK TABLE integrations IN ACCESS EXCLUSIVE MODE")
                .execute(&mut conn)
                .await
                .unwrap();
            Some(conn)
        }
        Backend::Sqlite => None,
    };
    for round in 0..3 {
        for i in [0, 1, INTEGRATIONS / 2, INTEGRATIONS - 1] {
            let ts = now();
            let h = headers(ts, slack::sign(secret(i).as_bytes(), ts, &body));
            let (st, v) = post(&app, &h, &format!("signed with secret {i}")).await;
            assert_eq!(
                (st, v),
                (StatusCode::OK, json!({"challenge": CHALLENGE})),
                "round {round}, secret {i}"
            );
        }
        for (what, h, code) in refused_cheaply(&body) {
            assert_rejected(post(&app, &h, what).await, code, what);
        }
        // Well-formed and fresh, so checked against every secret (from the cached list).
        let ts = now();
        let zeros = headers(ts, format!("v0={}", "0".repeat(64)));
        let wrong = post(&app, &zeros, "well-formed, wrong").await;
        assert_rejected(wrong, "invalid_signature", "well-formed, wrong");
        let h = headers(ts, slack::sign(b"nobody-has-this-secret", ts, &body));
        let unknown = post(&app, &h, "unknown secret").await;
        assert_rejected(unknown, "invalid_signature", "unknown secret");
    }
    if let Some(conn) = lock.as_mut() {
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    }
    let end = creds.cache_entry_count();
    assert_eq!(
        end.store_reads, warm.store_reads,
        "the integration table was read per request: {end:?}"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM deliveries").await, 0);
    if let Some(conn) = lock {
        conn.close().await.unwrap();
    }
    app.stop().await;
}

/// A Prometheus/OpenMetrics text line: a comment (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) or a
/// sample `name{label="value",…} number`, label values escaped (`\\`, `\"`, `\n` only).
fn is_exposition_line(line: &str) -> bool {
    if let Some(c) = line.strip_prefix('#') {
        return c == " EOF"
            || [" HELP ", " TYPE ", " UNIT "]
                .iter()
                .any(|p| c.starts_with(p));
    }
    let b = line.as_bytes();
    let mut i = 0;
    let name = |i: &mut usize, colon: bool| {
        let start = *i;
        while *i < b.len()
            && (b[*i].is_ascii_alphabetic()
                || b[*i] == b'_'
                || (colon && b[*i] == b':')
                || (*i > start && b[*i].is_ascii_digit()))
        {
            *i += 1;
        }
        *i > start
    };
    if !name(&mut i, true) {
        return false;
    }
    if b.get(i) == Some(&b'{') {
        i += 1;
        loop {
            if !name(&mut i, false) || b.get(i) != Some(&b'=') || b.get(i + 1) != Some(&b'"') {
                return false;
            }
            i += 2;
            loop {
                match b.get(i) {
                    None | Some(b'\n') => return false,
                    Some(b'"') => break,
                    Some(b'\\') => match b.get(i + 1) {
                        Some(b'\\' | b'"' | b'n') => i += 2,
                        _ => return false,
                    },
                    Some(_) => i += 1,
                }
            }
            i += 1;
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return false,
            }
        }
    }
    let Some(rest) = line[i..].strip_prefix(' ') else {
        return false;
    };
    let mut parts = rest.split(' ');
    let value_ok = parts
        .next()
        .is_some_and(|v| matches!(v, "+Inf" | "-Inf" | "NaN") || v.parse::<f64>().is_ok());
    let timestamp_ok = parts.next().is_none_or(|t| t.parse::<f64>().is_ok());
    value_ok && timestamp_ok && parts.next().is_none()
}

#[test]
fn the_exposition_line_check_can_fail() {
    assert!(is_exposition_line(
        r#"signalbox_slack_retries_total{reason="other"} 1"#
    ));
    assert!(is_exposition_line(r#"a_total{x="q\",y=\"\\"} 1"#));
    assert!(is_exposition_line("# EOF"));
    assert!(is_exposition_line("signalbox_queue_depth 0"));
    assert!(!is_exposition_line(
        r#"signalbox_slack_retries_total{reason="q",x="\"} 1"#
    ));
    assert!(!is_exposition_line(r#"a_total{reason="q"",x=""} 1"#));
    assert!(!is_exposition_line(r#"a_total{reason="q\x"} 1"#));
    assert!(!is_exposition_line("a_total{reason=\"q"));
    assert!(!is_exposition_line(""));
}

/// The reason labels of `signalbox_slack_retries_total` and their counts.
fn retry_counts(metrics: &str) -> Vec<(String, String)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("signalbox_slack_retries_total{reason=\""))
        .map(|l| {
            let (reason, count) = l.split_once("\"} ").unwrap();
            (reason.to_string(), count.to_string())
        })
        .collect()
}

/// `X-Slack-Retry-Reason` is not signed: a hostile value (one that would break the exposition,
/// or a new one per request) is counted as `other`; Slack's documented reasons as themselves.
async fn retry_reason_labels_come_from_a_closed_set(b: Backend) {
    let app = spawn_app(b).await;
    let ws = app.workspace("Retries").await;
    let key = "retry-label-secret";
    let integ = app
        .integration(
            &ws,
            json!({"platform": "slack", "name": "s", "slack_team_id": "T0RETRY", "signing_secret": key}),
        )
        .await;
    let path = format!(
        "{SLACK_EVENTS}?integration_id={}",
        integ["id"].as_str().unwrap()
    );
    let hostile = [
        r#"q",x="\"#.to_string(),
        "q\"} 1\nsignalbox_fake_total 99".replace('\n', " "),
        "HTTP_TIMEOUT".into(),
        "http_timeout,x".into(),
        "x".repeat(4_000),
    ];
    let mut reasons: Vec<String> = hostile.to_vec();
    reasons.extend((0..50).map(|i| format!("made-up-{i}")));
    reasons.push("http_timeout".into());
    for (n, reason) in reasons.iter().enumerate() {
        let body = json!({
            "token": "XXYYZZ", "team_id": "T0RETRY", "api_app_id": "A0RETRY",
            "type": "event_callback", "event_id": format!("Ev0RETRY{n}"), "event_time": 1_700_000_000,
            "event": {"type": "message", "channel": "C0ONE", "user": "U1", "text": "hi",
                      "ts": format!("1700000000.{n:06}"), "channel_type": "channel"}
        })
        .to_string()
        .into_bytes();
        let ts = now();
        let mut h = headers(ts, slack::sign(key.as_bytes(), ts, &body));
        h.push(("x-slack-retry-num", "1".into()));
        h.push(("x-slack-retry-reason", reason.clone()));
        let (st, v) = app.post_raw(&path, &h, body).await;
        assert_eq!(st, StatusCode::OK, "{reason:.40}: {v}");
    }
    let m = app.metrics().await;
    for line in m.lines() {
        assert!(
            is_exposition_line(line),
            "not exposition text: {line:?}\n{m}"
        );
    }
    assert!(!m.contains("signalbox_fake_total"), "{m}");
    let mut counts = retry_counts(&m);
    counts.sort();
    assert_eq!(
        counts,
        vec![
            ("http_timeout".to_string(), "1".to_string()),
            ("other".to_string(), (reasons.len() - 1).to_string()),
        ],
        "{m}"
    );
    app.stop().await;
}
