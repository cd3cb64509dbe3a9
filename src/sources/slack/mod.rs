//! Slack Events API: `POST /api/webhooks/slack/events[?integration_id=int_…]`.
//!
//! Three ways to be configured: (a) per-customer app, the URL names the integration and its
//! signing secret verifies; (b) one distributed app, the app-level secret verifies and the
//! envelope's team routes; (c) no parameter and no app-level secret, the team looks up the
//! integration whose secret verifies. Every request is verified before anything else, including
//! `url_verification`. A validly signed event we cannot route is acknowledged (200) and recorded
//! as `filtered`: Slack disables the whole app when too many deliveries fail.

pub(crate) mod api;
pub(crate) mod oauth;

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::State;

use crate::admin::platform::{Platform, string_list};
use crate::http::extract::Query;
use axum::http::HeaderMap;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{IntegrationRef, header, kept_headers, read_body, reject, store_all_and_ack};
use crate::clock::{now_micros, now_secs};
use crate::credentials::valid_keys;
use crate::error::{ApiError, ApiResult};
use crate::ids::{new_id, prefix};
use crate::protocol::slack::{self as proto, Envelope, NoNames, SlackSettings};
use crate::protocol::{Effect, SignatureError};
use crate::state::AppState;
use crate::store::{ClaimedDelivery, DeliveryStatus, LastUsedTable, NewDelivery, Parsed};

/// Source name stored with deliveries and signals.
pub const SOURCE: &str = "slack";

/// Query of the endpoint.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SlackQuery {
    /// A per-customer Slack app's integration (`int_…`); absent: the shared app, routed by team.
    integration_id: Option<String>,
}

/// Slack's signature headers.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // only its OpenAPI description is used
struct SlackHeaders {
    /// Unix seconds; outside the window (default ±300 s) the request is refused.
    #[param(rename = "X-Slack-Request-Timestamp")]
    timestamp: Option<String>,
    /// `v0=` + hex HMAC-SHA256 of `v0:{timestamp}:{body}` with the signing secret.
    #[param(rename = "X-Slack-Signature")]
    signature: Option<String>,
}

/// The answer to Slack's `url_verification`.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // only its OpenAPI description is used
struct Challenge {
    /// The `challenge` Slack sent.
    challenge: String,
}

/// What the Events endpoint answers with 200.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only its OpenAPI description is used
enum AckOrChallenge {
    /// An event was stored.
    Ack(super::Ack),
    /// A `url_verification` was answered.
    Challenge(Challenge),
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

/// What verified a request: it decides the dedupe scope (never the body) and which
/// integrations the event may reach.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verifier {
    /// The app-level `SIGNALBOX_SLACK_SIGNING_SECRET` (one distributed app).
    App,
    /// The integration's own signing secret (a per-customer app).
    Own,
}

