//! Pylon (usepylon.com) webhooks: signature verification, flexible payload parsing and
//! normalisation of a ticket or message into an [`Effect`].
//!
//! Pylon's "Send webhook" trigger action posts a JSON body the customer writes with
//! `{{ issue.* }}` template variables, so there is no fixed schema: [`parse`] accepts the issue
//! under `data`, under `issue`, at the top level or flattened into `issue_*` keys. Pylon signs the
//! raw body with `X-Pylon-Signature` (hex HMAC-SHA256, no timestamp); the timestamped
//! `Pylon-Webhook-Signature: hs256=` scheme (another company's) is supported behind config.

use serde_json::{Map, Value, json};

use super::effect::NO_CONTENT;
use super::html::html_to_text;
use super::{Effect, Merge, NewSignal, SignatureError, check_timestamp, ct_eq, hmac_sha256};

// ---------------------------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------------------------

/// Which signature a Pylon integration expects (integration config `signature_scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    /// `Pylon-Webhook-Signature` when present, else `X-Pylon-Signature`.
    #[default]
    Auto,
    /// `X-Pylon-Signature`: lowercase hex HMAC-SHA256(secret, raw body) (usepylon.com).
    XPylonSignature,
    /// `Pylon-Webhook-Signature: hs256=<hex>` over `"{timestamp}.{body}"` with
    /// `Pylon-Webhook-Timestamp`.
    Timestamped,
}

impl Scheme {
    /// Parses a config value: `"auto"`, `"x-pylon-signature"` or `"timestamped"` (ASCII case and
    /// surrounding whitespace ignored).
    pub fn parse(s: &str) -> Option<Scheme> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Scheme::Auto),
            "x-pylon-signature" => Some(Scheme::XPylonSignature),
            "timestamped" => Some(Scheme::Timestamped),
            _ => None,
        }
    }

    /// The config spelling of this scheme (round-trips through [`Scheme::parse`]).
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Auto => "auto",
            Scheme::XPylonSignature => "x-pylon-signature",
            Scheme::Timestamped => "timestamped",
        }
    }
}

/// The headers that matter (caller extracts them; values as received).
#[derive(Debug, Clone, Default)]
pub struct SignatureHeaders<'a> {
    /// `X-Pylon-Signature`.
    pub x_pylon_signature: Option<&'a str>,
    /// `Pylon-Webhook-Signature`.
    pub webhook_signature: Option<&'a str>,
    /// `Pylon-Webhook-Timestamp`.
    pub webhook_timestamp: Option<&'a str>,
}

/// Max `hs256=` entries looked at in one `Pylon-Webhook-Signature` header.
const MAX_SIGNATURE_ENTRIES: usize = 8;

/// A header value trimmed, `None` when absent or blank.
fn present(header: Option<&str>) -> Option<&str> {
    header.map(str::trim).filter(|s| !s.is_empty())
}

/// Exactly 64 hex digits (either case) to 32 bytes.
fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// True when HMAC-SHA256 of `parts` under any of `secrets` equals any of `expected`. Every
/// comparison runs (no early exit on a match).
fn any_secret_matches(secrets: &[&[u8]], parts: &[&[u8]], expected: &[[u8; 32]]) -> bool {
    let mut ok = false;
    for secret in secrets {
        let mac = hmac_sha256(secret, parts);
        for candidate in expected {
            ok |= ct_eq(&mac, candidate);
        }
    }
    ok
}

/// Verifies a delivery. `secrets`: all currently valid secrets (rotation grace: any may match).
///
/// - [`Scheme::XPylonSignature`]: the header must be 64 hex chars (case-insensitive) equal to
///   HMAC-SHA256(secret, body). Missing/empty is [`SignatureError::Missing`]; malformed or not
///   matching is [`SignatureError::Invalid`].
/// - [`Scheme::Timestamped`]: `Pylon-Webhook-Signature: hs256=<hex>` (several entries separated
///   by commas or spaces are allowed; any may match) over `"{ts}.{body}"`, `ts` being the
///   `Pylon-Webhook-Timestamp` header as sent, checked by [`check_timestamp`] against `now` and
///   `tolerance_secs` (Missing / Invalid / Stale).
/// - [`Scheme::Auto`]: a non-blank `Pylon-Webhook-Signature` selects Timestamped (it wins when
///   both are present), else a non-blank `X-Pylon-Signature` selects XPylonSignature, else
///   Missing.
///
/// With no secrets configured every signature is [`SignatureError::Invalid`].
pub fn verify(
    scheme: Scheme,
    secrets: &[&[u8]],
    h: &SignatureHeaders<'_>,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let scheme = match scheme {
        Scheme::Auto if present(h.webhook_signature).is_some() => Scheme::Timestamped,
        Scheme::Auto if present(h.x_pylon_signature).is_some() => Scheme::XPylonSignature,
        Scheme::Auto => return Err(SignatureError::Missing),
        other => other,
    };
    if scheme == Scheme::XPylonSignature {
        let sig = present(h.x_pylon_signature).ok_or(SignatureError::Missing)?;
        let expected = decode_hex32(sig).ok_or(SignatureError::Invalid)?;
        return if any_secret_matches(secrets, &[body], &[expected]) {
            Ok(())
        } else {
            Err(SignatureError::Invalid)
        };
    }
    let sig = present(h.webhook_signature).ok_or(SignatureError::Missing)?;
    check_timestamp(h.webhook_timestamp, now, tolerance_secs)?;
    let ts = present(h.webhook_timestamp).ok_or(SignatureError::Missing)?;
    let expected: Vec<[u8; 32]> = sig
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|part| !part.is_empty())
        .take(MAX_SIGNATURE_ENTRIES)
        .filter_map(|part| {
            let (name, hex) = part.split_once('=')?;
            if name.eq_ignore_ascii_case("hs256") {
                decode_hex32(hex)
            } else {
                None
            }
        })
        .collect();
    if expected.is_empty() {
        return Err(SignatureError::Invalid);
    }
    if any_secret_matches(secrets, &[ts.as_bytes(), b".", body], &expected) {
        Ok(())
    } else {
        Err(SignatureError::Invalid)
    }
}

/// `X-Pylon-Signature` value for `body`: lowercase hex HMAC-SHA256(secret, body). For tests, the
/// CLI and benchmarks.
pub fn sign_x_pylon(secret: &[u8], body: &[u8]) -> String {
    hex::encode(hmac_sha256(secret, &[body]))
}

/// `Pylon-Webhook-Signature` value for `body` sent with timestamp `ts`: `"hs256=<hex>"` of
/// HMAC-SHA256(secret, "{ts}.{body}"). For tests, the CLI and benchmarks.
pub fn sign_timestamped(secret: &[u8], ts: i64, body: &[u8]) -> String {
    let ts = ts.to_string();
    format!(
        "hs256={}",
        hex::encode(hmac_sha256(secret, &[ts.as_bytes(), b".", body]))
    )
}

