//! Prometheus metrics, one registry per running app (no globals, so tests can run several apps
//! in one process).

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The `reason` label of a Slack retry: one of the reasons Slack documents for
/// `X-Slack-Retry-Reason`, else `other`. The header is not signed, so it never becomes a label
/// value itself (that would let a caller break the exposition or grow its cardinality).
pub fn slack_retry_reason(header: &str) -> &'static str {
    match header.trim() {
        "http_timeout" => "http_timeout",
        "too_many_redirects" => "too_many_redirects",
        "connection_failed" => "connection_failed",
        "ssl_error" => "ssl_error",
        "http_error" => "http_error",
        "unknown_error" => "unknown_error",
        _ => "other",
    }
}

fn latency_histogram() -> Histogram {
    // 0.25 ms … ~8 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

fn e2e_histogram() -> Histogram {
    // 1 ms … ~9 h
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

/// All metrics of one app.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Deliveries by source and outcome (`accepted`, `duplicate`, `processed`, `filtered`,
    /// `failed`, `retried`, `dead`).
    pub deliveries: Family<Labels, Counter>,
    /// Rejected webhook requests by source and reason (the error code).
    pub rejections: Family<Labels, Counter>,
    /// Time from request start to the ack (after the inbox commit), by source.
    pub ack_latency: Family<Labels, Histogram>,
    /// Time from receipt to the worker's commit, by source.
    pub processing_latency: Family<Labels, Histogram>,
    /// Deliveries waiting for a worker (sampled).
    pub queue_depth: Gauge<i64, AtomicI64>,
    /// Deliveries per inbox transaction.
    pub inbox_batch: Histogram,
    /// Slack retries received, by `X-Slack-Retry-Reason` mapped with [`slack_retry_reason`]
    /// (count through [`Metrics::slack_retry`]: label values only from a closed set).
    pub slack_retries: Family<Labels, Counter>,
    /// Slack `app_rate_limited` events received.
    pub slack_rate_limited: Counter,
    /// Outbound API calls by service, method and outcome.
    pub api_calls: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("signalbox");
        let deliveries = Family::<Labels, Counter>::default();
        r.register(
            "deliveries",
            "Deliveries by source and outcome",
            deliveries.clone(),
        );
        let rejections = Family::<Labels, Counter>::default();
        r.register(
            "rejections",
            "Rejected webhook requests by source and reason",
            rejections.clone(),
        );
        let ack_latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        r.register(
            "ack_latency_seconds",
            "Webhook request to durable ack",
            ack_latency.clone(),
        );
        let processing_latency =
            Family::<Labels, Histogram>::new_with_constructor(e2e_histogram as fn() -> Histogram);
        r.register(
            "processing_latency_seconds",
            "Receipt to processed (signal committed)",
            processing_latency.clone(),
        );
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        r.register(
            "queue_depth",
            "Deliveries pending processing",
            queue_depth.clone(),
        );
        let inbox_batch = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        r.register(
            "inbox_batch_size",
            "Deliveries per inbox commit",
            inbox_batch.clone(),
        );
        let slack_retries = Family::<Labels, Counter>::default();
        r.register(
            "slack_retries",
            "Slack retried deliveries by reason",
            slack_retries.clone(),
        );
        let slack_rate_limited = Counter::default();
        r.register(
            "slack_app_rate_limited",
            "Slack app_rate_limited events",
            slack_rate_limited.clone(),
        );
        let api_calls = Family::<Labels, Counter>::default();
        r.register(
            "api_calls",
            "Outbound API calls by service, method and outcome",
            api_calls.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            deliveries,
            rejections,
            ack_latency,
            processing_latency,
            queue_depth,
            inbox_batch,
            slack_retries,
            slack_rate_limited,
            api_calls,
        }
    }

    /// Counts a delivery outcome.
    pub fn delivery(&self, source: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&vec![
                ("source", source.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Counts a rejection.
    pub fn rejection(&self, source: &str, reason: &str) {
        self.rejections
            .get_or_create(&vec![
                ("source", source.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// Counts a Slack retry by its (unsigned, so untrusted) `X-Slack-Retry-Reason`.
    pub fn slack_retry(&self, reason: &str) {
        self.slack_retries
            .get_or_create(&vec![("reason", slack_retry_reason(reason).to_string())])
            .inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_retry_reasons_come_from_a_closed_set() {
        for r in [
            "http_timeout",
            "too_many_redirects",
            "connection_failed",
            "ssl_error",
            "http_error",
            "unknown_error",
        ] {
            assert_eq!(slack_retry_reason(r), r);
        }
        for r in [
            "",
            "q\",x=\"\\",
            "HTTP_TIMEOUT",
            "http_timeout2",
            "other\n",
            "\u{1F600}",
        ] {
            assert_eq!(slack_retry_reason(r), "other", "{r:?}");
        }
        let m = Metrics::new();
        m.slack_retry("q\",x=\"\\");
        m.slack_retry("http_timeout");
        let text = m.render();
        assert!(
            text.contains("signalbox_slack_retries_total{reason=\"other\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("signalbox_slack_retries_total{reason=\"http_timeout\"} 1"),
            "{text}"
        );
        assert!(!text.contains("x=\""), "{text}");
    }
}
