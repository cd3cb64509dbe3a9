//! Administrative operations shared by the HTTP admin API and the CLI: validation, encryption
//! of secrets, activity logging, cache invalidation, and the JSON views of the contract (which
//! never contain a secret or token).

pub mod platform;
pub mod views;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::admin::views::{
    ActivityView, DeliveryView, Done, ErasureView, IntegrationView, Items, Page, SignalView,
    TokenView, WebhookKeyView, WorkspaceView, valid_until,
};
use crate::clock::{now_micros, rfc3339, rfc3339_opt};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::error::{ApiError, ApiResult};
use crate::ids::{new_id, prefix};
use crate::protocol::{sha256_hex, standard_webhooks};
use crate::store::{
    ApiToken, Delivery, DeliveryFilter, Integration, SignalFilter, Store, WebhookKey, Workspace,
};
use platform::{Platform, validate_config};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The global admin token or the local CLI.
    Admin,
    /// A workspace-scoped token: sees only its workspace.
    Workspace {
        /// The workspace.
        workspace_id: String,
        /// The token's id (recorded as the actor).
        token_id: String,
    },
}

impl Principal {
    /// Actor recorded in the activity log.
    pub fn actor(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Workspace { token_id, .. } => token_id,
        }
    }

    /// True when the principal may see `workspace_id`.
    pub fn can_see(&self, workspace_id: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Workspace {
                workspace_id: w, ..
            } => w == workspace_id,
        }
    }

    /// The only workspace a scoped token may see.
    pub fn scope(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Workspace { workspace_id, .. } => Some(workspace_id),
        }
    }
}

/// The admin service.
#[derive(Clone)]
pub struct Admin {
    /// Storage.
    pub store: Store,
    /// Credentials (encryption and cache).
    pub creds: Credentials,
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Every source's name (a signal's and a delivery's `source`), from the registration in
    /// [`crate::sources`]: list filters accept only these.
    pub sources: &'static [&'static str],
    /// The platforms integrations can be made for, from the same registration.
    pub platforms: &'static [&'static Platform],
}

/// Input of integration creation (API body and CLI flags). The API documents it per platform
/// ([`NewIntegrationDoc`]); this is the union the server parses and then checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewIntegration {
    /// `slack` or `pylon`.
    pub platform: String,
    /// Display name (1 to 200 characters).
    pub name: String,
    /// Slack team id (`T…`, or `E…` for an org-wide install); required for Slack.
    pub slack_team_id: Option<String>,
    /// Slack team name.
    pub slack_team_name: Option<String>,
    /// Slack signing secret of a per-customer app (8 to 4096 characters).
    pub signing_secret: Option<String>,
    /// Slack bot token (8 to 4096 characters).
    pub bot_token: Option<String>,
    /// The app's bot user id (its own messages are filtered).
    pub slack_bot_user_id: Option<String>,
    /// Pylon webhook secret (8 to 4096 characters); required for Pylon.
    pub webhook_secret: Option<String>,
    /// Pylon API token (8 to 4096 characters).
    pub api_token: Option<String>,
    /// Pylon account id.
    pub pylon_account_id: Option<String>,
    /// Value of the required shared header (`config.required_header` names it).
    pub required_header_value: Option<String>,
    /// Platform settings: Slack `slack_channels` (channel ids), `channel_types`; Pylon
    /// `pylon_events`, `signature_scheme` (`auto`, `x-pylon-signature`, `timestamped`),
    /// `required_header`.
    pub config: Option<Value>,
}

impl NewIntegration {
    /// The first field given that belongs to the other platform (a Slack secret on a Pylon
    /// integration would otherwise be dropped without a word).
    fn foreign_field(&self, platform: &str) -> Option<&'static str> {
        let slack = [
            ("slack_team_id", self.slack_team_id.is_some()),
            ("slack_team_name", self.slack_team_name.is_some()),
            ("signing_secret", self.signing_secret.is_some()),
            ("bot_token", self.bot_token.is_some()),
            ("slack_bot_user_id", self.slack_bot_user_id.is_some()),
        ];
        let pylon = [
            ("webhook_secret", self.webhook_secret.is_some()),
            ("api_token", self.api_token.is_some()),
            ("pylon_account_id", self.pylon_account_id.is_some()),
            (
                "required_header_value",
                self.required_header_value.is_some(),
            ),
        ];
        let other: &[(&str, bool)] = match platform {
            "slack" => &pylon,
            "pylon" => &slack,
            _ => &[],
        };
        other.iter().find(|(_, given)| *given).map(|(f, _)| *f)
    }
}

/// `POST /api/v1/workspaces/{ws}/integrations` as the API documents it: one shape per
/// platform (and, for Pylon, per use of a required shared header). Only its schema is used;
/// the server parses [`NewIntegration`] and refuses what does not fit the platform.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = NewIntegration)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum NewIntegrationDoc {
    /// A Slack integration.
    Slack(NewSlackIntegration),
    /// A Pylon integration.
    Pylon(NewPylonIntegration),
    /// A Pylon integration that also requires a shared header on every request.
    PylonWithHeader(NewPylonIntegrationWithHeader),
}

/// A platform name.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum SlackPlatform {
    /// Slack.
    #[serde(rename = "slack")]
    Slack,
}

/// A platform name.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum PylonPlatform {
    /// Pylon.
    #[serde(rename = "pylon")]
    Pylon,
}

/// A Slack integration: a team, and either a per-customer app's signing secret or (admin
/// token, server with SIGNALBOX_SLACK_SIGNING_SECRET) the shared app.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct NewSlackIntegration {
    /// `slack`.
    platform: SlackPlatform,
    /// Display name (1 to 200 characters).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    name: String,
    /// Slack team (`T…`, or `E…` for an org-wide install).
    #[schema(pattern = "^[TE][A-Z0-9]{1,20}$", example = "T0123ABCD")]
    slack_team_id: String,
    /// Slack team name.
    #[schema(nullable = false)]
    slack_team_name: Option<String>,
    /// Signing secret of a per-customer Slack app (8 to 4096 characters).
    #[schema(
        nullable = false,
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    signing_secret: Option<String>,
    /// Bot token (`xoxb-…`, 8 to 4096 characters): names channels and users.
    #[schema(
        nullable = false,
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    bot_token: Option<String>,
    /// The app's bot user id (its own messages are filtered).
    #[schema(nullable = false)]
    slack_bot_user_id: Option<String>,
    /// Settings.
    #[schema(nullable = false)]
    config: Option<SlackConfig>,
}