/// Slack Events API: `url_verification` is answered with its challenge, `event_callback`
/// stored and acknowledged within Slack's 3 s.
#[utoipa::path(post, path = "/api/webhooks/slack/events", tag = "webhooks",
    params(SlackQuery, SlackHeaders),
    request_body(content = Object, description = "A Slack Events API envelope"),
    responses((status = 200, description = "Stored (or a duplicate), or the challenge",
               body = AckOrChallenge),
              super::WebhookErrors))]
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
    let verify_own = |integ: &IntegrationRef| {
        proto::verify(
            &valid_keys(&integ.secrets, now_micros()),
            ts,
            sig,
            &body,
            now,
            tol,
        )
    };

    let (env, targets, verifier): (Envelope, Vec<IntegrationRef>, Verifier) =
        if let Some(id) = q.integration_id.filter(|s| !s.is_empty()) {
            // (a) the URL names the integration
            let integ = if crate::ids::looks_like(&id, prefix::INTEGRATION) {
                state.creds.integration(&id).await?
            } else {
                None
            };
            let Some(integ) = integ.filter(|i| i.row.platform == SOURCE) else {
                super::equalise_timing(&body);
                return Err(reject(&state, SOURCE, ApiError::UnknownIntegration));
            };
            if integ.secrets.is_empty() {
                // It belongs to the distributed app: the app secret verifies, and the event
                // must be for this integration's installation like any routed event.
                let Some(secret) = app_secret else {
                    return Err(reject(&state, SOURCE, ApiError::UnknownIntegration));
                };
                proto::verify(&[secret], ts, sig, &body, now, tol)
                    .map_err(|e| reject(&state, SOURCE, super::signature_error(e, ts, now, tol)))?;
                let env = parse(&state, &body)?;
                let found = candidates(&state, &env).await?;
                let targets = found.choose(|i| i.row.id == integ.row.id);
                (env, targets, Verifier::App)
            } else {
                verify_own(&integ)
                    .map_err(|e| reject(&state, SOURCE, super::signature_error(e, ts, now, tol)))?;
                (parse(&state, &body)?, vec![integ], Verifier::Own)
            }
        } else if let Some(secret) = app_secret {
            // (b) one distributed app: routed by installation among its integrations (those
            // with a signing secret of their own belong to other apps)
            proto::verify(&[secret], ts, sig, &body, now, tol)
                .map_err(|e| reject(&state, SOURCE, super::signature_error(e, ts, now, tol)))?;
            let env = parse(&state, &body)?;
            let found = candidates(&state, &env).await?;
            let targets = found.choose(|i| i.row.webhook_secret_enc.is_none());
            (env, targets, Verifier::App)
        } else {
            // (c) per-customer apps without the id in the URL: the installations' own secrets
            let env = parse(&state, &body)?;
            if env.kind == "url_verification" {
                // No team in the challenge: it must verify with one of our Slack secrets.
                verify_any(&state, ts, sig, &body).await?;
                (env, Vec::new(), Verifier::Own)
            } else {
                let found = candidates(&state, &env).await?;
                let Some(first) = found.first() else {
                    super::equalise_timing(&body);
                    return Err(reject(&state, SOURCE, ApiError::UnknownIntegration));
                };
                let targets = found.choose(|i| verify_own(i).is_ok());
                if targets.is_empty() {
                    let e = verify_own(first).err().unwrap_or(SignatureError::Invalid);
                    return Err(reject(
                        &state,
                        SOURCE,
                        super::signature_error(e, ts, now, tol),
                    ));
                }
                (env, targets, Verifier::Own)
            }
        };

    if env.kind == "url_verification" {
        let challenge = env.challenge.clone().unwrap_or_default();
        return Ok(Json(json!({ "challenge": challenge })));
    }
    if let Some(reason) = header(&headers, "x-slack-retry-reason") {
        // Unsigned header: counted under one of Slack's documented reasons or `other`.
        state.metrics.slack_retry(reason);
    }
    if env.kind == "app_rate_limited" {
        state.metrics.slack_rate_limited.inc();
        tracing::warn!(team_id = ?env.team_id, "Slack reports app_rate_limited");
    }
    let dedupe_key = env.dedupe_key(&body);
    let received_at = now_micros();
    let kept = kept_headers(&headers, KEPT);
    let env = Arc::new(env);
    let parsed = Parsed::SlackEnvelope(env.clone());
    let env = &*env;
    let delivery = |integration: Option<&IntegrationRef>| {
        let (status, filter_reason) = status_at_the_edge(integration, env);
        let outcome = match integration {
            Some(i) if status == DeliveryStatus::Pending && state.inbox.takes_outcomes() => {
                outcome_at_the_edge(i, env)
            }
            _ => None,
        };
        if let Some(i) = integration {
            state
                .creds
                .mark_used(LastUsedTable::Integrations, &i.row.id);
        }
        NewDelivery {
            id: new_id(prefix::DELIVERY),
            workspace_id: integration.map(|i| i.row.workspace_id.clone()),
            integration_id: integration.map(|i| i.row.id.clone()),
            webhook_key_id: None,
            source: SOURCE.into(),
            dedupe_scope: dedupe_scope(verifier, integration),
            dedupe_key: dedupe_key.clone(),
            body: body.clone(),
            headers: kept.clone(),
            status,
            filter_reason,
            received_at,
            parsed: parsed.clone(),
            outcome,
        }
    };
    let deliveries: Vec<NewDelivery> = if targets.is_empty() {
        vec![delivery(None)]
    } else {
        targets.iter().map(|i| delivery(Some(i))).collect()
    };
    store_all_and_ack(&state, deliveries, started).await
}

