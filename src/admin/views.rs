//! What the admin API answers: one typed view per resource. Each is serialised as the JSON the
//! contract shows and described in the OpenAPI document by the same type, so the two cannot
//! drift. A view never holds a stored secret; the two one-time values (a new webhook key's
//! `secret`, a new token's `token`) are set only on the answer that creates them.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::clock::{now_micros, rfc3339, rfc3339_opt};
use crate::store::{Activity, ApiToken, Delivery, Signal, Workspace};

/// The contract's error body: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A stable code and a message meant for the caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`invalid_request`, `not_found`, `stale_timestamp`, …).
    #[schema(example = "not_found")]
    pub code: String,
    /// What went wrong, naming the field, id or window that helps.
    #[schema(example = "workspace ws_01J… not found")]
    pub message: String,
}

/// A list without paging.
#[derive(Debug, Serialize, ToSchema)]
pub struct Items<T> {
    /// The items.
    pub items: Vec<T>,
}

/// One page of a list, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page of at most `limit` items: a full page has a cursor (the last item's id).
    pub fn new(items: Vec<T>, limit: usize, id: impl Fn(&T) -> &str) -> Self {
        let next_cursor = (items.len() == limit)
            .then(|| items.last().map(|i| id(i).to_string()))
            .flatten();
        Page { items, next_cursor }
    }
}

/// The answer of a delete or revoke.
#[derive(Debug, Serialize, ToSchema)]
pub struct Done {
    /// Always `true`.
    pub ok: bool,
    /// The id acted on.
    pub id: String,
}

/// A workspace.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceView {
    /// `ws_…`
    pub id: String,
    /// Display name.
    pub name: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// This workspace's own retention (`keep`, or a duration such as `30d`); `null`: the server's.
    pub retention: Option<String>,
    /// What applies: `keep` (nothing purged) or a duration.
    pub effective_retention: String,
}

impl WorkspaceView {
    /// The view of `w` on a server whose default retention is `server`.
    pub fn new(w: &Workspace, server: Option<std::time::Duration>) -> Self {
        WorkspaceView {
            id: w.id.clone(),
            name: w.name.clone(),
            created_at: rfc3339(w.created_at),
            retention: w.retention_secs.map(crate::admin::format_retention),
            effective_retention: crate::admin::format_retention(crate::admin::duration_secs(
                w.retention(server),
            )),
        }
    }
}

/// A generic webhook key (Standard Webhooks).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookKeyView {
    /// `whk_…`
    pub id: String,
    /// `ws_…`
    pub workspace_id: String,
    /// Optional label.
    pub name: Option<String>,
    /// `false` once deleted.
    pub is_active: bool,
    /// Where senders POST.
    pub webhook_url: String,
    /// Until when the secret before the last rotation still verifies; `null` when none does.
    #[schema(format = DateTime)]
    pub previous_secret_valid_until: Option<String>,
    /// Last verified delivery.
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// `whsec_…`: only in the answer that creates or rotates the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// An integration (never a secret or token: `has_*` says which are set).
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationView {
    /// `int_…`
    pub id: String,
    /// `ws_…`
    pub workspace_id: String,
    /// `slack` or `pylon`.
    #[schema(example = "slack")]
    pub platform: String,
    /// Display name.
    pub name: String,
    /// Deliveries are accepted only while active.
    pub is_active: bool,
    /// Slack refused the token; reinstall the app.
    pub needs_reauth: bool,
    /// A signing/webhook secret is set.
    pub has_webhook_secret: bool,
    /// A bot/API token is set.
    pub has_access_token: bool,
    /// A refresh token is set (Slack token rotation).
    pub has_refresh_token: bool,
    /// The value of `config.required_header` is set.
    pub has_required_header_value: bool,
    /// When the access token expires (Slack token rotation).
    #[schema(format = DateTime)]
    pub token_expires_at: Option<String>,
    /// Until when the secret before the last rotation still verifies.
    #[schema(format = DateTime)]
    pub previous_secret_valid_until: Option<String>,
    /// Slack team (`T…`).
    pub slack_team_id: Option<String>,
    /// Slack team name.
    pub slack_team_name: Option<String>,
    /// The app's bot user (its own messages are filtered).
    pub slack_bot_user_id: Option<String>,
    /// Enterprise Grid organisation (`E…`).
    pub slack_enterprise_id: Option<String>,
    /// Pylon account.
    pub pylon_account_id: Option<String>,
    /// Platform settings (`slack_channels`, `channel_types`; `pylon_events`,
    /// `signature_scheme`, `required_header`).
    #[schema(value_type = Object)]
    pub config: Value,
    /// The URL to paste into the platform.
    pub webhook_url: String,
    /// Last verified delivery.
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// `admin`, `token:tok_…` or `oauth`.
    pub created_by: Option<String>,
}

