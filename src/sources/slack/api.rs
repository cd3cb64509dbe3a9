//! Slack Web API: OAuth v2 code exchange, token rotation (single-flight), and the lookups that
//! enrich Slack signals (`users.info`, `conversations.info`, `chat.getPermalink`).
//!
//! Every call goes to `SIGNALBOX_SLACK_API_BASE`. A 429 blocks that method for that integration
//! until `Retry-After` has passed (other methods and integrations are unaffected); callers then
//! skip the lookup instead of waiting, so enrichment never delays a signal beyond a bound.
//! An API that does not answer (connect failure, timeout: the whole integration's API) or
//! answers 5xx (that method) is marked *down* the same way, for [`DOWN_BASE`] doubling per
//! failed probe up to [`DOWN_MAX`]; while down, calls fail at once with
//! [`SlackError::Unavailable`], and once the period is over one call at a time probes (the others
//! are still skipped) until one gets an answer. A bot-token call gives up after
//! [`CALL_TIMEOUT`], less than the enrichment deadline, so that a call getting no answer fails,
//! and is recorded, before the deadline drops it.
//! The back-off and the name cache are keyed by integration id (not by a team id a body names)
//! and bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::clock::now_micros;
use crate::config::Config;
use crate::credentials::Credentials;
use crate::metrics::Metrics;
use crate::store::Store;

/// Refresh when less than this remains before expiry (Bolt uses the same margin).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(2 * 3600);
/// How long names stay cached.
const NAME_TTL: Duration = Duration::from_secs(3600);
/// Most names cached (by integration, kind and id).
const NAME_CAPACITY: u64 = 10_000;
/// Longest back-off after a 429 (a longer `Retry-After` is cut to this).
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Most (integration, method) pairs under back-off at once.
const BLOCKED_CAPACITY: u64 = 10_000;
/// First period an API that did not answer (or answered 5xx) is skipped for; it doubles with
/// every failed probe.
pub const DOWN_BASE: Duration = Duration::from_secs(1);
/// Longest such period: a down API is probed at least this often.
pub const DOWN_MAX: Duration = Duration::from_secs(30);
/// Longest a bot-token call may take, connecting included (enrichment's deadline is 3 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a client-credential call (code exchange, refresh, revoke) may take.
const OAUTH_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The method under which a whole integration's API is marked down (no answer at all).
const ANY_METHOD: &str = "*";

/// A Slack API failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlackError {
    /// 429, or the method is still blocked by an earlier 429.
    #[error("rate limited for {0:?}")]
    RateLimited(Duration),
    /// Skipped without a call: the API got no answer or answered 5xx lately (`reason`), and
    /// is not tried again for `retry_in` (or another call is probing it).
    #[error("skipped, Slack API unavailable ({reason}); next try in {:.1}s", retry_in.as_secs_f64())]
    Unavailable {
        /// The failure that marked it down.
        reason: String,
        /// Until the next probe (zero: a probe is in flight).
        retry_in: Duration,
    },
    /// `{"ok":false,"error":"…"}`.
    #[error("slack error: {0}")]
    Api(String),
    /// Transport or unexpected response.
    #[error("slack call failed: {0}")]
    Http(String),
}

impl SlackError {
    /// Errors that mean the access token is no longer good.
    pub fn is_auth(&self) -> bool {
        matches!(self, SlackError::Api(e) if e == "token_expired" || e == "invalid_auth")
    }

    /// Errors that mean the refresh token is no longer good (re-install needed).
    pub fn is_refresh_dead(&self) -> bool {
        matches!(self, SlackError::Api(e) if matches!(e.as_str(),
            "invalid_refresh_token" | "invalid_grant" | "token_revoked" | "account_inactive"
            | "invalid_client_id" | "bad_client_secret" | "app_uninstalled"))
    }
}

