//! Realistic request bodies of each source (also used by the criterion benchmarks in
//! `benches/protocol.rs`).

use std::sync::LazyLock;

/// A Slack `event_callback` envelope carrying a channel `message` (~1.5 KB) with mentions,
/// links and a `blocks` array. `k` makes `event_id` and `ts` unique; `ts` is
/// `base_secs + k / 10^6` seconds. Returns the event id and the body.
pub fn slack_event(team: &str, run: &str, k: u64, now: i64, base_secs: i64) -> (String, Vec<u8>) {
    let event_id = format!("Ev{run}{k:09}");
    let ts = format!(
        "{}.{:06}",
        base_secs + (k / 1_000_000) as i64,
        k % 1_000_000
    );
    let user = format!("U0CUST{:04}", k % 1000);
    let body = format!(
        concat!(
            r#"{{"token":"XXYYZZbenchTOKEN","team_id":"{team}","context_team_id":"{team}","context_enterprise_id":null,"#,
            r#""api_app_id":"A0BENCHAPP","event":{{"user":"{user}","type":"message","ts":"{ts}","client_msg_id":"6c0e4a5b-{k:012}-4e1f-9a63-bench","#,
            r#""text":"Hi <@U0SUPPORT|support>, since this morning exports of <https://acme.example.com/reports/weekly|the weekly report> fail with a 502 for the whole team in <#C0BENCH01|customer-acme>. Ticket {k}, we tried twice &amp; cleared the cache. Could you check? <!here>","#,
            r#""team":"{team}","blocks":[{{"type":"rich_text","block_id":"b{k}","elements":[{{"type":"rich_text_section","elements":["#,
            r#"{{"type":"text","text":"Hi "}},{{"type":"user","user_id":"U0SUPPORT"}},{{"type":"text","text":", since this morning exports of "}},"#,
            r#"{{"type":"link","url":"https://acme.example.com/reports/weekly","text":"the weekly report"}},"#,
            r#"{{"type":"text","text":" fail with a 502 for the whole team in "}},{{"type":"channel","channel_id":"C0BENCH01"}},"#,
            r#"{{"type":"text","text":". Ticket {k}, we tried twice & cleared the cache. Could you check? "}},{{"type":"broadcast","range":"here"}}]}}]}}],"#,
            r#""channel":"C0BENCH01","event_ts":"{ts}","channel_type":"channel"}},"type":"event_callback","event_id":"{event_id}","event_time":{now},"#,
            r#""authorizations":[{{"enterprise_id":null,"team_id":"{team}","user_id":"U0BENCHBOT","is_bot":true,"is_enterprise_install":false}}],"#,
            r#""is_ext_shared_channel":false,"event_context":"4-eyJldCI6Im1lc3NhZ2UiLCJ0aWQiOiJUMEJFTkNIIiwiYWlkIjoiQTBCRU5DSEFQUCIsImNpZCI6IkMwQkVOQ0gwMSJ9"}}"#
        ),
        team = team,
        user = user,
        ts = ts,
        k = k,
        event_id = event_id,
        now = now,
    );
    (event_id, body.into_bytes())
}

static TICKET_HTML: LazyLock<String> = LazyLock::new(|| {
    let mut s = String::from(
        "<div><p>Hello team,</p><p>Since the upgrade on <b>Monday</b> our nightly <a href='https://acme.example.com/exports'>CSV export</a> \
         fails for every workspace with more than 50&nbsp;000 rows. The job starts, runs for about 40 minutes and then stops with \
         <code>502 Bad Gateway</code>. Smaller workspaces are fine.</p>\
         <p>What we tried so far:</p><ol><li>Re-running the export manually from the <i>Reports</i> page</li>\
         <li>Splitting the export by region (EMEA, AMER, APAC)</li><li>Switching the format from CSV to XLSX</li>\
         <li>Clearing the browser cache &amp; logging in again</li></ol>\
         <p>None of this helped. Our finance team needs the numbers for the quarterly close on <u>Friday</u>, so this is \
         <strong>blocking</strong> for us.</p><blockquote>Error: upstream timed out (110: Connection timed out) while reading \
         response header from upstream, request: GET /api/export?format=csv&amp;workspace=acme-prod</blockquote>\
         <table><tr><th>Workspace</th><th>Rows</th><th>Result</th></tr><tr><td>acme-prod</td><td>1&nbsp;204&nbsp;332</td><td>502</td></tr>\
         <tr><td>acme-emea</td><td>402&nbsp;118</td><td>502</td></tr><tr><td>acme-test</td><td>12&nbsp;004</td><td>OK</td></tr></table>\
         <p>Screenshots: <img src='https://files.example.com/s1.png' alt='export page'> and \
         <img src='https://files.example.com/s2.png' alt='error'></p><ul><li>Browser: Firefox 131</li><li>OS: macOS 14.6</li>\
         <li>Account plan: Enterprise</li></ul><p>Could you also confirm whether the export API has a hard timeout, and if so how we \
         can page through the results instead? We would be happy to use the streaming endpoint if there is one.</p>",
    );
    while s.len() < 2900 {
        s.push_str("<p>Additional context from the customer call: the issue also reproduces with the API client v2.3 and with \
                     scheduled exports; the audit log shows the job as <em>running</em> until it is killed.</p>");
    }
    s.push_str("<p>Thanks a lot,<br>Ann Example<br>Head of Finance Ops, Acme Inc</p></div>");
    s
});