/// Slack settings.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct SlackConfig {
    /// Only messages in these channels become signals (empty: every channel the app is in).
    #[schema(nullable = false)]
    slack_channels: Option<Vec<SlackChannelId>>,
    /// Only these conversation types (`channel`, `group`, `im`, `mpim`, `app_home`).
    #[schema(nullable = false)]
    channel_types: Option<Vec<ChannelType>>,
}

/// A Slack channel id.
#[derive(Deserialize, ToSchema)]
#[schema(value_type = String, pattern = "^[CGD][A-Z0-9]{2,}$", example = "C0123ABCD")]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct SlackChannelId(String);

/// A Slack conversation type.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum ChannelType {
    /// Public channel.
    Channel,
    /// Private channel.
    Group,
    /// Direct message.
    Im,
    /// Group direct message.
    Mpim,
    /// The app's home tab.
    AppHome,
}

/// A Pylon integration.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct NewPylonIntegration {
    /// `pylon`.
    platform: PylonPlatform,
    /// Display name (1 to 200 characters).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    name: String,
    /// The webhook secret set on the Pylon action (8 to 4096 characters).
    #[schema(
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    webhook_secret: String,
    /// Pylon API token (8 to 4096 characters): fetches full ticket text.
    #[schema(
        nullable = false,
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    api_token: Option<String>,
    /// Pylon account id.
    #[schema(nullable = false)]
    pylon_account_id: Option<String>,
    /// Settings.
    #[schema(nullable = false)]
    config: Option<PylonConfig>,
}

/// A Pylon integration whose requests must also carry a shared header. It repeats
/// [`NewPylonIntegration`]'s fields instead of flattening them: a flattened schema becomes an
/// `allOf`, and closed objects (`additionalProperties: false`) cannot be combined that way.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct NewPylonIntegrationWithHeader {
    /// `pylon`.
    platform: PylonPlatform,
    /// Display name (1 to 200 characters).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    name: String,
    /// The webhook secret set on the Pylon action (8 to 4096 characters).
    #[schema(
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    webhook_secret: String,
    /// Pylon API token (8 to 4096 characters).
    #[schema(
        nullable = false,
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    api_token: Option<String>,
    /// Pylon account id.
    #[schema(nullable = false)]
    pylon_account_id: Option<String>,
    /// The value the header named by `config.required_header` must have (8 to 4096 characters).
    #[schema(
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    required_header_value: String,
    /// Settings, with `required_header`.
    config: PylonHeaderConfig,
}

/// Pylon settings.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct PylonConfig {
    /// Only these events become signals (empty: all).
    #[schema(nullable = false)]
    pylon_events: Option<Vec<EventName>>,
    /// How requests are signed (default `auto`).
    #[schema(nullable = false)]
    signature_scheme: Option<SignatureScheme>,
}

/// Pylon settings with a required shared header.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct PylonHeaderConfig {
    /// Only these events become signals (empty: all).
    #[schema(nullable = false)]
    pylon_events: Option<Vec<EventName>>,
    /// How requests are signed (default `auto`).
    #[schema(nullable = false)]
    signature_scheme: Option<SignatureScheme>,
    /// A header every request must carry with `required_header_value`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", example = "x-signalbox-token")]
    required_header: String,
}

/// A Pylon event name.
#[derive(Deserialize, ToSchema)]
#[schema(value_type = String, pattern = r"[\s\S]", example = "ticket.created")]
#[allow(dead_code)] // only its OpenAPI description is used
pub struct EventName(String);

/// How Pylon signs requests.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum SignatureScheme {
    /// Either scheme, as the request shows.
    #[serde(rename = "auto")]
    Auto,
    /// `X-Pylon-Signature`: hex HMAC-SHA256 of the body.
    #[serde(rename = "x-pylon-signature")]
    XPylonSignature,
    /// `pylon-webhook-timestamp` + `pylon-webhook-signature`.
    #[serde(rename = "timestamped")]
    Timestamped,
}

/// Secrets in an integration update.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretsUpdate {
    /// New signing/webhook secret.
    #[serde(alias = "signing_secret")]
    #[schema(
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    pub webhook_secret: Option<String>,
    /// New bot/API token (`null`-like empty string clears it).
    #[serde(alias = "bot_token")]
    #[schema(
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    pub api_token: Option<String>,
    /// New required header value.
    #[schema(
        min_length = 8,
        max_length = 4096,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    pub required_header_value: Option<String>,
    /// Seconds the previous webhook secret stays valid (default `SIGNALBOX_SECRET_GRACE_SECS`,
    /// at most 30 days).
    #[schema(minimum = 0, maximum = 2592000)]
    #[serde(default, deserialize_with = "whole_secs")]
    pub grace_period_secs: Option<u64>,
}

/// Input of an integration update (PATCH).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntegrationUpdate {
    /// New name (`null` is refused: an integration always has one).
    #[serde(default, deserialize_with = "not_null_name")]
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    pub name: Option<String>,
    /// Replacement config (`null` is refused).
    #[serde(default, deserialize_with = "not_null_config")]
    #[schema(value_type = Object)]
    pub config: Option<Value>,
    /// Activate / deactivate (`null` is refused).
    #[serde(default, deserialize_with = "not_null_is_active")]
    #[schema(nullable = false)]
    pub is_active: Option<bool>,
    /// Secrets to replace (`null` is refused).
    #[serde(default, deserialize_with = "not_null_secrets")]
    #[schema(nullable = false)]
    pub secrets: Option<SecretsUpdate>,
    /// Slack bot user id; `null` or `""` clears it.
    #[serde(default, deserialize_with = "null_clears")]
    pub slack_bot_user_id: Option<String>,
    /// Slack team name; `null` or `""` clears it.
    #[serde(default, deserialize_with = "null_clears")]
    pub slack_team_name: Option<String>,
}

/// A PATCH field that cannot be cleared: `null` would otherwise parse as "absent" and the
/// request would answer 200 having changed nothing.
macro_rules! not_null {
    ($f:ident, $t:ty, $field:literal) => {
        fn $f<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<$t>, D::Error> {
            match Option::<$t>::deserialize(d)? {
                Some(v) => Ok(Some(v)),
                None => Err(serde::de::Error::custom(concat!(
                    $field,
                    " cannot be null: leave it out to keep the current value"
                ))),
            }
        }
    };
}
not_null!(not_null_name, String, "name");
not_null!(not_null_config, Value, "config");
not_null!(not_null_is_active, bool, "is_active");
not_null!(not_null_secrets, SecretsUpdate, "secrets");