/// The parts of an `oauth.v2.access` answer we keep.
#[derive(Debug, Clone)]
pub struct OAuthTokens {
    /// Bot token.
    pub access_token: SecretString,
    /// Refresh token (rotation on).
    pub refresh_token: Option<SecretString>,
    /// Seconds until the access token expires (rotation on).
    pub expires_in: Option<i64>,
    /// Bot user id.
    pub bot_user_id: Option<String>,
    /// Team id.
    pub team_id: Option<String>,
    /// Team name.
    pub team_name: Option<String>,
    /// Enterprise id (Grid).
    pub enterprise_id: Option<String>,
    /// Granted scopes.
    pub scope: Option<String>,
    /// App id.
    pub app_id: Option<String>,
}

impl OAuthTokens {
    fn from_json(v: &Value) -> Result<Self, SlackError> {
        let s = |p: &[&str]| -> Option<String> {
            let mut cur = v;
            for k in p {
                cur = cur.get(*k)?;
            }
            cur.as_str().filter(|x| !x.is_empty()).map(str::to_string)
        };
        let access = s(&["access_token"])
            .ok_or_else(|| SlackError::Http("no access_token in the answer".into()))?;
        Ok(OAuthTokens {
            access_token: SecretString::from(access),
            refresh_token: s(&["refresh_token"]).map(SecretString::from),
            expires_in: v.get("expires_in").and_then(Value::as_i64),
            bot_user_id: s(&["bot_user_id"]),
            team_id: s(&["team", "id"]),
            team_name: s(&["team", "name"]),
            enterprise_id: s(&["enterprise", "id"]),
            scope: s(&["scope"]),
            app_id: s(&["app_id"]),
        })
    }
}

/// Cached names by (integration id, kind, id).
type NameCache = Cache<(String, &'static str, String), String>;

/// Why calls under a [`Gate`] are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    /// A 429 (`Retry-After`).
    RateLimited,
    /// No answer or a 5xx: the failure.
    Unavailable(String),
}

/// The back-off state of one (integration, method) — or of a whole integration's API, under
/// [`ANY_METHOD`].
#[derive(Debug)]
struct Gate {
    /// Calls are skipped until then.
    until: Instant,
    why: Why,
    /// Failed probes in a row (unavailable only): the period doubles with each.
    strikes: u32,
    /// A call is probing the API now (unavailable only); the others are skipped.
    probing: bool,
}

type GateRef = Arc<Mutex<Gate>>;

fn lock(g: &GateRef) -> std::sync::MutexGuard<'_, Gate> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

/// The period an API is skipped for after `strikes` failures in a row.
fn down_period(strikes: u32) -> Duration {
    DOWN_BASE
        .saturating_mul(2u32.saturating_pow(strikes.saturating_sub(1).min(16)))
        .min(DOWN_MAX)
}

/// A call that is probing a down API: if it ends without a verdict (its future was dropped,
/// e.g. at the enrichment deadline), the next call probes instead.
struct Probe(GateRef);

impl Drop for Probe {
    fn drop(&mut self) {
        lock(&self.0).probing = false;
    }
}

/// How a call ended, for the back-off.
enum Verdict {
    /// Slack answered (any status but 429 and 5xx; `ok:false` too).
    Answered,
    /// 5xx: the method is down.
    MethodFailed(String),
    /// No answer (connect failure, timeout): the integration's whole API is down.
    NoAnswer(String),
}