/// The dedupe scope of a delivery, from what verified it: an event is stored once per
/// integration it reaches (and once, unrouted, for the app). The body's `api_app_id` plays no
/// part: it is whatever the sender wrote.
fn dedupe_scope(verifier: Verifier, integration: Option<&IntegrationRef>) -> String {
    match (verifier, integration) {
        (Verifier::App, Some(i)) => format!("slack:app:{}", i.row.id),
        (Verifier::App, None) => "slack:app".to_string(),
        (Verifier::Own, Some(i)) => format!("slack:{}", i.row.id),
        (Verifier::Own, None) => "slack:unrouted".to_string(),
    }
}

/// The status a delivery is stored with: pending for an integration that takes it, else
/// filtered with the reason.
fn status_at_the_edge(
    integration: Option<&IntegrationRef>,
    env: &Envelope,
) -> (DeliveryStatus, Option<String>) {
    match integration {
        None => (
            DeliveryStatus::Filtered,
            Some(format!(
                "no active Slack integration for installation {}",
                env.routing_ids()
                    .first()
                    .map(String::as_str)
                    .unwrap_or("(none)")
            )),
        ),
        Some(i) if !i.row.is_active && !is_lifecycle(env) => (
            DeliveryStatus::Filtered,
            Some("integration is inactive".to_string()),
        ),
        Some(_) => (DeliveryStatus::Pending, None),
    }
}

/// Uninstall and revocation reach an integration even when it is inactive: the worker wipes
/// its tokens.
fn is_lifecycle(env: &Envelope) -> bool {
    matches!(
        env.event_type.as_deref(),
        Some("app_uninstalled" | "tokens_revoked")
    )
}

/// The integrations stored under an envelope's installation ids: one group per authorization,
/// then one for the fallback ids ([`Envelope::fallback_installations`]).
struct Candidates {
    authorized: Vec<Vec<IntegrationRef>>,
    fallback: Vec<IntegrationRef>,
}

impl Candidates {
    fn first(&self) -> Option<&IntegrationRef> {
        self.authorized
            .iter()
            .flatten()
            .chain(self.fallback.iter())
            .next()
    }

    /// The integrations the event goes to, among those that `fit` (are of the app that
    /// verified it): for each authorization, its first active integration — an inactive one
    /// only when no active one exists, so an old deactivated row never hides a live install —
    /// one per signalbox workspace (a message seen through two installations of one workspace
    /// is one delivery). The fallback ids are used only when no authorization found one.
    fn choose(&self, fit: impl Fn(&IntegrationRef) -> bool) -> Vec<IntegrationRef> {
        let pick = |group: &[IntegrationRef]| {
            group
                .iter()
                .filter(|i| fit(i))
                .find(|i| i.row.is_active)
                .or_else(|| group.iter().find(|i| fit(i)))
                .cloned()
        };
        let mut out: Vec<IntegrationRef> = Vec::new();
        for group in &self.authorized {
            if let Some(i) = pick(group)
                && !out.iter().any(|o| o.row.workspace_id == i.row.workspace_id)
            {
                out.push(i);
            }
        }
        if out.is_empty()
            && let Some(i) = pick(&self.fallback)
        {
            out.push(i);
        }
        // An active integration of a workspace wins over another workspace's inactive one.
        if out.iter().any(|i| i.row.is_active) {
            out.retain(|i| i.row.is_active);
        }
        out
    }
}

/// Looks up the integrations under every installation id of the envelope (bounded: at most
/// [`proto::MAX_AUTHORIZATIONS`] authorizations of two ids, and four fallback ids, each
/// shape-checked by the parser and cached).
async fn candidates(state: &AppState, env: &Envelope) -> ApiResult<Candidates> {
    let mut authorized = Vec::new();
    for ids in env.authorized_installations() {
        authorized.push(lookup(state, &ids).await?);
    }
    let fallback = lookup(state, &env.fallback_installations()).await?;
    Ok(Candidates {
        authorized,
        fallback,
    })
}

async fn lookup(state: &AppState, ids: &[String]) -> ApiResult<Vec<IntegrationRef>> {
    let mut out: Vec<IntegrationRef> = Vec::new();
    for id in ids {
        for i in state.creds.slack_by_team(id).await? {
            if !out.iter().any(|o| o.row.id == i.row.id) {
                out.push(i);
            }
        }
    }
    Ok(out)
}

