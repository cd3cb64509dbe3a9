//! The generic signed endpoint: `POST /api/webhooks/signals?key_id=whk_…`, Standard Webhooks
//! signatures, one signal per message (`source_ref`, or the `webhook-id` when absent).

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::State;

use crate::http::extract::Query;
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{kept_headers, parse_json_object, read_body, reject, store_and_ack};
use crate::clock::{now_micros, now_secs};
use crate::credentials::valid_keys;
use crate::error::{ApiError, ApiResult};
use crate::ids::{new_id, prefix};
use crate::protocol::standard_webhooks::{self, Headers};
use crate::protocol::{Effect, Merge, NewSignal};
use crate::state::AppState;
use crate::store::{ClaimedDelivery, DeliveryStatus, LastUsedTable, NewDelivery, Parsed};

/// Source name stored with deliveries and signals.
pub const SOURCE: &str = "webhook";

/// Query of the endpoint.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// The webhook key (`whk_…`) whose secret signed the request.
    #[param(
        required = true,
        min_length = 1,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    key_id: Option<String>,
}

/// The Standard Webhooks (or Svix) signature headers; `svix-id`, `svix-timestamp` and
/// `svix-signature` are accepted in their place.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // only its OpenAPI description is used
struct SignatureParams {
    /// Unique message id; a resend with the same id is the same delivery.
    #[param(rename = "webhook-id")]
    webhook_id: Option<String>,
    /// Unix seconds; outside the window (default ±300 s) the request is refused.
    #[param(rename = "webhook-timestamp")]
    webhook_timestamp: Option<String>,
    /// `v1,<base64 HMAC-SHA256>` (space-separated when several).
    #[param(rename = "webhook-signature")]
    webhook_signature: Option<String>,
}

/// The body a sender posts (after verification; documented here for senders).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only its OpenAPI description is used
struct GenericPayload {
    /// The customer's words (required, not blank).
    #[schema(min_length = 1)]
    verbatim: String,
    /// Your id of the message (1 to 512 characters); a second payload with the same one
    /// updates the signal instead of adding one.
    #[schema(min_length = 1, max_length = 512)]
    source_ref: Option<String>,
    /// Where it came from (e.g. `intercom`).
    source_name: Option<String>,
    /// Link back to it.
    source_url: Option<String>,
    /// The customer's email.
    customer_email: Option<String>,
    /// Anything else, kept in the signal's metadata.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
}

/// The payload a sender posts.
#[derive(Debug, Deserialize)]
struct Payload {
    verbatim: Option<Value>,
    source_ref: Option<Value>,
    source_name: Option<Value>,
    source_url: Option<Value>,
    customer_email: Option<Value>,
    metadata: Option<Value>,
}

/// Validates a payload; returns the fields a signal needs.
fn validate(v: &Value) -> Result<Payload, String> {
    let p: Payload = serde_json::from_value(v.clone()).map_err(|e| format!("payload: {e}"))?;
    match &p.verbatim {
        Some(Value::String(s)) if !s.trim().is_empty() => {}
        Some(Value::String(_)) => return Err("verbatim must not be empty".into()),
        Some(_) => return Err("verbatim must be a string".into()),
        None => return Err("verbatim is required".into()),
    }
    for (name, field) in [
        ("source_ref", &p.source_ref),
        ("source_name", &p.source_name),
        ("source_url", &p.source_url),
        ("customer_email", &p.customer_email),
    ] {
        if !matches!(field, None | Some(Value::Null) | Some(Value::String(_))) {
            return Err(format!("{name} must be a string"));
        }
    }
    if let Some(Value::String(r)) = &p.source_ref
        && (r.is_empty() || r.len() > 512)
    {
        return Err("source_ref must be 1 to 512 characters".into());
    }
    if !matches!(
        p.metadata,
        None | Some(Value::Null) | Some(Value::Object(_))
    ) {
        return Err("metadata must be an object".into());
    }
    Ok(p)
}

