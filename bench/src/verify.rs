//! Verification: after the pipeline drained, every acknowledged delivery must be stored exactly
//! once and be processed into its own signal or recorded as filtered. Read from the database
//! when the benchmark can reach it, else through the admin API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::Value;
use signalbox::config::RawConfig;
use signalbox::store::Store;

use crate::load::Outcome;
use crate::report::new_hist;

/// One stored delivery with its signal's creation time.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    key: String,
    status: String,
    signal_id: Option<String>,
    received_at: i64,
    signal_created_at: Option<i64>,
}

pub(crate) enum Probe {
    Db(Store),
    Api {
        http: reqwest::Client,
        base: String,
        token: String,
    },
}

impl Probe {
    pub(crate) async fn db(url: &str) -> anyhow::Result<Probe> {
        let mut raw = RawConfig::defaults();
        raw.set("database_url", url).set("db_max_connections", "2");
        let cfg = raw.build()?;
        let store = Store::connect_without_migrating(&cfg)
            .await
            .context("connecting to the benchmark database for verification")?;
        Ok(Probe::Db(store))
    }

    pub(crate) async fn close(&self) {
        if let Probe::Db(s) = self {
            s.close().await;
        }
    }

    async fn any_pending(&self, ws: &str) -> anyhow::Result<bool> {
        match self {
            Probe::Db(store) => Ok(store.count_pending_deliveries(ws).await? > 0),
            Probe::Api { .. } => {
                let v = self
                    .api_get(&format!(
                        "/api/v1/deliveries?workspace_id={ws}&status=pending&limit=1"
                    ))
                    .await?;
                Ok(v["items"].as_array().is_some_and(|a| !a.is_empty()))
            }
        }
    }

