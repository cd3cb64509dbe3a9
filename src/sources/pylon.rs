//! Pylon (usepylon.com): `POST /api/webhooks/pylon?integration_id=int_…` (or
//! `/api/webhooks/pylon/{integration_id}`), sent by a trigger's "Send webhook" action whose JSON
//! body the customer writes. Verified with `X-Pylon-Signature` (hex HMAC of the body) or the
//! timestamped `Pylon-Webhook-Signature` scheme, per integration config; an optional shared
//! header adds defence in depth. Identical replays are duplicates (the dedupe key hashes the body).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::State;

use crate::admin::platform::{Platform, string_list};
use crate::http::extract::{Path, Query};
use axum::http::HeaderMap;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    IntegrationRef, ProcessError, header, kept_headers, parse_json_object, read_body, reject,
    store_and_ack,
};
use crate::clock::{now_micros, now_secs};
use crate::credentials::valid_keys;
use crate::error::{ApiError, ApiResult};
use crate::ids::{new_id, prefix};
use crate::protocol::pylon::{self as proto, PylonSettings, Scheme, SignatureHeaders};
use crate::protocol::{Effect, SignatureError, ct_eq};
use crate::state::AppState;
use crate::store::{ClaimedDelivery, DeliveryStatus, LastUsedTable, NewDelivery, Parsed};

/// Source name stored with deliveries and signals.
pub const SOURCE: &str = "pylon";

/// Query of the endpoint.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PylonQuery {
    /// The Pylon integration (`int_…`).
    #[param(
        required = true,
        min_length = 1,
        pattern = r"[^\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    integration_id: Option<String>,
}

const KEPT: &[&str] = &[
    "pylon-webhook-timestamp",
    "pylon-webhook-version",
    "user-agent",
    "content-type",
];

/// Pylon "Send webhook" action: one signal per ticket and per later customer message.
/// Signed with `X-Pylon-Signature` (hex HMAC-SHA256 of the body) or the timestamped scheme
/// (`pylon-webhook-timestamp`, `pylon-webhook-signature`), as `config.signature_scheme` says.
#[utoipa::path(post, path = "/api/webhooks/pylon", tag = "webhooks", params(PylonQuery),
    request_body(content = Object, description = "The action's JSON body template"),
    responses((status = 200, description = "Stored (or a duplicate)", body = super::Ack),
              super::WebhookErrors))]
pub async fn receive(
    State(state): State<AppState>,
    Query(q): Query<PylonQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    handle(state, q.integration_id, headers, body).await
}

/// As `POST /api/webhooks/pylon`, with the integration in the path.
#[utoipa::path(post, path = "/api/webhooks/pylon/{integration_id}", tag = "webhooks",
    params(("integration_id" = String, Path, description = "The Pylon integration (`int_…`)")),
    request_body(content = Object, description = "The action's JSON body template"),
    responses((status = 200, description = "Stored (or a duplicate)", body = super::Ack),
              super::WebhookErrors))]
pub async fn receive_path(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    handle(state, Some(id), headers, body).await
}

async fn handle(
    state: AppState,
    id: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let body = read_body(&state, &headers, body, SOURCE).await?;
    let id = id.filter(|s| !s.is_empty()).ok_or_else(|| {
        reject(
            &state,
            SOURCE,
            ApiError::MissingParam(
                "missing_integration_id",
                "the integration_id parameter is required".into(),
            ),
        )
    })?;
    let integ = if crate::ids::looks_like(&id, prefix::INTEGRATION) {
        state.creds.integration(&id).await?
    } else {
        None
    };
    let Some(integ) = integ.filter(|i| i.row.platform == SOURCE && i.row.is_active) else {
        super::equalise_timing(&body);
        return Err(reject(&state, SOURCE, ApiError::UnknownIntegration));
    };
    verify(&state, &integ, &headers, &body).map_err(|e| reject(&state, SOURCE, e.into()))?;
    let value = parse_json_object(&body).map_err(|e| reject(&state, SOURCE, e))?;
    state
        .creds
        .mark_used(LastUsedTable::Integrations, &integ.row.id);
    let d = NewDelivery {
        id: new_id(prefix::DELIVERY),
        workspace_id: Some(integ.row.workspace_id.clone()),
        integration_id: Some(integ.row.id.clone()),
        webhook_key_id: None,
        source: SOURCE.into(),
        dedupe_scope: integ.row.id.clone(),
        dedupe_key: proto::dedupe_key(&body),
        body,
        headers: kept_headers(&headers, KEPT),
        status: DeliveryStatus::Pending,
        filter_reason: None,
        received_at: now_micros(),
        parsed: Parsed::Json(Arc::new(value)),
        // Converting a ticket's HTML is heavy CPU work that stays off the request path (see
        // `normalize_off_runtime`); the worker decides Pylon outcomes.
        outcome: None,
    };
    store_and_ack(&state, d, started).await
}

