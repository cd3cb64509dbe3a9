//! Source platforms. Each file is one platform: its thin HTTP receiver (verify → store → ack)
//! and its worker step (stored delivery → [`Effect`]). Adding a platform means one new file
//! here plus its two registrations: a route in [`routes()`] and an arm in [`process`].

pub mod pylon;
pub mod slack;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::ingest::InboxError;
use crate::protocol::Effect;
use crate::state::AppState;
use crate::store::{ClaimedDelivery, NewDelivery, Stored};

/// Every source's name (a signal's and a delivery's `source`).
pub const SOURCES: &[&str] = &[webhook::SOURCE, slack::SOURCE, pylon::SOURCE];

/// The platforms integrations can be made for (their config rules and webhook URLs).
pub(crate) const PLATFORMS: &[&crate::admin::platform::Platform] =
    &[&slack::PLATFORM, &pylon::PLATFORM];

/// Webhook routes of every source, each with its OpenAPI operation.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(webhook::receive))
        .routes(routes!(slack::receive))
        .routes(routes!(pylon::receive))
        .routes(routes!(pylon::receive_path))
}

/// A signed request as the platform sends it (`signalbox send`): path and query of the
/// webhook, headers, body.
pub struct Sample {
    /// Path and query, appended to the server's base URL.
    pub path: String,
    /// Signature and other headers (`content-type: application/json` is added by the sender).
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// The answer to a stored delivery: the sender may stop retrying.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ack {
    /// Always `true`: the request is stored (or was already).
    pub ok: bool,
    /// `true` when this request was already stored (a retry); nothing new was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
}

/// The errors every webhook receiver can answer; a sender retries 408 and 503.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum WebhookErrors {
    /// Missing routing id, or (after verification) a body that is not the expected JSON.
    #[response(status = 400)]
    Invalid(crate::admin::views::ErrorBody),
    /// Signature missing or wrong, timestamp outside the window, or an unknown integration.
    #[response(status = 401)]
    Unauthorized(crate::admin::views::ErrorBody),
    /// The body did not arrive in time.
    #[response(status = 408)]
    Timeout(crate::admin::views::ErrorBody),
    /// The body is larger than `SIGNALBOX_MAX_BODY_BYTES`.
    #[response(status = 413)]
    TooLarge(crate::admin::views::ErrorBody),
    /// Not stored (storage is unavailable or full); retry after `Retry-After` seconds.
    #[response(status = 503)]
    Unavailable(crate::admin::views::ErrorBody),
}

/// The worker step for one claimed delivery, by source.
pub async fn process(state: &AppState, d: &ClaimedDelivery) -> Result<Effect, ProcessError> {
    match d.source.as_str() {
        webhook::SOURCE => webhook::process(d),
        slack::SOURCE => slack::process(state, d).await,
        pylon::SOURCE => pylon::process(state, d).await,
        other => Ok(Effect::reject(format!("unknown source {other:?}"))),
    }
}

/// A transient processing failure: the delivery is retried later.
#[derive(Debug)]
pub struct ProcessError {
    /// What went wrong (stored as `last_error`).
    pub reason: String,
    /// When to retry, if the failure says (e.g. `Retry-After`); else exponential backoff.
    pub retry_after: Option<Duration>,
}