    pub(crate) async fn wait_drained(&self, ws: &str, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.any_pending(ws).await? {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every stored delivery of the workspace, and the number of signals no delivery refers to.
    pub(crate) async fn snapshot(&self, ws: &str) -> anyhow::Result<(Vec<Row>, u64)> {
        match self {
            Probe::Db(store) => {
                // Deliveries and signals in one snapshot (see `workspace_snapshot`).
                let snap = store.workspace_snapshot(ws).await?;
                let signals = snap.signal_ids;
                let rows: Vec<Row> = snap
                    .deliveries
                    .into_iter()
                    .map(|d| Row {
                        key: d.dedupe_key,
                        status: d.status,
                        signal_id: d.signal_id,
                        received_at: d.received_at,
                        signal_created_at: d.signal_created_at,
                    })
                    .collect();
                let referenced: HashSet<&str> =
                    rows.iter().filter_map(|r| r.signal_id.as_deref()).collect();
                let orphans = signals
                    .iter()
                    .filter(|id| !referenced.contains(id.as_str()))
                    .count() as u64;
                Ok((rows, orphans))
            }
            Probe::Api { .. } => {
                // Signals first: a signal commits together with its delivery's status, so every
                // signal listed here has its delivery in the list read afterwards.
                let signals = self
                    .api_all(&format!("/api/v1/workspaces/{ws}/signals?limit=500"))
                    .await?;
                let created: HashMap<String, i64> = signals
                    .iter()
                    .filter_map(|s| {
                        Some((s["id"].as_str()?.to_string(), micros(&s["created_at"])?))
                    })
                    .collect();
                let deliveries = self
                    .api_all(&format!("/api/v1/deliveries?workspace_id={ws}&limit=500"))
                    .await?;
                let rows: Vec<Row> = deliveries
                    .iter()
                    .map(|d| {
                        let signal_id = d["signal_id"].as_str().map(str::to_string);
                        Row {
                            key: d["dedupe_key"].as_str().unwrap_or_default().to_string(),
                            status: d["status"].as_str().unwrap_or_default().to_string(),
                            signal_created_at: signal_id
                                .as_ref()
                                .and_then(|s| created.get(s).copied()),
                            signal_id,
                            received_at: micros(&d["received_at"]).unwrap_or(0),
                        }
                    })
                    .collect();
                let referenced: HashSet<&str> =
                    rows.iter().filter_map(|r| r.signal_id.as_deref()).collect();
                let orphans = created
                    .keys()
                    .filter(|id| !referenced.contains(id.as_str()))
                    .count() as u64;
                Ok((rows, orphans))
            }
        }
    }

    async fn api_get(&self, path: &str) -> anyhow::Result<Value> {
        let Probe::Api { http, base, token } = self else {
            bail!("not an API probe");
        };
        let resp = http
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("GET {path} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Every item of a cursor-paginated list.
    async fn api_all(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let p = match &cursor {
                Some(c) => format!("{path}&cursor={c}"),
                None => path.to_string(),
            };
            let v = self.api_get(&p).await?;
            if let Some(items) = v["items"].as_array() {
                out.extend(items.iter().cloned());
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(out),
            }
        }
    }
}

fn micros(v: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.timestamp_micros())
}

pub(crate) struct Verification {
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) filtered: u64,
    pub(crate) notes: Vec<String>,
    pub(crate) e2e_hist: Histogram<u64>,
    pub(crate) e2e_sps: f64,
}

/// Every acknowledged delivery must be stored exactly once and be `processed` with its own
/// signal, or `filtered`; nothing else may have been stored or created.
pub(crate) fn verify(load: &Outcome, rows: &[Row], orphans: u64) -> Verification {
    let mut by_key: HashMap<&str, Vec<&Row>> = HashMap::with_capacity(rows.len());
    for r in rows {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let sent: HashSet<&str> = load.sent_keys.iter().map(String::as_str).collect();
    let mut lost = 0u64;
    let mut duplicates = load.duplicate_acks;
    let mut filtered = 0u64;
    let mut missing = 0u64;
    let mut unfinished: BTreeMap<String, u64> = BTreeMap::new();
    let mut acked_seen: HashSet<&str> = HashSet::with_capacity(load.acked_keys.len());
    for key in &load.acked_keys {
        if !acked_seen.insert(key.as_str()) {
            duplicates += 1; // the same key acknowledged twice (the generator never repeats one)
            continue;
        }
        match by_key.get(key.as_str()) {
            None => {
                lost += 1;
                missing += 1;
            }
            Some(found) => {
                let r = found[0];
                let ok = match r.status.as_str() {
                    "processed" => r.signal_id.is_some() && r.signal_created_at.is_some(),
                    "filtered" => {
                        filtered += 1;
                        true
                    }
                    _ => false,
                };
                if !ok {
                    lost += 1;
                    *unfinished.entry(r.status.clone()).or_default() += 1;
                }
            }
        }
    }
    // More than one row for a key, or rows for keys never sent.
    let mut extra_rows = 0u64;
    for (key, found) in &by_key {
        extra_rows += found.len() as u64 - 1;
        if !sent.contains(key) {
            extra_rows += found.len() as u64;
        }
    }
    duplicates += extra_rows;
    // Two deliveries on one signal, or signals no delivery produced.
    let mut refs: HashMap<&str, u64> = HashMap::new();
    for r in rows {
        if let Some(s) = &r.signal_id {
            *refs.entry(s.as_str()).or_default() += 1;
        }
    }
    let shared: u64 = refs.values().map(|n| n - 1).sum();
    duplicates += shared + orphans;

    let mut notes = Vec::new();
    if missing > 0 {
        notes.push(format!("{missing} acknowledged deliveries are not stored"));
    }
    for (status, n) in &unfinished {
        notes.push(format!("{n} acknowledged deliveries are {status}"));
    }
    if extra_rows > 0 {
        notes.push(format!("{extra_rows} unexpected delivery rows"));
    }
    if shared > 0 {
        notes.push(format!("{shared} deliveries share a signal"));
    }
    if orphans > 0 {
        notes.push(format!("{orphans} signals without a delivery"));
    }
    if load.duplicate_acks > 0 {
        notes.push(format!(
            "{} requests were answered as duplicates",
            load.duplicate_acks
        ));
    }

    let mut e2e_hist = new_hist();
    let mut first_receipt = i64::MAX;
    let mut last_signal = i64::MIN;
    let mut n_signals = 0u64;
    for r in rows {
        first_receipt = first_receipt.min(r.received_at);
        if let (Some(created), "processed") = (r.signal_created_at, r.status.as_str()) {
            n_signals += 1;
            last_signal = last_signal.max(created);
            e2e_hist.saturating_record((created - r.received_at).max(1) as u64);
        }
    }
    let e2e_sps = if n_signals > 0 && last_signal > first_receipt {
        n_signals as f64 / ((last_signal - first_receipt) as f64 / 1e6)
    } else {
        0.0
    };
    Verification {
        lost,
        duplicates,
        filtered,
        notes,
        e2e_hist,
        e2e_sps,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn row(key: &str, status: &str, signal: Option<&str>) -> Row {
        Row {
            key: key.into(),
            status: status.into(),
            signal_id: signal.map(str::to_string),
            received_at: 1_000_000,
            signal_created_at: signal.map(|_| 1_010_000),
        }
    }

    fn outcome(acked: &[&str], sent: &[&str]) -> Outcome {
        let mut o = Outcome::new(Instant::now());
        o.acked_keys = acked.iter().map(|s| s.to_string()).collect();
        o.sent_keys = sent.iter().map(|s| s.to_string()).collect();
        o
    }

    #[test]
    fn verification_counts_lost_and_duplicates() {
        let o = outcome(&["a", "b", "c"], &["a", "b", "c", "d"]);
        // All good: one processed, one filtered, one processed; d (not acked) stored too.
        let ok = verify(
            &o,
            &[
                row("a", "processed", Some("s1")),
                row("b", "filtered", None),
                row("c", "processed", Some("s2")),
                row("d", "processed", Some("s3")),
            ],
            0,
        );
        assert_eq!((ok.lost, ok.duplicates, ok.filtered), (0, 0, 1));
        assert!(ok.notes.is_empty());
        assert!((9_990..=10_010).contains(&ok.e2e_hist.value_at_quantile(0.99)));

        // c missing, b still pending, a shares its signal with an unexpected row, one orphan.
        let bad = verify(
            &o,
            &[
                row("a", "processed", Some("s1")),
                row("b", "pending", None),
                row("zz", "processed", Some("s1")),
            ],
            1,
        );
        assert_eq!(bad.lost, 2);
        assert_eq!(bad.duplicates, 1 + 1 + 1);
        assert_eq!(bad.notes.len(), 5, "{:?}", bad.notes);
    }
}