/// Verifies against any active Slack integration's secret (team-lookup mode, `url_verification`).
///
/// Unsigned requests reach this, so what costs nothing comes first, in `proto::verify`'s order
/// (and with its answers): the headers, the timestamp window and the signature's shape
/// (`v0=` + 64 hex digits), and a body no larger than a challenge. Only then the secrets, from
/// the credential cache's list of active Slack integrations (no table read per request), in
/// one `proto::verify` call: one HMAC per secret over at most `MAX_CHALLENGE_BYTES`.
async fn verify_any(
    state: &AppState,
    ts: Option<&str>,
    sig: Option<&str>,
    body: &[u8],
) -> ApiResult<()> {
    /// Slack's challenge is ~150 bytes; a larger body would make each of the HMACs dearer.
    const MAX_CHALLENGE_BYTES: usize = 4096;
    let now = now_secs();
    let tolerance = state.cfg.signature_tolerance_secs;
    let fail = |e: SignatureError| reject(state, SOURCE, e.into());
    let sig = sig
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail(SignatureError::Missing))?;
    crate::protocol::check_timestamp(ts, now, tolerance).map_err(fail)?;
    let well_formed = sig
        .strip_prefix("v0=")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed || body.len() > MAX_CHALLENGE_BYTES {
        return Err(fail(SignatureError::Invalid));
    }
    let integrations = state.creds.active_slack_integrations().await?;
    let now_us = now_micros();
    let keys: Vec<&[u8]> = integrations
        .iter()
        .flat_map(|i| valid_keys(&i.secrets, now_us))
        .collect();
    proto::verify(&keys, ts, Some(sig), body, now, tolerance).map_err(fail)
}

/// The integration's settings for normalising `env`.
pub fn settings(integ: &IntegrationRef, env: &Envelope) -> SlackSettings {
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
        team_id: integ
            .row
            .slack_team_id
            .as_deref()
            .map(|t| env.installing_team(t)),
        bot_user_id: integ.row.slack_bot_user_id.clone(),
        channels: list("slack_channels"),
        channel_types: list("channel_types"),
    }
}