/// Dedupe key for a delivery: `"sha256:" + sha256_hex(body)`. `X-Pylon-Signature` has no
/// timestamp, so identical replays must be duplicates.
pub fn dedupe_key(body: &[u8]) -> String {
    format!("sha256:{}", super::sha256_hex(body))
}

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

/// A ticket as far as the payload (or the API) tells.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Issue {
    /// Pylon issue id (required).
    pub id: String,
    /// Human-readable issue number.
    pub number: Option<i64>,
    /// Title.
    pub title: Option<String>,
    /// Body (the first message) as HTML.
    pub body_html: Option<String>,
    /// State (`new`, `waiting_on_you`, `waiting_on_customer`, `on_hold`, `closed`, ...).
    pub state: Option<String>,
    /// Priority (`urgent`, `high`, `medium`, `low`, or a custom value).
    pub priority: Option<String>,
    /// App link to the issue.
    pub link: Option<String>,
    /// Requester's email.
    pub requester_email: Option<String>,
    /// Requester's name.
    pub requester_name: Option<String>,
    /// Account id.
    pub account_id: Option<String>,
    /// Account name.
    pub account_name: Option<String>,
    /// Assignee (email when known, else id).
    pub assignee: Option<String>,
    /// Team (name when known, else id).
    pub team: Option<String>,
    /// Tags (trimmed, deduplicated, in order).
    pub tags: Vec<String>,
    /// Channel the issue came from (`slack`, `email`, `form`, ...).
    pub source: Option<String>,
    /// Creation time as sent (RFC 3339 from the API).
    pub created_at: Option<String>,
}

/// A message on an issue (a reply or an internal note).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// Pylon message id (required).
    pub id: String,
    /// Body as HTML.
    pub body_html: Option<String>,
    /// Internal note (never becomes a signal).
    pub is_private: bool,
    /// Author's name.
    pub author_name: Option<String>,
    /// Author's email.
    pub author_email: Option<String>,
    /// Send time as sent.
    pub sent_at: Option<String>,
}

/// A parsed delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// Event name from `event` / `event_type` / `type`.
    pub event: Option<String>,
    /// The issue.
    pub issue: Issue,
    /// The message, when the payload carries one with an id.
    pub message: Option<Message>,
}

/// A non-blank string (trimmed) or number as text. Blank strings and unfilled `{{ ... }}`
/// template variables count as absent.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => {
            let t = s.trim();
            let unfilled = t.starts_with("{{") && t.ends_with("}}");
            (!t.is_empty() && !unfilled).then(|| t.to_string())
        }
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An integer given as a JSON integer, an integral float or a string (`"42"`, `"#42"`).
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().trim_start_matches('#').parse().ok(),
        _ => None,
    }
}

