//! Property tests: every verifier accepts what its signer produced and rejects any change to the
//! body, the timestamp, the id or the secret; the text converters never panic on any input.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use signalbox::protocol::{SignatureError, html, pylon, slack, standard_webhooks};

const NOW: i64 = 1_700_000_000;

fn flip(body: &[u8], at: usize) -> Vec<u8> {
    let mut b = body.to_vec();
    let i = at % b.len();
    b[i] ^= 0x01;
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn standard_webhooks_round_trip_and_tamper(
        key in proptest::collection::vec(any::<u8>(), 16..64),
        other in proptest::collection::vec(any::<u8>(), 16..64),
        id in "[a-zA-Z0-9_]{1,40}",
        body in proptest::collection::vec(any::<u8>(), 1..512),
        skew in -300i64..=300,
        at in any::<usize>(),
    ) {
        let ts = NOW + skew;
        let sig = standard_webhooks::sign(&key, &id, ts, &body);
        let tss = ts.to_string();
        let h = standard_webhooks::Headers { id: Some(&id), timestamp: Some(&tss), signature: Some(&sig) };
        prop_assert_eq!(standard_webhooks::verify(&[&key], &h, &body, NOW, 300), Ok(()));
        prop_assert_eq!(standard_webhooks::verify(&[&key], &h, &flip(&body, at), NOW, 300), Err(SignatureError::Invalid));
        let other_ts = (ts + 1).to_string();
        let h2 = standard_webhooks::Headers { timestamp: Some(&other_ts), ..h };
        prop_assert_ne!(standard_webhooks::verify(&[&key], &h2, &body, NOW, 300), Ok(()));
        let other_id = format!("{id}x");
        let h3 = standard_webhooks::Headers { id: Some(&other_id), ..h };
        prop_assert_eq!(standard_webhooks::verify(&[&key], &h3, &body, NOW, 300), Err(SignatureError::Invalid));
        if other != key {
            prop_assert_eq!(standard_webhooks::verify(&[&other], &h, &body, NOW, 300), Err(SignatureError::Invalid));
        }
    }

    #[test]
    fn slack_round_trip_and_tamper(
        secret in proptest::collection::vec(any::<u8>(), 8..48),
        other in proptest::collection::vec(any::<u8>(), 8..48),
        body in proptest::collection::vec(any::<u8>(), 1..512),
        skew in -300i64..=300,
        at in any::<usize>(),
    ) {
        let ts = NOW + skew;
        let sig = slack::sign(&secret, ts, &body);
        let tss = ts.to_string();
        prop_assert_eq!(slack::verify(&[&secret], Some(&tss), Some(&sig), &body, NOW, 300), Ok(()));
        prop_assert_eq!(slack::verify(&[&secret], Some(&tss), Some(&sig), &flip(&body, at), NOW, 300), Err(SignatureError::Invalid));
        let ts2 = (ts - 1).to_string();
        prop_assert_ne!(slack::verify(&[&secret], Some(&ts2), Some(&sig), &body, NOW, 300), Ok(()));
        if other != secret {
            prop_assert_eq!(slack::verify(&[&other], Some(&tss), Some(&sig), &body, NOW, 300), Err(SignatureError::Invalid));
        }
    }

    #[test]
    fn pylon_round_trip_and_tamper(
        secret in proptest::collection::vec(any::<u8>(), 8..48),
        other in proptest::collection::vec(any::<u8>(), 8..48),
        body in proptest::collection::vec(any::<u8>(), 1..512),
        skew in -300i64..=300,
        at in any::<usize>(),
    ) {
        let x = pylon::sign_x_pylon(&secret, &body);
        let hx = pylon::SignatureHeaders { x_pylon_signature: Some(&x), ..Default::default() };
        prop_assert_eq!(pylon::verify(pylon::Scheme::Auto, &[&secret], &hx, &body, NOW, 300), Ok(()));
        prop_assert_eq!(pylon::verify(pylon::Scheme::Auto, &[&secret], &hx, &flip(&body, at), NOW, 300), Err(SignatureError::Invalid));
        let ts = NOW + skew;
        let t = pylon::sign_timestamped(&secret, ts, &body);
        let tss = ts.to_string();
        let ht = pylon::SignatureHeaders { webhook_signature: Some(&t), webhook_timestamp: Some(&tss), ..Default::default() };
        prop_assert_eq!(pylon::verify(pylon::Scheme::Timestamped, &[&secret], &ht, &body, NOW, 300), Ok(()));
        prop_assert_eq!(pylon::verify(pylon::Scheme::Timestamped, &[&secret], &ht, &flip(&body, at), NOW, 300), Err(SignatureError::Invalid));
        let ts2 = (ts + 1).to_string();
        let ht2 = pylon::SignatureHeaders { webhook_timestamp: Some(&ts2), ..ht };
        prop_assert_ne!(pylon::verify(pylon::Scheme::Timestamped, &[&secret], &ht2, &body, NOW, 300), Ok(()));
        if other != secret {
            prop_assert_eq!(pylon::verify(pylon::Scheme::Auto, &[&other], &hx, &body, NOW, 300), Err(SignatureError::Invalid));
            prop_assert_eq!(pylon::verify(pylon::Scheme::Auto, &[&other], &ht, &body, NOW, 300), Err(SignatureError::Invalid));
        }
    }

    #[test]
    fn text_converters_never_panic(s in "(?s).{0,400}", t in "[<>&|@#!a-zA-Z0-9 ;/:.^]{0,400}") {
        let _ = slack::render_text(&s, &slack::NoNames);
        let out = slack::render_text(&t, &slack::NoNames);
        prop_assert!(out.len() <= t.len() * 4 + 16);
        // Markup only shrinks into text: the output is never longer than the input.
        prop_assert!(html::html_to_text(&s).len() <= s.len());
        prop_assert!(html::html_to_text(&t).len() <= t.len());
    }

    /// The envelope parser (run by the receiver, whose parse the worker then reuses) reads
    /// every routing and dedupe field as a plain JSON parser sees it, lenient about types, and
    /// refuses exactly what is not a JSON object.
    #[test]
    fn envelope_fields_match_a_plain_json_parse(v in arb_envelope(), junk in "(?s).{0,40}") {
        for body in [v.clone(), junk.clone(), format!("{v}{junk}")] {
            let plain = serde_json::from_str::<serde_json::Value>(&body).ok().filter(|p| p.is_object());
            let parsed = slack::parse_envelope(body.as_bytes());
            prop_assert_eq!(plain.is_some(), parsed.is_ok(), "body {}", body);
            if let (Some(p), Ok(e)) = (plain, parsed) {
                let s = |v: Option<&serde_json::Value>| {
                    v.and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_string)
                };
                prop_assert_eq!(e.kind, s(p.get("type")).unwrap_or_default());
                prop_assert_eq!(e.event_id, s(p.get("event_id")));
                prop_assert_eq!(e.api_app_id, s(p.get("api_app_id")));
                // Team and enterprise ids count only when shaped like Slack's.
                let team = |v: Option<&serde_json::Value>| s(v).filter(|t| slack::is_team_id(t));
                prop_assert_eq!(e.team_id, team(p.get("team_id")));
                prop_assert_eq!(e.challenge, s(p.get("challenge")));
                prop_assert_eq!(e.event_type, s(p.get("event").and_then(|e| e.get("type"))));
                let authorizations: Vec<Option<String>> = p
                    .get("authorizations")
                    .and_then(|a| a.as_array())
                    .map(|list| {
                        list.iter()
                            .take(slack::MAX_AUTHORIZATIONS)
                            .map(|a| (team(a.get("team_id")), team(a.get("enterprise_id"))))
                            .filter(|(t, e)| t.is_some() || e.is_some())
                            .map(|(t, _)| t)
                            .collect()
                    })
                    .unwrap_or_default();
                prop_assert_eq!(
                    e.authorizations.iter().map(|a| a.team_id.clone()).collect::<Vec<_>>(),
                    authorizations
                );
            }
        }
    }

    #[test]
    fn parsers_never_panic_on_any_json(v in arb_json()) {
        let body = v.to_string();
        if let Ok(env) = slack::parse_envelope(body.as_bytes()) {
            let _ = slack::normalize(&env, &slack::SlackSettings::default(), &slack::NoNames);
        }
        if let Ok(p) = pylon::parse(&v) {
            let _ = pylon::normalize(&p, &v, &pylon::PylonSettings::default());
        }
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-z_<>&@#]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("message"),
            Just("event_callback"),
            Just("issue_new"),
            Just("id"),
            Just("T1"),
            Just("C1"),
            Just("message_changed"),
            Just("message_deleted"),
            Just("1.2")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            Just("type"),
            Just("event"),
            Just("subtype"),
            Just("team_id"),
            Just("channel"),
            Just("ts"),
            Just("text"),
            Just("user"),
            Just("message"),
            Just("issue"),
            Just("data"),
            Just("id"),
            Just("issue_id"),
            Just("title"),
            Just("body_html"),
            Just("message_id"),
            Just("tags"),
            Just("requester"),
            Just("custom_fields"),
            Just("authorizations"),
            Just("files")
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(keys.prop_map(String::from), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Envelope-shaped JSON object text: every field the receiver reads, with values of any type,
/// keys possibly repeated (the last one wins, as in any JSON parser here).
fn arb_envelope() -> impl Strategy<Value = String> {
    use serde_json::{Value, json};
    let keys = prop_oneof![
        Just("type"),
        Just("challenge"),
        Just("event_id"),
        Just("api_app_id"),
        Just("team_id"),
        Just("context_team_id"),
        Just("enterprise_id"),
        Just("event"),
        Just("authorizations"),
        Just("minute_rate_limited"),
        Just("other"),
    ];
    let value = prop_oneof![
        arb_json(),
        "[A-Z0-9\\\\\"é]{0,6}".prop_map(Value::String),
        "[TE][A-Z0-9]{1,8}".prop_map(Value::String),
        any::<f64>().prop_map(|f| json!(f)),
        any::<u64>().prop_map(|n| json!(n)),
        arb_json().prop_map(|v| json!([{"team_id": v}, {"team_id": "T2"}])),
        arb_json().prop_map(|v| json!({"type": v, "team_id": v})),
    ];
    proptest::collection::vec((keys, value), 0..8).prop_map(|kv| {
        // Built as text so repeated keys stay repeated (the last one wins in both readers).
        let fields: Vec<String> = kv
            .into_iter()
            .map(|(k, v)| format!("{}:{}", json!(k), v))
            .collect();
        format!("{{{}}}", fields.join(","))
    })
}
