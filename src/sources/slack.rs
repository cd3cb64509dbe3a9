//! Slack Events API: `POST /api/webhooks/slack/events[?integration_id=int_…]`.
//!
//! Three ways to be configured: (a) per-customer app, the URL names the integration and its
//! signing secret verifies; (b) one distributed app, the app-level secret verifies and the
//! envelope's team routes; (c) no parameter and no app-level secret, the team looks up the
//! integration whose secret verifies. Every request is verified before anything else, including
//! `url_verification`. A validly signed event we cannot route is acknowledged (200) and recorded
//! as `filtered`: Slack disables the whole app when too many deliveries fail.

use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{IntegrationRef, header, kept_headers, read_body, reject, store_and_ack};
use crate::app::AppState;
use crate::clock::{now_micros, now_secs};
use crate::credentials::valid_keys;
use crate::error::{ApiError, ApiResult};
use crate::ids::{new_id, prefix};
use crate::protocol::slack::{self as proto, Envelope, NoNames, SlackSettings};
use crate::protocol::{Effect, SignatureError};
use crate::store::{ClaimedDelivery, DeliveryStatus, LastUsedTable, NewDelivery, Parsed};

/// Source name stored with deliveries and signals.
pub const SOURCE: &str = "slack";

/// Query of the endpoint.
#[derive(Debug, Deserialize)]
pub struct SlackQuery {
    integration_id: Option<String>,
}

const KEPT: &[&str] = &[
    "x-slack-request-timestamp",
    "x-slack-retry-num",
    "x-slack-retry-reason",
    "user-agent",
    "content-type",
];

/// The whole envelope (as the worker needs it, so it travels with the delivery; see
/// [`Parsed`]), not just a peek at its routing fields.
fn parse(state: &AppState, body: &[u8]) -> ApiResult<Envelope> {
    proto::parse_envelope(body).map_err(|m| reject(state, SOURCE, ApiError::InvalidJson(m)))
}

