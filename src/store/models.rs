//! Row types, shared by both backends (`FromRow` is derived generically over the row type).

use std::sync::Arc;

use bytes::Bytes;

/// What the receiver already parsed of a delivery's body, carried with it in memory to a local
/// worker so that the body is not parsed twice. Never stored: a delivery claimed from the
/// database has none, and its source parses the stored body with the same function the
/// receiver used ([`ClaimedDelivery::json`], [`ClaimedDelivery::slack_envelope`]).
#[derive(Clone, Default)]
pub enum Parsed {
    /// Nothing carried (claimed from the database, or a receiver that does not parse).
    #[default]
    None,
    /// The body as JSON (Pylon and generic webhooks).
    Json(Arc<serde_json::Value>),
    /// A Slack Events API envelope.
    SlackEnvelope(Arc<crate::protocol::slack::Envelope>),
}

impl Parsed {
    fn kind(&self) -> &'static str {
        match self {
            Parsed::None => "none",
            Parsed::Json(_) => "JSON",
            Parsed::SlackEnvelope(_) => "Slack envelope",
        }
    }
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Parsed({})", self.kind())
    }
}

/// A tenant: owns integrations, webhook keys, deliveries and signals.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Workspace {
    /// `ws_…`
    pub id: String,
    /// Display name.
    pub name: String,
    /// How long this workspace's bodies, headers and activity are kept, in seconds: `None`
    /// follows `SIGNALBOX_RETENTION`, `Some(0)` keeps everything.
    pub retention_secs: Option<i64>,
    /// Unix µs.
    pub created_at: i64,
    /// Unix µs.
    pub updated_at: i64,
}

impl Workspace {
    /// How long this workspace's bodies, headers and activity are kept when the server keeps
    /// them for `server` (`SIGNALBOX_RETENTION`; `None`: forever). `None`: kept forever.
    pub fn retention(&self, server: Option<std::time::Duration>) -> Option<std::time::Duration> {
        match self.retention_secs {
            None => server,
            Some(s) if s <= 0 => None,
            Some(s) => Some(std::time::Duration::from_secs(s.unsigned_abs())),
        }
    }
}

/// A generic webhook key (Standard Webhooks secret, encrypted).
#[derive(Clone, sqlx::FromRow)]
pub struct WebhookKey {
    /// `whk_…`
    pub id: String,
    /// Owner.
    pub workspace_id: String,
    /// Optional label.
    pub name: Option<String>,
    /// Envelope of the `whsec_…` secret.
    pub secret_enc: String,
    /// Envelope of the previous secret during a rotation grace period.
    pub previous_secret_enc: Option<String>,
    /// End of the grace period (Unix µs).
    pub previous_expires_at: Option<i64>,
    /// False once deleted.
    pub is_active: bool,
    /// Unix µs.
    pub last_used_at: Option<i64>,
    /// Unix µs.
    pub created_at: i64,
    /// Unix µs.
    pub updated_at: i64,
}

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookKey")
            .field("id", &self.id)
            .field("workspace_id", &self.workspace_id)
            .field("is_active", &self.is_active)
            .finish_non_exhaustive()
    }
}

/// A connected Slack team or Pylon account. Secret columns hold encryption envelopes.
#[derive(Clone, Default, sqlx::FromRow)]
pub struct Integration {
    /// `int_…`
    pub id: String,
    /// Owner.
    pub workspace_id: String,
    /// `slack` or `pylon`.
    pub platform: String,
    /// Display name.
    pub name: String,
    /// Slack signing secret / Pylon webhook secret (envelope).
    pub webhook_secret_enc: Option<String>,
    /// Previous secret during a rotation grace period (envelope).
    pub previous_webhook_secret_enc: Option<String>,
    /// End of that grace period (Unix µs).
    pub previous_secret_expires_at: Option<i64>,
    /// Slack bot token / Pylon API token (envelope).
    pub access_token_enc: Option<String>,
    /// Slack refresh token (envelope).
    pub refresh_token_enc: Option<String>,
    /// Access token expiry (Unix µs).
    pub token_expires_at: Option<i64>,
    /// Value of a required shared header (envelope).
    pub required_header_value_enc: Option<String>,
    /// Slack team id.
    pub slack_team_id: Option<String>,
    /// Slack team name.
    pub slack_team_name: Option<String>,
    /// The app's bot user in that team.
    pub slack_bot_user_id: Option<String>,
    /// Enterprise Grid id.
    pub slack_enterprise_id: Option<String>,
    /// Slack app id.
    pub slack_app_id: Option<String>,
    /// Granted scopes.
    pub slack_scopes: Option<String>,
    /// Pylon account id.
    pub pylon_account_id: Option<String>,
    /// Accepting deliveries.
    pub is_active: bool,
    /// Token refresh failed; an admin must re-install.
    pub needs_reauth: bool,
    /// Platform config (JSON object text).
    pub config: String,
    /// Unix µs.
    pub last_used_at: Option<i64>,
    /// Unix µs.
    pub created_at: i64,
    /// Unix µs.
    pub updated_at: i64,
    /// Who created it (`admin`, `tok_…`, `oauth`).
    pub created_by: Option<String>,
}