impl ProcessError {
    /// A retryable failure.
    pub fn retry(reason: impl Into<String>) -> Self {
        ProcessError {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// Reads the raw body with the configured cap: 413 when the declared or actual size is larger.
pub async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    source: &str,
) -> ApiResult<Bytes> {
    let limit = state.cfg.max_body_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        state.metrics.rejection(source, "payload_too_large");
        return Err(ApiError::PayloadTooLarge(limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                state.metrics.rejection(source, "payload_too_large");
                Err(ApiError::PayloadTooLarge(limit))
            } else {
                state.metrics.rejection(source, "request_timeout");
                Err(ApiError::RequestTimeout)
            }
        }
    }
}

/// Header value as `&str` (None when absent or not visible ASCII).
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A signature failure as the sender should read it: a stale timestamp says how far off it
/// was, the allowed window, and whether it looks like milliseconds instead of seconds.
pub fn signature_error(
    e: crate::protocol::SignatureError,
    timestamp: Option<&str>,
    now: i64,
    tolerance_secs: i64,
) -> ApiError {
    let ts = timestamp.and_then(|t| t.trim().parse::<i64>().ok());
    match (e, ts) {
        (crate::protocol::SignatureError::Stale, Some(ts)) => {
            let off = ts.saturating_sub(now);
            let side = if off < 0 { "behind" } else { "ahead of" };
            let ms = if ts > 100_000_000_000 {
                "; it looks like milliseconds: send Unix seconds"
            } else {
                ""
            };
            ApiError::StaleTimestamp(format!(
                "timestamp {ts} is {} s {side} the server's clock ({now}); the allowed window is \
                 ±{tolerance_secs} s{ms}",
                off.unsigned_abs()
            ))
        }
        (e, _) => e.into(),
    }
}

/// The headers worth keeping with a delivery (never signatures or authorisation), as a JSON
/// object with keys sorted and at most 256 characters per value. Built without a `Value` tree:
/// this runs for every delivery.
pub fn kept_headers(headers: &HeaderMap, names: &[&str]) -> String {
    let mut m = std::collections::BTreeMap::<&str, &str>::new();
    for n in names {
        if let Some(v) = header(headers, n) {
            let end = v.char_indices().nth(256).map_or(v.len(), |(i, _)| i);
            m.insert(n, &v[..end]);
        }
    }
    // A map of strings always serialises.
    serde_json::to_string(&m).unwrap_or_else(|_| "{}".to_string())
}

/// Counts a rejection, logs it at info (at most [`REJECTION_LINES_PER_SEC`] lines a second, so
/// a flood cannot fill the disk; the rest are counted in a summary line) and returns the error.
pub fn reject(state: &AppState, source: &str, e: ApiError) -> ApiError {
    state.metrics.rejection(source, e.code());
    let verdict = REJECTIONS
        .lock()
        .map(|mut l| l.admit(Instant::now()))
        .unwrap_or(Admit::Drop);
    if let Admit::Log { suppressed } = verdict {
        if suppressed > 0 {
            tracing::info!(
                suppressed,
                "rejected webhooks not logged in the last second"
            );
        }
        tracing::info!(source, code = e.code(), reason = %e, "rejected webhook");
    }
    e
}

/// Most rejection lines logged per second.
pub const REJECTION_LINES_PER_SEC: u32 = 10;

static REJECTIONS: std::sync::Mutex<LogLimiter> =
    std::sync::Mutex::new(LogLimiter::new(REJECTION_LINES_PER_SEC));

/// Whether to log one more line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it; `suppressed` lines were dropped since the last one logged.
    Log {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop it (counted for the next summary).
    Drop,
}

/// At most `per_sec` lines in each one-second window.
#[derive(Debug)]
pub struct LogLimiter {
    per_sec: u32,
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter of `per_sec` lines a second.
    pub const fn new(per_sec: u32) -> LogLimiter {
        LogLimiter {
            per_sec,
            window: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// The verdict for a line at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        let fresh = self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= std::time::Duration::from_secs(1));
        if fresh {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < self.per_sec {
            self.logged += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Admit::Drop
        }
    }
}

/// Stores a verified delivery through the inbox and builds the contract's ack.
pub async fn store_and_ack(
    state: &AppState,
    d: NewDelivery,
    started: Instant,
) -> ApiResult<Json<Value>> {
    store_all_and_ack(state, vec![d], started).await
}

/// Stores the deliveries one request became (a Slack event reaching several workspaces) and
/// acks once all of them are committed; a duplicate only when every one was. If any cannot be
/// stored the answer is 503 and the sender's retry finds the others as duplicates.
pub async fn store_all_and_ack(
    state: &AppState,
    deliveries: Vec<NewDelivery>,
    started: Instant,
) -> ApiResult<Json<Value>> {
    let Some(source) = deliveries.first().map(|d| d.source.clone()) else {
        return Err(ApiError::Internal(anyhow::anyhow!("nothing to store")));
    };
    let ids: Vec<String> = deliveries.iter().map(|d| d.id.clone()).collect();
    let results =
        futures::future::join_all(deliveries.into_iter().map(|d| state.inbox.store(d))).await;
    let mut all_duplicates = true;
    for (result, id) in results.into_iter().zip(&ids) {
        let outcome = result.map_err(|e| {
            state.metrics.rejection(&source, "unavailable");
            match e {
                InboxError::Saturated => {
                    ApiError::Unavailable("the inbox is saturated, retry later".into())
                }
                InboxError::Closed => {
                    ApiError::Unavailable("the server is shutting down, retry later".into())
                }
                InboxError::Store(_) => {
                    ApiError::Unavailable("storage is unavailable, retry later".into())
                }
                InboxError::Deadline(d) => ApiError::Unavailable(format!(
                    "storage did not answer within {} ms, retry later",
                    d.as_millis()
                )),
            }
        })?;
        match outcome {
            Stored::New(_) => {
                all_duplicates = false;
                state.metrics.delivery(&source, "accepted");
                tracing::info!(delivery_id = %id, source = %source, "delivery stored");
            }
            Stored::Duplicate(existing) => {
                state.metrics.delivery(&source, "duplicate");
                tracing::info!(delivery_id = %existing, source = %source, "duplicate delivery");
            }
        }
    }
    state
        .metrics
        .ack_latency
        .get_or_create(&vec![("source", source.clone())])
        .observe(started.elapsed().as_secs_f64());
    Ok(Json(json!(Ack {
        ok: true,
        duplicate: all_duplicates.then_some(true),
    })))
}

/// Parses a body as a JSON object (after verification): 400 `invalid_json` otherwise.
pub fn parse_json_object(body: &[u8]) -> ApiResult<Value> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidJson(format!("body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::InvalidJson("body must be a JSON object".into()));
    }
    Ok(v)
}

/// Spends about as long as a real verification when the key/integration is unknown, so
/// response timing does not reveal which ids exist.
pub fn equalise_timing(body: &[u8]) {
    let _ = crate::protocol::hmac_sha256(b"signalbox-dummy-key-for-timing-equalisation", &[body]);
}

/// Shared state handle type used by receivers.
pub type State = axum::extract::State<AppState>;

/// An `Arc`'d cached integration.
pub type IntegrationRef = Arc<crate::credentials::CachedIntegration>;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on unexpected results
mod tests {
    use axum::http::{HeaderMap, HeaderValue};
    use serde_json::{Value, json};

    use super::kept_headers;

    #[test]
    fn kept_headers_keeps_only_the_named_ones_escaped_and_capped() {
        let mut h = HeaderMap::new();
        h.insert(
            "user-agent",
            HeaderValue::from_static("Slackbot 1.0 \"quoted\""),
        );
        h.insert("x-slack-signature", HeaderValue::from_static("v0=secret"));
        let long = "é".repeat(300);
        h.insert("x-long", HeaderValue::from_bytes(long.as_bytes()).unwrap());
        let text = kept_headers(&h, &["x-long", "user-agent", "x-missing"]);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["user-agent"], json!("Slackbot 1.0 \"quoted\""));
        // Header values that are not visible ASCII are not kept (`to_str` refuses them).
        assert!(v.get("x-long").is_none());
        assert!(v.get("x-missing").is_none());
        assert!(
            v.get("x-slack-signature").is_none(),
            "not asked for, never kept"
        );
        let mut h = HeaderMap::new();
        h.insert("x-long", HeaderValue::from_str(&"a".repeat(300)).unwrap());
        let v: Value = serde_json::from_str(&kept_headers(&h, &["x-long"])).unwrap();
        assert_eq!(v["x-long"].as_str().map(str::len), Some(256));
        assert_eq!(kept_headers(&HeaderMap::new(), &["x"]), "{}");
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_logs_ten_lines_a_second_and_counts_the_rest() {
        let mut l = LogLimiter::new(10);
        let t0 = Instant::now();
        let verdicts: Vec<Admit> = (0..1000)
            .map(|i| l.admit(t0 + Duration::from_micros(i)))
            .collect();
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| matches!(v, Admit::Log { .. }))
                .count(),
            10
        );
        assert_eq!(verdicts[0], Admit::Log { suppressed: 0 });
        // The next second's first line carries the count of what was dropped.
        assert_eq!(
            l.admit(t0 + Duration::from_secs(1)),
            Admit::Log { suppressed: 990 }
        );
        assert_eq!(
            l.admit(t0 + Duration::from_millis(1001)),
            Admit::Log { suppressed: 0 }
        );
    }
}