/// Generic Standard Webhooks delivery: one signal per payload.
#[utoipa::path(post, path = "/api/webhooks/signals", tag = "webhooks",
    params(KeyQuery, SignatureParams), request_body = GenericPayload,
    responses((status = 200, description = "Stored (or a duplicate)", body = super::Ack),
              super::WebhookErrors))]
pub async fn receive(
    State(state): State<AppState>,
    Query(q): Query<KeyQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let body = read_body(&state, &headers, body, SOURCE).await?;
    // The contract's code for both; the message says which of the two it is.
    let key_id = match q.key_id.as_deref().map(str::trim) {
        Some(k) if !k.is_empty() => k.to_string(),
        given => {
            let m = if given.is_some() {
                "the key_id query parameter is empty: pass the webhook key's id \
                 (?key_id=whk_…, printed by `signalbox webhook-key create`)"
            } else {
                "the key_id query parameter is required: POST /api/webhooks/signals?key_id=whk_… \
                 (the id printed by `signalbox webhook-key create`)"
            };
            return Err(reject(
                &state,
                SOURCE,
                ApiError::MissingParam("missing_integration_id", m.into()),
            ));
        }
    };
    let key = if crate::ids::looks_like(&key_id, prefix::WEBHOOK_KEY) {
        state.creds.webhook_key(&key_id).await?
    } else {
        None
    };
    let Some(key) = key else {
        super::equalise_timing(&body);
        return Err(reject(&state, SOURCE, ApiError::UnknownIntegration));
    };
    // Svix and its libraries send the same scheme under `svix-*` names.
    let either = |std: &str, svix: &str| {
        super::header(&headers, std).or_else(|| super::header(&headers, svix))
    };
    let h = Headers {
        id: either("webhook-id", "svix-id"),
        timestamp: either("webhook-timestamp", "svix-timestamp"),
        signature: either("webhook-signature", "svix-signature"),
    };
    let keys = valid_keys(&key.secrets, now_micros());
    let (now, tol) = (now_secs(), state.cfg.signature_tolerance_secs);
    standard_webhooks::verify(&keys, &h, &body, now, tol).map_err(|e| {
        reject(
            &state,
            SOURCE,
            super::signature_error(e, h.timestamp, now, tol),
        )
    })?;
    let msg_id = h.id.unwrap_or_default().trim().to_string();
    let value = parse_json_object(&body).map_err(|e| reject(&state, SOURCE, e))?;
    validate(&value).map_err(|m| reject(&state, SOURCE, ApiError::InvalidPayload(m)))?;
    if msg_id.len() > 512 {
        return Err(reject(
            &state,
            SOURCE,
            ApiError::InvalidPayload("webhook-id is longer than 512 characters".into()),
        ));
    }
    state.creds.mark_used(LastUsedTable::WebhookKeys, &key.id);
    let outcome = state
        .inbox
        .takes_outcomes()
        .then(|| effect_of(&value, &msg_id, Some(&key.id)));
    let d = NewDelivery {
        id: new_id(prefix::DELIVERY),
        workspace_id: Some(key.workspace_id.clone()),
        integration_id: None,
        webhook_key_id: Some(key.id.clone()),
        source: SOURCE.into(),
        dedupe_scope: key.id.clone(),
        dedupe_key: msg_id,
        body,
        headers: kept_headers(
            &headers,
            &[
                "webhook-id",
                "webhook-timestamp",
                "svix-id",
                "svix-timestamp",
                "user-agent",
                "content-type",
            ],
        ),
        status: DeliveryStatus::Pending,
        filter_reason: None,
        received_at: now_micros(),
        parsed: Parsed::Json(Arc::new(value)),
        outcome,
    };
    store_and_ack(&state, d, started).await
}