/// A count of seconds given as a JSON number: `49723` or `49723.0` (JSON Schema counts both as
/// an integer, and so do many JSON encoders); `null` is absent; a fraction or a negative is
/// refused.
pub fn whole_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    match n.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= 9.0e15 => Ok(Some(f as u64)),
        _ => Err(serde::de::Error::custom(format!(
            "expected a whole number of seconds, got {n}"
        ))),
    }
}

/// A present `null` is "clear this field" (stored as empty, like `""`).
fn null_clears<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d).map(|v| Some(v.unwrap_or_default()))
}

/// Input of `PATCH /api/v1/workspaces/{ws}`. `retention`: a duration (`30d`, `12h`, `90s`),
/// `"keep"` (never purge this workspace) or `null` (follow `SIGNALBOX_RETENTION`); absent:
/// unchanged.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceUpdate {
    /// New name (`null` is refused: a workspace always has one).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, required = false, min_length = 1, max_length = 200, pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]")]
    pub name: Option<Value>,
    /// New retention: a duration (`30d`, `12h`, `90s`), `keep`, or `null` (the server's).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, required = false, example = "30d")]
    pub retention: Option<Value>,
}

/// Deserializes a field that is present (even as `null`) into `Some`; an absent field stays
/// `None` through `#[serde(default)]`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A retention in seconds as the API shows it: `keep` for 0, else the largest whole unit.
pub fn format_retention(secs: i64) -> String {
    match secs {
        s if s <= 0 => "keep".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub fn duration_secs(d: Option<std::time::Duration>) -> i64 {
    d.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Why Slack installation `team` cannot be bound to workspace `ws`: `other` owns it. Names the
/// other integration only when it is in the same workspace (another tenant's ids stay hidden).
pub fn slack_owner_message(team: &str, other: &Integration, ws: &str) -> String {
    if other.workspace_id == ws {
        format!(
            "Slack team {team} already has an active integration in this workspace ({}); \
             deactivate it first",
            other.id
        )
    } else {
        format!(
            "Slack team {team} (or its Enterprise Grid organisation) is already connected to \
             another signalbox workspace"
        )
    }
}

/// A unique-index refusal of an integration write, as the contract's 409 naming the team.
fn slack_conflict(e: crate::store::StoreError, row: &Integration) -> ApiError {
    match (e, &row.slack_team_id) {
        (crate::store::StoreError::Conflict, Some(team)) => ApiError::Conflict(format!(
            "Slack team {team} already has an active integration of the shared Slack app"
        )),
        (e, _) => e.into(),
    }
}

/// Signal statuses a list can filter by.
const SIGNAL_STATUSES: &[&str] = &["new", "triaged", "archived", "deleted"];
/// Delivery statuses a list can filter by.
const DELIVERY_STATUSES: &[&str] = &["pending", "processed", "filtered", "failed", "dead"];

/// A 400 naming the allowed values when a filter's `value` is not one of them (a typo would
/// otherwise look like an empty result).
fn one_of(field: &str, value: Option<&str>, allowed: &[&str]) -> ApiResult<()> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(ApiError::invalid(format!(
            "{field} must be one of {}, not {v:?}",
            allowed.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// A display name: 1 to 200 characters, not blank. The OpenAPI documents say "not blank" as a
/// pattern that lists Unicode `White_Space` (what `str::trim` removes) character by character,
/// because `\s` means a different set in Rust, ECMAScript and Python.
fn check_name(name: &str) -> ApiResult<String> {
    let n = name.trim();
    if n.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name must be 1 to 200 characters"));
    }
    Ok(n.to_string())
}

fn check_secret(field: &str, s: &str) -> ApiResult<()> {
    if s.trim().is_empty() {
        return Err(ApiError::invalid(format!("{field} must not be empty")));
    }
    let chars = s.chars().count();
    if !(8..=4096).contains(&chars) {
        return Err(ApiError::invalid(format!(
            "{field} must be 8 to 4096 characters"
        )));
    }
    Ok(())
}

/// A secret the caller may omit: `None` when absent, the trimmed value when given, and a 400
/// naming `field` when it was given empty or blank (which must not read as "absent": that
/// would pass a required check, or silently keep the old secret).
fn given_secret(field: &str, v: &Option<String>) -> ApiResult<Option<String>> {
    match v.as_deref() {
        None => Ok(None),
        Some(s) => {
            check_secret(field, s)?;
            Ok(Some(s.trim().to_string()))
        }
    }
}

/// The API field behind an integration's secret column (for error messages).
fn secret_field(platform: &str, col: &str) -> &'static str {
    match (platform, col) {
        ("slack", "webhook_secret_enc") => "signing_secret",
        (_, "webhook_secret_enc") => "webhook_secret",
        ("slack", "access_token_enc") => "bot_token",
        (_, "access_token_enc") => "api_token",
        _ => "required_header_value",
    }
}

/// The grace period of a rotated secret: `requested`, else the configured default; at most
/// [`MAX_SECRET_GRACE_SECS`](crate::config::MAX_SECRET_GRACE_SECS) (30 days).
fn check_grace(requested: Option<u64>, default: u64) -> ApiResult<u64> {
    let max = crate::config::MAX_SECRET_GRACE_SECS;
    let grace = requested.unwrap_or(default);
    if grace > max {
        return Err(ApiError::invalid(format!(
            "grace_period_secs must be at most {max} (30 days)"
        )));
    }
    Ok(grace)
}

/// When a previous secret kept for `grace_secs` from `now` (Unix µs) expires; checked, never
/// wrapped.
fn grace_expiry(now: i64, grace_secs: u64) -> ApiResult<i64> {
    i64::try_from(grace_secs)
        .ok()
        .and_then(|g| g.checked_mul(1_000_000))
        .and_then(|us| now.checked_add(us))
        .ok_or_else(|| ApiError::invalid("grace_period_secs is out of range"))
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl Admin {
    /// Public URL of a webhook endpoint.
    pub fn webhook_url(&self, platform: &str, id: &str) -> String {
        let base = &self.cfg.public_url;
        match self.platforms.iter().find(|p| p.name == platform) {
            Some(p) => format!("{base}{}{id}", p.webhook_path),
            None => format!("{base}/api/webhooks/signals?key_id={id}"),
        }
    }

    /// The registered platform called `name`.
    fn platform(&self, name: &str) -> ApiResult<&'static Platform> {
        self.platforms
            .iter()
            .copied()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.platforms.iter().map(|p| p.name).collect();
                ApiError::invalid(format!("platform must be {}", names.join(" or ")))
            })
    }

    async fn workspace_visible(&self, who: &Principal, ws: &str) -> ApiResult<Workspace> {
        if !who.can_see(ws) {
            return Err(ApiError::not_found("workspace", ws));
        }
        self.store
            .get_workspace(ws)
            .await?
            .ok_or_else(|| ApiError::not_found("workspace", ws))
    }

    // ---------------------------------------------------------------- workspaces

    /// Creates a workspace (admin only).
    pub async fn create_workspace(&self, who: &Principal, name: &str) -> ApiResult<WorkspaceView> {
        if who != &Principal::Admin {
            return Err(ApiError::Forbidden(
                "creating a workspace needs the admin token (SIGNALBOX_ADMIN_TOKEN); \
                 a workspace-scoped token cannot do it"
                    .into(),
            ));
        }
        let ws = self.store.create_workspace(&check_name(name)?).await?;
        self.store
            .log_activity(
                &ws.id,
                Some(who.actor()),
                "workspace.created",
                "workspace",
                &ws.id,
                &json!({"name": ws.name}),
            )
            .await?;
        Ok(WorkspaceView::new(&ws, self.cfg.retention))
    }

    /// Lists the workspaces the caller may see.
    pub async fn list_workspaces(&self, who: &Principal) -> ApiResult<Items<WorkspaceView>> {
        let items = self.store.list_workspaces(who.scope()).await?;
        Ok(Items {
            items: items
                .iter()
                .map(|w| WorkspaceView::new(w, self.cfg.retention))
                .collect(),
        })
    }

    /// One workspace.
    pub async fn get_workspace(&self, who: &Principal, id: &str) -> ApiResult<WorkspaceView> {
        Ok(WorkspaceView::new(
            &self.workspace_visible(who, id).await?,
            self.cfg.retention,
        ))
    }

    /// Renames a workspace and/or sets its retention. A workspace token may shorten its
    /// workspace's retention below the server's (`SIGNALBOX_RETENTION`) or go back to it, but
    /// only the admin token may keep data longer than the server does.
    pub async fn update_workspace(
        &self,
        who: &Principal,
        id: &str,
        up: WorkspaceUpdate,
    ) -> ApiResult<WorkspaceView> {
        let ws = self.workspace_visible(who, id).await?;
        let name = match up.name {
            None => None,
            Some(Value::String(n)) => Some(check_name(&n)?),
            Some(_) => {
                return Err(ApiError::invalid(
                    "name must be a string of 1 to 200 characters (a workspace always has a name)",
                ));
            }
        };
        let server = self.cfg.retention;
        let retention = match up.retention {
            None => None,
            Some(Value::Null) => Some(None),
            Some(Value::String(v)) => {
                let d = crate::config::parse_retention(&v)
                    .map_err(|m| ApiError::invalid(format!("retention: {m}")))?;
                Some(Some(duration_secs(d)))
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "retention must be a duration such as \"30d\", \"12h\" or \"90s\", \"keep\", \
                     or null (follow SIGNALBOX_RETENTION)",
                ));
            }
        };
        if let (Some(Some(secs)), Some(limit)) = (retention, server)
            && who != &Principal::Admin
        {
            let limit = duration_secs(Some(limit));
            if secs == 0 || secs > limit {
                return Err(ApiError::Forbidden(format!(
                    "this server keeps deliveries for {} (SIGNALBOX_RETENTION); a workspace token \
                     may only shorten that, keeping data longer needs the admin token",
                    format_retention(limit)
                )));
            }
        }
        if name.is_none() && retention.is_none() {
            return Ok(WorkspaceView::new(&ws, server));
        }
        let row = self
            .store
            .update_workspace(id, name.as_deref(), retention)
            .await?
            .ok_or_else(|| ApiError::not_found("workspace", id))?;
        let mut changed = Map::new();
        if let Some(n) = &name {
            changed.insert("name".into(), json!(n));
        }
        if let Some(r) = retention {
            changed.insert("retention".into(), json!(r.map(format_retention)));
        }
        self.store
            .log_activity(
                id,
                Some(who.actor()),
                "workspace.updated",
                "workspace",
                id,
                &Value::Object(changed),
            )
            .await?;
        Ok(WorkspaceView::new(&row, server))
    }

    // ---------------------------------------------------------------- webhook keys

    /// Creates a webhook key; the secret is in this response only.
    pub async fn create_webhook_key(
        &self,
        who: &Principal,
        ws: &str,
        name: Option<String>,
    ) -> ApiResult<WebhookKeyView> {
        self.workspace_visible(who, ws).await?;
        let now = now_micros();
        let id = new_id(prefix::WEBHOOK_KEY);
        let secret = standard_webhooks::generate_secret();
        let key = WebhookKey {
            id: id.clone(),
            workspace_id: ws.to_string(),
            name: name.as_deref().map(check_name).transpose()?,
            secret_enc: self
                .creds
                .encrypt("webhook_keys", &id, "secret_enc", &secret),
            previous_secret_enc: None,
            previous_expires_at: None,
            is_active: true,
            last_used_at: None,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_webhook_key(&key).await?;
        self.creds.changed(&id).await;
        self.store
            .log_activity(
                ws,
                Some(who.actor()),
                "webhook_key.created",
                "webhook_key",
                &id,
                &json!({}),
            )
            .await?;
        Ok(WebhookKeyView {
            secret: Some(secret),
            ..self.key_view(&key)
        })
    }

    /// Lists a workspace's keys (no secrets).
    pub async fn list_webhook_keys(
        &self,
        who: &Principal,
        ws: &str,
    ) -> ApiResult<Items<WebhookKeyView>> {
        self.workspace_visible(who, ws).await?;
        let keys = self.store.list_webhook_keys(ws).await?;
        Ok(Items {
            items: keys.iter().map(|k| self.key_view(k)).collect(),
        })
    }

    async fn key_visible(&self, who: &Principal, id: &str) -> ApiResult<WebhookKey> {
        let key = self
            .store
            .get_webhook_key(id)
            .await?
            .filter(|k| who.can_see(&k.workspace_id))
            .ok_or_else(|| ApiError::not_found("webhook key", id))?;
        Ok(key)
    }

    /// Deactivates a key.
    pub async fn delete_webhook_key(&self, who: &Principal, id: &str) -> ApiResult<Done> {
        let key = self.key_visible(who, id).await?;
        self.store.deactivate_webhook_key(id).await?;
        self.creds.changed(id).await;
        self.store
            .log_activity(
                &key.workspace_id,
                Some(who.actor()),
                "webhook_key.deleted",
                "webhook_key",
                id,
                &json!({}),
            )
            .await?;
        Ok(Done {
            ok: true,
            id: id.to_string(),
        })
    }

    /// Rotates a key's secret; the previous one keeps verifying for the grace period.
    pub async fn rotate_webhook_key(
        &self,
        who: &Principal,
        id: &str,
        grace_secs: Option<u64>,
    ) -> ApiResult<WebhookKeyView> {
        let key = self.key_visible(who, id).await?;
        if !key.is_active {
            return Err(ApiError::not_found("webhook key", id));
        }
        let grace = check_grace(grace_secs, self.cfg.secret_grace.as_secs())?;
        let secret = standard_webhooks::generate_secret();
        let new_enc = self
            .creds
            .encrypt("webhook_keys", id, "secret_enc", &secret);
        let (prev, until) = if grace > 0 {
            let plain = self
                .creds
                .decrypt("webhook_keys", id, "secret_enc", &key.secret_enc)
                .map_err(|e| {
                    ApiError::Internal(anyhow::anyhow!("decrypting the current secret: {e}"))
                })?;
            use secrecy::ExposeSecret;
            (
                Some(self.creds.encrypt(
                    "webhook_keys",
                    id,
                    "previous_secret_enc",
                    plain.expose_secret(),
                )),
                Some(grace_expiry(now_micros(), grace)?),
            )
        } else {
            (None, None)
        };
        self.store
            .update_webhook_key_secrets(id, &new_enc, prev.as_deref(), until)
            .await?;
        self.creds.changed(id).await;
        self.store
            .log_activity(
                &key.workspace_id,
                Some(who.actor()),
                "webhook_key.rotated",
                "webhook_key",
                id,
                &json!({"grace_period_secs": grace}),
            )
            .await?;
        let key = self.key_visible(who, id).await?;
        Ok(WebhookKeyView {
            secret: Some(secret),
            ..self.key_view(&key)
        })
    }

    /// JSON view of a key (never the secret).
    pub fn key_view(&self, k: &WebhookKey) -> WebhookKeyView {
        WebhookKeyView {
            id: k.id.clone(),
            workspace_id: k.workspace_id.clone(),
            name: k.name.clone(),
            is_active: k.is_active,
            webhook_url: self.webhook_url("webhook", &k.id),
            previous_secret_valid_until: valid_until(k.previous_expires_at),
            last_used_at: rfc3339_opt(k.last_used_at),
            created_at: rfc3339(k.created_at),
            secret: None,
        }
    }

    // ---------------------------------------------------------------- integrations

    /// Creates an integration.
    pub async fn create_integration(
        &self,
        who: &Principal,
        ws: &str,
        input: NewIntegration,
    ) -> ApiResult<IntegrationView> {
        self.workspace_visible(who, ws).await?;
        let platform = input.platform.trim().to_lowercase();
        if let Some(field) = input.foreign_field(&platform) {
            return Err(ApiError::invalid(format!(
                "{field} is not a {platform} field (see the {platform} shape of NewIntegration in \
                 /api/v1/openapi.json)"
            )));
        }
        let config = validate_config(self.platform(&platform)?, input.config.as_ref())?;
        let name = check_name(&input.name)?;
        let now = now_micros();
        let id = new_id(prefix::INTEGRATION);
        let enc = |col: &str, v: &Option<String>| -> ApiResult<Option<String>> {
            // An explicitly empty secret is a 400 naming the field, not "absent".
            match given_secret(secret_field(&platform, col), v)? {
                Some(s) => Ok(Some(self.creds.encrypt("integrations", &id, col, &s))),
                None => Ok(None),
            }
        };
        let mut row = Integration {
            id: id.clone(),
            workspace_id: ws.to_string(),
            platform: platform.clone(),
            name,
            is_active: true,
            config: config.to_string(),
            created_at: now,
            updated_at: now,
            created_by: Some(who.actor().to_string()),
            ..Default::default()
        };
        match platform.as_str() {
            "slack" => {
                // Not trimmed: an id with spaces around it is a paste error worth naming.
                let team = input
                    .slack_team_id
                    .clone()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        ApiError::invalid("slack_team_id is required for a Slack integration")
                    })?;
                if !crate::protocol::slack::is_team_id(&team) {
                    return Err(ApiError::invalid(
                        "slack_team_id must look like T0123ABCD (or E0123ABCD for an org-wide install)",
                    ));
                }
                let own_secret = given_secret("signing_secret", &input.signing_secret)?.is_some();
                if !own_secret && self.cfg.slack_signing_secret.is_none() {
                    return Err(ApiError::invalid(
                        "signing_secret is required (or configure the app-level SIGNALBOX_SLACK_SIGNING_SECRET)",
                    ));
                }
                if !own_secret && who != &Principal::Admin {
                    // The distributed app routes by team: binding a team to it needs proof
                    // that the caller owns it, which only Slack's OAuth install gives.
                    return Err(ApiError::Forbidden(format!(
                        "a workspace token cannot bind Slack team {team} to the shared Slack app: \
                         install it with Slack's OAuth flow (GET /api/integrations/slack/install?workspace_id={ws}), \
                         or create the integration with the signing_secret of your own Slack app"
                    )));
                }
                if !own_secret {
                    self.check_slack_owner(ws, &team, None, &id).await?;
                }
                row.slack_team_id = Some(team);
                row.slack_team_name = non_empty(&input.slack_team_name);
                row.slack_bot_user_id = non_empty(&input.slack_bot_user_id);
                row.webhook_secret_enc = enc("webhook_secret_enc", &input.signing_secret)?;
                row.access_token_enc = enc("access_token_enc", &input.bot_token)?;
            }
            "pylon" => {
                if non_empty(&input.webhook_secret).is_none() {
                    return Err(ApiError::invalid(
                        "webhook_secret is required for a Pylon integration",
                    ));
                }
                row.webhook_secret_enc = enc("webhook_secret_enc", &input.webhook_secret)?;
                row.access_token_enc = enc("access_token_enc", &input.api_token)?;
                row.pylon_account_id = non_empty(&input.pylon_account_id);
                if config.get("required_header").is_some()
                    && non_empty(&input.required_header_value).is_none()
                {
                    return Err(ApiError::invalid(
                        "required_header_value is required when config.required_header is set",
                    ));
                }
                if config.get("required_header").is_none() && input.required_header_value.is_some()
                {
                    // Stored but never checked, it would look like protection it is not.
                    return Err(ApiError::invalid(
                        "required_header_value needs config.required_header (the header's name)",
                    ));
                }
                row.required_header_value_enc =
                    enc("required_header_value_enc", &input.required_header_value)?;
            }
            _ => return Err(ApiError::invalid("platform must be slack or pylon")),
        }
        self.store
            .insert_integration(&row)
            .await
            .map_err(|e| slack_conflict(e, &row))?;
        self.creds.changed(&id).await;
        self.store
            .log_activity(
                ws,
                Some(who.actor()),
                "integration.created",
                "integration",
                &id,
                &json!({"platform": platform, "name": row.name}),
            )
            .await?;
        Ok(self.integration_view(&row))
    }

    /// Refuses to bind Slack installation `team` (of enterprise `enterprise`, if known) to the
    /// distributed app in workspace `ws` when an active integration elsewhere owns it, its
    /// enterprise or a workspace inside it (`except`: the integration being bound).
    pub async fn check_slack_owner(
        &self,
        ws: &str,
        team: &str,
        enterprise: Option<&str>,
        except: &str,
    ) -> ApiResult<()> {
        match self
            .store
            .slack_owner_conflict(ws, team, enterprise, except)
            .await?
        {
            None => Ok(()),
            Some(other) => Err(ApiError::Conflict(slack_owner_message(team, &other, ws))),
        }
    }

    async fn integration_visible(&self, who: &Principal, id: &str) -> ApiResult<Integration> {
        self.store
            .get_integration(id)
            .await?
            .filter(|i| who.can_see(&i.workspace_id))
            .ok_or_else(|| ApiError::not_found("integration", id))
    }

    /// One integration.
    pub async fn get_integration(&self, who: &Principal, id: &str) -> ApiResult<IntegrationView> {
        Ok(self.integration_view(&self.integration_visible(who, id).await?))
    }

    /// Integrations of a workspace, or every visible one.
    pub async fn list_integrations(
        &self,
        who: &Principal,
        ws: Option<&str>,
    ) -> ApiResult<Items<IntegrationView>> {
        if let Some(ws) = ws {
            self.workspace_visible(who, ws).await?;
        }
        let ws = ws.or(who.scope());
        let rows = self.store.list_integrations(ws).await?;
        Ok(Items {
            items: rows.iter().map(|r| self.integration_view(r)).collect(),
        })
    }

    /// Updates name, config, active flag and/or secrets.
    pub async fn update_integration(
        &self,
        who: &Principal,
        id: &str,
        up: IntegrationUpdate,
    ) -> ApiResult<IntegrationView> {
        let mut row = self.integration_visible(who, id).await?;
        let mut changed = Vec::new();
        if let Some(n) = &up.name {
            row.name = check_name(n)?;
            changed.push("name");
        }
        if let Some(c) = &up.config {
            row.config = validate_config(self.platform(&row.platform)?, Some(c))?.to_string();
            changed.push("config");
        }
        if let Some(a) = up.is_active {
            if a && !row.is_active && row.platform == "slack" && row.webhook_secret_enc.is_none() {
                if let Some(team) = row.slack_team_id.clone() {
                    let ent = row.slack_enterprise_id.clone();
                    self.check_slack_owner(&row.workspace_id, &team, ent.as_deref(), id)
                        .await?;
                }
            }
            row.is_active = a;
            changed.push("is_active");
        }
        if let Some(u) = &up.slack_bot_user_id {
            row.slack_bot_user_id = Some(u.clone()).filter(|s| !s.is_empty());
            changed.push("slack_bot_user_id");
        }
        if let Some(u) = &up.slack_team_name {
            row.slack_team_name = Some(u.clone()).filter(|s| !s.is_empty());
            changed.push("slack_team_name");
        }
        if let Some(s) = &up.secrets {
            // Checked even without a new secret: an out-of-range value is never ignored.
            let grace = check_grace(s.grace_period_secs, self.cfg.secret_grace.as_secs())?;
            let secret_name = secret_field(&row.platform, "webhook_secret_enc");
            if let Some(new) = given_secret(secret_name, &s.webhook_secret)? {
                match (&row.webhook_secret_enc, grace > 0) {
                    (Some(cur), true) => {
                        let plain = self
                            .creds
                            .decrypt("integrations", id, "webhook_secret_enc", cur)
                            .map_err(|e| {
                                ApiError::Internal(anyhow::anyhow!(
                                    "decrypting the current secret: {e}"
                                ))
                            })?;
                        use secrecy::ExposeSecret;
                        row.previous_webhook_secret_enc = Some(self.creds.encrypt(
                            "integrations",
                            id,
                            "previous_webhook_secret_enc",
                            plain.expose_secret(),
                        ));
                        row.previous_secret_expires_at = Some(grace_expiry(now_micros(), grace)?);
                    }
                    _ => {
                        row.previous_webhook_secret_enc = None;
                        row.previous_secret_expires_at = None;
                    }
                }
                row.webhook_secret_enc =
                    Some(
                        self.creds
                            .encrypt("integrations", id, "webhook_secret_enc", &new),
                    );
                changed.push("webhook_secret");
            }
            if let Some(t) = &s.api_token {
                row.access_token_enc = if t.trim().is_empty() {
                    None
                } else {
                    check_secret("api_token", t.trim())?;
                    Some(
                        self.creds
                            .encrypt("integrations", id, "access_token_enc", t.trim()),
                    )
                };
                row.needs_reauth = false;
                changed.push("api_token");
            }
            if let Some(v) = given_secret("required_header_value", &s.required_header_value)? {
                row.required_header_value_enc =
                    Some(
                        self.creds
                            .encrypt("integrations", id, "required_header_value_enc", &v),
                    );
                changed.push("required_header_value");
            }
        }
        let cfg: Value = serde_json::from_str(&row.config).unwrap_or(Value::Null);
        if cfg.get("required_header").is_some() && row.required_header_value_enc.is_none() {
            return Err(ApiError::invalid(
                "secrets.required_header_value is required when config.required_header is set",
            ));
        }
        if !self
            .store
            .update_integration(&row)
            .await
            .map_err(|e| slack_conflict(e, &row))?
        {
            return Err(ApiError::not_found("integration", id));
        }
        self.creds.changed(id).await;
        self.store
            .log_activity(
                &row.workspace_id,
                Some(who.actor()),
                "integration.updated",
                "integration",
                id,
                &json!({"changed": changed}),
            )
            .await?;
        self.get_integration(who, id).await
    }

    /// Deactivates an integration (signals are kept).
    pub async fn deactivate_integration(
        &self,
        who: &Principal,
        id: &str,
    ) -> ApiResult<IntegrationView> {
        let row = self.integration_visible(who, id).await?;
        let mut up = row.clone();
        up.is_active = false;
        self.store.update_integration(&up).await?;
        self.creds.changed(id).await;
        self.store
            .log_activity(
                &row.workspace_id,
                Some(who.actor()),
                "integration.deactivated",
                "integration",
                id,
                &json!({"reason": "deactivated by an administrator"}),
            )
            .await?;
        self.get_integration(who, id).await
    }

    /// JSON view of an integration (never a secret or token).
    pub fn integration_view(&self, r: &Integration) -> IntegrationView {
        IntegrationView {
            id: r.id.clone(),
            workspace_id: r.workspace_id.clone(),
            platform: r.platform.clone(),
            name: r.name.clone(),
            is_active: r.is_active,
            needs_reauth: r.needs_reauth,
            has_webhook_secret: r.webhook_secret_enc.is_some(),
            has_access_token: r.access_token_enc.is_some(),
            has_refresh_token: r.refresh_token_enc.is_some(),
            has_required_header_value: r.required_header_value_enc.is_some(),
            token_expires_at: rfc3339_opt(r.token_expires_at),
            previous_secret_valid_until: valid_until(r.previous_secret_expires_at),
            slack_team_id: r.slack_team_id.clone(),
            slack_team_name: r.slack_team_name.clone(),
            slack_bot_user_id: r.slack_bot_user_id.clone(),
            slack_enterprise_id: r.slack_enterprise_id.clone(),
            pylon_account_id: r.pylon_account_id.clone(),
            config: serde_json::from_str(&r.config).unwrap_or_else(|_| json!({})),
            webhook_url: if r.platform == "slack" && r.webhook_secret_enc.is_none() {
                // Verified with the app-level secret and routed by team: the plain URL.
                format!("{}/api/webhooks/slack/events", self.cfg.public_url)
            } else {
                self.webhook_url(&r.platform, &r.id)
            },
            last_used_at: rfc3339_opt(r.last_used_at),
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
            created_by: r.created_by.clone(),
        }
    }

    // ---------------------------------------------------------------- tokens

    /// Mints a workspace-scoped token (admin only); the token is in this response only.
    pub async fn create_token(
        &self,
        who: &Principal,
        ws: &str,
        name: Option<String>,
    ) -> ApiResult<TokenView> {
        // Another workspace stays 404 (tenant isolation); one's own is 403: a global action.
        self.workspace_visible(who, ws).await?;
        if who != &Principal::Admin {
            return Err(ApiError::Forbidden(
                "minting a workspace token needs the admin token (SIGNALBOX_ADMIN_TOKEN); \
                 a workspace-scoped token cannot do it"
                    .into(),
            ));
        }
        let token = crate::crypto::random_token("sbx_", 32);
        let t = ApiToken {
            id: new_id(prefix::TOKEN),
            workspace_id: ws.to_string(),
            name: name.as_deref().map(check_name).transpose()?,
            token_hash: sha256_hex(token.as_bytes()),
            created_at: now_micros(),
            revoked_at: None,
            last_used_at: None,
        };
        self.store.insert_api_token(&t).await?;
        self.store
            .log_activity(
                ws,
                Some(who.actor()),
                "token.created",
                "token",
                &t.id,
                &json!({}),
            )
            .await?;
        Ok(TokenView {
            token: Some(token),
            ..TokenView::from(&t)
        })
    }

    /// Lists a workspace's tokens (no token values).
    pub async fn list_tokens(&self, who: &Principal, ws: &str) -> ApiResult<Items<TokenView>> {
        self.workspace_visible(who, ws).await?;
        let items = self.store.list_api_tokens(ws).await?;
        Ok(Items {
            items: items.iter().map(TokenView::from).collect(),
        })
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, who: &Principal, id: &str) -> ApiResult<Done> {
        let t = self
            .store
            .get_api_token(id)
            .await?
            .filter(|t| who.can_see(&t.workspace_id))
            .ok_or_else(|| ApiError::not_found("token", id))?;
        self.store.revoke_api_token(id).await?;
        self.store
            .log_activity(
                &t.workspace_id,
                Some(who.actor()),
                "token.revoked",
                "token",
                id,
                &json!({}),
            )
            .await?;
        Ok(Done {
            ok: true,
            id: id.to_string(),
        })
    }

    /// Resolves a bearer token to a principal.
    pub async fn authenticate(&self, token: &str) -> ApiResult<Principal> {
        if let Some(admin) = &self.cfg.admin_token {
            use secrecy::ExposeSecret;
            // Compare digests so neither length nor content leaks through timing.
            if crate::protocol::ct_eq(
                &crate::protocol::hmac_sha256(b"auth", &[token.as_bytes()]),
                &crate::protocol::hmac_sha256(b"auth", &[admin.expose_secret().as_bytes()]),
            ) {
                return Ok(Principal::Admin);
            }
        }
        if token.starts_with("sbx_")
            && let Some(t) = self
                .store
                .find_api_token(&sha256_hex(token.as_bytes()))
                .await?
        {
            return Ok(Principal::Workspace {
                workspace_id: t.workspace_id,
                token_id: t.id,
            });
        }
        Err(ApiError::Unauthorized)
    }

    // ---------------------------------------------------------------- signals, deliveries, activity

    /// Lists signals with cursor pagination.
    pub async fn list_signals(
        &self,
        who: &Principal,
        f: SignalFilter,
    ) -> ApiResult<Page<SignalView>> {
        one_of("source", f.source.as_deref(), self.sources)?;
        one_of("status", f.status.as_deref(), SIGNAL_STATUSES)?;
        self.workspace_visible(who, &f.workspace_id).await?;
        check_limit(f.limit)?;
        let items = self.store.list_signals(&f).await?;
        Ok(Page::new(
            items.iter().map(SignalView::from).collect(),
            f.limit,
            |s| &s.id,
        ))
    }

    /// One signal.
    pub async fn get_signal(&self, who: &Principal, id: &str) -> ApiResult<SignalView> {
        let s = self
            .store
            .get_signal(id)
            .await?
            .filter(|s| who.can_see(&s.workspace_id))
            .ok_or_else(|| ApiError::not_found("signal", id))?;
        Ok(SignalView::from(&s))
    }

    /// Lists deliveries with cursor pagination.
    pub async fn list_deliveries(
        &self,
        who: &Principal,
        mut f: DeliveryFilter,
    ) -> ApiResult<Page<DeliveryView>> {
        one_of("source", f.source.as_deref(), self.sources)?;
        one_of("status", f.status.as_deref(), DELIVERY_STATUSES)?;
        if let Some(scope) = who.scope() {
            match &f.workspace_id {
                Some(ws) if ws != scope => return Err(ApiError::not_found("workspace", ws)),
                _ => f.workspace_id = Some(scope.to_string()),
            }
        }
        if let Some(s) = &f.status
            && crate::store::DeliveryStatus::parse(s).is_none()
        {
            return Err(ApiError::invalid(
                "status must be pending, processed, filtered, failed or dead",
            ));
        }
        check_limit(f.limit)?;
        let items = self.store.list_deliveries(&f).await?;
        Ok(Page::new(
            items.iter().map(DeliveryView::from).collect(),
            f.limit,
            |d| &d.id,
        ))
    }

    async fn delivery_visible(&self, who: &Principal, id: &str) -> ApiResult<Delivery> {
        self.store
            .get_delivery(id)
            .await?
            .filter(|d| match (who.scope(), &d.workspace_id) {
                (None, _) => true,
                (Some(s), Some(ws)) => s == ws,
                (Some(_), None) => false,
            })
            .ok_or_else(|| ApiError::not_found("delivery", id))
    }

    /// One delivery.
    pub async fn get_delivery(&self, who: &Principal, id: &str) -> ApiResult<DeliveryView> {
        Ok(DeliveryView::from(&self.delivery_visible(who, id).await?))
    }

    /// Re-runs a delivery.
    pub async fn replay_delivery(&self, who: &Principal, id: &str) -> ApiResult<DeliveryView> {
        let d = self.delivery_visible(who, id).await?;
        if d.workspace_id.is_none() {
            return Err(ApiError::Conflict(
                "this delivery has no workspace (it could not be routed); it cannot be replayed"
                    .into(),
            ));
        }
        if self.store.delivery_purged(id).await? {
            return Err(ApiError::Purged(
                "this delivery's body was purged (retention or erasure); it cannot be replayed",
            ));
        }
        self.store.replay_delivery(id).await?;
        if let Some(ws) = &d.workspace_id {
            self.store
                .log_activity(
                    ws,
                    Some(who.actor()),
                    "delivery.replayed",
                    "delivery",
                    id,
                    &json!({}),
                )
                .await?;
        }
        self.get_delivery(who, id).await
    }

    /// Activity of a workspace.
    pub async fn list_activity(
        &self,
        who: &Principal,
        ws: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> ApiResult<Page<ActivityView>> {
        self.workspace_visible(who, ws).await?;
        check_limit(limit)?;
        let items = self.store.list_activity(ws, limit, cursor).await?;
        Ok(Page::new(
            items.iter().map(ActivityView::from).collect(),
            limit,
            |a| &a.id,
        ))
    }
}

