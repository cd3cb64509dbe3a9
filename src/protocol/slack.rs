//! Slack Events API: request signing (`X-Slack-Signature`, `v0` scheme), envelope parsing,
//! mrkdwn rendering and normalisation of `message` events into an [`Effect`].
//!
//! Everything here is pure: the handler calls [`verify`] on the raw body before parsing anything
//! (including `url_verification`), then [`parse_envelope`] for routing and deduplication; the
//! worker calls [`normalize`] on the stored delivery. Slack keeps adding event types and message
//! subtypes, so every shape that is not explicitly understood becomes [`Effect::Filter`], and no
//! JSON input can make these functions panic.

use serde_json::{Map, Value, json};

use super::effect::{Effect, Merge, NO_CONTENT, NewSignal};
use super::{SignatureError, check_timestamp, ct_eq, hmac_sha256, sha256_hex};

/// Channel types accepted when [`SlackSettings::channel_types`] is empty (`app_home` is not).
const DEFAULT_CHANNEL_TYPES: [&str; 4] = ["channel", "group", "im", "mpim"];

// ---------------------------------------------------------------------------------------------
// Signing
// ---------------------------------------------------------------------------------------------

/// Verifies `X-Slack-Signature` (`v0=<hex HMAC-SHA256>` over `v0:{timestamp}:{body}`).
///
/// `secrets` are all currently valid signing secrets (during a rotation grace period any of them
/// may match); empty secrets are ignored. Checks, in order: a missing or empty header is
/// [`SignatureError::Missing`]; a non-integer timestamp is [`SignatureError::Invalid`]; a
/// timestamp more than `tolerance_secs` away from `now` (either direction) is
/// [`SignatureError::Stale`]; a signature that is not `v0=` followed by 64 hex digits, or that no
/// secret reproduces, is [`SignatureError::Invalid`]. The comparison is constant-time.
pub fn verify(
    secrets: &[&[u8]],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let signature = signature
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(SignatureError::Missing)?;
    check_timestamp(timestamp, now, tolerance_secs)?;
    // `check_timestamp` succeeded, so the header is present and parses; sign exactly what was sent.
    let ts = timestamp.map(str::trim).unwrap_or_default();
    let hex_digits = signature
        .strip_prefix("v0=")
        .filter(|h| h.len() == 64)
        .ok_or(SignatureError::Invalid)?;
    let expected = hex::decode(hex_digits).map_err(|_| SignatureError::Invalid)?;
    let mut matched = false;
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let mac = hmac_sha256(secret, &[b"v0:", ts.as_bytes(), b":", body]);
        // No early exit: every secret is tried so timing does not reveal which one matched.
        matched |= ct_eq(&mac, &expected);
    }
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Invalid)
    }
}

/// Signs `body` as Slack does and returns the `X-Slack-Signature` value, `v0=<lowercase hex>`
/// (used by tests, the CLI `send slack` command and benchmarks).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = hmac_sha256(secret, &[b"v0:", ts.as_bytes(), b":", body]);
    format!("v0={}", hex::encode(mac))
}

// ---------------------------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------------------------

/// The outer Events API envelope, parsed after the signature was verified.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Envelope `type`: `url_verification`, `event_callback`, `app_rate_limited` or anything else
    /// (empty when absent or not a string).
    pub kind: String,
    /// `challenge` of a `url_verification` request.
    pub challenge: Option<String>,
    /// Globally unique `event_id` of an `event_callback`.
    pub event_id: Option<String>,
    /// `api_app_id`: the app the event is for.
    pub api_app_id: Option<String>,
    /// `team_id`: the workspace where the event occurred.
    pub team_id: Option<String>,
    /// `event.type` of the inner event, if any.
    pub event_type: Option<String>,
    /// `authorizations`: the installations the event was delivered for (Slack sends at most
    /// one today; more than [`MAX_AUTHORIZATIONS`] are ignored). Entries without a well-formed
    /// team or enterprise id are dropped.
    pub authorizations: Vec<Authorization>,
    /// `context_team_id`: the workspace whose context (channel) the event happened in.
    pub context_team_id: Option<String>,
    /// `context_enterprise_id`.
    pub context_enterprise_id: Option<String>,
    /// `enterprise_id` of the envelope.
    pub enterprise_id: Option<String>,
    /// `minute_rate_limited` of an `app_rate_limited` envelope, as text.
    pub minute_rate_limited: Option<String>,
    /// The parsed body (a JSON object) without any `blocks` member, which nothing reads (the
    /// text is rendered from `text`).
    pub raw: Value,
}

/// Entries of `authorizations` looked at; Slack truncates the list to one.
pub const MAX_AUTHORIZATIONS: usize = 8;

/// One entry of an envelope's `authorizations`: an installation of the app that can see the
/// event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// The installed workspace (absent for some org-wide installs).
    pub team_id: Option<String>,
    /// The enterprise (Enterprise Grid), if any.
    pub enterprise_id: Option<String>,
    /// An org-wide install: the installation is the enterprise, not one workspace.
    pub is_enterprise_install: bool,
}

impl Authorization {
    fn from_json(v: &Value) -> Option<Authorization> {
        let a = Authorization {
            team_id: team_field(v, "team_id"),
            enterprise_id: team_field(v, "enterprise_id"),
            is_enterprise_install: v
                .get("is_enterprise_install")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        (a.team_id.is_some() || a.enterprise_id.is_some()).then_some(a)
    }

    /// The ids an installation is stored under, most specific first: an org-wide install is
    /// its enterprise, a workspace install its team.
    pub fn ids(&self) -> Vec<String> {
        let (first, second) = if self.is_enterprise_install {
            (&self.enterprise_id, &self.team_id)
        } else {
            (&self.team_id, &self.enterprise_id)
        };
        let mut ids: Vec<String> = first.iter().cloned().collect();
        if self.is_enterprise_install || first.is_none() {
            ids.extend(second.iter().cloned());
        }
        ids
    }
}

/// True when `s` has the shape of a Slack team (`T…`) or enterprise (`E…`) id: the letter and
/// 1 to 20 upper-case letters or digits. Anything else is never looked up.
pub fn is_team_id(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=21).contains(&b.len())
        && matches!(b[0], b'T' | b'E')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

/// A team or enterprise id field, if present and well-formed.
fn team_field(v: &Value, key: &str) -> Option<String> {
    str_ref(v, key)
        .filter(|s| is_team_id(s))
        .map(str::to_string)
}

/// Parses the envelope of a (verified) Events API body. `Err(message)` when the body is not a
/// JSON object. String fields that are absent, empty or not strings are `None`.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope, String> {
    let raw: Value = serde_json::from_slice::<pruned::Pruned>(body)
        .map_err(|e| format!("body is not valid JSON: {e}"))?
        .0;
    if !raw.is_object() {
        return Err("body is not a JSON object".to_string());
    }
    Ok(Envelope {
        kind: raw
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        challenge: str_field(&raw, "challenge"),
        event_id: str_field(&raw, "event_id"),
        api_app_id: str_field(&raw, "api_app_id"),
        team_id: team_field(&raw, "team_id"),
        event_type: raw.get("event").and_then(|e| str_field(e, "type")),
        authorizations: raw
            .get("authorizations")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .take(MAX_AUTHORIZATIONS)
                    .filter_map(Authorization::from_json)
                    .collect()
            })
            .unwrap_or_default(),
        context_team_id: team_field(&raw, "context_team_id"),
        context_enterprise_id: team_field(&raw, "context_enterprise_id"),
        enterprise_id: team_field(&raw, "enterprise_id"),
        minute_rate_limited: raw.get("minute_rate_limited").and_then(minute_text),
        raw,
    })
}

fn minute_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A JSON tree without `blocks` members: a message's Block Kit copy of its text is most of the
/// nodes of a Slack envelope (every word of rich text is an object), and the worker spent more
/// time building and dropping it than on everything else it does with the message. The skipped
/// part is still parsed (a syntax error is still an error), just not kept.
mod pruned {
    use std::fmt;