/// The Slack Web API client with per-(integration, method) back-off state (429, 5xx; no answer
/// for the whole integration) and a name cache.
#[derive(Clone)]
pub struct SlackApi {
    http: reqwest::Client,
    base: String,
    metrics: Metrics,
    /// (integration id, or `oauth` for client-credential calls; method, or [`ANY_METHOD`]) →
    /// back-off (429 or down).
    blocked: Cache<(String, &'static str), GateRef>,
    names: NameCache,
    refreshing: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl SlackApi {
    /// A client for `base` (e.g. `https://slack.com/api`).
    pub fn new(http: reqwest::Client, base: &str, metrics: Metrics) -> Self {
        SlackApi {
            http,
            base: base.trim_end_matches('/').to_string(),
            metrics,
            blocked: Cache::builder()
                .max_capacity(BLOCKED_CAPACITY)
                .time_to_live(MAX_BACKOFF)
                .build(),
            names: Cache::builder()
                .max_capacity(NAME_CAPACITY)
                .time_to_live(NAME_TTL)
                .build(),
            refreshing: Arc::default(),
        }
    }

    fn count(&self, method: &str, outcome: &str) {
        self.metrics
            .api_calls
            .get_or_create(&vec![
                ("service", "slack".to_string()),
                ("method", method.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Calls a Web API method with form arguments, as the bot (`token`) or with client
    /// credentials (HTTP Basic). A 429 blocks `method` for `integration_id` (the integration
    /// whose token calls, or `oauth` for client-credential calls); a 5xx marks `method` down, no
    /// answer marks the integration's whole API down (see the module documentation).
    pub async fn call(
        &self,
        integration_id: &str,
        method: &'static str,
        token: Option<&SecretString>,
        basic: Option<(&str, &SecretString)>,
        form: &[(&str, &str)],
    ) -> Result<Value, SlackError> {
        let mut probes = Vec::new();
        for m in [ANY_METHOD, method] {
            if let Some(p) = self.pass(integration_id, m, method)? {
                probes.push(p);
            }
        }
        let timeout = if basic.is_some() || integration_id == "oauth" {
            OAUTH_CALL_TIMEOUT
        } else {
            CALL_TIMEOUT
        };
        let mut req = self
            .http
            .post(format!("{}/{method}", self.base))
            .timeout(timeout)
            .form(form);
        if let Some(t) = token {
            req = req.bearer_auth(t.expose_secret());
        }
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret.expose_secret()));
        }
        let (verdict, result) = self.send(method, req).await;
        match verdict {
            Verdict::Answered => {
                self.recovered(integration_id, ANY_METHOD);
                self.recovered(integration_id, method);
            }
            Verdict::MethodFailed(why) => {
                self.recovered(integration_id, ANY_METHOD);
                self.failed(integration_id, method, why);
            }
            Verdict::NoAnswer(why) => self.failed(integration_id, ANY_METHOD, why),
        }
        drop(probes);
        let resp = result?;
        if resp.status().as_u16() == 429 {
            let secs = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    crate::protocol::retry_after_secs(v, crate::clock::now_micros() / 1_000_000)
                })
                .unwrap_or(30)
                .min(MAX_BACKOFF.as_secs());
            let d = Duration::from_secs(secs);
            let gate = Gate {
                until: Instant::now() + d,
                why: Why::RateLimited,
                strikes: 0,
                probing: false,
            };
            self.blocked.insert(
                (integration_id.to_string(), method),
                Arc::new(Mutex::new(gate)),
            );
            self.count(method, "rate_limited");
            return Err(SlackError::RateLimited(d));
        }
        if !resp.status().is_success() {
            self.count(method, "error");
            return Err(SlackError::Http(format!("HTTP {}", resp.status())));
        }
        let v: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => {
                self.count(method, "error");
                if e.is_timeout() {
                    self.failed(integration_id, ANY_METHOD, "timed out".into());
                }
                return Err(SlackError::Http(format!("bad JSON: {}", e.without_url())));
            }
        };
        if v.get("ok") != Some(&Value::Bool(true)) {
            self.count(method, "api_error");
            let err = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown_error");
            return Err(SlackError::Api(err.chars().take(64).collect()));
        }
        self.count(method, "ok");
        Ok(v)
    }