/// The configured signature scheme (`config.signature_scheme`, default `auto`).
pub fn scheme(integ: &IntegrationRef) -> Scheme {
    integ
        .config
        .get("signature_scheme")
        .and_then(Value::as_str)
        .and_then(Scheme::parse)
        .unwrap_or_default()
}

fn verify(
    state: &AppState,
    integ: &IntegrationRef,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), SignatureError> {
    let h = SignatureHeaders {
        x_pylon_signature: header(headers, "x-pylon-signature"),
        webhook_signature: header(headers, "pylon-webhook-signature"),
        webhook_timestamp: header(headers, "pylon-webhook-timestamp"),
    };
    let keys = valid_keys(&integ.secrets, now_micros());
    proto::verify(
        scheme(integ),
        &keys,
        &h,
        body,
        now_secs(),
        state.cfg.signature_tolerance_secs,
    )?;
    // Optional shared header (e.g. a secret `Authorization` header set in Pylon).
    if let Some(name) = integ.config.get("required_header").and_then(Value::as_str) {
        let expected = integ
            .required_header
            .as_ref()
            .ok_or(SignatureError::Invalid)?;
        let given = header(headers, name).ok_or(SignatureError::Missing)?;
        if !ct_eq(
            &crate::protocol::hmac_sha256(b"cmp", &[given.as_bytes()]),
            &crate::protocol::hmac_sha256(b"cmp", &[expected.expose_secret().as_bytes()]),
        ) {
            return Err(SignatureError::Invalid);
        }
    }
    Ok(())
}

/// The integration's settings for normalisation.
pub fn settings(integ: &IntegrationRef) -> PylonSettings {
    PylonSettings {
        events: integ
            .config
            .get("pylon_events")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Worker step: parse flexibly, enrich thin payloads from the Pylon API, normalise.
pub async fn process(state: &AppState, d: &ClaimedDelivery) -> Result<Effect, ProcessError> {
    let Ok(raw) = d.json() else {
        return Ok(Effect::reject("stored body is not JSON"));
    };
    let parsed = match proto::parse(&raw) {
        Ok(p) => p,
        Err(reason) => return Ok(Effect::reject(reason)),
    };
    let Some(int_id) = &d.integration_id else {
        return Ok(Effect::filter("no integration"));
    };
    let integ = state
        .creds
        .integration(int_id)
        .await
        .map_err(|e| ProcessError::retry(format!("loading integration: {e}")))?;
    let Some(integ) = integ else {
        return Ok(Effect::filter("integration no longer exists"));
    };
    if !integ.row.is_active {
        return Ok(Effect::filter("integration is inactive"));
    }
    let settings = settings(&integ);
    // Normalise once (filters before spending an API call); again only if the API added data.
    let (effect, mut parsed, raw, settings) = normalize_off_runtime(parsed, raw, settings).await?;
    if let Effect::Filter { .. } = effect {
        return Ok(effect);
    }
    // A message event carries its own text: the issue lookup would add nothing to it.
    if parsed.is_thin()
        && parsed.message.is_none()
        && let Some(token) = &integ.access_token
        && let Some(api) = fetch_issue(state, token.expose_secret(), &parsed.issue.id).await?
    {
        parsed.enrich_from_api(&api);
        return Ok(normalize_off_runtime(parsed, raw, settings).await?.0);
    }
    Ok(effect)
}

/// Conversions running at once: four per core. It is pure CPU work, so more would only queue
/// in the kernel instead, and every extra blocking-pool thread keeps its own allocator heap.
static CONVERSIONS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    tokio::sync::Semaphore::new(4 * std::thread::available_parallelism().map_or(2, |n| n.get()))
});

/// Runs [`proto::normalize`] on the blocking pool: converting a ticket's HTML to text is usually
/// quick but takes milliseconds for a body at the 256 KiB cap, which would otherwise hold a
/// runtime thread that answers webhooks.
async fn normalize_off_runtime(
    parsed: proto::Parsed,
    raw: Arc<Value>,
    settings: proto::PylonSettings,
) -> Result<(Effect, proto::Parsed, Arc<Value>, proto::PylonSettings), ProcessError> {
    let _turn = CONVERSIONS
        .acquire()
        .await
        .map_err(|_| ProcessError::retry("the conversion limiter is closed"))?;
    tokio::task::spawn_blocking(move || {
        let effect = proto::normalize(&parsed, &raw, &settings);
        (effect, parsed, raw, settings)
    })
    .await
    .map_err(|_| ProcessError::retry("normalising the ticket panicked"))
}