impl Admin {
    // ---------------------------------------------------------------- retention and erasure

    /// The raw body of a delivery as received and its content type (the kept `content-type`
    /// header, else `application/octet-stream`); `410 purged` once retention or an erasure
    /// removed it.
    pub async fn delivery_body(&self, who: &Principal, id: &str) -> ApiResult<(String, Vec<u8>)> {
        self.delivery_visible(who, id).await?;
        let b = self
            .store
            .delivery_body(id)
            .await?
            .ok_or_else(|| ApiError::not_found("delivery", id))?;
        if b.purged_at.is_some() {
            return Err(ApiError::Purged(
                "this delivery's body was purged (retention or erasure)",
            ));
        }
        let content_type = serde_json::from_str::<Value>(&b.headers)
            .ok()
            .and_then(|h| h.get("content-type")?.as_str().map(str::to_string))
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "application/octet-stream".to_string());
        Ok((content_type, b.body))
    }

    /// Erases one signal: the signal, the bodies and headers of its deliveries and the text in
    /// its activity entries; logs `signal.erased`.
    pub async fn erase_signal(&self, who: &Principal, id: &str) -> ApiResult<()> {
        let s = self
            .store
            .get_signal(id)
            .await?
            .filter(|s| who.can_see(&s.workspace_id))
            .ok_or_else(|| ApiError::not_found("signal", id))?;
        self.store
            .erase_signals(&s.workspace_id, std::slice::from_ref(&s.id), who.actor())
            .await?;
        Ok(())
    }

    /// Erases everything about one customer email in a workspace: every signal whose metadata
    /// names it as the customer, as [`Admin::erase_signal`] does; logs `workspace.erasure`
    /// with the counts (never the email).
    pub async fn erase_customer(
        &self,
        who: &Principal,
        ws: &str,
        customer_email: &str,
    ) -> ApiResult<ErasureView> {
        self.workspace_visible(who, ws).await?;
        let email = customer_email.trim();
        if email.is_empty() || email.len() > 320 {
            return Err(ApiError::invalid(
                "customer_email must be a non-empty string of at most 320 characters",
            ));
        }
        let ids = self.store.signals_with_customer_email(ws, email).await?;
        let erased = self.store.erase_signals(ws, &ids, who.actor()).await?;
        let counts = ErasureView {
            signals_erased: erased.signals,
            deliveries_purged: erased.deliveries,
        };
        self.store
            .log_activity(
                ws,
                Some(who.actor()),
                "workspace.erasure",
                "workspace",
                ws,
                &json!(counts),
            )
            .await?;
        Ok(counts)
    }
}

/// Largest page a list answers.
pub const MAX_LIMIT: usize = 500;

/// A page size out of range is refused rather than quietly clamped: the caller would
/// otherwise page with a size it did not ask for.
fn check_limit(limit: usize) -> ApiResult<()> {
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(format!(
            "limit must be between 1 and {MAX_LIMIT} (got {limit})"
        )))
    }
}