static TICKET_HTML_JSON: LazyLock<String> =
    LazyLock::new(|| serde_json::to_string(TICKET_HTML.as_str()).unwrap_or_default());

/// A ~3 KB HTML ticket body.
pub fn ticket_html() -> &'static str {
    &TICKET_HTML
}

/// A Pylon issue in the flattened template shape (`issue_*` keys) with ~3 KB of HTML and a
/// unique issue id.
pub fn pylon_issue(run: &str, k: u64) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"event":"issue_new","issue_id":"iss_{run}_{k}","issue_number":"{k}","#,
            r#""issue_title":"Nightly CSV export fails with 502 for large workspaces (ticket {k})","#,
            r#""issue_body":{html},"issue_status":"new","issue_priority":"high","#,
            r#""issue_requester_email":"ann.{u}@acme.test","issue_requester_name":"Ann Example","#,
            r#""issue_account_id":"acc_acme_{u}","issue_account_name":"Acme Inc","#,
            r#""issue_link":"https://app.usepylon.com/issues/{k}","issue_assignee_email":"support@signalbox.test","#,
            r#""issue_team_name":"Support","issue_tags":"bug,export,enterprise","issue_created_at":"2026-11-29T09:00:00Z"}}"#
        ),
        run = run,
        k = k,
        u = k % 100,
        html = TICKET_HTML_JSON.as_str(),
    )
    .into_bytes()
}

/// A generic payload (`{"verbatim": …}` plus optional fields).
pub fn webhook_payload(run: &str, k: u64) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"verbatim":"Feedback {k} from the in-app widget: the new dashboard takes more than ten seconds to load on Monday "#,
            r#"mornings when our whole team opens it, and filtering by region freezes the tab. Otherwise we love the new charts!","#,
            r#""customer_email":"user{u}@acme.test","source_name":"In-app widget","source_url":"https://app.acme.test/feedback/{k}","#,
            r#""metadata":{{"plan":"enterprise","seat_count":40,"run":"{run}","seq":{k}}}}}"#
        ),
        run = run,
        k = k,
        u = k % 100,
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use signalbox::protocol::{Effect, pylon, slack};

    use super::*;

    #[test]
    fn payloads_have_realistic_sizes_and_parse() {
        let (id, slack_body) = slack_event("T0BENCH", "RUN", 7, 1_700_000_000, 1_700_000_000);
        assert!(id.starts_with("EvRUN"));
        assert!(
            (1300..1800).contains(&slack_body.len()),
            "{}",
            slack_body.len()
        );
        let env = slack::parse_envelope(&slack_body).expect("valid JSON");
        assert_eq!(env.kind, "event_callback");
        assert_eq!(env.event_id.as_deref(), Some(id.as_str()));
        assert!(matches!(
            slack::normalize(&env, &slack::SlackSettings::default(), &slack::NoNames),
            Effect::Upsert { .. }
        ));

        let pylon_body = pylon_issue("RUN", 7);
        assert!(
            (3000..4500).contains(&pylon_body.len()),
            "{}",
            pylon_body.len()
        );
        let raw: Value = serde_json::from_slice(&pylon_body).expect("valid JSON");
        let parsed = pylon::parse(&raw).expect("an issue");
        assert_eq!(parsed.issue.id, "iss_RUN_7");
        assert!(matches!(
            pylon::normalize(&parsed, &raw, &pylon::PylonSettings::default()),
            Effect::Upsert { .. }
        ));

        let w: Value = serde_json::from_slice(&webhook_payload("RUN", 7)).expect("JSON");
        assert!(
            w["verbatim"]
                .as_str()
                .is_some_and(|s| s.contains("Feedback 7"))
        );
    }

    #[test]
    fn slack_ts_and_ids_are_unique() {
        let a = slack_event("T", "R", 999_999, 0, 100).1;
        let b = slack_event("T", "R", 1_000_000, 0, 100).1;
        let ts = |b: &[u8]| {
            let v: Value = serde_json::from_slice(b).expect("JSON");
            v["event"]["ts"].as_str().map(str::to_string)
        };
        assert_eq!(ts(&a).as_deref(), Some("100.999999"));
        assert_eq!(ts(&b).as_deref(), Some("101.000000"));
    }
}