/// Worker step: the stored payload becomes one signal (re-sends keep the first).
pub fn process(d: &ClaimedDelivery) -> Result<Effect, super::ProcessError> {
    let Ok(value) = d.json() else {
        return Ok(Effect::reject("stored body is not JSON"));
    };
    Ok(effect_of(
        &value,
        &d.dedupe_key,
        d.webhook_key_id.as_deref(),
    ))
}

/// The signal a payload makes (pure: the receiver commits it with the delivery; a worker
/// reaches the same from the stored body).
fn effect_of(value: &Value, dedupe_key: &str, webhook_key_id: Option<&str>) -> Effect {
    let p = match validate(value) {
        Ok(p) => p,
        Err(e) => return Effect::reject(e),
    };
    let s = |v: &Option<Value>| v.as_ref().and_then(Value::as_str).map(str::to_string);
    let source_ref = s(&p.source_ref).unwrap_or_else(|| dedupe_key.to_string());
    let mut meta = Map::new();
    meta.insert("webhook_id".into(), json!(dedupe_key));
    meta.insert("webhook_key_id".into(), json!(webhook_key_id));
    for (k, v) in [
        ("source_name", s(&p.source_name)),
        ("source_url", s(&p.source_url)),
        ("customer_email", s(&p.customer_email)),
    ] {
        if let Some(v) = v {
            meta.insert(k.into(), Value::String(v));
        }
    }
    if let Some(m @ Value::Object(_)) = p.metadata {
        meta.insert("metadata".into(), m);
    }
    Effect::Upsert {
        signal: NewSignal {
            source_ref,
            verbatim: s(&p.verbatim).unwrap_or_default(),
            metadata: Value::Object(meta),
        },
        merge: Merge::Keep,
    }
}

/// `signalbox send webhook`: a Standard Webhooks signed generic delivery.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Key id (whk_…).
    #[arg(long)]
    key_id: String,
    /// Signal text.
    #[arg(long)]
    verbatim: String,
    /// Dedupe key of the signal.
    #[arg(long)]
    source_ref: Option<String>,
    /// Message id (default: random).
    #[arg(long)]
    webhook_id: Option<String>,
}

impl SendArgs {
    /// The delivery signed with `secret` (whsec_…) at `now`.
    pub fn sample(self, secret: &str, now: i64) -> anyhow::Result<super::Sample> {
        let key = standard_webhooks::decode_secret(secret)
            .ok_or_else(|| anyhow::anyhow!("--secret must be a whsec_… secret"))?;
        let mut payload = json!({"verbatim": self.verbatim});
        if let Some(r) = self.source_ref {
            payload["source_ref"] = json!(r);
        }
        let body = payload.to_string().into_bytes();
        let id = self.webhook_id.unwrap_or_else(|| new_id("msg"));
        let sig = standard_webhooks::sign(&key, &id, now, &body);
        Ok(super::Sample {
            path: format!("/api/webhooks/signals?key_id={}", self.key_id),
            headers: vec![
                ("webhook-id".into(), id),
                ("webhook-timestamp".into(), now.to_string()),
                ("webhook-signature".into(), sig),
            ],
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        assert!(validate(&json!({"verbatim": "hi"})).is_ok());
        assert_eq!(
            validate(&json!({})).err().as_deref(),
            Some("verbatim is required")
        );
        assert_eq!(
            validate(&json!({"verbatim": 3})).err().as_deref(),
            Some("verbatim must be a string")
        );
        assert_eq!(
            validate(&json!({"verbatim": " "})).err().as_deref(),
            Some("verbatim must not be empty")
        );
        assert_eq!(
            validate(&json!({"verbatim": "x", "metadata": [1]}))
                .err()
                .as_deref(),
            Some("metadata must be an object")
        );
        assert_eq!(
            validate(&json!({"verbatim": "x", "customer_email": 1}))
                .err()
                .as_deref(),
            Some("customer_email must be a string")
        );
    }
}
