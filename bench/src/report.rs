//! The figures of a scenario: the `--json` object and the human line.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms track (larger values are clamped).
pub(crate) const HIST_MAX_US: u64 = 600_000_000;

/// The figures of one scenario. Serialised as the `--json` object (exactly these keys).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// `sqlite`, `postgres`, or `remote` (--url without --database-url).
    pub backend: String,
    /// Connections used.
    pub connections: usize,
    /// Deliveries acknowledged (2xx) during the measured phase.
    pub acked: u64,
    /// Failed requests during the measured phase (non-2xx, I/O errors, timeouts).
    pub errors: u64,
    /// Acknowledged deliveries per second.
    pub ack_rps: f64,
    /// Ack latency percentiles, milliseconds.
    pub ack_p50_ms: f64,
    /// 90th percentile.
    pub ack_p90_ms: f64,
    /// 99th percentile.
    pub ack_p99_ms: f64,
    /// 99.9th percentile.
    pub ack_p999_ms: f64,
    /// Signals created per second, first receipt to last signal (warm-up included).
    pub e2e_sps: f64,
    /// Receipt → signal latency p99, milliseconds.
    pub e2e_p99_ms: f64,
    /// `GET /healthz` requests/s on the same server with the same connections.
    pub baseline_rps: f64,
    /// `ack_rps / baseline_rps`.
    pub ratio_to_baseline: f64,
    /// Peak resident memory of the server process (`VmHWM`), MiB; null with --url.
    pub peak_rss_mib: Option<f64>,
    /// Acknowledged deliveries not stored, or stored but not processed/filtered after draining.
    pub lost: u64,
    /// Extra rows or signals beyond one per acknowledged unique delivery.
    pub duplicates: u64,
    /// Measured-phase errors by HTTP status (or `io`, `timeout`, `connect`).
    pub errors_by_status: BTreeMap<String, u64>,
    /// Server CPU time (user + system, all threads) per acknowledged delivery, µs: from the
    /// start of the measured phase until the pipeline drained. Unlike the rates it hardly
    /// depends on what else the machine is doing. Null with --url.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The same for the baseline: server CPU per `GET /healthz`, µs.
    pub baseline_cpu_us_per_request: Option<f64>,
    /// CPU time of the whole machine per acknowledged delivery, µs, over the same span: the
    /// server, the load generator, a local PostgreSQL and anything else running.
    pub machine_cpu_us_per_delivery: Option<f64>,
    /// The same for the baseline, per `GET /healthz`.
    pub baseline_machine_cpu_us_per_request: Option<f64>,
    /// The SQLite writer thread's share of `server_cpu_us_per_delivery`, µs (null on
    /// PostgreSQL, whose work runs in its own processes).
    pub writer_cpu_us_per_delivery: Option<f64>,
    #[serde(skip)]
    pub(crate) filtered: u64,
    #[serde(skip)]
    pub(crate) notes: Vec<String>,
    #[serde(skip)]
    pub(crate) offered: Option<f64>,
}

impl Report {
    /// True when verification found nothing wrong.
    pub fn verified(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.acked > 0 && self.notes.is_empty()
    }

    /// The human line.
    pub fn human(&self) -> String {
        let offered = self
            .offered
            .map(|r| format!(" offered {r:.0}/s"))
            .unwrap_or_default();
        let rss = self
            .peak_rss_mib
            .map(|m| format!("{m:.0} MiB"))
            .unwrap_or_else(|| "n/a".into());
        let errors = if self.errors_by_status.is_empty() {
            "0".to_string()
        } else {
            let parts: Vec<String> = self
                .errors_by_status
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            format!("{} ({})", self.errors, parts.join(" "))
        };
        let filtered = if self.filtered > 0 {
            format!(" filtered {}", self.filtered)
        } else {
            String::new()
        };
        let cpu = match (
            self.server_cpu_us_per_delivery,
            self.baseline_cpu_us_per_request,
        ) {
            (Some(d), Some(b)) => {
                let writer = self
                    .writer_cpu_us_per_delivery
                    .map(|w| format!(", writer {w:.0}"))
                    .unwrap_or_default();
                let machine = match (
                    self.machine_cpu_us_per_delivery,
                    self.baseline_machine_cpu_us_per_request,
                ) {
                    (Some(d), Some(b)) => format!("; machine {d:.0} (healthz {b:.0})"),
                    _ => String::new(),
                };
                format!(" | server cpu {d:.0} us/delivery{writer} (healthz {b:.0}){machine}")
            }
            _ => String::new(),
        };
        format!(
            "{:<8} {:<8} c={}{} acked {} at {:.0}/s = {:.2}x healthz {:.0}/s | ack p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} ms | errors {} | e2e {:.0} signals/s p99 {:.1} ms | rss {}{} | lost {} dup {}{} | {}",
            self.scenario,
            self.backend,
            self.connections,
            offered,
            self.acked,
            self.ack_rps,
            self.ratio_to_baseline,
            self.baseline_rps,
            self.ack_p50_ms,
            self.ack_p90_ms,
            self.ack_p99_ms,
            self.ack_p999_ms,
            errors,
            self.e2e_sps,
            self.e2e_p99_ms,
            rss,
            cpu,
            self.lost,
            self.duplicates,
            filtered,
            if self.verified() {
                "verified".to_string()
            } else {
                format!("VERIFICATION FAILED: {}", self.failure_reasons().join("; "))
            }
        )
    }

    pub(crate) fn failure_reasons(&self) -> Vec<String> {
        let mut r = self.notes.clone();
        if self.acked == 0 {
            r.push("no delivery was acknowledged".into());
        }
        if self.lost > 0 {
            r.push(format!("{} lost", self.lost));
        }
        if self.duplicates > 0 {
            r.push(format!("{} duplicates", self.duplicates));
        }
        r
    }
}

pub(crate) fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

pub(crate) fn pct_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    round(h.value_at_quantile(q / 100.0) as f64 / 1000.0, 3)
}

pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant, valid histogram bounds")
}