    /// Sends `req`: the response (or the error to return) and what it says about the API.
    async fn send(
        &self,
        method: &str,
        req: reqwest::RequestBuilder,
    ) -> (Verdict, Result<reqwest::Response, SlackError>) {
        match req.send().await {
            Ok(resp) if resp.status().is_server_error() => {
                let why = format!("HTTP {}", resp.status().as_u16());
                (Verdict::MethodFailed(why), Ok(resp))
            }
            Ok(resp) => (Verdict::Answered, Ok(resp)),
            Err(e) => {
                self.count(method, "error");
                let why = if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "could not connect".to_string()
                } else {
                    "no answer".to_string()
                };
                let err = SlackError::Http(format!("{why}: {}", e.without_url()));
                (Verdict::NoAnswer(why), Err(err))
            }
        }
    }

    /// Whether a call of `method` may go out under the gate of `(integration_id, gate)`:
    /// `Ok(Some(probe))` when this call is the one probing a down API, an error when it is to
    /// be skipped.
    fn pass(
        &self,
        integration_id: &str,
        gate: &'static str,
        method: &'static str,
    ) -> Result<Option<Probe>, SlackError> {
        let key = (integration_id.to_string(), gate);
        let Some(g) = self.blocked.get(&key) else {
            return Ok(None);
        };
        let mut state = lock(&g);
        let left = state.until.saturating_duration_since(Instant::now());
        match state.why.clone() {
            Why::RateLimited if !left.is_zero() => {
                self.count(method, "skipped_rate_limited");
                Err(SlackError::RateLimited(left))
            }
            Why::RateLimited => {
                drop(state);
                self.blocked.invalidate(&key);
                Ok(None)
            }
            Why::Unavailable(reason) if !left.is_zero() || state.probing => {
                self.count(method, "skipped_unavailable");
                Err(SlackError::Unavailable {
                    reason,
                    retry_in: left,
                })
            }
            Why::Unavailable(_) => {
                state.probing = true;
                drop(state);
                Ok(Some(Probe(g)))
            }
        }
    }

    /// Records a failure (`why`) under `(integration_id, gate)`: down for a period that doubles
    /// with each failure in a row, unless it is down already (a call that started before).
    fn failed(&self, integration_id: &str, gate: &'static str, why: String) {
        let now = Instant::now();
        let g = self
            .blocked
            .get_with((integration_id.to_string(), gate), || {
                Arc::new(Mutex::new(Gate {
                    until: now,
                    why: Why::Unavailable(String::new()),
                    strikes: 0,
                    probing: false,
                }))
            });
        let mut state = lock(&g);
        let strikes = match state.why {
            Why::Unavailable(_) if state.until > now => return,
            Why::Unavailable(_) => state.strikes.saturating_add(1),
            Why::RateLimited => 1,
        };
        let period = down_period(strikes);
        tracing::warn!(
            integration_id,
            method = gate,
            reason = %why,
            skip_ms = period.as_millis() as u64,
            "Slack API unavailable; skipping it for a while"
        );
        *state = Gate {
            until: now + period,
            why: Why::Unavailable(why),
            strikes,
            probing: false,
        };
    }

    /// Slack answered: a down mark under `(integration_id, gate)` is lifted.
    fn recovered(&self, integration_id: &str, gate: &'static str) {
        let key = (integration_id.to_string(), gate);
        if let Some(g) = self.blocked.get(&key)
            && matches!(lock(&g).why, Why::Unavailable(_))
        {
            self.blocked.invalidate(&key);
            tracing::info!(integration_id, method = gate, "Slack API answers again");
        }
    }

    /// `oauth.v2.access` with an authorization code.
    pub async fn exchange_code(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        code: &str,
        redirect_uri: &str,
    ) -> Result<OAuthTokens, SlackError> {
        let v = self
            .call(
                "oauth",
                "oauth.v2.access",
                None,
                Some((client_id, client_secret)),
                &[
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                    ("grant_type", "authorization_code"),
                ],
            )
            .await?;
        OAuthTokens::from_json(&v)
    }

    /// `auth.revoke`: gives back a token signalbox will not keep (an install that turned out
    /// to belong to another workspace's team).
    pub async fn revoke(&self, token: &SecretString) -> Result<(), SlackError> {
        self.call("oauth", "auth.revoke", Some(token), None, &[])
            .await
            .map(|_| ())
    }

    /// `oauth.v2.access` with `grant_type=refresh_token`.
    pub async fn refresh(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        refresh_token: &SecretString,
    ) -> Result<OAuthTokens, SlackError> {
        let v = self
            .call(
                "oauth",
                "oauth.v2.access",
                None,
                Some((client_id, client_secret)),
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token.expose_secret()),
                ],
            )
            .await?;
        OAuthTokens::from_json(&v)
    }

    fn cached_name(&self, integration_id: &str, kind: &'static str, id: &str) -> Option<String> {
        self.names
            .get(&(integration_id.to_string(), kind, id.to_string()))
    }

    fn cache_name(&self, integration_id: &str, kind: &'static str, id: &str, name: &str) {
        self.names.insert(
            (integration_id.to_string(), kind, id.to_string()),
            name.to_string(),
        );
    }

    /// A name from a `*.info` method, cached per integration: `pick` extracts it from the
    /// answer.
    async fn cached_info(
        &self,
        integration_id: &str,
        token: &SecretString,
        kind: &'static str,
        method: &'static str,
        id: &str,
        pick: fn(&Value) -> Option<&str>,
    ) -> Result<String, SlackError> {
        if let Some(n) = self.cached_name(integration_id, kind, id) {
            return Ok(n);
        }
        let v = self
            .call(integration_id, method, Some(token), None, &[(kind, id)])
            .await?;
        let name = pick(&v)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| SlackError::Api(format!("{kind} has no name")))?
            .to_string();
        self.cache_name(integration_id, kind, id, &name);
        Ok(name)
    }

    /// A user's display name (falling back to the real name), cached per integration.
    pub async fn user_name(
        &self,
        integration_id: &str,
        token: &SecretString,
        user: &str,
    ) -> Result<String, SlackError> {
        self.cached_info(integration_id, token, "user", "users.info", user, |v| {
            let u = &v["user"];
            [
                u["profile"]["display_name"].as_str(),
                u["profile"]["real_name"].as_str(),
                u["real_name"].as_str(),
                u["name"].as_str(),
            ]
            .into_iter()
            .flatten()
            .find(|s| !s.is_empty())
        })
        .await
    }

    /// A channel's name, cached per integration.
    pub async fn channel_name(
        &self,
        integration_id: &str,
        token: &SecretString,
        channel: &str,
    ) -> Result<String, SlackError> {
        self.cached_info(
            integration_id,
            token,
            "channel",
            "conversations.info",
            channel,
            |v| v["channel"]["name"].as_str(),
        )
        .await
    }

    /// A message permalink.
    pub async fn permalink(
        &self,
        integration_id: &str,
        token: &SecretString,
        channel: &str,
        ts: &str,
    ) -> Result<String, SlackError> {
        let v = self
            .call(
                integration_id,
                "chat.getPermalink",
                Some(token),
                None,
                &[("channel", channel), ("message_ts", ts)],
            )
            .await?;
        v["permalink"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| SlackError::Api("no permalink".into()))
    }

    fn local_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }
}