    use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess};
    use serde::de::{SeqAccess, Visitor};
    use serde_json::{Map, Value};

    pub(super) struct Pruned(pub Value);

    impl<'de> Deserialize<'de> for Pruned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(V).map(Pruned)
        }
    }

    struct V;

    impl<'de> DeserializeSeed<'de> for V {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(V)
        }
    }

    impl<'de> Visitor<'de> for V {
        type Value = Value;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E: de::Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(V)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
            let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0).min(64));
            while let Some(v) = a.next_element_seed(V)? {
                out.push(v);
            }
            Ok(Value::Array(out))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(k) = a.next_key::<String>()? {
                if k == "blocks" {
                    a.next_value::<IgnoredAny>()?;
                } else {
                    let v = a.next_value_seed(V)?;
                    out.insert(k, v);
                }
            }
            Ok(Value::Object(out))
        }
    }
}

impl Envelope {
    /// The installations the event was delivered for, one group of candidate ids per entry of
    /// `authorizations` ([`Authorization::ids`]), in order.
    pub fn authorized_installations(&self) -> Vec<Vec<String>> {
        self.authorizations
            .iter()
            .map(Authorization::ids)
            .filter(|ids| !ids.is_empty())
            .collect()
    }

    /// Where to look when no authorization names an installation of ours:
    /// `context_team_id`, `context_enterprise_id`, and the envelope's `team_id` and
    /// `enterprise_id` only when there is neither an authorization nor a context. (In a Slack
    /// Connect channel the envelope's `team_id` is the *sender's* organisation, so it must not
    /// win over the installation Slack delivered the event for.)
    pub fn fallback_installations(&self) -> Vec<String> {
        let context = [&self.context_team_id, &self.context_enterprise_id];
        let envelope = [&self.team_id, &self.enterprise_id];
        let use_envelope = self.authorizations.is_empty() && context.iter().all(|id| id.is_none());
        let mut ids: Vec<String> = Vec::new();
        for id in context
            .into_iter()
            .chain(envelope.into_iter().filter(|_| use_envelope))
            .flatten()
        {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// Every id the event may be routed by, in routing order (authorizations, then the
    /// fallbacks), without duplicates.
    pub fn routing_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for id in self
            .authorized_installations()
            .into_iter()
            .flatten()
            .chain(self.fallback_installations())
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// The workspace to record on a signal of an installation stored under `installed`
    /// (a team id, or an enterprise id for an org-wide install): the team of the authorization
    /// that names it, else the context team, else `installed` itself.
    pub fn installing_team(&self, installed: &str) -> String {
        self.authorizations
            .iter()
            .find(|a| {
                a.team_id.as_deref() == Some(installed)
                    || (a.is_enterprise_install && a.enterprise_id.as_deref() == Some(installed))
            })
            .and_then(|a| a.team_id.clone())
            .or_else(|| {
                installed
                    .starts_with('E')
                    .then(|| self.context_team_id.clone())
                    .flatten()
            })
            .unwrap_or_else(|| installed.to_string())
    }

    /// The delivery's dedupe key: the `event_id`; for `app_rate_limited`,
    /// `app_rate_limited:{team_id}:{minute_rate_limited}`; otherwise `sha256:` + the hex SHA-256
    /// of `body` (the raw body the envelope was parsed from).
    pub fn dedupe_key(&self, body: &[u8]) -> String {
        if let Some(id) = &self.event_id {
            return id.clone();
        }
        if self.kind == "app_rate_limited" {
            if let Some(minute) = &self.minute_rate_limited {
                let team = self.team_id.as_deref().unwrap_or_default();
                return format!("app_rate_limited:{team}:{minute}");
            }
        }
        format!("sha256:{}", sha256_hex(body))
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and names
// ---------------------------------------------------------------------------------------------

/// Per-integration settings the worker passes to [`normalize`].
#[derive(Debug, Clone, Default)]
pub struct SlackSettings {
    /// The installed workspace the signal is recorded under ([`Envelope::installing_team`]);
    /// `None` falls back to the envelope's routing ids.
    pub team_id: Option<String>,
    /// The installation's bot user id; its own messages are filtered.
    pub bot_user_id: Option<String>,
    /// Channel allow-list; empty means every channel.
    pub channels: Vec<String>,
    /// Accepted `channel_type`s; empty means `channel`, `group`, `im` and `mpim`.
    pub channel_types: Vec<String>,
}

/// Names known for Slack ids, used to render mentions and to annotate metadata.
pub trait NameLookup {
    /// Display name of user `id`, if known.
    fn user(&self, id: &str) -> Option<String>;
    /// Name (without `#`) of channel `id`, if known.
    fn channel(&self, id: &str) -> Option<String>;
}

/// A [`NameLookup`] that knows no names.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNames;

impl NameLookup for NoNames {
    fn user(&self, _id: &str) -> Option<String> {
        None
    }

    fn channel(&self, _id: &str) -> Option<String> {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// mrkdwn rendering
// ---------------------------------------------------------------------------------------------

/// Renders Slack mrkdwn as readable text.
///
/// * `&amp;`, `&lt;`, `&gt;` are decoded once (so `&amp;lt;` becomes `&lt;`);
/// * `<@U123>` / `<@U123|name>` become `@name` (looked-up name, else the label, else the id);
/// * `<#C123|general>` becomes `#general` (looked-up name, else the label, else the id);
/// * `<!here>`, `<!channel>`, `<!everyone>` become `@here`, …; `<!subteam^S123|@team>` becomes
///   `@team`; other `<!…|label>` become their label;
/// * `<https://x|label>` becomes `label (https://x)`, `<https://x>` becomes `https://x`, and
///   `mailto:` is dropped (`<mailto:a@b|a@b>` becomes `a@b`);
/// * a `<` without a matching `>` (before the next `<`) is kept literally.
///
/// Runs in linear time and never panics.
pub fn render_text(raw: &str, names: &dyn NameLookup) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    loop {
        let Some(open) = rest.find('<') else {
            push_decoded(&mut out, rest);
            break;
        };
        push_decoded(&mut out, &rest[..open]);
        let after = &rest[open + 1..];
        match after.find(['<', '>']) {
            Some(close) if after[close..].starts_with('>') => {
                render_token(&mut out, &after[..close], names);
                rest = &after[close + 1..];
            }
            Some(next_open) => {
                // Another '<' comes first: this one is literal text.
                out.push('<');
                push_decoded(&mut out, &after[..next_open]);
                rest = &after[next_open..];
            }
            None => {
                out.push('<');
                push_decoded(&mut out, after);
                break;
            }
        }
    }
    out
}

/// Appends `s` with `&amp;`, `&lt;` and `&gt;` decoded in a single left-to-right pass (each
/// entity is decoded once, which is what decoding `&amp;` last achieves).
fn push_decoded(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (ch, len) = if tail.starts_with("&amp;") {
            ('&', 5)
        } else if tail.starts_with("&lt;") {
            ('<', 4)
        } else if tail.starts_with("&gt;") {
            ('>', 4)
        } else {
            ('&', 1)
        };
        out.push(ch);
        rest = &tail[len..];
    }
    out.push_str(rest);
}

fn decoded(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_decoded(&mut out, s);
    out
}

/// A name from a lookup or a label, if it is non-blank.
fn non_blank(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// Renders the inside of one `<…>` control sequence.
fn render_token(out: &mut String, token: &str, names: &dyn NameLookup) {
    let (target, label) = match token.split_once('|') {
        Some((t, l)) => (t, non_blank(Some(decoded(l)))),
        None => (token, None),
    };
    if let Some(id) = target.strip_prefix('@') {
        let label = label.map(|l| l.trim_start_matches('@').to_string());
        let name = non_blank(names.user(id)).or(non_blank(label));
        out.push('@');
        match name {
            Some(name) => out.push_str(&name),
            None => push_decoded(out, id),
        }
    } else if let Some(id) = target.strip_prefix('#') {
        let label = label.map(|l| l.trim_start_matches('#').to_string());
        let name = non_blank(names.channel(id)).or(non_blank(label));
        out.push('#');
        match name {
            Some(name) => out.push_str(&name),
            None => push_decoded(out, id),
        }
    } else if let Some(command) = target.strip_prefix('!') {
        let (name, arg) = command.split_once('^').unwrap_or((command, ""));
        match (name, label) {
            ("here" | "channel" | "everyone", _) => {
                out.push('@');
                out.push_str(name);
            }
            ("subteam", Some(label)) => {
                if !label.starts_with('@') {
                    out.push('@');
                }
                out.push_str(&label);
            }
            ("subteam", None) => {
                out.push('@');
                push_decoded(out, arg);
            }
            (_, Some(label)) => out.push_str(&label),
            (_, None) => {
                out.push('@');
                push_decoded(out, name);
            }
        }
    } else if target.is_empty() {
        // `<>` or `<|x>`: not a control sequence, keep it as written.
        out.push('<');
        push_decoded(out, token);
        out.push('>');
    } else {
        let url = decoded(target);
        let shown = url.strip_prefix("mailto:").unwrap_or(&url);
        match label {
            Some(label) if label != shown && label != url => {
                out.push_str(&label);
                out.push_str(" (");
                out.push_str(shown);
                out.push(')');
            }
            _ => out.push_str(shown),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

/// Turns a verified envelope into an [`Effect`] on the signals table.
///
/// * `app_uninstalled`, and `tokens_revoked` with bot tokens, deactivate the integration;
/// * `message` events with no subtype, `thread_broadcast` or `file_share` create a signal
///   ([`Merge::Keep`]); `message_changed` upserts the new text ([`Merge::Edit`]);
///   `message_deleted` (and an edit into a `tombstone`) marks the signal deleted;
/// * bot messages, the installation's own bot user, channels outside the allow-list, channel
///   types not accepted, other envelope kinds, event types and subtypes are filtered;
/// * a message without a channel or ts is rejected.
pub fn normalize(env: &Envelope, settings: &SlackSettings, names: &dyn NameLookup) -> Effect {
    match env.kind.as_str() {
        "event_callback" => {}
        "url_verification" => return Effect::filter("url_verification"),
        "app_rate_limited" => return Effect::filter("app_rate_limited"),
        kind => return Effect::filter(format!("unsupported envelope type {kind}")),
    }
    let Some(event) = env.raw.get("event").filter(|e| e.is_object()) else {
        return Effect::reject("event_callback has no event object");
    };
    match event.get("type").and_then(Value::as_str) {
        // An `app_mention` is the same user-written message as the `message` event Slack
        // may also send for it: both land on one signal (same channel and ts).
        Some("message" | "app_mention") => normalize_message(env, event, settings, names),
        Some("app_uninstalled") => Effect::DeactivateIntegration {
            reason: "app_uninstalled".to_string(),
        },
        Some("tokens_revoked") => {
            let bot_revoked = event
                .get("tokens")
                .and_then(|t| t.get("bot"))
                .and_then(Value::as_array)
                .is_some_and(|bots| !bots.is_empty());
            if bot_revoked {
                Effect::DeactivateIntegration {
                    reason: "tokens_revoked".to_string(),
                }
            } else {
                Effect::filter("tokens_revoked: user tokens only")
            }
        }
        Some(other) => Effect::filter(format!("event type {other} is not a message")),
        None => Effect::filter("event has no type"),
    }
}

/// What a `message` event's subtype asks for.
enum Action {
    Create,
    Edit,
    Delete,
}

/// The reason to filter a message posted by a bot or by the installation's own bot user.
fn bot_filter(message: &Value, settings: &SlackSettings) -> Option<&'static str> {
    let has_bot_id = match message.get("bot_id") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if has_bot_id || message.get("subtype").and_then(Value::as_str) == Some("bot_message") {
        return Some("bot message");
    }
    let own = settings.bot_user_id.as_deref().filter(|b| !b.is_empty());
    if own.is_some() && str_ref(message, "user") == own {
        return Some("own bot user");
    }
    None
}

fn normalize_message(
    env: &Envelope,
    event: &Value,
    settings: &SlackSettings,
    names: &dyn NameLookup,
) -> Effect {
    let channel_type = str_ref(event, "channel_type");
    let accepted = match channel_type {
        Some(ct) if settings.channel_types.is_empty() => DEFAULT_CHANNEL_TYPES.contains(&ct),
        Some(ct) => settings.channel_types.iter().any(|t| t == ct),
        // Without a channel type only the default "everything" setting can accept it.
        None => settings.channel_types.is_empty(),
    };
    if !accepted {
        return Effect::filter(format!(
            "channel type {} is not accepted",
            channel_type.unwrap_or("(missing)")
        ));
    }
    if let Some(reason) = bot_filter(event, settings) {
        return Effect::filter(reason);
    }
    let action = match event.get("subtype") {
        None | Some(Value::Null) => Action::Create,
        Some(Value::String(s)) => match s.as_str() {
            "thread_broadcast" | "file_share" | "me_message" => Action::Create,
            "message_changed" => Action::Edit,
            "message_deleted" => Action::Delete,
            other => return Effect::filter(format!("message subtype {other} is ignored")),
        },
        Some(other) => return Effect::filter(format!("message subtype {other} is ignored")),
    };
    let Some(channel) = str_ref(event, "channel") else {
        return Effect::reject("message event has no channel or ts");
    };
    if !settings.channels.is_empty() && !settings.channels.iter().any(|c| c == channel) {
        return Effect::filter(format!("channel {channel} is not in the allow-list"));
    }
    let Some(team) = settings
        .team_id
        .clone()
        .or_else(|| env.routing_ids().into_iter().next())
        .or_else(|| str_field(event, "team"))
    else {
        return Effect::reject("message event has no team");
    };

    match action {
        Action::Delete => {
            let Some(deleted_ts) = str_ref(event, "deleted_ts") else {
                return Effect::reject("message event has no channel or ts");
            };
            Effect::MarkDeleted {
                source_ref: source_ref(channel, deleted_ts),
                metadata: json!({ "deleted_ts": deleted_ts }),
            }
        }
        Action::Create => match str_ref(event, "ts") {
            Some(ts) => Effect::Upsert {
                signal: build_signal(env, event, event, ts, &team, channel, names),
                merge: Merge::Keep,
            },
            None => Effect::reject("message event has no channel or ts"),
        },
        Action::Edit => {
            let Some(message) = event.get("message").filter(|m| m.is_object()) else {
                return Effect::reject("message_changed event has no message");
            };
            if let Some(reason) = bot_filter(message, settings) {
                return Effect::filter(reason);
            }
            match message.get("subtype") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => match s.as_str() {
                    "thread_broadcast" | "file_share" | "me_message" => {}
                    // A deleted thread parent is replaced by a tombstone placeholder.
                    "tombstone" => {
                        let Some(ts) = edited_ts(event, message) else {
                            return Effect::reject("message event has no channel or ts");
                        };
                        return Effect::MarkDeleted {
                            source_ref: source_ref(channel, ts),
                            metadata: json!({ "deleted_ts": ts, "tombstone": true }),
                        };
                    }
                    other => {
                        return Effect::filter(format!("message subtype {other} is ignored"));
                    }
                },
                Some(other) => {
                    return Effect::filter(format!("message subtype {other} is ignored"));
                }
            }
            let Some(ts) = edited_ts(event, message) else {
                return Effect::reject("message_changed event has no ts");
            };
            Effect::Upsert {
                signal: build_signal(env, event, message, ts, &team, channel, names),
                merge: Merge::Edit,
            }
        }
    }
}

/// The ts of the message a `message_changed` event is about: `message.ts`, else
/// `previous_message.ts` (some edits carry it only there).
fn edited_ts<'a>(event: &'a Value, message: &'a Value) -> Option<&'a str> {
    str_ref(message, "ts").or_else(|| event.get("previous_message").and_then(|p| str_ref(p, "ts")))
}

/// Builds the signal for `message` (the event itself, or `event.message` for an edit) with
/// timestamp `ts`, recorded under the installed workspace `team`.
fn build_signal(
    env: &Envelope,
    event: &Value,
    message: &Value,
    ts: &str,
    team: &str,
    channel: &str,
    names: &dyn NameLookup,
) -> NewSignal {
    let raw_text = message
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let user = str_ref(message, "user");

    let mut files = Vec::new();
    let mut file_names = Vec::new();
    if let Some(list) = message.get("files").and_then(Value::as_array) {
        for file in list {
            let name = str_field(file, "name").or_else(|| str_field(file, "title"));
            if let Some(name) = &name {
                file_names.push(format!("[file] {name}"));
            }
            files.push(json!({ "id": str_field(file, "id"), "name": name }));
        }
    }

    let mut verbatim = render_text(raw_text, names);
    if verbatim.trim().is_empty() {
        verbatim = if file_names.is_empty() {
            NO_CONTENT.to_string()
        } else {
            file_names.join("\n")
        };
    }

    let mut meta = Map::new();
    meta.insert("team_id".into(), json!(team));
    // The sender's organisation (Slack Connect: not the installing workspace).
    meta.insert(
        "user_team".into(),
        json!(str_ref(message, "user_team").or_else(|| str_ref(message, "team"))),
    );
    meta.insert(
        "source_team".into(),
        json!(str_ref(message, "source_team").or(env.team_id.as_deref())),
    );
    meta.insert("channel_id".into(), json!(channel));
    meta.insert("channel_type".into(), json!(str_ref(event, "channel_type")));
    meta.insert("user_id".into(), json!(user));
    meta.insert("message_ts".into(), json!(ts));
    meta.insert("thread_ts".into(), json!(str_ref(message, "thread_ts")));
    meta.insert("event_id".into(), json!(env.event_id));
    meta.insert(
        "event_time".into(),
        env.raw.get("event_time").cloned().unwrap_or(Value::Null),
    );
    meta.insert(
        "is_ext_shared_channel".into(),
        json!(
            env.raw
                .get("is_ext_shared_channel")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        ),
    );
    meta.insert("files".into(), Value::Array(files));
    meta.insert("raw_text".into(), json!(raw_text));
    meta.insert(
        "subtype".into(),
        json!(message.get("subtype").and_then(Value::as_str)),
    );
    meta.insert("externalId".into(), json!(format!("{team}/{channel}/{ts}")));
    if let Some(name) = user.and_then(|u| non_blank(names.user(u))) {
        meta.insert("user_name".into(), json!(name));
    }
    if let Some(name) = non_blank(names.channel(channel)) {
        meta.insert("channel_name".into(), json!(name));
    }

    NewSignal {
        source_ref: source_ref(channel, ts),
        verbatim,
        metadata: Value::Object(meta),
    }
}

/// A Slack message's key inside a workspace: its channel and ts. Not the team: a Slack Connect
/// channel keeps one id and ts for every organisation in it, so a message seen through two
/// installations of one signalbox workspace is one signal.
fn source_ref(channel: &str, ts: &str) -> String {
    format!("slack-{channel}-{ts}")
}

/// `v[key]` if it is a non-empty string.
fn str_ref<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Owned [`str_ref`].
fn str_field(v: &Value, key: &str) -> Option<String> {
    str_ref(v, key).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    // ---- signing -------------------------------------------------------------------------

    const DOC_SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";
    const DOC_TS: i64 = 1_531_420_618;
    const DOC_BODY: &[u8] = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const DOC_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn the_worker_parse_drops_blocks_and_keeps_everything_else() {
        let body = br#"{"type":"event_callback","event_id":"Ev1","blocks":[1],"event":{"type":"message","text":"hi","ts":"1.2","n":-3,"f":1.5,"b":true,"z":null,"blocks":[{"type":"rich_text","elements":[{"type":"text","text":"hi"}]}],"message":{"text":"x","blocks":[]},"files":[{"id":"F1"}]}}"#;
        let env = parse_envelope(body).expect("parses");
        let mut expected: Value = serde_json::from_slice(body).expect("valid");
        let Some(top) = expected.as_object_mut() else {
            panic!("object")
        };
        top.remove("blocks");
        let event = &mut expected["event"];
        event.as_object_mut().expect("object").remove("blocks");
        event["message"]
            .as_object_mut()
            .expect("object")
            .remove("blocks");
        assert_eq!(env.raw, expected);
        assert_eq!(env.event_id.as_deref(), Some("Ev1"));
        // What is skipped is still parsed: bad JSON there is still bad JSON.
        let broken = br#"{"type":"event_callback","event":{"blocks":[{"type":}],"text":"hi"}}"#;
        assert!(parse_envelope(broken).is_err());
    }

    fn check(
        secrets: &[&[u8]],
        ts: Option<&str>,
        sig: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), SignatureError> {
        verify(secrets, ts, sig, body, now, 300)
    }

    #[test]
    fn slack_documented_example_signs_and_verifies() {
        assert_eq!(sign(DOC_SECRET, DOC_TS, DOC_BODY), DOC_SIG);
        assert_eq!(
            check(
                &[DOC_SECRET],
                Some("1531420618"),
                Some(DOC_SIG),
                DOC_BODY,
                DOC_TS
            ),
            Ok(())
        );
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let upper = format!("v0={}", DOC_SIG[3..].to_uppercase());
        assert_eq!(
            check(
                &[DOC_SECRET],
                Some("1531420618"),
                Some(&upper),
                DOC_BODY,
                DOC_TS
            ),
            Ok(())
        );
    }

    #[test]
    fn missing_or_empty_headers_are_missing() {
        let ts = Some("1531420618");
        assert_eq!(
            check(&[DOC_SECRET], None, Some(DOC_SIG), DOC_BODY, DOC_TS),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(&[DOC_SECRET], ts, None, DOC_BODY, DOC_TS),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(&[DOC_SECRET], Some(""), Some(DOC_SIG), DOC_BODY, DOC_TS),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(&[DOC_SECRET], ts, Some("  "), DOC_BODY, DOC_TS),
            Err(SignatureError::Missing)
        );
        // Missing wins over a malformed timestamp.
        assert_eq!(
            check(&[DOC_SECRET], Some("abc"), None, DOC_BODY, DOC_TS),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn malformed_signatures_are_invalid() {
        let ts = Some("1531420618");
        for sig in [
            "v0=",
            "v0=abc",
            "v1=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "v0=z2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b50",
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b5030",
            "v0=ÿ2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b5",
        ] {
            assert_eq!(
                check(&[DOC_SECRET], ts, Some(sig), DOC_BODY, DOC_TS),
                Err(SignatureError::Invalid),
                "{sig}"
            );
        }
    }

    #[test]
    fn wrong_secret_or_changed_body_is_invalid() {
        let ts = Some("1531420618");
        assert_eq!(
            check(&[b"not-the-secret"], ts, Some(DOC_SIG), DOC_BODY, DOC_TS),
            Err(SignatureError::Invalid)
        );
        let mut body = DOC_BODY.to_vec();
        body[0] ^= 1;
        assert_eq!(
            check(&[DOC_SECRET], ts, Some(DOC_SIG), &body, DOC_TS),
            Err(SignatureError::Invalid)
        );
        let mut body = DOC_BODY.to_vec();
        body.push(b'\n');
        assert_eq!(
            check(&[DOC_SECRET], ts, Some(DOC_SIG), &body, DOC_TS),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            check(&[], ts, Some(DOC_SIG), DOC_BODY, DOC_TS),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            check(
                &[b""],
                ts,
                Some(&sign(b"", DOC_TS, DOC_BODY)),
                DOC_BODY,
                DOC_TS
            ),
            Err(SignatureError::Invalid),
            "an empty secret never verifies"
        );
    }

    #[test]
    fn stale_and_future_timestamps_are_stale() {
        let ts = Some("1531420618");
        assert_eq!(
            check(&[DOC_SECRET], ts, Some(DOC_SIG), DOC_BODY, DOC_TS + 300),
            Ok(())
        );
        assert_eq!(
            check(&[DOC_SECRET], ts, Some(DOC_SIG), DOC_BODY, DOC_TS + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(&[DOC_SECRET], ts, Some(DOC_SIG), DOC_BODY, DOC_TS - 301),
            Err(SignatureError::Stale)
        );
        // Stale is reported before a bad signature.
        assert_eq!(
            check(&[DOC_SECRET], ts, Some("v0="), DOC_BODY, DOC_TS + 1000),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(
                &[DOC_SECRET],
                Some("-9223372036854775808"),
                Some(DOC_SIG),
                DOC_BODY,
                i64::MAX
            ),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn non_numeric_timestamp_is_invalid() {
        for ts in ["abc", "1531420618.5", "1e9", "99999999999999999999"] {
            assert_eq!(
                check(&[DOC_SECRET], Some(ts), Some(DOC_SIG), DOC_BODY, DOC_TS),
                Err(SignatureError::Invalid),
                "{ts}"
            );
        }
    }

    #[test]
    fn any_secret_in_the_rotation_list_matches() {
        let ts = Some("1531420618");
        assert_eq!(
            check(
                &[b"old-secret", DOC_SECRET],
                ts,
                Some(DOC_SIG),
                DOC_BODY,
                DOC_TS
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &[DOC_SECRET, b"new-secret"],
                ts,
                Some(DOC_SIG),
                DOC_BODY,
                DOC_TS
            ),
            Ok(())
        );
    }

    #[test]
    fn sign_round_trips() {
        let body = br#"{"type":"event_callback"}"#;
        let sig = sign(b"s3cret", 1_700_000_000, body);
        assert!(sig.starts_with("v0=") && sig.len() == 67);
        assert_eq!(
            verify(
                &[b"s3cret"],
                Some("1700000000"),
                Some(&sig),
                body,
                1_700_000_100,
                300
            ),
            Ok(())
        );
    }

    // ---- envelope ------------------------------------------------------------------------

    fn env(v: Value) -> Envelope {
        parse_envelope(v.to_string().as_bytes()).expect("test envelope is an object")
    }

    #[test]
    fn parse_envelope_refuses_deep_nesting_and_trailing_junk() {
        let deep = format!(
            "{{\"type\":\"event_callback\",\"x\":{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(parse_envelope(deep.as_bytes()).is_err());
        let ok = format!(
            "{{\"type\":\"event_callback\",\"x\":{}1{}}}",
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(parse_envelope(ok.as_bytes()).is_ok());
        for bad in [&b"{} x"[..], b"{\"a\":1,}"] {
            assert!(
                parse_envelope(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parse_envelope_rejects_non_objects() {
        assert!(parse_envelope(b"").is_err());
        assert!(parse_envelope(b"[1,2]").is_err());
        assert!(parse_envelope(b"\"x\"").is_err());
        assert!(parse_envelope(b"token=abc").is_err());
        let e = parse_envelope(b"{}").expect("empty object parses");
        assert_eq!(e.kind, "");
        assert_eq!(e.event_id, None);
    }

    #[test]
    fn parse_url_verification() {
        let e = env(
            json!({"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}),
        );
        assert_eq!(e.kind, "url_verification");
        assert_eq!(
            e.challenge.as_deref(),
            Some("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P")
        );
        assert_eq!(
            normalize(&e, &SlackSettings::default(), &NoNames),
            Effect::filter("url_verification")
        );
        assert!(e.dedupe_key(b"body").starts_with("sha256:"));
    }

    #[test]
    fn routing_ids_order_and_dedup() {
        let e = env(json!({
            "type": "event_callback", "team_id": "T1", "enterprise_id": "E1",
            "context_team_id": "T2", "api_app_id": "A1", "event_id": "Ev1",
            "authorizations": [{"team_id": "T1", "user_id": "U1", "is_bot": true}],
            "event": {"type": "message"}
        }));
        // The envelope's own team and enterprise only count when there is neither an
        // authorization nor a context.
        assert_eq!(e.routing_ids(), vec!["T1", "T2"]);
        let e = env(json!({"type": "event_callback", "team_id": "T1", "enterprise_id": "E1"}));
        assert_eq!(e.routing_ids(), vec!["T1", "E1"]);
        let e = env(json!({
            "type": "event_callback", "team_id": "T1", "enterprise_id": "E1",
            "context_team_id": "T2", "api_app_id": "A1", "event_id": "Ev1",
            "authorizations": [{"team_id": "T1", "user_id": "U1", "is_bot": true}],
            "event": {"type": "message"}
        }));
        assert_eq!(e.api_app_id.as_deref(), Some("A1"));
        assert_eq!(e.event_type.as_deref(), Some("message"));
        let e = env(
            json!({"type": "event_callback", "team_id": "", "authorizations": [{"team_id": "T9"}], "context_team_id": null, "enterprise_id": 5}),
        );
        assert_eq!(e.routing_ids(), vec!["T9"]);
        let e = env(json!({"authorizations": "nope"}));
        assert!(e.routing_ids().is_empty());
        // Ids that are not shaped like Slack's are never routing candidates.
        let e = env(
            json!({"team_id": "T0', OR 1=1", "authorizations": [{"team_id": "x".repeat(5000)}], "context_team_id": "t123"}),
        );
        assert!(e.routing_ids().is_empty());
        assert!(e.authorizations.is_empty());
    }

    #[test]
    fn slack_connect_routes_by_the_installation_not_the_sender() {
        // From Slack's shared-channel payloads: the sender's org in `team_id`, the
        // installation the event was delivered for in `authorizations` and `context_team_id`.
        let e = env(json!({
            "type": "event_callback", "team_id": "T0SENDER", "context_team_id": "T0INSTALL",
            "is_ext_shared_channel": true, "event_id": "Ev1",
            "authorizations": [{"enterprise_id": null, "team_id": "T0INSTALL", "user_id": "U1", "is_bot": true, "is_enterprise_install": false}],
            "event": with(with(plain_message(), "team", json!("T0SENDER")), "user_team", json!("T0SENDER"))
        }));
        assert_eq!(
            e.authorized_installations(),
            vec![vec!["T0INSTALL".to_string()]]
        );
        assert_eq!(e.fallback_installations(), vec!["T0INSTALL"]);
        assert!(!e.routing_ids().contains(&"T0SENDER".to_string()));
        let settings = SlackSettings {
            team_id: Some(e.installing_team("T0INSTALL")),
            ..settings()
        };
        let (signal, _) = upsert(normalize(&e, &settings, &NoNames));
        assert_eq!(signal.metadata["team_id"], "T0INSTALL");
        assert_eq!(signal.metadata["user_team"], "T0SENDER");
        assert_eq!(signal.metadata["source_team"], "T0SENDER");
        assert_eq!(signal.metadata["is_ext_shared_channel"], true);
        // The same message seen by another installation has the same key.
        assert_eq!(signal.source_ref, "slack-C2147483705-1355517523.000005");
    }

    #[test]
    fn org_wide_installs_route_by_enterprise_and_record_the_workspace() {
        let e = env(json!({
            "type": "event_callback", "team_id": "T0GRIDWS", "enterprise_id": "E0ORG",
            "context_team_id": "T0GRIDWS", "context_enterprise_id": "E0ORG", "event_id": "Ev1",
            "authorizations": [{"enterprise_id": "E0ORG", "team_id": "T0GRIDWS", "user_id": "U1", "is_bot": true, "is_enterprise_install": true}],
            "event": plain_message()
        }));
        assert_eq!(
            e.authorized_installations(),
            vec![vec!["E0ORG".to_string(), "T0GRIDWS".to_string()]]
        );
        assert_eq!(e.installing_team("E0ORG"), "T0GRIDWS");
        // A workspace install inside an enterprise is that workspace.
        let a = Authorization {
            team_id: Some("T1".into()),
            enterprise_id: Some("E1".into()),
            is_enterprise_install: false,
        };
        assert_eq!(a.ids(), vec!["T1"]);
        let a = Authorization { team_id: None, ..a };
        assert_eq!(a.ids(), vec!["E1"]);
    }

    #[test]
    fn team_ids_are_shape_checked() {
        for ok in ["T1", "E0123ABCD", "T01234567890123456789"] {
            assert!(is_team_id(ok), "{ok}");
        }
        for bad in [
            "",
            "T",
            "U123",
            "t123",
            "T12-3",
            "T012345678901234567890",
            "T1 ",
            "Té",
        ] {
            assert!(!is_team_id(bad), "{bad}");
        }
    }

    #[test]
    fn dedupe_keys() {
        let e = env(json!({"type": "event_callback", "event_id": "Ev123"}));
        assert_eq!(e.dedupe_key(b"x"), "Ev123");
        let e = env(
            json!({"token": "t", "type": "app_rate_limited", "team_id": "T123456", "minute_rate_limited": 1518467820, "api_app_id": "A123456"}),
        );
        assert_eq!(e.dedupe_key(b"x"), "app_rate_limited:T123456:1518467820");
        let e = env(json!({"type": "event_callback"}));
        assert_eq!(
            e.dedupe_key(b"abc"),
            format!("sha256:{}", sha256_hex(b"abc"))
        );
    }

    // ---- normalisation -------------------------------------------------------------------

    struct Names(HashMap<&'static str, &'static str>);

    impl NameLookup for Names {
        fn user(&self, id: &str) -> Option<String> {
            self.0.get(id).map(|s| s.to_string())
        }
        fn channel(&self, id: &str) -> Option<String> {
            self.0.get(id).map(|s| s.to_string())
        }
    }

    fn names() -> Names {
        Names(HashMap::from([
            ("U2147483697", "spengler"),
            ("C2147483705", "general"),
        ]))
    }

    /// An `event_callback` envelope shaped like Slack's `message.channels` example.
    fn callback(event: Value) -> Envelope {
        env(json!({
            "token": "XXYYZZ",
            "team_id": "T123ABC456",
            "api_app_id": "A123ABC456",
            "event": event,
            "type": "event_callback",
            "event_id": "Ev123ABC456",
            "event_time": 1355517523,
            "authorizations": [{"enterprise_id": null, "team_id": "T123ABC456", "user_id": "U123ABC456", "is_bot": true, "is_enterprise_install": false}],
            "is_ext_shared_channel": false
        }))
    }

    fn plain_message() -> Value {
        json!({
            "type": "message",
            "channel": "C2147483705",
            "user": "U2147483697",
            "text": "Hello world",
            "ts": "1355517523.000005",
            "event_ts": "1355517523.000005",
            "channel_type": "channel"
        })
    }

    fn settings() -> SlackSettings {
        SlackSettings {
            bot_user_id: Some("U0BOT".into()),
            ..SlackSettings::default()
        }
    }

    fn run(event: Value) -> Effect {
        normalize(&callback(event), &settings(), &NoNames)
    }

    fn upsert(effect: Effect) -> (NewSignal, Merge) {
        match effect {
            Effect::Upsert { signal, merge } => (signal, merge),
            other => panic!("expected an upsert, got {other:?}"),
        }
    }

    fn with(mut v: Value, key: &str, value: Value) -> Value {
        if let Some(m) = v.as_object_mut() {
            m.insert(key.to_string(), value);
        }
        v
    }

    #[test]
    fn plain_channel_message_creates_a_signal() {
        let (signal, merge) = upsert(run(plain_message()));
        assert_eq!(merge, Merge::Keep);
        assert_eq!(signal.source_ref, "slack-C2147483705-1355517523.000005");
        assert_eq!(signal.verbatim, "Hello world");
        let m = &signal.metadata;
        assert_eq!(m["team_id"], "T123ABC456");
        assert_eq!(m["channel_id"], "C2147483705");
        assert_eq!(m["channel_type"], "channel");
        assert_eq!(m["user_id"], "U2147483697");
        assert_eq!(m["message_ts"], "1355517523.000005");
        assert_eq!(m["thread_ts"], Value::Null);
        assert_eq!(m["event_id"], "Ev123ABC456");
        assert_eq!(m["event_time"], 1355517523);
        assert_eq!(m["is_ext_shared_channel"], false);
        assert_eq!(m["files"], json!([]));
        assert_eq!(m["raw_text"], "Hello world");
        assert_eq!(m["subtype"], Value::Null);
        assert_eq!(m["externalId"], "T123ABC456/C2147483705/1355517523.000005");
        assert!(m.get("user_name").is_none() && m.get("channel_name").is_none());
    }

    #[test]
    fn names_from_the_lookup_go_into_metadata_and_text() {
        let event = with(
            plain_message(),
            "text",
            json!("hi <@U2147483697> in <#C2147483705>"),
        );
        let (signal, _) = upsert(normalize(&callback(event), &settings(), &names()));
        assert_eq!(signal.verbatim, "hi @spengler in #general");
        assert_eq!(signal.metadata["user_name"], "spengler");
        assert_eq!(signal.metadata["channel_name"], "general");
        assert_eq!(
            signal.metadata["raw_text"],
            "hi <@U2147483697> in <#C2147483705>"
        );
    }

    #[test]
    fn thread_reply_keeps_thread_ts() {
        let event = with(plain_message(), "thread_ts", json!("1355517500.000001"));
        let event = with(event, "parent_user_id", json!("U1"));
        let (signal, merge) = upsert(run(event));
        assert_eq!(merge, Merge::Keep);
        assert_eq!(signal.metadata["thread_ts"], "1355517500.000001");
        assert_eq!(signal.source_ref, "slack-C2147483705-1355517523.000005");
    }

    #[test]
    fn thread_broadcast_creates_a_signal() {
        let event = json!({
            "type": "message", "subtype": "thread_broadcast", "text": "Also to channel",
            "user": "U061F7AUR", "ts": "1517414906.000889", "thread_ts": "1517414896.001003",
            "root": {"text": "root", "user": "U061F7AUR", "ts": "1517414896.001003"},
            "client_msg_id": "a", "channel": "C061EG9SL", "event_ts": "1517414906.000889",
            "channel_type": "channel"
        });
        let (signal, merge) = upsert(run(event));
        assert_eq!(merge, Merge::Keep);
        assert_eq!(signal.verbatim, "Also to channel");
        assert_eq!(signal.metadata["subtype"], "thread_broadcast");
        assert_eq!(signal.metadata["thread_ts"], "1517414896.001003");
    }

    fn message_changed(inner: Value) -> Value {
        json!({
            "type": "message", "subtype": "message_changed", "hidden": true,
            "channel": "C123ABC456", "channel_type": "channel", "ts": "1358878755.000001",
            "event_ts": "1358878755.000001",
            "message": inner,
            "previous_message": {"type": "message", "user": "U123ABC456", "text": "Hello world", "ts": "1358878749.000002"}
        })
    }

    #[test]
    fn message_changed_upserts_an_edit() {
        let inner = json!({"type": "message", "user": "U123ABC456", "text": "Hello, world!", "ts": "1358878749.000002", "edited": {"user": "U123ABC456", "ts": "1358878755.000001"}});
        let (signal, merge) = upsert(run(message_changed(inner)));
        assert_eq!(merge, Merge::Edit);
        assert_eq!(signal.source_ref, "slack-C123ABC456-1358878749.000002");
        assert_eq!(signal.verbatim, "Hello, world!");
        assert_eq!(signal.metadata["message_ts"], "1358878749.000002");
        assert_eq!(signal.metadata["user_id"], "U123ABC456");
        assert_eq!(signal.metadata["subtype"], Value::Null);
    }

    #[test]
    fn message_changed_with_same_text_still_upserts() {
        let inner = json!({"type": "message", "user": "U123ABC456", "text": "Hello world", "ts": "1358878749.000002", "attachments": [{"title": "unfurl"}]});
        let (signal, merge) = upsert(run(message_changed(inner)));
        assert_eq!(merge, Merge::Edit);
        assert_eq!(signal.verbatim, "Hello world");
    }

    #[test]
    fn message_changed_of_bot_or_odd_messages_is_filtered_or_rejected() {
        let inner = json!({"type": "message", "bot_id": "B1", "text": "x", "ts": "1.2"});
        assert_eq!(run(message_changed(inner)), Effect::filter("bot message"));
        let inner = json!({"type": "message", "subtype": "bot_message", "text": "x", "ts": "1.2"});
        assert_eq!(run(message_changed(inner)), Effect::filter("bot message"));
        let inner = json!({"type": "message", "user": "U0BOT", "text": "x", "ts": "1.2"});
        assert_eq!(run(message_changed(inner)), Effect::filter("own bot user"));
        let inner =
            json!({"type": "message", "subtype": "huddle_thread", "text": "x", "ts": "1.2"});
        assert_eq!(
            run(message_changed(inner)),
            Effect::filter("message subtype huddle_thread is ignored")
        );
        assert_eq!(
            run(message_changed(Value::Null)),
            Effect::reject("message_changed event has no message")
        );
        let mut event = message_changed(json!({"type": "message", "text": "x"}));
        event["previous_message"] = json!({"type": "message", "text": "old"});
        assert_eq!(
            run(event),
            Effect::reject("message_changed event has no ts")
        );
    }

    #[test]
    fn message_changed_without_ts_in_message_uses_previous_message_ts() {
        // As in Slack's SDK fixtures: the edited `message` carries no ts, `previous_message` does.
        let inner = json!({"type": "message", "user": "U123ABC456", "text": "Hello, world"});
        let (signal, merge) = upsert(run(message_changed(inner)));
        assert_eq!(merge, Merge::Edit);
        assert_eq!(signal.source_ref, "slack-C123ABC456-1358878749.000002");
        assert_eq!(signal.verbatim, "Hello, world");
    }

    #[test]
    fn app_mentions_and_me_messages_are_signals_of_their_message() {
        let mention = json!({"type": "app_mention", "user": "U2147483697", "text": "<@U0BOT> the export is broken", "ts": "1355517523.000005", "channel": "C2147483705", "event_ts": "1355517523.000005"});
        let (a, merge) = upsert(run(mention));
        assert_eq!(merge, Merge::Keep);
        let (m, _) = upsert(run(plain_message()));
        assert_eq!(a.source_ref, m.source_ref, "one signal per channel+ts");
        let me = with(plain_message(), "subtype", json!("me_message"));
        let (signal, _) = upsert(run(me));
        assert_eq!(signal.verbatim, "Hello world");
    }

    #[test]
    fn message_changed_to_tombstone_marks_deleted() {
        let inner = json!({"type": "message", "subtype": "tombstone", "text": "This message was deleted.", "user": "USLACKBOT", "ts": "1358878749.000002", "hidden": true});
        assert_eq!(
            run(message_changed(inner)),
            Effect::MarkDeleted {
                source_ref: "slack-C123ABC456-1358878749.000002".into(),
                metadata: json!({"deleted_ts": "1358878749.000002", "tombstone": true}),
            }
        );
    }

    #[test]
    fn message_deleted_marks_deleted() {
        let event = json!({
            "type": "message", "subtype": "message_deleted", "hidden": true,
            "channel": "C123ABC456", "channel_type": "channel", "ts": "1358878755.000001",
            "deleted_ts": "1358878749.000002", "event_ts": "1358878755.000001",
            "previous_message": {"type": "message", "user": "U123ABC456", "text": "Hello world", "ts": "1358878749.000002"}
        });
        assert_eq!(
            run(event.clone()),
            Effect::MarkDeleted {
                source_ref: "slack-C123ABC456-1358878749.000002".into(),
                metadata: json!({"deleted_ts": "1358878749.000002"}),
            }
        );
        let no_channel_type = with(event.clone(), "channel_type", Value::Null);
        assert!(matches!(run(no_channel_type), Effect::MarkDeleted { .. }));
        let no_ts = with(event, "deleted_ts", Value::Null);
        assert_eq!(
            run(no_ts),
            Effect::reject("message event has no channel or ts")
        );
    }

    #[test]
    fn bot_messages_are_filtered() {
        let event = json!({"type": "message", "subtype": "bot_message", "ts": "1358877455.000010", "text": "Pushing is the answer", "bot_id": "BB12033", "username": "github", "icons": {}, "channel": "C1", "channel_type": "channel"});
        assert_eq!(run(event), Effect::filter("bot message"));
        let event = json!({"type": "message", "subtype": "bot_message", "ts": "1.1", "text": "x", "channel": "C1", "channel_type": "channel"});
        assert_eq!(run(event), Effect::filter("bot message"));
        let event = with(plain_message(), "bot_id", json!("B0123"));
        let event = with(event, "bot_profile", json!({"app_id": "A1"}));
        assert_eq!(run(event), Effect::filter("bot message"));
        let event = with(plain_message(), "bot_id", Value::Null);
        assert!(matches!(run(event), Effect::Upsert { .. }));
    }

    #[test]
    fn own_bot_user_is_filtered() {
        let event = with(plain_message(), "user", json!("U0BOT"));
        assert_eq!(run(event.clone()), Effect::filter("own bot user"));
        // Without a configured bot user nothing is "own".
        let effect = normalize(&callback(event), &SlackSettings::default(), &NoNames);
        assert!(matches!(effect, Effect::Upsert { .. }));
    }

    #[test]
    fn ignored_subtypes_are_filtered() {
        let event = json!({"type": "message", "subtype": "channel_join", "ts": "1358877458.000011", "user": "U2147483828", "text": "<@U2147483828|cal> has joined the channel", "inviter": "U123", "channel": "C1", "channel_type": "channel"});
        assert_eq!(
            run(event),
            Effect::filter("message subtype channel_join is ignored")
        );
        for subtype in ["channel_leave", "message_replied", "brand_new_subtype"] {
            let event = with(plain_message(), "subtype", json!(subtype));
            assert_eq!(
                run(event),
                Effect::filter(format!("message subtype {subtype} is ignored"))
            );
        }
        let event = with(plain_message(), "subtype", json!(42));
        assert_eq!(run(event), Effect::filter("message subtype 42 is ignored"));
    }

    #[test]
    fn file_share_uses_file_names() {
        let event = json!({
            "type": "message", "subtype": "file_share", "text": "", "user": "U1",
            "ts": "1.000100", "channel": "C1", "channel_type": "channel", "upload": false,
            "files": [
                {"id": "F1", "name": "report.pdf", "title": "Report", "url_private": "https://files.slack.com/secret", "mimetype": "application/pdf"},
                {"id": "F2", "title": "Untitled"},
                {"id": "F3", "mode": "hidden_by_limit"},
                "garbage"
            ]
        });
        let (signal, merge) = upsert(run(event.clone()));
        assert_eq!(merge, Merge::Keep);
        assert_eq!(signal.verbatim, "[file] report.pdf\n[file] Untitled");
        assert_eq!(
            signal.metadata["files"],
            json!([{"id": "F1", "name": "report.pdf"}, {"id": "F2", "name": "Untitled"}, {"id": "F3", "name": null}, {"id": null, "name": null}])
        );
        assert!(!signal.metadata.to_string().contains("url_private"));
        assert!(!signal.metadata.to_string().contains("files.slack.com"));
        let (signal, _) = upsert(run(with(event.clone(), "text", json!("see attached"))));
        assert_eq!(signal.verbatim, "see attached");
        let (signal, _) = upsert(run(with(event, "files", json!([]))));
        assert_eq!(signal.verbatim, NO_CONTENT);
    }

    #[test]
    fn lifecycle_events_deactivate() {
        assert_eq!(
            run(json!({"type": "app_uninstalled"})),
            Effect::DeactivateIntegration {
                reason: "app_uninstalled".into()
            }
        );
        assert_eq!(
            run(
                json!({"type": "tokens_revoked", "tokens": {"oauth": ["UXXXXXXXX"], "bot": ["UXXXXXXXX"]}})
            ),
            Effect::DeactivateIntegration {
                reason: "tokens_revoked".into()
            }
        );
        assert_eq!(
            run(json!({"type": "tokens_revoked", "tokens": {"oauth": ["UXXXXXXXX"], "bot": []}})),
            Effect::filter("tokens_revoked: user tokens only")
        );
        assert_eq!(
            run(json!({"type": "tokens_revoked", "tokens": {"oauth": ["UXXXXXXXX"]}})),
            Effect::filter("tokens_revoked: user tokens only")
        );
        assert_eq!(
            run(json!({"type": "tokens_revoked", "tokens": "weird"})),
            Effect::filter("tokens_revoked: user tokens only")
        );
    }

    #[test]
    fn other_envelopes_and_event_types_are_filtered() {
        let e = env(
            json!({"token": "t", "type": "app_rate_limited", "team_id": "T123456", "minute_rate_limited": 1518467820, "api_app_id": "A123456"}),
        );
        assert_eq!(
            normalize(&e, &settings(), &NoNames),
            Effect::filter("app_rate_limited")
        );
        let e = env(json!({"type": "block_actions"}));
        assert_eq!(
            normalize(&e, &settings(), &NoNames),
            Effect::filter("unsupported envelope type block_actions")
        );
        assert_eq!(
            run(json!({"type": "reaction_added", "user": "U1", "reaction": "thumbsup"})),
            Effect::filter("event type reaction_added is not a message")
        );
        assert_eq!(
            run(json!({"no_type": true})),
            Effect::filter("event has no type")
        );
        let e = env(json!({"type": "event_callback", "team_id": "T1", "event": "nope"}));
        assert_eq!(
            normalize(&e, &settings(), &NoNames),
            Effect::reject("event_callback has no event object")
        );
    }

    #[test]
    fn channel_allow_list() {
        let s = SlackSettings {
            channels: vec!["C999".into()],
            ..settings()
        };
        assert_eq!(
            normalize(&callback(plain_message()), &s, &NoNames),
            Effect::filter("channel C2147483705 is not in the allow-list")
        );
        let s = SlackSettings {
            channels: vec!["C999".into(), "C2147483705".into()],
            ..settings()
        };
        assert!(matches!(
            normalize(&callback(plain_message()), &s, &NoNames),
            Effect::Upsert { .. }
        ));
    }

    #[test]
    fn channel_type_filter() {
        let im = with(plain_message(), "channel_type", json!("im"));
        assert!(matches!(run(im.clone()), Effect::Upsert { .. }));
        let only_channels = SlackSettings {
            channel_types: vec!["channel".into()],
            ..settings()
        };
        assert_eq!(
            normalize(&callback(im), &only_channels, &NoNames),
            Effect::filter("channel type im is not accepted")
        );
        let app_home = with(plain_message(), "channel_type", json!("app_home"));
        assert_eq!(
            run(app_home.clone()),
            Effect::filter("channel type app_home is not accepted")
        );
        let allow_home = SlackSettings {
            channel_types: vec!["app_home".into()],
            ..settings()
        };
        assert!(matches!(
            normalize(&callback(app_home), &allow_home, &NoNames),
            Effect::Upsert { .. }
        ));
        let missing = with(plain_message(), "channel_type", Value::Null);
        assert!(matches!(run(missing.clone()), Effect::Upsert { .. }));
        assert_eq!(
            normalize(&callback(missing), &only_channels, &NoNames),
            Effect::filter("channel type (missing) is not accepted")
        );
    }

    #[test]
    fn missing_channel_or_ts_is_rejected() {
        let event = with(plain_message(), "channel", Value::Null);
        assert_eq!(
            run(event),
            Effect::reject("message event has no channel or ts")
        );
        let event = with(plain_message(), "ts", json!(1355517523.5));
        assert_eq!(
            run(event),
            Effect::reject("message event has no channel or ts")
        );
    }

    #[test]
    fn team_falls_back_to_routing_ids_then_event_team() {
        let e = env(
            json!({"type": "event_callback", "event_id": "Ev1", "context_team_id": "T2", "event": plain_message()}),
        );
        let (signal, _) = upsert(normalize(&e, &settings(), &NoNames));
        assert_eq!(signal.metadata["team_id"], "T2");
        let event = with(plain_message(), "team", json!("T3"));
        let e = env(json!({"type": "event_callback", "event": event}));
        let (signal, _) = upsert(normalize(&e, &settings(), &NoNames));
        assert_eq!(signal.source_ref, "slack-C2147483705-1355517523.000005");
        assert_eq!(signal.metadata["team_id"], "T3");
        let e = env(json!({"type": "event_callback", "event": plain_message()}));
        assert_eq!(
            normalize(&e, &settings(), &NoNames),
            Effect::reject("message event has no team")
        );
    }

    #[test]
    fn ext_shared_flag_and_empty_text() {
        let e = env(
            json!({"type": "event_callback", "team_id": "T1", "is_ext_shared_channel": true, "event": with(plain_message(), "text", json!("   "))}),
        );
        let (signal, _) = upsert(normalize(&e, &settings(), &NoNames));
        assert_eq!(signal.metadata["is_ext_shared_channel"], true);
        assert_eq!(signal.verbatim, NO_CONTENT);
        let (signal, _) = upsert(run(with(plain_message(), "text", json!({"not": "text"}))));
        assert_eq!(signal.verbatim, NO_CONTENT);
        assert_eq!(signal.metadata["raw_text"], "");
    }

    #[test]
    fn odd_json_shapes_never_panic() {
        let shapes = [
            json!(null),
            json!(1),
            json!("s"),
            json!([]),
            json!({}),
            json!({"type": 1}),
            json!({"type": "message", "subtype": [], "channel": {}, "ts": []}),
            json!({"type": "message", "channel": "C", "ts": "1", "files": {"a": 1}, "user": 5, "thread_ts": 7, "text": null}),
            json!({"type": "message", "subtype": "message_changed", "channel": "C", "message": []}),
            json!({"type": "message", "subtype": "message_changed", "channel": "C", "message": {"ts": "1", "subtype": 3}}),
            json!({"type": "message", "subtype": "message_deleted", "channel": "C", "deleted_ts": 1}),
            json!({"type": "tokens_revoked", "tokens": null}),
        ];
        for event in shapes {
            let _ = run(event.clone());
            for kind in [json!("event_callback"), json!(null), json!(3)] {
                let e = env(
                    json!({"type": kind, "event": event, "authorizations": [null, 1], "team_id": []}),
                );
                let _ = normalize(&e, &SlackSettings::default(), &NoNames);
                let _ = e.routing_ids();
                let _ = e.dedupe_key(b"");
            }
        }
    }

    // ---- render_text ---------------------------------------------------------------------

    fn render(s: &str) -> String {
        render_text(s, &NoNames)
    }

    #[test]
    fn render_entities() {
        assert_eq!(render("a &amp; b &lt;c&gt;"), "a & b <c>");
        assert_eq!(render("&amp;lt; stays &amp;gt;"), "&lt; stays &gt;");
        assert_eq!(render("&amp;amp;"), "&amp;");
        assert_eq!(render("AT&T &nbsp; & &am"), "AT&T &nbsp; & &am");
    }

    #[test]
    fn render_user_mentions() {
        assert_eq!(render("hi <@U123>"), "hi @U123");
        assert_eq!(render("hi <@U123|bob>"), "hi @bob");
        assert_eq!(render("hi <@U123|@bob>"), "hi @bob");
        assert_eq!(render_text("<@U2147483697|old>", &names()), "@spengler");
        assert_eq!(render_text("<@U2147483697>", &names()), "@spengler");
        assert_eq!(render("<@>"), "@");
    }

    #[test]
    fn render_channel_mentions() {
        assert_eq!(render("<#C123|general>"), "#general");
        assert_eq!(render("<#C123>"), "#C123");
        assert_eq!(render("<#C123|>"), "#C123");
        assert_eq!(
            render_text("<#C2147483705|stale-name>", &names()),
            "#general"
        );
    }

    #[test]
    fn render_special_mentions() {
        assert_eq!(
            render("<!here> <!channel> <!everyone>"),
            "@here @channel @everyone"
        );
        assert_eq!(render("<!here|here>"), "@here");
        assert_eq!(render("<!subteam^S123|@team>"), "@team");
        assert_eq!(render("<!subteam^S123|team>"), "@team");
        assert_eq!(render("<!subteam^S123>"), "@S123");
        assert_eq!(
            render("<!date^1392734382^{date_pretty}|Feb 18, 2014>"),
            "Feb 18, 2014"
        );
        assert_eq!(render("<!foo>"), "@foo");
    }

    #[test]
    fn render_links() {
        assert_eq!(render("<https://x.com|label>"), "label (https://x.com)");
        assert_eq!(render("<https://x.com>"), "https://x.com");
        assert_eq!(render("<https://x.com|https://x.com>"), "https://x.com");
        assert_eq!(
            render("<https://x.com/?a=1&amp;b=2|A &amp; B>"),
            "A & B (https://x.com/?a=1&b=2)"
        );
        assert_eq!(render("<mailto:a@b.com|a@b.com>"), "a@b.com");
        assert_eq!(render("<mailto:a@b.com|Alice>"), "Alice (a@b.com)");
        assert_eq!(render("<mailto:a@b.com>"), "a@b.com");
        assert_eq!(render("<http://a|b|c>"), "b|c (http://a)");
    }

    #[test]
    fn render_unterminated_and_odd_brackets() {
        assert_eq!(render("a < b"), "a < b");
        assert_eq!(render("<@U123"), "<@U123");
        assert_eq!(render("x < y <@U1>"), "x < y @U1");
        assert_eq!(render("<<<"), "<<<");
        assert_eq!(render("a > b"), "a > b");
        assert_eq!(render("<>"), "<>");
        assert_eq!(render("<|x>"), "<|x>");
        assert_eq!(render("&lt;@U1&gt;"), "<@U1>");
        assert_eq!(render(""), "");
        assert_eq!(render("é<@Ü|ñ>ß<"), "é@ñß<");
    }

    #[test]
    fn render_is_linear_on_adversarial_input() {
        let many_opens = "<".repeat(200_000);
        assert_eq!(render(&many_opens), many_opens);
        let nested = "<a".repeat(100_000) + ">";
        assert_eq!(render(&nested), "<a".repeat(99_999) + "a");
        let entities = "&amp;".repeat(100_000);
        assert_eq!(render(&entities), "&".repeat(100_000));
    }

    #[test]
    fn render_never_panics_on_arbitrary_bytes() {
        // A small deterministic fuzz over the interesting alphabet, including multi-byte chars.
        let alphabet = [
            '<', '>', '|', '@', '#', '!', '^', '&', ';', 'a', 'l', 't', 'é', '💥', ' ',
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2_000 {
            let mut s = String::new();
            for _ in 0..(state % 24) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            let _ = render_text(&s, &names());
            state = state.wrapping_add(1);
        }
    }
}