/// A workspace-scoped API token (never the token after creation).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    /// `tok_…`
    pub id: String,
    /// `ws_…`
    pub workspace_id: String,
    /// Optional label.
    pub name: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Set once revoked.
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
    /// `sbx_…`: only in the answer that creates it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl From<&ApiToken> for TokenView {
    fn from(t: &ApiToken) -> Self {
        TokenView {
            id: t.id.clone(),
            workspace_id: t.workspace_id.clone(),
            name: t.name.clone(),
            created_at: rfc3339(t.created_at),
            revoked_at: rfc3339_opt(t.revoked_at),
            token: None,
        }
    }
}

/// A signal: one customer message.
#[derive(Debug, Serialize, ToSchema)]
pub struct SignalView {
    /// `sig_…`
    pub id: String,
    /// `ws_…`
    pub workspace_id: String,
    /// The customer's words.
    pub verbatim: String,
    /// `slack`, `pylon` or `webhook`.
    pub source: String,
    /// The source's id of the message (unique per workspace and source).
    pub source_ref: String,
    /// Source details (channel, author, ticket, customer, …).
    #[schema(value_type = Object)]
    pub source_metadata: Value,
    /// `new`, `triaged`, `archived` or `deleted`.
    pub status: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
}

impl From<&Signal> for SignalView {
    fn from(s: &Signal) -> Self {
        SignalView {
            id: s.id.clone(),
            workspace_id: s.workspace_id.clone(),
            verbatim: s.verbatim.clone(),
            source: s.source.clone(),
            source_ref: s.source_ref.clone(),
            source_metadata: object(&s.source_metadata),
            status: s.status.clone(),
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
        }
    }
}

/// One received webhook request and what became of it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    /// `dlv_…`
    pub id: String,
    /// `null` when the request could not be routed to a workspace.
    pub workspace_id: Option<String>,
    /// The integration it came through (Slack, Pylon).
    pub integration_id: Option<String>,
    /// The webhook key it came through (generic endpoint).
    pub webhook_key_id: Option<String>,
    /// `slack`, `pylon` or `webhook`.
    pub source: String,
    /// What makes a resend the same delivery.
    pub dedupe_key: String,
    /// `pending`, `processed`, `filtered`, `failed` or `dead`.
    pub status: String,
    /// Processing attempts so far.
    pub attempts: i32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Why it made no signal (`filtered`).
    pub filter_reason: Option<String>,
    /// The signal it made or changed.
    pub signal_id: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub received_at: String,
    /// When it was processed.
    #[schema(format = DateTime)]
    pub processed_at: Option<String>,
}

impl From<&Delivery> for DeliveryView {
    fn from(d: &Delivery) -> Self {
        DeliveryView {
            id: d.id.clone(),
            workspace_id: d.workspace_id.clone(),
            integration_id: d.integration_id.clone(),
            webhook_key_id: d.webhook_key_id.clone(),
            source: d.source.clone(),
            dedupe_key: d.dedupe_key.clone(),
            status: d.status.clone(),
            attempts: d.attempts,
            last_error: d.last_error.clone(),
            filter_reason: d.filter_reason.clone(),
            signal_id: d.signal_id.clone(),
            received_at: rfc3339(d.received_at),
            processed_at: rfc3339_opt(d.processed_at),
        }
    }
}

/// An activity-log entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityView {
    /// `act_…`
    pub id: String,
    /// `ws_…`
    pub workspace_id: String,
    /// Who did it (`admin`, `token:tok_…`, `worker`, …); `null` for the system.
    pub actor: Option<String>,
    /// e.g. `signal.created`, `integration.updated`.
    pub action: String,
    /// e.g. `signal`, `integration`.
    pub target_type: String,
    /// The target's id.
    pub target_id: String,
    /// Details of the change.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl From<&Activity> for ActivityView {
    fn from(a: &Activity) -> Self {
        ActivityView {
            id: a.id.clone(),
            workspace_id: a.workspace_id.clone(),
            actor: a.actor.clone(),
            action: a.action.clone(),
            target_type: a.target_type.clone(),
            target_id: a.target_id.clone(),
            metadata: object(&a.metadata),
            created_at: rfc3339(a.created_at),
        }
    }
}

/// What a customer erasure removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasureView {
    /// Signals deleted.
    pub signals_erased: u64,
    /// Deliveries whose body and headers were purged.
    pub deliveries_purged: u64,
}

/// A stored JSON object column, `{}` when it does not parse (it always does: we wrote it).
fn object(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::Object(Default::default()))
}

/// A previous secret's expiry as shown: only while it is still in the future.
pub fn valid_until(expires_at: Option<i64>) -> Option<String> {
    rfc3339_opt(expires_at.filter(|t| *t > now_micros()))
}