/// `GET {pylon_api_base}/issues/{id}`. `Ok(None)` when the issue is not found (the signal is
/// created from the payload alone); transient failures are retried.
async fn fetch_issue(
    state: &AppState,
    token: &str,
    id: &str,
) -> Result<Option<Value>, ProcessError> {
    let url = format!(
        "{}/issues/{}",
        state.cfg.pylon_api_base,
        crate::protocol::url_encode(id)
    );
    let resp = state
        .http
        .get(&url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let count = |outcome: &str| {
        state
            .metrics
            .api_calls
            .get_or_create(&vec![
                ("service", "pylon".to_string()),
                ("method", "issues.get".to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            count("error");
            return Err(ProcessError::retry(format!(
                "Pylon API unreachable: {}",
                e.without_url()
            )));
        }
    };
    let status = resp.status();
    if status.as_u16() == 429 {
        count("rate_limited");
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                crate::protocol::retry_after_secs(v, crate::clock::now_micros() / 1_000_000)
            })
            .unwrap_or(30);
        return Err(ProcessError {
            reason: format!("Pylon API rate limited (429), retry after {after}s"),
            retry_after: Some(Duration::from_secs(after.min(3600))),
        });
    }
    if status.as_u16() == 404 {
        count("not_found");
        return Ok(None);
    }
    if !status.is_success() {
        count("error");
        if status.is_client_error() {
            // A bad token or a bad id will not fix itself: create the signal without enrichment.
            tracing::warn!(
                status = status.as_u16(),
                "Pylon API refused the issue lookup; continuing without enrichment"
            );
            return Ok(None);
        }
        return Err(ProcessError::retry(format!("Pylon API answered {status}")));
    }
    count("ok");
    resp.json::<Value>()
        .await
        .map(Some)
        .map_err(|e| ProcessError::retry(format!("Pylon API response: {}", e.without_url())))
}

/// Pylon's part of the integration API: config keys and their rules, the webhook URL.
pub(crate) const PLATFORM: Platform = Platform {
    name: SOURCE,
    webhook_path: "/api/webhooks/pylon?integration_id=",
    config_keys: &["pylon_events", "signature_scheme", "required_header"],
    validate: validate_config,
};

/// Checks `config.pylon_events`, `config.signature_scheme` and `config.required_header`.
fn validate_config(obj: &Map<String, Value>) -> ApiResult<Map<String, Value>> {
    let mut out = Map::new();
    out.insert(
        "pylon_events".into(),
        json!(string_list(obj, "pylon_events")?),
    );
    match obj.get("signature_scheme") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if crate::protocol::pylon::Scheme::parse(s).is_some() => {
            out.insert("signature_scheme".into(), json!(s));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "config.signature_scheme must be auto, x-pylon-signature or timestamped",
            ));
        }
    }
    match obj.get("required_header") {
        None | Some(Value::Null) => {}
        Some(Value::String(h))
            if !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            out.insert("required_header".into(), json!(h.to_lowercase()));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "config.required_header must be an HTTP header name",
            ));
        }
    }
    Ok(out)
}

/// `signalbox send pylon`: a "Send webhook" delivery signed as Pylon signs it.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Integration id.
    #[arg(long)]
    integration_id: String,
    /// Issue id.
    #[arg(long)]
    issue_id: String,
    /// Title.
    #[arg(long, default_value = "Sample ticket")]
    title: String,
    /// Body HTML (default: none, so the signal's text is the title, as for a ticket
    /// with an empty body).
    #[arg(long)]
    body_html: Option<String>,
    /// Event name.
    #[arg(long, default_value = "issue_new")]
    event: String,
    /// x-pylon-signature (default) or timestamped.
    #[arg(long, default_value = "x-pylon-signature")]
    scheme: String,
}

impl SendArgs {
    /// The delivery signed with `secret` at `now`.
    pub fn sample(self, secret: &str, now: i64) -> anyhow::Result<super::Sample> {
        let mut payload =
            json!({"event": self.event, "issue_id": self.issue_id, "issue_title": self.title});
        if let Some(b) = self.body_html {
            payload["issue_body"] = json!(b);
        }
        let body = payload.to_string().into_bytes();
        let headers = match self.scheme.as_str() {
            "timestamped" => vec![
                ("pylon-webhook-timestamp".into(), now.to_string()),
                (
                    "pylon-webhook-signature".into(),
                    proto::sign_timestamped(secret.as_bytes(), now, &body),
                ),
            ],
            _ => vec![(
                "x-pylon-signature".into(),
                proto::sign_x_pylon(secret.as_bytes(), &body),
            )],
        };
        Ok(super::Sample {
            path: format!("/api/webhooks/pylon?integration_id={}", self.integration_id),
            headers,
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
    fn pylon_config_is_validated_by_field() {
        let ok = validate_config(
            &PLATFORM,
            Some(&json!({"pylon_events": ["issue_new"], "signature_scheme": "auto"})),
        )
        .expect("valid");
        assert_eq!(ok["pylon_events"], json!(["issue_new"]));
        let e = validate_config(&PLATFORM, Some(&json!({"pylon_events": [""]})))
            .expect_err("empty name");
        assert!(e.to_string().contains("config.pylon_events[0]"), "{e}");
        let e = validate_config(&PLATFORM, Some(&json!({"signature_scheme": "md5"})))
            .expect_err("scheme");
        assert!(e.to_string().contains("config.signature_scheme"), "{e}");
        let e = validate_config(&PLATFORM, Some(&json!({"required_header": "bad header"})))
            .expect_err("header");
        assert!(e.to_string().contains("config.required_header"), "{e}");
    }
}