/// `POST /api/webhooks/slack/events`
pub async fn receive(
    State(state): State<AppState>,
    Query(q): Query<SlackQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let body = read_body(&state, &headers, body, SOURCE).await?;
    let ts = header(&headers, "x-slack-request-timestamp");
    let sig = header(&headers, "x-slack-signature");
    let now = now_secs();
    let tol = state.cfg.signature_tolerance_secs;
    let app_secret = state
        .cfg
        .slack_signing_secret
        .as_ref()
        .map(|s| s.expose_secret().as_bytes());
    let verify_with = |integ: &IntegrationRef| {
        let mut keys = valid_keys(&integ.secrets, now_micros());
        // An integration without its own signing secret belongs to the distributed app.
        if keys.is_empty()
            && let Some(a) = app_secret
        {
            keys.push(a);
        }
        proto::verify(&keys, ts, sig, &body, now, tol)
    };

    let (env, integration): (Envelope, Option<IntegrationRef>) =
        if let Some(id) = q.integration_id.filter(|s| !s.is_empty()) {
            // (a) per-customer app
            let integ = if crate::ids::looks_like(&id, prefix::INTEGRATION) {
                state.creds.integration(&id).await?
            } else {
                None
            };
            let Some(integ) = integ.filter(|i| i.row.platform == SOURCE) else {
                super::equalise_timing(&body);
                return Err(reject(&state, SOURCE, ApiError::UnknownIntegration));
            };
            verify_with(&integ).map_err(|e| reject(&state, SOURCE, e.into()))?;
            (parse(&state, &body)?, Some(integ))
        } else if let Some(app_secret) = &state.cfg.slack_signing_secret {
            // (b) one distributed app
            let secret = app_secret.expose_secret().as_bytes();
            proto::verify(&[secret], ts, sig, &body, now, tol)
                .map_err(|e| reject(&state, SOURCE, e.into()))?;
            let env = parse(&state, &body)?;
            let integ = route(&state, &env).await?;
            (env, integ)
        } else {
            // (c) look the team up and verify with its secret
            let env = parse(&state, &body)?;
            if env.kind == "url_verification" {
                // No team in the challenge: it must verify with one of our Slack secrets.
                verify_any(&state, ts, sig, &body).await?;
                (env, None)
            } else {
                let Some(integ) = route(&state, &env).await? else {
                    super::equalise_timing(&body);
                    return Err(reject(&state, SOURCE, ApiError::UnknownIntegration));
                };
                verify_with(&integ).map_err(|e| reject(&state, SOURCE, e.into()))?;
                (env, Some(integ))
            }
        };

    if env.kind == "url_verification" {
        let challenge = env.challenge.clone().unwrap_or_default();
        return Ok(Json(json!({ "challenge": challenge })));
    }
    if let Some(reason) = header(&headers, "x-slack-retry-reason") {
        state
            .metrics
            .slack_retries
            .get_or_create(&vec![("reason", reason.chars().take(32).collect())])
            .inc();
    }
    if env.kind == "app_rate_limited" {
        state.metrics.slack_rate_limited.inc();
        tracing::warn!(team_id = ?env.team_id, "Slack reports app_rate_limited");
    }
    let (status, filter_reason) = match &integration {
        None => (
            DeliveryStatus::Filtered,
            Some(format!(
                "no Slack integration for team {}",
                env.routing_ids()
                    .first()
                    .map(String::as_str)
                    .unwrap_or("(none)")
            )),
        ),
        // Uninstall/revocation still reaches the worker: it wipes the tokens of an inactive
        // integration too.
        Some(i)
            if !i.row.is_active
                && !matches!(
                    env.event_type.as_deref(),
                    Some("app_uninstalled" | "tokens_revoked")
                ) =>
        {
            (
                DeliveryStatus::Filtered,
                Some("integration is inactive".to_string()),
            )
        }
        Some(_) => (DeliveryStatus::Pending, None),
    };
    if let Some(i) = &integration {
        state
            .creds
            .mark_used(LastUsedTable::Integrations, &i.row.id);
    }
    let outcome = match &integration {
        Some(i) if status == DeliveryStatus::Pending && state.inbox.takes_outcomes() => {
            outcome_at_the_edge(i, &env)
        }
        _ => None,
    };
    let app = env.api_app_id.clone().unwrap_or_else(|| "app".into());
    let dedupe_key = env.dedupe_key(&body);
    let d = NewDelivery {
        id: new_id(prefix::DELIVERY),
        workspace_id: integration.as_ref().map(|i| i.row.workspace_id.clone()),
        integration_id: integration.as_ref().map(|i| i.row.id.clone()),
        webhook_key_id: None,
        source: SOURCE.into(),
        dedupe_scope: format!("slack:{app}"),
        dedupe_key,
        body,
        headers: kept_headers(&headers, KEPT),
        status,
        filter_reason,
        received_at: now_micros(),
        parsed: Parsed::new(env),
        outcome,
    };
    store_and_ack(&state, d, started).await
}