/// Worker step.
pub async fn process(state: &AppState, d: &ClaimedDelivery) -> Result<Effect, super::ProcessError> {
    let env = match d.slack_envelope() {
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
    // At the deadline the lookups still waiting are dropped (their requests with them). The
    // worker runs this for every delivery of its batch at once, so a batch waits for the
    // deadline once, not once per delivery.
    let mut names = Names::default();
    let mut extra = serde_json::Map::new();
    let outcome = tokio::time::timeout(
        ENRICH_DEADLINE,
        enrich(state, &integ, &env, &mut names, &mut extra),
    )
    .await;
    if outcome.is_err() {
        names.errors.push(format!(
            "enrichment timed out after {}s",
            ENRICH_DEADLINE.as_secs()
        ));
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
    let settings = settings(integ, env);
    let effect = proto::normalize(env, &settings, &NoNames);
    if !integ.row.is_active && !matches!(effect, Effect::DeactivateIntegration { .. }) {
        return Decision::Done(Effect::filter("integration is inactive"));
    }
    if !matches!(effect, Effect::Upsert { .. }) || integ.row.access_token_enc.is_none() {
        return Decision::Done(effect);
    }
    Decision::Enrich(settings)
}

/// The outcome the receiver can offer the inbox: the worker step's, when it needs no I/O (no
/// enrichment). Which offered outcomes commit with the row is decided in one place,
/// [`crate::store::finishes_at_insert`].
fn outcome_at_the_edge(integ: &IntegrationRef, env: &Envelope) -> Option<Effect> {
    match decide(integ, env) {
        Decision::Enrich(_) => None,
        Decision::Done(effect) => Some(effect),
    }
}

/// Upper bound on the time enrichment may add to a delivery (and to the batch it is in: the
/// deliveries of a batch are enriched concurrently). Longer than a Slack call may take
/// ([`crate::sources::slack::api::CALL_TIMEOUT`]), so a call that gets no answer fails and marks the API
/// down before the deadline cuts it.
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

/// One lookup of enrichment.
enum Lookup {
    User(String),
    Channel(String),
    Permalink,
}

impl Lookup {
    fn method(&self) -> &'static str {
        match self {
            Lookup::User(_) => "users.info",
            Lookup::Channel(_) => "conversations.info",
            Lookup::Permalink => "chat.getPermalink",
        }
    }
}

async fn look_up(
    api: &crate::sources::slack::api::SlackApi,
    id: &str,
    token: &secrecy::SecretString,
    channel: &str,
    ts: &str,
    l: Lookup,
) -> (
    Lookup,
    Result<String, crate::sources::slack::api::SlackError>,
) {
    let r = match &l {
        Lookup::User(u) => api.user_name(id, token, u).await,
        Lookup::Channel(c) => api.channel_name(id, token, c).await,
        Lookup::Permalink => api.permalink(id, token, channel, ts).await,
    };
    (l, r)
}

fn keep(
    names: &mut Names,
    extra: &mut serde_json::Map<String, Value>,
    l: Lookup,
    r: Result<String, crate::sources::slack::api::SlackError>,
) {
    match (l, r) {
        (Lookup::User(u), Ok(n)) => {
            names.users.insert(u, n);
        }
        (Lookup::Channel(c), Ok(n)) => {
            names.channels.insert(c, n);
        }
        (Lookup::Permalink, Ok(p)) => {
            extra.insert("permalink".into(), Value::String(p));
        }
        (l, Err(e)) => names.errors.push(format!("{}: {e}", l.method())),
    }
}

/// The integration's usable bot token ([`api::bot_token`]: refreshed when it expires soon, or
/// when `force`); `None` when there is none or the integration needs re-authorisation.
pub async fn bot_token(
    state: &AppState,
    integration_id: &str,
    force: bool,
) -> Option<secrecy::SecretString> {
    let tokens = api::Tokens {
        api: &state.slack,
        store: &state.store,
        creds: &state.creds,
        cfg: &state.cfg,
    };
    api::bot_token(tokens, integration_id, force).await
}

/// Looks up the author's, mentioned users' and channels' names and the permalink, all at once
/// (the caller bounds the whole with [`ENRICH_DEADLINE`]). Each answer lands in `names` /
/// `extra` as it arrives, so what was found before the deadline is kept. A method under
/// back-off (429, or a Slack API that did not answer lately) fails at once and is recorded.
async fn enrich(
    state: &AppState,
    integ: &IntegrationRef,
    env: &Envelope,
    names: &mut Names,
    extra: &mut serde_json::Map<String, Value>,
) {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;
    let id = &integ.row.id;
    let Some(token) = bot_token(state, id, false).await else {
        names.errors.push("no usable bot token".into());
        return;
    };
    let event = &env.raw["event"];
    let msg = if event["subtype"] == "message_changed" {
        &event["message"]
    } else {
        event
    };
    let channel = event["channel"].as_str().unwrap_or_default().to_string();
    let ts = msg["ts"].as_str().unwrap_or_default().to_string();
    let (mut users, channels) = mentions(msg["text"].as_str().unwrap_or_default(), 10);
    if let Some(u) = msg["user"].as_str()
        && !users.iter().any(|x| x == u)
    {
        users.insert(0, u.to_string());
    }
    let mut all_channels = channels;
    if !channel.is_empty() && !all_channels.contains(&channel) {
        all_channels.insert(0, channel.clone());
    }
    let mut lookups: Vec<Lookup> = users.into_iter().map(Lookup::User).collect();
    lookups.extend(all_channels.into_iter().map(Lookup::Channel));
    if !channel.is_empty() && !ts.is_empty() {
        lookups.push(Lookup::Permalink);
    }
    let api = &state.slack;
    let mut expired = Vec::new();
    let mut pending: FuturesUnordered<_> = lookups
        .into_iter()
        .map(|l| look_up(api, id, &token, &channel, &ts, l))
        .collect();
    while let Some((l, r)) = pending.next().await {
        match r {
            Err(e) if e.is_auth() => expired.push((l, e)),
            r => keep(names, extra, l, r),
        }
    }
    drop(pending);
    if expired.is_empty() {
        return;
    }
    // Slack says the token expired: one refresh, then those lookups again.
    let Some(fresh) = bot_token(state, id, true).await else {
        for (l, e) in expired {
            keep(names, extra, l, Err(e));
        }
        return;
    };
    let mut again: FuturesUnordered<_> = expired
        .into_iter()
        .map(|(l, _)| look_up(api, id, &fresh, &channel, &ts, l))
        .collect();
    while let Some((l, r)) = again.next().await {
        keep(names, extra, l, r);
    }
}

/// Slack's part of the integration API: config keys and their rules, the webhook URL.
pub(crate) const PLATFORM: Platform = Platform {
    name: SOURCE,
    webhook_path: "/api/webhooks/slack/events?integration_id=",
    config_keys: &["slack_channels", "channel_types"],
    validate: validate_config,
};

/// Conversation types `config.channel_types` may list.
const CHANNEL_TYPES: &[&str] = &["channel", "group", "im", "mpim", "app_home"];

/// Checks `config.slack_channels` (channel ids) and `config.channel_types`.
fn validate_config(obj: &Map<String, Value>) -> ApiResult<Map<String, Value>> {
    let mut out = Map::new();
    let channels = string_list(obj, "slack_channels")?;
    for (i, c) in channels.iter().enumerate() {
        let ok = c.len() >= 3
            && matches!(c.as_bytes().first(), Some(b'C' | b'G' | b'D'))
            && c.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if !ok {
            return Err(ApiError::invalid(format!(
                "config.slack_channels[{i}] must be a Slack channel id like C0123ABCD or G0123ABCD, got {c:?}"
            )));
        }
    }
    let types = string_list(obj, "channel_types")?;
    for (i, t) in types.iter().enumerate() {
        if !CHANNEL_TYPES.contains(&t.as_str()) {
            return Err(ApiError::invalid(format!(
                "config.channel_types[{i}] must be one of {}, got {t:?}",
                CHANNEL_TYPES.join(", ")
            )));
        }
    }
    out.insert("slack_channels".into(), json!(channels));
    if !types.is_empty() {
        out.insert("channel_types".into(), json!(types));
    }
    Ok(out)
}

/// `signalbox send slack`: an Events API message signed as Slack signs it.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Send to ?integration_id= (per-customer app mode).
    #[arg(long)]
    integration_id: Option<String>,
    /// Team id.
    #[arg(long)]
    team: String,
    /// Channel id.
    #[arg(long, default_value = "C0SIGNALBOX")]
    channel: String,
    /// User id.
    #[arg(long, default_value = "U0SIGNALBOX")]
    user: String,
    /// Message text.
    #[arg(long)]
    text: String,
    /// Event id (default: random).
    #[arg(long)]
    event_id: Option<String>,
}