impl std::fmt::Debug for Integration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integration")
            .field("id", &self.id)
            .field("workspace_id", &self.workspace_id)
            .field("platform", &self.platform)
            .field("is_active", &self.is_active)
            .finish_non_exhaustive()
    }
}

/// A workspace-scoped API token (only its SHA-256 is stored).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiToken {
    /// `tok_…`
    pub id: String,
    /// The only workspace it can see.
    pub workspace_id: String,
    /// Label.
    pub name: Option<String>,
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    /// Unix µs.
    pub created_at: i64,
    /// Unix µs.
    pub revoked_at: Option<i64>,
    /// Unix µs.
    pub last_used_at: Option<i64>,
}

/// Status of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for (or being processed by) a worker.
    Pending,
    /// Became (or updated) a signal.
    Processed,
    /// Deliberately not a signal; `filter_reason` says why.
    Filtered,
    /// Can never become a signal; `last_error` says why.
    Failed,
    /// Gave up after the maximum number of attempts.
    Dead,
}

impl DeliveryStatus {
    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Processed => "processed",
            DeliveryStatus::Filtered => "filtered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Dead => "dead",
        }
    }

    /// Parses a stored/queried status.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => DeliveryStatus::Pending,
            "processed" => DeliveryStatus::Processed,
            "filtered" => DeliveryStatus::Filtered,
            "failed" => DeliveryStatus::Failed,
            "dead" => DeliveryStatus::Dead,
            _ => return None,
        })
    }
}

/// A delivery to store.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// `dlv_…`
    pub id: String,
    /// Owner, when known (unroutable Slack events have none).
    pub workspace_id: Option<String>,
    /// The integration it came through.
    pub integration_id: Option<String>,
    /// The generic webhook key it came through.
    pub webhook_key_id: Option<String>,
    /// `webhook`, `slack` or `pylon`.
    pub source: String,
    /// Who the dedupe key is unique for (key id, integration id, `slack:{app}`).
    pub dedupe_scope: String,
    /// The sender's idempotency key.
    pub dedupe_key: String,
    /// The raw body, exactly as signed (shared with the request's buffer, not copied).
    pub body: Bytes,
    /// The headers that matter (JSON object text, never signatures).
    pub headers: String,
    /// `Pending`, or `Filtered` when decided at the edge.
    pub status: DeliveryStatus,
    /// Why it was filtered at the edge.
    pub filter_reason: Option<String>,
    /// Unix µs.
    pub received_at: i64,
    /// The receiver's parse of `body`, for a local worker (see [`Parsed`]).
    pub parsed: Parsed,
    /// The delivery's outcome, when its receiver could decide it without any I/O (the source's
    /// worker step would call no API). The inbox commits it in the same transaction as the row
    /// (see `Store::insert_and_finish`), so no worker runs for it. Never stored as such.
    pub outcome: Option<crate::protocol::Effect>,
}

/// A delivery as listed by the API (no body).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Delivery {
    /// `dlv_…`
    pub id: String,
    /// Owner.
    pub workspace_id: Option<String>,
    /// Integration.
    pub integration_id: Option<String>,
    /// Webhook key.
    pub webhook_key_id: Option<String>,
    /// Source.
    pub source: String,
    /// Dedupe key.
    pub dedupe_key: String,
    /// Status string.
    pub status: String,
    /// Attempts so far.
    pub attempts: i32,
    /// Last error.
    pub last_error: Option<String>,
    /// Why filtered.
    pub filter_reason: Option<String>,
    /// Resulting signal.
    pub signal_id: Option<String>,
    /// Unix µs.
    pub received_at: i64,
    /// Unix µs.
    pub processed_at: Option<i64>,
}

/// A delivery claimed by a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    /// `dlv_…`
    pub id: String,
    /// Owner.
    pub workspace_id: Option<String>,
    /// Integration.
    pub integration_id: Option<String>,
    /// Webhook key.
    pub webhook_key_id: Option<String>,
    /// Source.
    pub source: String,
    /// Dedupe key.
    pub dedupe_key: String,
    /// Raw body.
    #[sqlx(try_from = "Vec<u8>")]
    pub body: Bytes,
    /// Stored headers (JSON text).
    pub headers: String,
    /// Attempts including this one.
    pub attempts: i32,
    /// Unix µs.
    pub received_at: i64,
    /// The receiver's parse of `body` when it was handed over in memory; none when claimed.
    #[sqlx(skip)]
    pub parsed: Parsed,
}