/// Finds the integration for an envelope by its routing ids (team, authorization, context,
/// enterprise).
async fn route(state: &AppState, env: &Envelope) -> ApiResult<Option<IntegrationRef>> {
    for team in env.routing_ids() {
        if let Some(i) = state.creds.slack_by_team(&team).await? {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Verifies against any active Slack integration's secret (team-lookup mode, `url_verification`).
async fn verify_any(
    state: &AppState,
    ts: Option<&str>,
    sig: Option<&str>,
    body: &[u8],
) -> ApiResult<()> {
    let rows = state.store.list_integrations(None).await?;
    let mut last = SignatureError::Missing;
    for row in rows
        .into_iter()
        .filter(|r| r.platform == SOURCE && r.is_active)
    {
        let Some(integ) = state.creds.integration(&row.id).await? else {
            continue;
        };
        match proto::verify(
            &valid_keys(&integ.secrets, now_micros()),
            ts,
            sig,
            body,
            now_secs(),
            state.cfg.signature_tolerance_secs,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    if last == SignatureError::Missing && sig.is_some() && ts.is_some() {
        last = SignatureError::Invalid;
    }
    Err(reject(state, SOURCE, last.into()))
}

/// The integration's settings for normalisation.
pub fn settings(integ: &IntegrationRef) -> SlackSettings {
    let list = |k: &str| -> Vec<String> {
        integ
            .config
            .get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    SlackSettings {
        bot_user_id: integ.row.slack_bot_user_id.clone(),
        channels: list("slack_channels"),
        channel_types: list("channel_types"),
    }
}

/// Worker step.
pub async fn process(state: &AppState, d: &ClaimedDelivery) -> Result<Effect, super::ProcessError> {
    let env = match d.parsed_or(proto::parse_envelope) {
        Ok(env) => env,
        Err(e) => return Ok(Effect::reject(format!("stored body: {e}"))),
    };
    let Some(int_id) = &d.integration_id else {
        return Ok(Effect::filter("no integration"));
    };
    let integ = state
        .creds
        .integration(int_id)
        .await
        .map_err(|e| super::ProcessError::retry(format!("loading integration: {e}")))?;
    let Some(integ) = integ else {
        return Ok(Effect::filter("integration no longer exists"));
    };
    let settings = match decide(&integ, &env) {
        Decision::Done(effect) => return Ok(effect),
        Decision::Enrich(settings) => settings,
    };
    // Enrichment is bounded: whatever is known after the deadline is used, the rest is recorded.
    let mut names = Names::default();
    let mut extra = serde_json::Map::new();
    let outcome = tokio::time::timeout(
        ENRICH_DEADLINE,
        enrich(state, &integ, &env, &mut names, &mut extra),
    )
    .await;
    if outcome.is_err() {
        names.errors.push("enrichment timed out".into());
    }
    let mut effect = proto::normalize(&env, &settings, &names);
    if let Effect::Upsert { signal, .. } = &mut effect
        && let Some(meta) = signal.metadata.as_object_mut()
    {
        meta.extend(extra);
        let status = if names.errors.is_empty() {
            "ok"
        } else {
            "partial"
        };
        meta.insert(
            "enrichment".into(),
            json!({"status": status, "errors": names.errors}),
        );
    }
    Ok(effect)
}

/// What the worker step does with an envelope, decided without I/O.
enum Decision {
    /// This is the outcome.
    Done(Effect),
    /// A new or changed message of an integration with a bot token: look up names first.
    Enrich(SlackSettings),
}

fn decide(integ: &IntegrationRef, env: &Envelope) -> Decision {
    let settings = settings(integ);
    let effect = proto::normalize(env, &settings, &NoNames);
    if !integ.row.is_active && !matches!(effect, Effect::DeactivateIntegration { .. }) {
        return Decision::Done(Effect::filter("integration is inactive"));
    }
    if !matches!(effect, Effect::Upsert { .. }) || integ.row.access_token_enc.is_none() {
        return Decision::Done(effect);
    }
    Decision::Enrich(settings)
}

/// The outcome the receiver can pass to the inbox: the worker step's, when it needs no I/O (no
/// enrichment) and no follow-up (a deactivation refreshes the credential cache after its
/// commit, which the worker does). The inbox commits only some kinds with the row
/// (`Store::finishes_at_insert`: not a deletion, which must not overtake its message).
fn outcome_at_the_edge(integ: &IntegrationRef, env: &Envelope) -> Option<Effect> {
    match decide(integ, env) {
        Decision::Done(Effect::DeactivateIntegration { .. }) | Decision::Enrich(_) => None,
        Decision::Done(effect) => Some(effect),
    }
}

/// Upper bound on the time enrichment may add to a delivery.
const ENRICH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// Names found by enrichment (and the errors met).
#[derive(Default)]
struct Names {
    users: std::collections::HashMap<String, String>,
    channels: std::collections::HashMap<String, String>,
    errors: Vec<String>,
}

impl proto::NameLookup for Names {
    fn user(&self, id: &str) -> Option<String> {
        self.users.get(id).cloned()
    }
    fn channel(&self, id: &str) -> Option<String> {
        self.channels.get(id).cloned()
    }
}

/// Ids mentioned as `<@U…>` / `<#C…>` in mrkdwn (at most `max` of each).
fn mentions(text: &str, max: usize) -> (Vec<String>, Vec<String>) {
    let mut users = Vec::new();
    let mut channels = Vec::new();
    for part in text.split('<').skip(1) {
        let inner = part.split('>').next().unwrap_or("");
        let id = inner.split('|').next().unwrap_or("");
        if let Some(u) = id.strip_prefix('@') {
            if !u.is_empty() && users.len() < max && !users.iter().any(|x| x == u) {
                users.push(u.to_string());
            }
        } else if let Some(c) = id.strip_prefix('#')
            && !c.is_empty()
            && channels.len() < max
            && !channels.iter().any(|x| x == c)
        {
            channels.push(c.to_string());
        }
    }
    (users, channels)
}

#[allow(unused_assignments)] // the last retry's flag update is never read
async fn enrich(
    state: &AppState,
    integ: &IntegrationRef,
    env: &Envelope,
    names: &mut Names,
    extra: &mut serde_json::Map<String, Value>,
) {
    use crate::slack_api::{SlackError, bot_token};
    let id = &integ.row.id;
    let Some(mut token) = bot_token(state, id, false).await else {
        names.errors.push("no usable bot token".into());
        return;
    };
    let event = &env.raw["event"];
    let msg = if event["subtype"] == "message_changed" {
        &event["message"]
    } else {
        event
    };
    let team = env
        .team_id
        .clone()
        .or_else(|| env.routing_ids().into_iter().next())
        .unwrap_or_default();
    let channel = event["channel"].as_str().unwrap_or_default().to_string();
    let ts = msg["ts"].as_str().unwrap_or_default().to_string();
    let (mut users, channels) = mentions(msg["text"].as_str().unwrap_or_default(), 10);
    if let Some(u) = msg["user"].as_str()
        && !users.iter().any(|x| x == u)
    {
        users.insert(0, u.to_string());
    }
    let api = &state.slack;
    let mut refreshed = false;
    // One retry after refreshing when Slack says the token expired.
    macro_rules! with_token {
        (|$t:ident| $call:expr) => {{
            let mut r = {
                let $t = &token;
                $call.await
            };
            if let Err(e) = &r
                && e.is_auth()
                && !refreshed
            {
                refreshed = true;
                if let Some(fresh) = bot_token(state, id, true).await {
                    token = fresh;
                    let $t = &token;
                    r = $call.await;
                }
            }
            r
        }};
    }
    let note = |errors: &mut Vec<String>, what: &str, e: &SlackError| {
        errors.push(format!("{what}: {e}"));
    };
    for u in users {
        match with_token!(|t| api.user_name(&team, t, &u)) {
            Ok(n) => {
                names.users.insert(u, n);
            }
            Err(e) => note(&mut names.errors, "users.info", &e),
        }
    }
    let mut all_channels = channels;
    if !channel.is_empty() && !all_channels.contains(&channel) {
        all_channels.insert(0, channel.clone());
    }
    for c in all_channels {
        match with_token!(|t| api.channel_name(&team, t, &c)) {
            Ok(n) => {
                names.channels.insert(c, n);
            }
            Err(e) => note(&mut names.errors, "conversations.info", &e),
        }
    }
    if !channel.is_empty() && !ts.is_empty() {
        match with_token!(|t| api.permalink(&team, t, &channel, &ts)) {
            Ok(p) => {
                extra.insert("permalink".into(), Value::String(p));
            }
            Err(e) => note(&mut names.errors, "chat.getPermalink", &e),
        }
    }
}
