//! Slack Web API: OAuth v2 code exchange, token rotation (single-flight), and the lookups that
//! enrich Slack signals (`users.info`, `conversations.info`, `chat.getPermalink`).
//!
//! Every call goes to `SIGNALBOX_SLACK_API_BASE`. A 429 blocks that method for that integration
//! until `Retry-After` has passed (other methods and integrations are unaffected); callers then
//! skip the lookup instead of waiting, so enrichment never delays a signal beyond a bound.
//! The back-off and the name cache are keyed by integration id (not by a team id a body names)
//! and bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::app::AppState;
use crate::clock::now_micros;
use crate::metrics::Metrics;

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

/// A Slack API failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlackError {
    /// 429, or the method is still blocked by an earlier 429.
    #[error("rate limited for {0:?}")]
    RateLimited(Duration),
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

/// The Slack Web API client with per-(integration, method) rate-limit state and a name cache.
#[derive(Clone)]
pub struct SlackApi {
    http: reqwest::Client,
    base: String,
    metrics: Metrics,
    /// (integration id, or `oauth` for client-credential calls, method) → blocked until.
    blocked: Cache<(String, &'static str), Instant>,
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
    /// whose token calls, or `oauth` for client-credential calls).
    pub async fn call(
        &self,
        integration_id: &str,
        method: &'static str,
        token: Option<&SecretString>,
        basic: Option<(&str, &SecretString)>,
        form: &[(&str, &str)],
    ) -> Result<Value, SlackError> {
        let key = (integration_id.to_string(), method);
        if let Some(until) = self.blocked.get(&key)
            && let Some(left) = until.checked_duration_since(Instant::now())
            && !left.is_zero()
        {
            self.count(method, "skipped_rate_limited");
            return Err(SlackError::RateLimited(left));
        }
        let mut req = self
            .http
            .post(format!("{}/{method}", self.base))
            .timeout(Duration::from_secs(5))
            .form(form);
        if let Some(t) = token {
            req = req.bearer_auth(t.expose_secret());
        }
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret.expose_secret()));
        }
        let resp = req.send().await.map_err(|e| {
            self.count(method, "error");
            SlackError::Http(e.without_url().to_string())
        })?;
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
            self.blocked.insert(key, Instant::now() + d);
            self.count(method, "rate_limited");
            return Err(SlackError::RateLimited(d));
        }
        if !resp.status().is_success() {
            self.count(method, "error");
            return Err(SlackError::Http(format!("HTTP {}", resp.status())));
        }
        let v: Value = resp.json().await.map_err(|e| {
            self.count(method, "error");
            SlackError::Http(format!("bad JSON: {}", e.without_url()))
        })?;
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

/// The integration's usable bot token, refreshed first when it expires within
/// [`REFRESH_MARGIN`] (or when `force`, after a `token_expired`/`invalid_auth`). `None` when
/// there is no token or the integration needs re-authorisation.
///
/// Single-flight: one refresh per integration at a time in this process (a mutex) and across
/// nodes (a lease column taken with a conditional `UPDATE`); losers wait for the winner's tokens.
pub async fn bot_token(
    state: &AppState,
    integration_id: &str,
    force: bool,
) -> Option<SecretString> {
    let api = &state.slack;
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