impl ClaimedDelivery {
    /// `d` as a claim would return it on its first attempt (for a row leased at insert).
    pub fn first_attempt(d: NewDelivery) -> ClaimedDelivery {
        ClaimedDelivery {
            id: d.id,
            workspace_id: d.workspace_id,
            integration_id: d.integration_id,
            webhook_key_id: d.webhook_key_id,
            source: d.source,
            dedupe_key: d.dedupe_key,
            body: d.body,
            headers: d.headers,
            attempts: 1,
            received_at: d.received_at,
            parsed: d.parsed,
        }
    }

    /// The body as JSON: the receiver's parse when it came with the delivery, else parsed from
    /// the stored body.
    pub fn json(&self) -> Result<Arc<serde_json::Value>, serde_json::Error> {
        match &self.parsed {
            Parsed::Json(v) => Ok(v.clone()),
            other => {
                self.unexpected(other, "JSON");
                serde_json::from_slice(&self.body).map(Arc::new)
            }
        }
    }

    /// The Slack envelope: the receiver's parse when it came with the delivery, else parsed
    /// from the stored body with the receiver's own function.
    pub fn slack_envelope(&self) -> Result<Arc<crate::protocol::slack::Envelope>, String> {
        match &self.parsed {
            Parsed::SlackEnvelope(e) => Ok(e.clone()),
            other => {
                self.unexpected(other, "Slack envelope");
                crate::protocol::slack::parse_envelope(&self.body).map(Arc::new)
            }
        }
    }

    /// A carried parse of another kind than the source's is a bug in a receiver: said loudly
    /// (the body is parsed again, so the outcome is still right).
    fn unexpected(&self, carried: &Parsed, wanted: &str) {
        if !matches!(carried, Parsed::None) {
            tracing::error!(
                delivery_id = %self.id,
                source = %self.source,
                carried = carried.kind(),
                wanted,
                "a receiver handed over a parse of the wrong kind; parsing the stored body"
            );
            debug_assert!(
                false,
                "{} carried {} instead of {wanted}",
                self.source,
                carried.kind()
            );
        }
    }
}

/// A signal.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Signal {
    /// `sig_…`
    pub id: String,
    /// Owner.
    pub workspace_id: String,
    /// Readable text.
    pub verbatim: String,
    /// `slack`, `pylon`, `webhook`.
    pub source: String,
    /// Dedupe key within workspace and source.
    pub source_ref: String,
    /// JSON object text.
    pub source_metadata: String,
    /// Triage status (`new`).
    pub status: String,
    /// Unix µs.
    pub created_at: i64,
    /// Unix µs.
    pub updated_at: i64,
}

/// An activity-log entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Activity {
    /// `act_…`
    pub id: String,
    /// Owner.
    pub workspace_id: String,
    /// Who did it (`worker`, `admin`, `tok_…`, `slack`…).
    pub actor: Option<String>,
    /// `signal.created`, `signal.updated`, …
    pub action: String,
    /// `signal`, `integration`, …
    pub target_type: String,
    /// Id of the target.
    pub target_id: String,
    /// JSON object text.
    pub metadata: String,
    /// Unix µs.
    pub created_at: i64,
}

/// Filters for listing deliveries.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// Only this workspace.
    pub workspace_id: Option<String>,
    /// Only this integration.
    pub integration_id: Option<String>,
    /// Only this status.
    pub status: Option<String>,
    /// Only this source.
    pub source: Option<String>,
    /// Ids below this one (pagination).
    pub cursor: Option<String>,
    /// Page size.
    pub limit: usize,
}

/// Filters for listing signals.
#[derive(Debug, Clone, Default)]
pub struct SignalFilter {
    /// The workspace.
    pub workspace_id: String,
    /// Only this source.
    pub source: Option<String>,
    /// Only this status.
    pub status: Option<String>,
    /// Ids below this one (pagination).
    pub cursor: Option<String>,
    /// Page size.
    pub limit: usize,
}

/// Tables with a `last_used_at` column.
#[derive(Debug, Clone, Copy)]
pub enum LastUsedTable {
    /// `webhook_keys`
    WebhookKeys,
    /// `integrations`
    Integrations,
}

/// Every encrypted column, as (table, column).
pub const ENCRYPTED_COLUMNS: &[(&str, &str)] = &[
    ("webhook_keys", "secret_enc"),
    ("webhook_keys", "previous_secret_enc"),
    ("integrations", "webhook_secret_enc"),
    ("integrations", "previous_webhook_secret_enc"),
    ("integrations", "access_token_enc"),
    ("integrations", "refresh_token_enc"),
    ("integrations", "required_header_value_enc"),
];

pub(crate) fn encrypted_select_sql(table: &str, column: &str) -> String {
    format!("SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL")
}

/// One stored encrypted value.
#[derive(Clone)]
pub struct EncryptedValue {
    /// Table.
    pub table: &'static str,
    /// Column.
    pub column: &'static str,
    /// Row id (bound into the AEAD associated data).
    pub row_id: String,
    /// The envelope.
    pub value: String,
}

impl std::fmt::Debug for EncryptedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}[{}]", self.table, self.column, self.row_id)
    }
}