/// A boolean given as a JSON bool, `"true"`/`"false"`/`"1"`/`"0"`/`"yes"`/`"no"` or 1/0.
fn boolean(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().and_then(|i| match i {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// The first present value among `candidates`.
fn first<T>(candidates: impl IntoIterator<Item = Option<T>>) -> Option<T> {
    candidates.into_iter().flatten().next()
}

/// Someone or something referenced by an issue: an object `{id, email, name}` or a string.
#[derive(Default)]
struct Party {
    id: Option<String>,
    email: Option<String>,
    name: Option<String>,
    /// The value when it was a plain string or number.
    plain: Option<String>,
}

fn party(v: Option<&Value>) -> Party {
    match v {
        Some(Value::Object(o)) => {
            let full_name = match (text(o.get("first_name")), text(o.get("last_name"))) {
                (Some(f), Some(l)) => Some(format!("{f} {l}")),
                (f, l) => f.or(l),
            };
            let nested_email = |key: &str| text(o.get(key).and_then(|c| c.get("email")));
            Party {
                id: text(o.get("id")),
                email: first([
                    text(o.get("email")),
                    nested_email("contact"),
                    nested_email("user"),
                ]),
                name: first([text(o.get("name")), text(o.get("display_name")), full_name]),
                plain: None,
            }
        }
        other => Party {
            plain: text(other),
            ..Party::default()
        },
    }
}

/// True for a UUID-shaped string (Pylon ids are UUIDs).
fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Max tags kept per issue.
const MAX_TAGS: usize = 256;

/// Tags: an array of strings/numbers or of objects with `name`/`value`/`label`, a
/// comma-separated string, or a string holding a JSON array. Trimmed, blank ones and duplicates
/// dropped, at most [`MAX_TAGS`].
fn tags(v: Option<&Value>) -> Vec<String> {
    let items: Vec<Option<String>> = match v {
        Some(Value::Array(items)) => items.iter().map(tag_of).collect(),
        Some(Value::String(s)) => {
            let t = s.trim();
            match serde_json::from_str::<Value>(t) {
                Ok(Value::Array(items)) if t.starts_with('[') => items.iter().map(tag_of).collect(),
                _ => t
                    .split(',')
                    .map(|part| text(Some(&Value::String(part.to_string()))))
                    .collect(),
            }
        }
        _ => Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .flatten()
        .filter(|t| seen.insert(t.clone()))
        .take(MAX_TAGS)
        .collect()
}

/// One tag: a string/number, or an object with `name`/`value`/`label`/`id`.
fn tag_of(item: &Value) -> Option<String> {
    match item {
        Value::Object(o) => first([
            text(o.get("name")),
            text(o.get("value")),
            text(o.get("label")),
            text(o.get("id")),
        ]),
        other => text(Some(other)),
    }
}

/// A priority value: a string/number, or an object with `value`/`name`/`values[0]`.
fn priority_value(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Object(o) => first([
            text(o.get("value")),
            text(o.get("name")),
            text(o.get("values").and_then(|a| a.get(0))),
        ]),
        other => text(Some(other)),
    }
}

/// `custom_fields.priority`: an object keyed by slug, or an array of `{slug, value}`.
fn custom_priority(custom_fields: Option<&Value>) -> Option<String> {
    match custom_fields? {
        Value::Object(o) => priority_value(o.get("priority")),
        Value::Array(items) => items
            .iter()
            .find(|f| f.get("slug").and_then(Value::as_str) == Some("priority"))
            .and_then(|f| priority_value(Some(f))),
        _ => None,
    }
}

/// An issue read from an object with API-style keys (`id`, `title`, `requester{...}`, ...).
fn issue_from_object(o: &Map<String, Value>) -> Issue {
    let requester = party(o.get("requester"));
    let (requester_email, requester_name) = match requester.plain {
        Some(p) if p.contains('@') => (Some(p), None),
        p => (requester.email, requester.name.or(p)),
    };
    let account = party(o.get("account"));
    let (account_id, account_name) = match account.plain {
        Some(p) if looks_like_uuid(&p) => (Some(p), None),
        p => (account.id, account.name.or(p)),
    };
    let assignee = party(o.get("assignee"));
    let team = party(o.get("team"));
    Issue {
        id: first([text(o.get("id")), text(o.get("issue_id"))]).unwrap_or_default(),
        number: first([int(o.get("number")), int(o.get("issue_number"))]),
        title: text(o.get("title")),
        body_html: first([text(o.get("body_html")), text(o.get("body"))]),
        state: first([text(o.get("state")), text(o.get("status"))]),
        priority: first([
            priority_value(o.get("priority")),
            custom_priority(o.get("custom_fields")),
        ]),
        link: first([text(o.get("link")), text(o.get("url"))]),
        requester_email: first([requester_email, text(o.get("requester_email"))]),
        requester_name: first([requester_name, text(o.get("requester_name"))]),
        account_id: first([account_id, text(o.get("account_id"))]),
        account_name: first([account_name, text(o.get("account_name"))]),
        assignee: first([
            assignee.email,
            assignee.id,
            assignee.plain,
            assignee.name,
            text(o.get("assignee_email")),
            text(o.get("assignee_id")),
        ]),
        team: first([
            team.name,
            team.id,
            team.plain,
            text(o.get("team_name")),
            text(o.get("team_id")),
        ]),
        tags: tags(o.get("tags")),
        source: text(o.get("source")),
        created_at: text(o.get("created_at")),
    }
}

/// An issue read from flattened `issue_*` keys at the top level.
fn issue_from_flat(o: &Map<String, Value>) -> Issue {
    let t = |k: &str| text(o.get(k));
    Issue {
        id: t("issue_id").unwrap_or_default(),
        number: int(o.get("issue_number")),
        title: t("issue_title"),
        body_html: first([t("issue_body"), t("issue_body_html")]),
        state: first([t("issue_status"), t("issue_state")]),
        priority: first([
            priority_value(o.get("issue_priority")),
            priority_value(o.get("issue_custom_field_priority")),
        ]),
        link: first([t("issue_link"), t("issue_url")]),
        requester_email: t("issue_requester_email"),
        requester_name: t("issue_requester_name"),
        account_id: t("issue_account_id"),
        account_name: t("issue_account_name"),
        assignee: first([t("issue_assignee_email"), t("issue_assignee_id")]),
        team: first([t("issue_team_name"), t("issue_team_id")]),
        tags: tags(o.get("issue_tags")),
        source: t("issue_source"),
        created_at: t("issue_created_at"),
    }
}

/// Fills the fields of `into` that are absent from `from` (the id only when `into` has none).
fn fill(into: &mut Issue, from: Issue) {
    fn opt<T>(slot: &mut Option<T>, v: Option<T>) {
        if slot.is_none() {
            *slot = v;
        }
    }
    if into.id.is_empty() {
        into.id = from.id;
    }
    opt(&mut into.number, from.number);
    opt(&mut into.title, from.title);
    opt(&mut into.body_html, from.body_html);
    opt(&mut into.state, from.state);
    opt(&mut into.priority, from.priority);
    opt(&mut into.link, from.link);
    opt(&mut into.requester_email, from.requester_email);
    opt(&mut into.requester_name, from.requester_name);
    opt(&mut into.account_id, from.account_id);
    opt(&mut into.account_name, from.account_name);
    opt(&mut into.assignee, from.assignee);
    opt(&mut into.team, from.team);
    if into.tags.is_empty() {
        into.tags = from.tags;
    }
    opt(&mut into.source, from.source);
    opt(&mut into.created_at, from.created_at);
}

/// The message carried by the payload: an object at `message`/`last_message` and/or flattened
/// `message_*` keys. `None` without a message id.
fn message_from(top: &Map<String, Value>) -> Option<Message> {
    let empty = Map::new();
    let obj = ["message", "last_message"]
        .iter()
        .find_map(|k| top.get(*k).and_then(Value::as_object))
        .unwrap_or(&empty);
    let author = party(obj.get("author"));
    let t = |k: &str| text(top.get(k));
    let id = first([text(obj.get("id")), t("message_id")])?;
    Some(Message {
        id,
        body_html: first([
            text(obj.get("message_html")),
            text(obj.get("body_html")),
            text(obj.get("body")),
            t("message_body_html"),
            t("message_html"),
            t("message_body"),
        ]),
        is_private: first([
            boolean(obj.get("is_private")),
            boolean(top.get("message_is_private")),
        ])
        .unwrap_or(false),
        author_name: first([
            author.name,
            author.plain,
            text(obj.get("author_name")),
            t("message_author_name"),
        ]),
        author_email: first([
            author.email,
            text(obj.get("author_email")),
            t("message_author_email"),
        ]),
        sent_at: first([
            text(obj.get("sent_at")),
            text(obj.get("timestamp")),
            text(obj.get("created_at")),
            t("message_sent_at"),
        ]),
    })
}

/// Parses a delivery body flexibly (customers write it in Pylon's "Send webhook" action with
/// `{{ issue.* }}` variables).
///
/// The issue may be at `data` (or `data.issue`), at `issue`, at the top level (`id`, `title`,
/// `body_html`, `state`, ...) or flattened (`issue_id`, `issue_number`, `issue_title`,
/// `issue_body` (HTML), `issue_status`, `issue_priority`, `issue_requester_email`,
/// `issue_requester_name`, `issue_account_id`, `issue_account_name`, `issue_link`,
/// `issue_assignee_email`, `issue_team_name`, `issue_tags`, ...); for each field the first
/// place that has it wins, in that order. The event name comes from `event` / `event_type` /
/// `type` (top level). Numbers may be strings; priority may be `priority` or
/// `custom_fields.priority.value`; requester/account/assignee/team may be objects or strings;
/// tags may be an array of strings or objects, or a comma-separated string.
///
/// The message comes from `message` / `last_message` objects (`id`, `message_html`/`body_html`,
/// `is_private`, `author{name,email}`) or flattened `message_*` keys; one without an id is
/// ignored. Empty strings and unfilled `{{ ... }}` variables count as absent; unknown fields are
/// ignored.
///
/// Errors when the body is not a JSON object or has no usable issue id.
pub fn parse(body: &serde_json::Value) -> Result<Parsed, String> {
    let Some(top) = body.as_object() else {
        return Err("payload is not a JSON object".to_string());
    };
    let data = top.get("data").and_then(Value::as_object);
    let objects = [
        data.and_then(|d| d.get("issue")).and_then(Value::as_object),
        data,
        top.get("issue").and_then(Value::as_object),
        Some(top),
    ];
    let mut issue = Issue::default();
    for o in objects.into_iter().flatten() {
        fill(&mut issue, issue_from_object(o));
    }
    fill(&mut issue, issue_from_flat(top));
    if issue.id.is_empty() {
        return Err(
            "payload has no issue id (looked at data.issue.id, data.id, issue.id, id, issue_id)"
                .to_string(),
        );
    }
    let event = first([
        text(top.get("event")),
        text(top.get("event_type")),
        text(top.get("type")),
    ]);
    // A message id alone (e.g. `{{ issue.last_message.id }}` in a new-issue template) does not
    // make the event a message: it needs a body, or an event name that says "message".
    let is_message_event = event
        .as_deref()
        .is_some_and(|e| e.to_ascii_lowercase().contains("message"));
    let message = message_from(top).filter(|m| m.body_html.is_some() || is_message_event);
    Ok(Parsed {
        event,
        issue,
        message,
    })
}

impl Parsed {
    /// True when title AND body are both missing (a thin payload): the worker then fetches
    /// `GET {api}/issues/{id}` and calls [`Parsed::enrich_from_api`].
    pub fn is_thin(&self) -> bool {
        self.issue.title.is_none() && self.issue.body_html.is_none()
    }

    /// Fills missing fields from a `GET /issues/{id}` response body (the issue under `data`; a
    /// bare issue object with an `id` is accepted too). Payload values win; API values only fill
    /// what the payload left absent. The id is never changed.
    pub fn enrich_from_api(&mut self, api_response: &serde_json::Value) {
        let issue = api_response
            .get("data")
            .and_then(Value::as_object)
            .or_else(|| api_response.as_object().filter(|o| o.contains_key("id")));
        if let Some(o) = issue {
            fill(&mut self.issue, issue_from_object(o));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

/// Per-integration settings that affect normalisation.
#[derive(Debug, Clone, Default)]
pub struct PylonSettings {
    /// `config.pylon_events`: event names to accept (ASCII case-insensitive); empty = all.
    pub events: Vec<String>,
}

/// Inserts `key` when `value` is known.
fn put(meta: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        meta.insert(key.to_string(), v.into());
    }
}

/// Turns a parsed delivery into an [`Effect`].
///
/// - Event filter: when `settings.events` is non-empty and the event (`None` counts as `""`) is
///   not in it: `Filter("event {e} is not in pylon_events")`.
/// - A message: private → `Filter("private/internal note")`; otherwise an upsert of
///   `pylon-{issue_id}-msg-{message_id}` with the message text (or [`NO_CONTENT`]) and
///   [`Merge::Keep`]. Metadata: `ticket_id`, `ticketId`, `message_id`, `author_name`,
///   `author_email`, `sent_at`, `sourceUrl`, `event`, `raw_payload`.
/// - Otherwise the ticket: an upsert of `pylon-{issue_id}` with the body text, falling back to
///   the title, then [`NO_CONTENT`], and [`Merge::PatchMetadata`]. Metadata: `ticketId`,
///   `ticketNumber`, `ticketStatus`, `priority`, `customerEmail`, `sourceName` (requester name),
///   `accountId`, `accountName`, `sourceUrl` (link), `tags`, `assignee`, `team`, `title`,
///   `ticketSource` (channel), `createdAt`, `event`, `lastEvent`, `raw_payload`.
///
/// Keys whose value is unknown are omitted (so a later thin update does not erase them), except
/// `event`, `lastEvent` and `raw_payload`, which are always written (`event` as null when the
/// payload names none).
pub fn normalize(parsed: &Parsed, raw: &serde_json::Value, settings: &PylonSettings) -> Effect {
    let event = parsed.event.as_deref().unwrap_or("");
    if !settings.events.is_empty()
        && !settings
            .events
            .iter()
            .any(|e| e.trim().eq_ignore_ascii_case(event))
    {
        return Effect::filter(format!("event {event} is not in pylon_events"));
    }
    let issue = &parsed.issue;
    let event_value = parsed.event.clone().map_or(Value::Null, Value::String);
    if let Some(msg) = &parsed.message {
        if msg.is_private {
            return Effect::filter("private/internal note");
        }
        let verbatim = text_or_placeholder(msg.body_html.as_deref().map(html_to_text), None);
        let mut meta = Map::new();
        meta.insert("ticket_id".into(), json!(issue.id));
        meta.insert("ticketId".into(), json!(issue.id));
        meta.insert("message_id".into(), json!(msg.id));
        put(&mut meta, "author_name", msg.author_name.clone());
        put(&mut meta, "author_email", msg.author_email.clone());
        put(&mut meta, "sent_at", msg.sent_at.clone());
        put(&mut meta, "sourceUrl", issue.link.clone());
        meta.insert("event".into(), event_value);
        meta.insert("raw_payload".into(), raw.clone());
        return Effect::Upsert {
            signal: NewSignal {
                source_ref: format!("pylon-{}-msg-{}", issue.id, msg.id),
                verbatim,
                metadata: Value::Object(meta),
            },
            merge: Merge::Keep,
        };
    }
    let verbatim = text_or_placeholder(
        issue.body_html.as_deref().map(html_to_text),
        issue.title.as_deref(),
    );
    let mut meta = Map::new();
    meta.insert("ticketId".into(), json!(issue.id));
    put(&mut meta, "ticketNumber", issue.number);
    put(&mut meta, "ticketStatus", issue.state.clone());
    put(&mut meta, "priority", issue.priority.clone());
    put(&mut meta, "customerEmail", issue.requester_email.clone());
    put(&mut meta, "sourceName", issue.requester_name.clone());
    put(&mut meta, "accountId", issue.account_id.clone());
    put(&mut meta, "accountName", issue.account_name.clone());
    put(&mut meta, "sourceUrl", issue.link.clone());
    if !issue.tags.is_empty() {
        meta.insert("tags".into(), json!(issue.tags));
    }
    put(&mut meta, "assignee", issue.assignee.clone());
    put(&mut meta, "team", issue.team.clone());
    put(&mut meta, "title", issue.title.clone());
    put(&mut meta, "ticketSource", issue.source.clone());
    put(&mut meta, "createdAt", issue.created_at.clone());
    meta.insert("event".into(), event_value.clone());
    meta.insert("lastEvent".into(), event_value);
    meta.insert("raw_payload".into(), raw.clone());
    Effect::Upsert {
        signal: NewSignal {
            source_ref: format!("pylon-{}", issue.id),
            verbatim,
            metadata: Value::Object(meta),
        },
        merge: Merge::PatchMetadata,
    }
}

/// The converted text when non-empty, else the fallback when non-blank, else [`NO_CONTENT`].
fn text_or_placeholder(converted: Option<String>, fallback: Option<&str>) -> String {
    converted
        .filter(|t| !t.is_empty())
        .or_else(|| {
            fallback
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| NO_CONTENT.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with Python's hmac/hashlib:
    //   hmac.new(b"secret", BODY, hashlib.sha256).hexdigest()
    //   hmac.new(b"secret", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    //   hashlib.sha256(BODY).hexdigest()
    const BODY: &[u8] = br#"{"event":"issue_new","issue_id":"iss_1"}"#;
    const X_SIG: &str = "b046034fd3f984c7b4bb384000e06023ab80075f2377a2e1eeb8832766c3932f";
    const TS: i64 = 1_700_000_000;
    const TS_SIG: &str = "9e6d91db8452b24244d97fc85842cd5a0ae4842c89cd977de8f48d4a6f2d097a";
    const BODY_SHA256: &str = "31d1bcee9c684edd0635cc2807a8cc6521d75105098f08ef0e15b54c006182da";
    const SECRET: &[u8] = b"secret";
    const TOL: i64 = 300;

    fn x_headers(sig: &str) -> SignatureHeaders<'_> {
        SignatureHeaders {
            x_pylon_signature: Some(sig),
            ..Default::default()
        }
    }

    fn ts_headers<'a>(sig: &'a str, ts: &'a str) -> SignatureHeaders<'a> {
        SignatureHeaders {
            webhook_signature: Some(sig),
            webhook_timestamp: Some(ts),
            ..Default::default()
        }
    }

    #[test]
    fn signers_match_independent_vectors() {
        assert_eq!(sign_x_pylon(SECRET, BODY), X_SIG);
        assert_eq!(
            sign_timestamped(SECRET, TS, BODY),
            format!("hs256={TS_SIG}")
        );
        assert_eq!(dedupe_key(BODY), format!("sha256:{BODY_SHA256}"));
    }

    #[test]
    fn x_pylon_signature_verifies() {
        let s = Scheme::XPylonSignature;
        assert_eq!(
            verify(s, &[SECRET], &x_headers(X_SIG), BODY, TS, TOL),
            Ok(())
        );
        let upper = X_SIG.to_ascii_uppercase();
        assert_eq!(
            verify(s, &[SECRET], &x_headers(&upper), BODY, TS, TOL),
            Ok(())
        );
        let padded = format!(" {X_SIG} ");
        assert_eq!(
            verify(s, &[SECRET], &x_headers(&padded), BODY, TS, TOL),
            Ok(())
        );
        // No timestamp involved: any `now` works.
        assert_eq!(verify(s, &[SECRET], &x_headers(X_SIG), BODY, 0, 0), Ok(()));
    }

    #[test]
    fn x_pylon_signature_rejections() {
        let s = Scheme::XPylonSignature;
        let none = SignatureHeaders::default();
        assert_eq!(
            verify(s, &[SECRET], &none, BODY, TS, TOL),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(s, &[SECRET], &x_headers(""), BODY, TS, TOL),
            Err(SignatureError::Missing)
        );
        let tampered = br#"{"event":"issue_new","issue_id":"iss_2"}"#;
        assert_eq!(
            verify(s, &[SECRET], &x_headers(X_SIG), tampered, TS, TOL),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(s, &[b"wrong"], &x_headers(X_SIG), BODY, TS, TOL),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(s, &[], &x_headers(X_SIG), BODY, TS, TOL),
            Err(SignatureError::Invalid)
        );
        for bad in [
            &X_SIG[..63],
            &format!("{X_SIG}0"),
            &format!("sha256={X_SIG}"),
            &format!("{}g", &X_SIG[..63]),
            "zz",
            "é",
        ] {
            assert_eq!(
                verify(s, &[SECRET], &x_headers(bad), BODY, TS, TOL),
                Err(SignatureError::Invalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn rotation_second_secret_matches() {
        let secrets: [&[u8]; 2] = [b"old-secret", SECRET];
        assert_eq!(
            verify(
                Scheme::XPylonSignature,
                &secrets,
                &x_headers(X_SIG),
                BODY,
                TS,
                TOL
            ),
            Ok(())
        );
        let sig = format!("hs256={TS_SIG}");
        let h = ts_headers(&sig, "1700000000");
        assert_eq!(
            verify(Scheme::Timestamped, &secrets, &h, BODY, TS, TOL),
            Ok(())
        );
    }

    #[test]
    fn timestamped_verifies() {
        let sig = format!("hs256={TS_SIG}");
        let h = ts_headers(&sig, "1700000000");
        assert_eq!(
            verify(Scheme::Timestamped, &[SECRET], &h, BODY, TS + 10, TOL),
            Ok(())
        );
        assert_eq!(
            verify(Scheme::Timestamped, &[SECRET], &h, BODY, TS - 10, TOL),
            Ok(())
        );
        let upper = format!("HS256={}", TS_SIG.to_ascii_uppercase());
        let h = ts_headers(&upper, "1700000000");
        assert_eq!(
            verify(Scheme::Timestamped, &[SECRET], &h, BODY, TS, TOL),
            Ok(())
        );
        // Several entries: any may match.
        let multi = format!("hs256={X_SIG}, hs256={TS_SIG}");
        let h = ts_headers(&multi, "1700000000");
        assert_eq!(
            verify(Scheme::Timestamped, &[SECRET], &h, BODY, TS, TOL),
            Ok(())
        );
    }

    #[test]
    fn timestamped_rejections() {
        let t = Scheme::Timestamped;
        let sig = format!("hs256={TS_SIG}");
        // Stale either way.
        let h = ts_headers(&sig, "1700000000");
        assert_eq!(
            verify(t, &[SECRET], &h, BODY, TS + TOL + 1, TOL),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(t, &[SECRET], &h, BODY, TS - TOL - 1, TOL),
            Err(SignatureError::Stale)
        );
        // Tampered body, wrong secret, a different (fresh) timestamp.
        assert_eq!(
            verify(t, &[SECRET], &h, b"{}", TS, TOL),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(t, &[b"nope"], &h, BODY, TS, TOL),
            Err(SignatureError::Invalid)
        );
        let h2 = ts_headers(&sig, "1700000001");
        assert_eq!(
            verify(t, &[SECRET], &h2, BODY, TS, TOL),
            Err(SignatureError::Invalid)
        );
        // Missing pieces and malformed values.
        let only_sig = SignatureHeaders {
            webhook_signature: Some(&sig),
            ..Default::default()
        };
        assert_eq!(
            verify(t, &[SECRET], &only_sig, BODY, TS, TOL),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(t, &[SECRET], &ts_headers("", "1700000000"), BODY, TS, TOL),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(t, &[SECRET], &ts_headers(&sig, "soon"), BODY, TS, TOL),
            Err(SignatureError::Invalid)
        );
        for bad in [
            TS_SIG.to_string(),
            "hs256=".into(),
            format!("v1={TS_SIG}"),
            "hs256=xyz".into(),
        ] {
            let h = ts_headers(&bad, "1700000000");
            assert_eq!(
                verify(t, &[SECRET], &h, BODY, TS, TOL),
                Err(SignatureError::Invalid),
                "{bad}"
            );
        }
        // The X-Pylon signature alone does not satisfy the timestamped scheme.
        assert_eq!(
            verify(t, &[SECRET], &x_headers(X_SIG), BODY, TS, TOL),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn auto_picks_the_scheme() {
        let a = Scheme::Auto;
        assert_eq!(
            verify(a, &[SECRET], &x_headers(X_SIG), BODY, TS, TOL),
            Ok(())
        );
        let sig = format!("hs256={TS_SIG}");
        assert_eq!(
            verify(a, &[SECRET], &ts_headers(&sig, "1700000000"), BODY, TS, TOL),
            Ok(())
        );
        // Both present: the timestamped one wins (a stale one is not rescued by X-Pylon).
        let both = SignatureHeaders {
            x_pylon_signature: Some(X_SIG),
            webhook_signature: Some(&sig),
            webhook_timestamp: Some("1700000000"),
        };
        assert_eq!(verify(a, &[SECRET], &both, BODY, TS, TOL), Ok(()));
        assert_eq!(
            verify(a, &[SECRET], &both, BODY, TS + 10_000, TOL),
            Err(SignatureError::Stale)
        );
        let both_bad_ts = SignatureHeaders {
            x_pylon_signature: Some(X_SIG),
            webhook_signature: Some("hs256=00"),
            webhook_timestamp: Some("1700000000"),
        };
        assert_eq!(
            verify(a, &[SECRET], &both_bad_ts, BODY, TS, TOL),
            Err(SignatureError::Invalid)
        );
        // A blank Pylon-Webhook-Signature counts as absent.
        let blank = SignatureHeaders {
            x_pylon_signature: Some(X_SIG),
            webhook_signature: Some(" "),
            webhook_timestamp: None,
        };
        assert_eq!(verify(a, &[SECRET], &blank, BODY, TS, TOL), Ok(()));
        assert_eq!(
            verify(a, &[SECRET], &SignatureHeaders::default(), BODY, TS, TOL),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn scheme_config_round_trip() {
        for s in [Scheme::Auto, Scheme::XPylonSignature, Scheme::Timestamped] {
            assert_eq!(Scheme::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            Scheme::parse(" X-Pylon-Signature "),
            Some(Scheme::XPylonSignature)
        );
        assert_eq!(Scheme::parse("hs256"), None);
        assert_eq!(Scheme::default(), Scheme::Auto);
    }

    fn parsed(v: Value) -> Parsed {
        match parse(&v) {
            Ok(p) => p,
            Err(e) => panic!("parse failed: {e}"),
        }
    }

    #[test]
    fn issue_under_data() {
        let p = parsed(json!({
            "event": "issue_new",
            "data": {
                "id": "iss_1", "number": 42, "title": "Login broken",
                "body_html": "<p>Cannot log in</p>", "state": "new",
                "link": "https://app.usepylon.com/issues?issueNumber=42",
                "requester": {"id": "c1", "email": "ann@acme.test", "name": "Ann"},
                "account": {"id": "a1", "name": "Acme"},
                "assignee": {"id": "u1", "email": "bob@us.test"},
                "team": {"id": "t1", "name": "Support"},
                "tags": ["bug", "login"], "source": "slack",
                "created_at": "2025-01-01T00:00:00Z",
                "custom_fields": {"priority": {"slug": "priority", "value": "high"}},
                "unknown": {"nested": [1, 2, 3]}
            }
        }));
        assert_eq!(p.event.as_deref(), Some("issue_new"));
        let i = &p.issue;
        assert_eq!(i.id, "iss_1");
        assert_eq!(i.number, Some(42));
        assert_eq!(i.title.as_deref(), Some("Login broken"));
        assert_eq!(i.body_html.as_deref(), Some("<p>Cannot log in</p>"));
        assert_eq!(i.state.as_deref(), Some("new"));
        assert_eq!(i.priority.as_deref(), Some("high"));
        assert_eq!(i.requester_email.as_deref(), Some("ann@acme.test"));
        assert_eq!(i.requester_name.as_deref(), Some("Ann"));
        assert_eq!(i.account_id.as_deref(), Some("a1"));
        assert_eq!(i.account_name.as_deref(), Some("Acme"));
        assert_eq!(i.assignee.as_deref(), Some("bob@us.test"));
        assert_eq!(i.team.as_deref(), Some("Support"));
        assert_eq!(i.tags, vec!["bug", "login"]);
        assert_eq!(i.source.as_deref(), Some("slack"));
        assert_eq!(i.created_at.as_deref(), Some("2025-01-01T00:00:00Z"));
        assert!(p.message.is_none());
        assert!(!p.is_thin());
    }

    #[test]
    fn issue_under_issue_key_and_data_issue() {
        let p = parsed(
            json!({"type": "issue.updated", "issue": {"id": "iss_2", "title": "T", "state": "closed"}}),
        );
        assert_eq!(p.event.as_deref(), Some("issue.updated"));
        assert_eq!(p.issue.id, "iss_2");
        assert_eq!(p.issue.state.as_deref(), Some("closed"));
        let p = parsed(json!({"data": {"issue": {"id": "iss_3", "title": "nested"}}}));
        assert_eq!(p.issue.id, "iss_3");
        assert_eq!(p.issue.title.as_deref(), Some("nested"));
    }

    #[test]
    fn issue_at_top_level() {
        let p = parsed(json!({
            "id": "iss_4", "title": "Top", "body_html": "<b>x</b>", "state": "waiting_on_you",
            "priority": "urgent", "requester": "carol@acme.test", "account": "Acme Corp",
            "assignee": "u-77", "team": "Tier 2", "tags": "a, b ,, a", "message_id": ""
        }));
        let i = &p.issue;
        assert_eq!(i.id, "iss_4");
        assert_eq!(i.priority.as_deref(), Some("urgent"));
        assert_eq!(i.requester_email.as_deref(), Some("carol@acme.test"));
        assert_eq!(i.account_name.as_deref(), Some("Acme Corp"));
        assert_eq!(i.account_id, None);
        assert_eq!(i.assignee.as_deref(), Some("u-77"));
        assert_eq!(i.team.as_deref(), Some("Tier 2"));
        assert_eq!(i.tags, vec!["a", "b"]);
        assert!(p.message.is_none(), "an empty message_id is no message");
        assert_eq!(p.event, None);
    }

    #[test]
    fn flattened_issue() {
        let p = parsed(json!({
            "event_type": "issue_status_changed",
            "issue_id": "iss_5", "issue_number": "42", "issue_title": "Flat",
            "issue_body": "<p>Body &amp; more</p>", "issue_status": "on_hold",
            "issue_priority": "low", "issue_requester_email": "dan@acme.test",
            "issue_requester_name": "Dan", "issue_account_id": "a5",
            "issue_account_name": "Acme", "issue_link": "https://app.usepylon.com/x",
            "issue_assignee_email": "eve@us.test", "issue_team_name": "Billing",
            "issue_tags": ["x", {"name": "y"}, {"value": "z"}, 7, null, ""],
            "issue_requesteer_id": "typo ignored"
        }));
        let i = &p.issue;
        assert_eq!(p.event.as_deref(), Some("issue_status_changed"));
        assert_eq!(i.id, "iss_5");
        assert_eq!(i.number, Some(42));
        assert_eq!(i.title.as_deref(), Some("Flat"));
        assert_eq!(i.body_html.as_deref(), Some("<p>Body &amp; more</p>"));
        assert_eq!(i.state.as_deref(), Some("on_hold"));
        assert_eq!(i.priority.as_deref(), Some("low"));
        assert_eq!(i.requester_email.as_deref(), Some("dan@acme.test"));
        assert_eq!(i.requester_name.as_deref(), Some("Dan"));
        assert_eq!(i.account_id.as_deref(), Some("a5"));
        assert_eq!(i.account_name.as_deref(), Some("Acme"));
        assert_eq!(i.link.as_deref(), Some("https://app.usepylon.com/x"));
        assert_eq!(i.assignee.as_deref(), Some("eve@us.test"));
        assert_eq!(i.team.as_deref(), Some("Billing"));
        assert_eq!(i.tags, vec!["x", "y", "z", "7"]);
    }

    #[test]
    fn numbers_as_strings_and_ints() {
        assert_eq!(
            parsed(json!({"id": 17, "number": "#9"})).issue,
            Issue {
                id: "17".into(),
                number: Some(9),
                ..Issue::default()
            }
        );
        assert_eq!(
            parsed(json!({"id": "i", "number": 9.0})).issue.number,
            Some(9)
        );
        assert_eq!(
            parsed(json!({"id": "i", "number": "nine"})).issue.number,
            None
        );
        assert_eq!(
            parsed(json!({"id": "i", "number": 1e300})).issue.number,
            None
        );
    }

    #[test]
    fn priority_in_custom_fields() {
        let p = parsed(json!({"id": "i", "custom_fields": {"priority": {"value": "medium"}}}));
        assert_eq!(p.issue.priority.as_deref(), Some("medium"));
        let p = parsed(
            json!({"id": "i", "custom_fields": [{"slug": "other", "value": "x"}, {"slug": "priority", "values": ["p1"]}]}),
        );
        assert_eq!(p.issue.priority.as_deref(), Some("p1"));
        // Top-level priority wins over the custom field.
        let p = parsed(
            json!({"id": "i", "priority": "urgent", "custom_fields": {"priority": {"value": "low"}}}),
        );
        assert_eq!(p.issue.priority.as_deref(), Some("urgent"));
    }

    #[test]
    fn tag_shapes() {
        let t = |v: Value| parsed(json!({"id": "i", "tags": v})).issue.tags;
        assert_eq!(t(json!(["a", "b", "a"])), vec!["a", "b"]);
        assert_eq!(
            t(json!([{"name": "n"}, {"value": "v"}, {"label": "l"}, {"other": 1}])),
            vec!["n", "v", "l"]
        );
        assert_eq!(t(json!("one, two,three")), vec!["one", "two", "three"]);
        assert_eq!(t(json!(r#"["j1","j2"]"#)), vec!["j1", "j2"]);
        assert_eq!(t(json!("")), Vec::<String>::new());
        assert_eq!(t(json!({"not": "tags"})), Vec::<String>::new());
        let many: Vec<String> = (0..100_000).map(|i| format!("t{i}")).collect();
        assert_eq!(t(json!(many)).len(), MAX_TAGS);
    }

    #[test]
    fn empty_and_unfilled_values_are_absent() {
        let p = parsed(
            json!({"issue_id": "i", "issue_title": "", "issue_body": "{{ issue.body_html }}", "issue_status": "  "}),
        );
        assert_eq!(p.issue.title, None);
        assert_eq!(p.issue.body_html, None);
        assert_eq!(p.issue.state, None);
        assert!(p.is_thin());
    }

    #[test]
    fn message_flattened() {
        let p = parsed(json!({
            "event": "issue_message_new", "issue_id": "iss_6", "message_id": "m1",
            "message_body_html": "<p>Any update?</p>", "message_is_private": "false",
            "message_author_name": "Ann", "message_author_email": "ann@acme.test",
            "message_sent_at": "2025-01-02T00:00:00Z"
        }));
        assert_eq!(
            p.message,
            Some(Message {
                id: "m1".into(),
                body_html: Some("<p>Any update?</p>".into()),
                is_private: false,
                author_name: Some("Ann".into()),
                author_email: Some("ann@acme.test".into()),
                sent_at: Some("2025-01-02T00:00:00Z".into()),
            })
        );
        let p = parsed(
            json!({"issue_id": "i", "message_id": "m", "message_html": "<p>h</p>", "message_is_private": "TRUE"}),
        );
        let m = p.message.unwrap_or_default();
        assert_eq!(m.body_html.as_deref(), Some("<p>h</p>"));
        assert!(m.is_private);
    }

    #[test]
    fn message_objects() {
        let p = parsed(json!({
            "issue": {"id": "iss_7"},
            "message": {"id": "m2", "message_html": "<p>hi</p>", "is_private": true,
                        "author": {"name": "Agent", "user": {"email": "agent@us.test"}}}
        }));
        let m = p.message.unwrap_or_default();
        assert_eq!(m.id, "m2");
        assert!(m.is_private);
        assert_eq!(m.author_name.as_deref(), Some("Agent"));
        assert_eq!(m.author_email.as_deref(), Some("agent@us.test"));
        let p = parsed(
            json!({"id": "i", "last_message": {"id": "m3", "body_html": "b", "author": {"name": "N", "email": "n@x.test"}}}),
        );
        let m = p.message.unwrap_or_default();
        assert_eq!((m.id.as_str(), m.body_html.as_deref()), ("m3", Some("b")));
        // Without an id the message is ignored.
        let p = parsed(json!({"id": "i", "message": {"message_html": "orphan"}}));
        assert!(p.message.is_none());
    }

    #[test]
    fn rejects_unusable_payloads() {
        for v in [json!([]), json!("x"), json!(null), json!(1)] {
            assert_eq!(parse(&v), Err("payload is not a JSON object".to_string()));
        }
        for v in [
            json!({}),
            json!({"title": "no id"}),
            json!({"issue_id": ""}),
            json!({"id": null, "data": "x", "issue": [1]}),
        ] {
            let Err(e) = parse(&v) else {
                panic!("{v} parsed")
            };
            assert!(e.contains("no issue id"), "{e}");
        }
    }

    #[test]
    fn never_panics_on_odd_json() {
        let odd = [
            json!({"id": "i", "data": [], "issue": 5, "message": "str", "last_message": [], "tags": [[], {}, null]}),
            json!({"id": "i", "requester": [], "account": {"id": {}}, "assignee": true, "team": null}),
            json!({"id": "i", "custom_fields": {"priority": []}, "priority": {"values": "x"}}),
            json!({"id": "i", "number": -1, "message_id": 5, "message_is_private": 2}),
            json!({"issue_id": "i", "issue_tags": "[not json", "event": 3}),
        ];
        for v in odd {
            let mut p = parsed(v.clone());
            p.enrich_from_api(&v);
            p.enrich_from_api(&json!(null));
            let _ = normalize(&p, &v, &PylonSettings::default());
        }
    }

    #[test]
    fn thin_payload_enriched_from_api() {
        let mut p = parsed(
            json!({"event": "issue_new", "issue_id": "iss_8", "issue_status": "closed", "issue_tags": "keep"}),
        );
        assert!(p.is_thin());
        p.enrich_from_api(&json!({
            "data": {
                "id": "iss_8", "number": 8, "title": "From API", "body_html": "<p>api body</p>",
                "state": "new", "link": "https://app.usepylon.com/8",
                "requester": {"id": "c8", "email": "req@acme.test"}, "account": {"id": "a8"},
                "assignee": {"id": "u8", "email": "as@us.test"}, "team": {"id": "t8"},
                "tags": ["api-tag"], "custom_fields": {"priority": {"value": "high"}},
                "created_at": "2025-01-03T00:00:00Z", "source": "email"
            },
            "request_id": "r"
        }));
        let i = &p.issue;
        assert!(!p.is_thin());
        assert_eq!(i.id, "iss_8");
        assert_eq!(i.state.as_deref(), Some("closed"), "payload wins");
        assert_eq!(i.tags, vec!["keep"], "payload wins");
        assert_eq!(i.title.as_deref(), Some("From API"));
        assert_eq!(i.body_html.as_deref(), Some("<p>api body</p>"));
        assert_eq!(i.number, Some(8));
        assert_eq!(i.requester_email.as_deref(), Some("req@acme.test"));
        assert_eq!(i.account_id.as_deref(), Some("a8"));
        assert_eq!(i.assignee.as_deref(), Some("as@us.test"));
        assert_eq!(i.team.as_deref(), Some("t8"));
        assert_eq!(i.priority.as_deref(), Some("high"));
        assert_eq!(i.source.as_deref(), Some("email"));
        // An API answer for another id never changes the id.
        p.enrich_from_api(&json!({"data": {"id": "other"}}));
        assert_eq!(p.issue.id, "iss_8");
    }

    fn upsert(e: Effect) -> (NewSignal, Merge) {
        match e {
            Effect::Upsert { signal, merge } => (signal, merge),
            other => panic!("expected an upsert, got {other:?}"),
        }
    }

    #[test]
    fn event_filter() {
        let raw = json!({"event": "issue_new", "issue_id": "i"});
        let p = parsed(raw.clone());
        let only = |events: &[&str]| PylonSettings {
            events: events.iter().map(|s| s.to_string()).collect(),
        };
        assert!(matches!(
            normalize(&p, &raw, &only(&[])),
            Effect::Upsert { .. }
        ));
        assert!(matches!(
            normalize(&p, &raw, &only(&["issue_new"])),
            Effect::Upsert { .. }
        ));
        assert!(matches!(
            normalize(&p, &raw, &only(&["ISSUE_NEW"])),
            Effect::Upsert { .. }
        ));
        assert_eq!(
            normalize(&p, &raw, &only(&["issue_closed"])),
            Effect::filter("event issue_new is not in pylon_events")
        );
        let raw = json!({"issue_id": "i"});
        let p = parsed(raw.clone());
        assert_eq!(
            normalize(&p, &raw, &only(&["issue_new"])),
            Effect::filter("event  is not in pylon_events")
        );
        assert!(matches!(
            normalize(&p, &raw, &only(&[""])),
            Effect::Upsert { .. }
        ));
    }

    #[test]
    fn normalize_ticket() {
        let raw = json!({
            "event": "issue_new", "issue_id": "iss_9", "issue_number": "9",
            "issue_title": "Export fails", "issue_body": "<p>Export&nbsp;fails &amp; crashes</p><p>Please help</p>",
            "issue_status": "new", "issue_priority": "high", "issue_requester_email": "ann@acme.test",
            "issue_requester_name": "Ann", "issue_account_id": "a1", "issue_account_name": "Acme",
            "issue_link": "https://app.usepylon.com/9", "issue_assignee_email": "bob@us.test",
            "issue_team_name": "Support", "issue_tags": "bug,export"
        });
        let (signal, merge) = upsert(normalize(
            &parsed(raw.clone()),
            &raw,
            &PylonSettings::default(),
        ));
        assert_eq!(merge, Merge::PatchMetadata);
        assert_eq!(signal.source_ref, "pylon-iss_9");
        assert_eq!(signal.verbatim, "Export fails & crashes\n\nPlease help");
        assert_eq!(
            signal.metadata,
            json!({
                "ticketId": "iss_9", "ticketNumber": 9, "ticketStatus": "new", "priority": "high",
                "customerEmail": "ann@acme.test", "sourceName": "Ann", "accountId": "a1",
                "accountName": "Acme", "sourceUrl": "https://app.usepylon.com/9",
                "tags": ["bug", "export"], "assignee": "bob@us.test", "team": "Support",
                "title": "Export fails", "event": "issue_new", "lastEvent": "issue_new",
                "raw_payload": raw
            })
        );
    }

    #[test]
    fn normalize_thin_ticket_omits_unknowns_and_falls_back() {
        let raw =
            json!({"event": "issue_status_changed", "issue_id": "i", "issue_status": "closed"});
        let (signal, _) = upsert(normalize(
            &parsed(raw.clone()),
            &raw,
            &PylonSettings::default(),
        ));
        assert_eq!(signal.verbatim, NO_CONTENT);
        assert_eq!(
            signal.metadata,
            json!({
                "ticketId": "i", "ticketStatus": "closed", "event": "issue_status_changed",
                "lastEvent": "issue_status_changed", "raw_payload": raw
            })
        );
        // Title fallback when the body has no text; event null when unnamed.
        let raw = json!({"id": "i", "title": "Only a title", "body_html": "<p> </p>"});
        let (signal, _) = upsert(normalize(
            &parsed(raw.clone()),
            &raw,
            &PylonSettings::default(),
        ));
        assert_eq!(signal.verbatim, "Only a title");
        assert_eq!(signal.metadata["event"], Value::Null);
        assert_eq!(signal.metadata["lastEvent"], Value::Null);
    }

    #[test]
    fn normalize_message() {
        let raw = json!({
            "event": "issue_message_new", "issue_id": "iss_10", "issue_link": "https://app.usepylon.com/10",
            "message_id": "m9", "message_body_html": "<div>Still broken<br>see logs</div>",
            "message_is_private": false, "message_author_name": "Ann",
            "message_author_email": "ann@acme.test", "message_sent_at": "2025-01-04T00:00:00Z"
        });
        let (signal, merge) = upsert(normalize(
            &parsed(raw.clone()),
            &raw,
            &PylonSettings::default(),
        ));
        assert_eq!(merge, Merge::Keep);
        assert_eq!(signal.source_ref, "pylon-iss_10-msg-m9");
        assert_eq!(signal.verbatim, "Still broken\nsee logs");
        assert_eq!(
            signal.metadata,
            json!({
                "ticket_id": "iss_10", "ticketId": "iss_10", "message_id": "m9",
                "author_name": "Ann", "author_email": "ann@acme.test",
                "sent_at": "2025-01-04T00:00:00Z", "sourceUrl": "https://app.usepylon.com/10",
                "event": "issue_message_new", "raw_payload": raw
            })
        );
        // No body: placeholder.
        let raw = json!({"issue_id": "i", "message_id": "m"});
        let (signal, _) = upsert(normalize(
            &parsed(raw.clone()),
            &raw,
            &PylonSettings::default(),
        ));
        assert_eq!(signal.verbatim, NO_CONTENT);
    }

    #[test]
    fn normalize_private_message_is_filtered() {
        let raw = json!({"issue_id": "i", "message": {"id": "m", "message_html": "secret", "is_private": "true"}});
        assert_eq!(
            normalize(&parsed(raw.clone()), &raw, &PylonSettings::default()),
            Effect::filter("private/internal note")
        );
    }
}