/// What [`bot_token`] reads and writes, borrowed from the application's shared state (this
/// module does not depend on it).
#[derive(Clone, Copy)]
pub struct Tokens<'a> {
    /// The Web API client (refresh calls, single-flight locks).
    pub api: &'a SlackApi,
    /// The integration rows.
    pub store: &'a Store,
    /// Token encryption.
    pub creds: &'a Credentials,
    /// The app's client id and secret.
    pub cfg: &'a Config,
}

/// The integration's usable bot token, refreshed first when it expires within
/// [`REFRESH_MARGIN`] (or when `force`, after a `token_expired`/`invalid_auth`). `None` when
/// there is no token or the integration needs re-authorisation.
///
/// Single-flight: one refresh per integration at a time in this process (a mutex) and across
/// nodes (a lease column taken with a conditional `UPDATE`); losers wait for the winner's tokens.
pub async fn bot_token(
    state: Tokens<'_>,
    integration_id: &str,
    force: bool,
) -> Option<SecretString> {
    let api = state.api;
    let fresh_enough = |row: &crate::store::Integration| {
        row.token_expires_at
            .is_none_or(|t| t - now_micros() > REFRESH_MARGIN.as_micros() as i64)
    };
    let row = state
        .store
        .get_integration(integration_id)
        .await
        .ok()
        .flatten()?;
    if row.needs_reauth || !row.is_active {
        return None;
    }
    let current = |row: &crate::store::Integration| {
        row.access_token_enc.as_deref().and_then(|e| {
            state
                .creds
                .decrypt("integrations", &row.id, "access_token_enc", e)
                .ok()
        })
    };
    if (!force && fresh_enough(&row)) || row.refresh_token_enc.is_none() {
        return current(&row);
    }
    let seen_token = row.access_token_enc.clone();
    let lock = api.local_lock(integration_id);
    let _guard = lock.lock().await;
    // Someone may have refreshed while we waited.
    let row = state
        .store
        .get_integration(integration_id)
        .await
        .ok()
        .flatten()?;
    if row.needs_reauth {
        return None;
    }
    if row.access_token_enc != seen_token || (!force && fresh_enough(&row)) {
        return current(&row);
    }
    let (Some(client_id), Some(client_secret)) =
        (&state.cfg.slack_client_id, &state.cfg.slack_client_secret)
    else {
        tracing::warn!(
            integration_id,
            "token needs a refresh but SIGNALBOX_SLACK_CLIENT_ID/SECRET are not set"
        );
        return current(&row);
    };
    let lease = now_micros() + 30_000_000;
    if !state
        .store
        .try_lock_refresh(integration_id, lease)
        .await
        .unwrap_or(false)
    {
        // Another node is refreshing: wait for its result.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = state
                .store
                .get_integration(integration_id)
                .await
                .ok()
                .flatten()?;
            if r.access_token_enc != seen_token || r.needs_reauth {
                return if r.needs_reauth { None } else { current(&r) };
            }
        }
        return current(&row);
    }
    let refresh = row.refresh_token_enc.as_deref().and_then(|e| {
        state
            .creds
            .decrypt("integrations", &row.id, "refresh_token_enc", e)
            .ok()
    });
    let Some(refresh) = refresh else {
        let _ = state
            .store
            .release_refresh_lock(integration_id, lease)
            .await;
        return current(&row);
    };
    match api.refresh(client_id, client_secret, &refresh).await {
        Ok(t) => {
            let access = state.creds.encrypt(
                "integrations",
                integration_id,
                "access_token_enc",
                t.access_token.expose_secret(),
            );
            let new_refresh = t
                .refresh_token
                .as_ref()
                .unwrap_or(&refresh)
                .expose_secret()
                .to_string();
            let refresh_enc = state.creds.encrypt(
                "integrations",
                integration_id,
                "refresh_token_enc",
                &new_refresh,
            );
            let expires = t.expires_in.map(|s| now_micros() + s * 1_000_000);
            match state
                .store
                .store_refreshed_tokens(integration_id, lease, &access, Some(&refresh_enc), expires)
                .await
            {
                Ok(true) => {
                    tracing::info!(integration_id, "Slack token refreshed");
                    state.creds.changed(integration_id).await;
                    Some(t.access_token)
                }
                _ => {
                    tracing::warn!(
                        integration_id,
                        "refreshed Slack token could not be stored (lease lost)"
                    );
                    Some(t.access_token)
                }
            }
        }
        Err(e) if e.is_refresh_dead() => {
            tracing::warn!(integration_id, error = %e, "Slack token refresh failed for good: integration needs re-authorisation");
            let _ = state
                .store
                .mark_needs_reauth(integration_id, &e.to_string())
                .await;
            state.creds.changed(integration_id).await;
            None
        }
        Err(e) => {
            tracing::warn!(integration_id, error = %e, "Slack token refresh failed; will retry later");
            let _ = state
                .store
                .release_refresh_lock(integration_id, lease)
                .await;
            current(&row)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on unexpected results
mod tests {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    fn api(base: &str) -> SlackApi {
        SlackApi::new(crate::state::http_client().unwrap(), base, Metrics::new())
    }

    async fn calls(mock: &MockServer, p: &str) -> usize {
        let reqs = mock.received_requests().await.unwrap();
        reqs.iter().filter(|r| r.url.path() == p).count()
    }

    #[test]
    fn down_periods_double_and_cap() {
        assert_eq!(down_period(1), DOWN_BASE);
        assert_eq!(down_period(2), DOWN_BASE * 2);
        assert_eq!(down_period(3), DOWN_BASE * 4);
        assert_eq!(down_period(40), DOWN_MAX);
    }

    #[tokio::test]
    async fn a_5xx_marks_the_method_down_and_one_call_probes_after_the_period() {
        let mock = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/users.info"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&mock)
            .await;
        Mock::given(method("POST"))
            .and(path("/conversations.info"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({"ok": true, "channel": {"name": "general"}})),
            )
            .mount(&mock)
            .await;
        let api = api(&mock.uri());
        let token = SecretString::from("xoxb-test");
        let first = api.user_name("int_a", &token, "U1").await;
        assert_eq!(
            first,
            Err(SlackError::Http("HTTP 503 Service Unavailable".into()))
        );
        for _ in 0..10 {
            let e = api.user_name("int_a", &token, "U1").await.unwrap_err();
            assert!(matches!(e, SlackError::Unavailable { .. }), "{e:?}");
            assert!(e.to_string().contains("HTTP 503"), "{e}");
        }
        assert_eq!(calls(&mock, "/users.info").await, 1, "skipped while down");
        // Other methods and other integrations are not affected.
        assert_eq!(
            api.channel_name("int_a", &token, "C1").await.unwrap(),
            "general"
        );
        assert!(matches!(
            api.user_name("int_b", &token, "U1").await,
            Err(SlackError::Http(_))
        ));
        assert_eq!(calls(&mock, "/users.info").await, 2);
        // After the period one call probes; the others are skipped meanwhile.
        tokio::time::sleep(DOWN_BASE + Duration::from_millis(100)).await;
        let (a, b) = tokio::join!(
            api.user_name("int_a", &token, "U1"),
            api.user_name("int_a", &token, "U1")
        );
        let probed = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Err(SlackError::Http(_))))
            .count();
        assert_eq!(probed, 1, "{a:?} {b:?}");
        assert_eq!(calls(&mock, "/users.info").await, 3);
        // The failed probe doubled the period.
        tokio::time::sleep(DOWN_BASE + Duration::from_millis(100)).await;
        assert!(matches!(
            api.user_name("int_a", &token, "U1").await,
            Err(SlackError::Unavailable { .. })
        ));
        assert_eq!(calls(&mock, "/users.info").await, 3);
    }

    #[tokio::test]
    async fn no_answer_marks_the_integrations_api_down_until_a_probe_gets_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hole = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let api = api(&format!("http://{addr}"));
        let token = SecretString::from("xoxb-test");
        let started = Instant::now();
        let e = api.user_name("int_a", &token, "U1").await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        let took = started.elapsed();
        assert!(took < CALL_TIMEOUT + Duration::from_secs(1), "{took:?}");
        // Every method of that integration is skipped at once now.
        let started = Instant::now();
        for r in [
            api.channel_name("int_a", &token, "C1").await,
            api.permalink("int_a", &token, "C1", "1.2").await,
        ] {
            let e = r.unwrap_err();
            assert!(matches!(e, SlackError::Unavailable { .. }), "{e:?}");
            assert!(e.to_string().contains("timed out"), "{e}");
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        // Another integration's calls still go out (and wait for their answer).
        let other = tokio::time::timeout(
            Duration::from_millis(300),
            api.user_name("int_b", &token, "U1"),
        )
        .await;
        assert!(other.is_err(), "not skipped: {other:?}");
        hole.abort();
    }
}