impl SendArgs {
    /// The event signed with `signing_secret` at `now`.
    pub fn sample(self, signing_secret: &str, now: i64) -> anyhow::Result<super::Sample> {
        let ts = format!("{now}.000100");
        let team = &self.team;
        let body = json!({
            "token": "unused", "team_id": team, "api_app_id": "A0SIGNALBOX", "type": "event_callback",
            "event_id": self.event_id.unwrap_or_else(|| format!("Ev{}", new_id("x").to_uppercase().replace('_', ""))),
            "event_time": now,
            "event": {"type": "message", "channel": self.channel, "user": self.user, "text": self.text, "ts": ts,
                      "event_ts": ts, "channel_type": "channel"},
            "authorizations": [{"team_id": team, "is_bot": true}],
        })
        .to_string()
        .into_bytes();
        let sig = proto::sign(signing_secret.as_bytes(), now, &body);
        let q = self
            .integration_id
            .map(|i| format!("?integration_id={i}"))
            .unwrap_or_default();
        Ok(super::Sample {
            path: format!("/api/webhooks/slack/events{q}"),
            headers: vec![
                ("x-slack-request-timestamp".into(), now.to_string()),
                ("x-slack-signature".into(), sig),
            ],
            body,
        })
    }
}

#[cfg(test)]
mod platform_tests {
    use super::PLATFORM;
    use crate::admin::platform::validate_config;
    use serde_json::json;

    #[test]
    fn slack_config_is_validated_by_field() {
        assert!(
            validate_config(
                &PLATFORM,
                Some(&json!({"slack_channels": ["C0123ABC", "G99"]}))
            )
            .is_ok()
        );
        let e = validate_config(&PLATFORM, Some(&json!({"slack_channels": ["general"]})))
            .expect_err("bad id");
        assert!(e.to_string().contains("config.slack_channels[0]"), "{e}");
        let e = validate_config(&PLATFORM, Some(&json!({"slack_channels": "C1"})))
            .expect_err("not a list");
        assert!(e.to_string().contains("config.slack_channels"), "{e}");
        let e = validate_config(&PLATFORM, Some(&json!({"channel_types": ["dm"]})))
            .expect_err("bad type");
        assert!(e.to_string().contains("config.channel_types[0]"), "{e}");
        let e = validate_config(&PLATFORM, Some(&json!({"pylon_events": []})))
            .expect_err("wrong platform");
        assert!(e.to_string().contains("config.pylon_events"), "{e}");
    }
}
