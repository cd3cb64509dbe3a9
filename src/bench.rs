//! `signalbox bench`: the load-and-verify benchmark (docs/PERFORMANCE.md).
//!
//! Per scenario it starts a server as a child process on a fresh database (or targets `--url`),
//! provisions a workspace, a webhook key, a Slack and a Pylon integration through the admin API,
//! measures the bare HTTP ceiling (`GET /healthz`, the baseline), drives correctly signed
//! deliveries over N keep-alive HTTP/1.1 connections (closed loop, or open loop at `--rate`
//! with latency measured from each request's intended send time), waits for the pipeline to
//! drain and then verifies in the database that every acknowledged delivery is stored exactly
//! once and became exactly one signal or a recorded filter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::body::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
use hyper_util::rt::TokioIo;
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::now_secs;
use crate::config::RawConfig;
use crate::crypto::MasterKey;
use crate::protocol::{pylon, slack, standard_webhooks};
use crate::store::{Pool, Store};

/// Longest time one request may take before it counts as a `timeout` error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a started server to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Highest latency the histograms track (larger values are clamped).
const HIST_MAX_US: u64 = 600_000_000;

/// Which load to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioArg {
    /// Slack Events API `message` envelopes (~1.5 KB).
    Slack,
    /// Pylon "Send webhook" issues with ~3 KB of HTML.
    Pylon,
    /// Standard Webhooks signed generic payloads.
    Webhook,
    /// Round-robin of the three.
    Mixed,
    /// The four scenarios in turn, each on a fresh database and server.
    All,
    /// Not load: fills `--list-rows` signals, deliveries and activity entries directly in a
    /// fresh database, then times the first and a deep page of each filtered list of the API
    /// (not part of `all`).
    Lists,
}

/// `signalbox bench …`
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// slack, pylon, webhook, mixed (round-robin of the three) or all (the four in turn).
    #[arg(long, value_enum, default_value_t = ScenarioArg::All)]
    pub scenario: ScenarioArg,
    /// Concurrent keep-alive HTTP/1.1 connections (one task each).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds of measured load per scenario (after the warm-up); also the baseline's length.
    #[arg(long, default_value_t = 10.0, conflicts_with = "requests")]
    pub duration: f64,
    /// Measured requests per scenario instead of a duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Offered load in requests/s (open loop: each request has an intended send time and its
    /// latency counts from that time, so a stalled server is not hidden). Default: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Database of the started server: postgres://… creates a fresh database `sbx_bench_<id>` on
    /// that server per scenario; sqlite://PATH puts a fresh file per scenario beside PATH.
    /// Default: a fresh SQLite file in a temp dir. With --url: the target's database, read only
    /// for the verification (else the admin API is used).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Target an already running server (http://HOST:PORT) instead of starting one; each
    /// scenario then uses a fresh workspace on it. Needs --admin-token.
    #[arg(long)]
    pub url: Option<String>,
    /// Admin token of the --url server.
    #[arg(long, env = "SIGNALBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Warm-up seconds before measuring (not counted in the figures; still verified).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Longest wait, in seconds, for the pipeline to drain after the load.
    #[arg(long, default_value_t = 120.0)]
    pub drain_timeout: f64,
    /// Keep the benchmark databases (temp dir, PostgreSQL databases) for inspection.
    #[arg(long)]
    pub keep: bool,
    /// `--scenario lists`: rows of each table (signals, deliveries, activity) filled before the
    /// list calls are timed. `--requests` there is the number of calls per list and page
    /// (default 100).
    #[arg(long, default_value_t = 150_000)]
    pub list_rows: u64,
}

/// One scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Slack only.
    Slack,
    /// Pylon only.
    Pylon,
    /// Generic webhooks only.
    Webhook,
    /// Round-robin of the three.
    Mixed,
}

impl Scenario {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Slack => "slack",
            Scenario::Pylon => "pylon",
            Scenario::Webhook => "webhook",
            Scenario::Mixed => "mixed",
        }
    }

    fn source(self, k: u64) -> Source {
        match self {
            Scenario::Slack => Source::Slack,
            Scenario::Pylon => Source::Pylon,
            Scenario::Webhook => Source::Webhook,
            Scenario::Mixed => [Source::Slack, Source::Pylon, Source::Webhook][(k % 3) as usize],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Slack,
    Pylon,
    Webhook,
}

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
    filtered: u64,
    #[serde(skip)]
    notes: Vec<String>,
    #[serde(skip)]
    offered: Option<f64>,
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

    fn failure_reasons(&self) -> Vec<String> {
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

/// Runs the benchmark; fails when any scenario fails verification.
pub async fn run(args: BenchArgs, json_out: bool) -> anyhow::Result<()> {
    crate::state::install_crypto_provider();
    check_args(&args)?;
    if args.scenario == ScenarioArg::Lists {
        return lists::run(&args, json_out).await;
    }
    let scenarios = match args.scenario {
        ScenarioArg::Slack => vec![Scenario::Slack],
        ScenarioArg::Pylon => vec![Scenario::Pylon],
        ScenarioArg::Webhook => vec![Scenario::Webhook],
        ScenarioArg::Mixed => vec![Scenario::Mixed],
        ScenarioArg::Lists => unreachable!("handled above"),
        ScenarioArg::All => vec![
            Scenario::Slack,
            Scenario::Pylon,
            Scenario::Webhook,
            Scenario::Mixed,
        ],
    };
    let mut failed = Vec::new();
    for sc in scenarios {
        let report = run_scenario(&args, sc).await?;
        if json_out {
            println!("{}", serde_json::to_string(&report)?);
            eprintln!("{}", report.human());
        } else {
            println!("{}", report.human());
        }
        if !report.verified() {
            failed.push(format!(
                "{}: {}",
                report.scenario,
                report.failure_reasons().join("; ")
            ));
        }
    }
    if !failed.is_empty() {
        bail!("benchmark verification failed: {}", failed.join(" | "));
    }
    Ok(())
}

fn check_args(a: &BenchArgs) -> anyhow::Result<()> {
    if a.connections == 0 || a.connections > 10_000 {
        bail!("--connections must be between 1 and 10000");
    }
    if a.requests.is_none() && !(a.duration > 0.0 && a.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if a.requests == Some(0) {
        bail!("--requests must be at least 1");
    }
    if let Some(r) = a.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of requests per second");
    }
    if !(a.warmup >= 0.0 && a.warmup.is_finite()) {
        bail!("--warmup must be zero or more seconds");
    }
    if !(a.drain_timeout > 0.0 && a.drain_timeout.is_finite()) {
        bail!("--drain-timeout must be a positive number of seconds");
    }
    if a.url.is_some() && a.admin_token.as_deref().is_none_or(str::is_empty) {
        bail!("--url needs --admin-token (or SIGNALBOX_ADMIN_TOKEN) of that server");
    }
    if let Some(u) = &a.database_url
        && !(u.starts_with("sqlite:")
            || u.starts_with("postgres://")
            || u.starts_with("postgresql://"))
    {
        bail!("--database-url must start with sqlite:// or postgres://");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One scenario
// ---------------------------------------------------------------------------------------------

async fn run_scenario(args: &BenchArgs, sc: Scenario) -> anyhow::Result<Report> {
    let (target, mut server) = match &args.url {
        Some(url) => (
            Target::parse(url, args.admin_token.clone().unwrap_or_default()).await?,
            None,
        ),
        None => {
            let s = Server::start(args, sc.name()).await?;
            (s.target.clone(), Some(s))
        }
    };
    let result = drive_scenario(args, sc, &target, server.as_ref()).await;
    if let Some(s) = server.take() {
        s.stop(args.keep).await;
    }
    result
}

async fn drive_scenario(
    args: &BenchArgs,
    sc: Scenario,
    target: &Target,
    server: Option<&Server>,
) -> anyhow::Result<Report> {
    let admin = admin_client()?;
    let run_id = short_id();
    progress(&format!(
        "{}: provisioning through the admin API",
        sc.name()
    ));
    let prov = provision(&admin, target, &run_id).await?;
    let amount = match args.requests {
        Some(n) => Amount::Requests(n),
        None => Amount::Duration(Duration::from_secs_f64(args.duration)),
    };
    let warmup = Duration::from_secs_f64(args.warmup);

    progress(&format!(
        "{}: baseline GET /healthz over {} connections",
        sc.name(),
        args.connections
    ));
    let pid = server.and_then(|s| s.pid);
    let base_cpu = CpuWatch::start(pid, warmup);
    let baseline = drive(
        target,
        Arc::new(Generator::healthz(target)),
        Plan {
            connections: args.connections,
            warmup,
            amount,
            rate: None,
        },
    )
    .await;
    let baseline_rps = baseline.rps();
    let baseline_cpu = base_cpu.per(baseline.acked_measured).await;

    progress(&format!(
        "{}: load over {} connections{}",
        sc.name(),
        args.connections,
        args.rate
            .map(|r| format!(" at {r:.0}/s offered"))
            .unwrap_or_default()
    ));
    let load_cpu = CpuWatch::start(pid, warmup);
    let load = drive(
        target,
        Arc::new(Generator::load(target, sc, prov.clone(), run_id.clone())),
        Plan {
            connections: args.connections,
            warmup,
            amount,
            rate: args.rate,
        },
    )
    .await;

    // Verification: from the database when we can reach it, else through the admin API.
    let probe = match (server, &args.database_url, &args.url) {
        (Some(s), _, _) => Probe::db(&s.database_url).await?,
        (None, Some(db), Some(_)) => Probe::db(db).await?,
        _ => Probe::Api {
            http: admin.clone(),
            base: target.base.clone(),
            token: target.admin_token.clone(),
        },
    };
    progress(&format!(
        "{}: {} acked; waiting for the pipeline to drain",
        sc.name(),
        load.acked_keys.len()
    ));
    let drained = probe
        .wait_drained(&prov.workspace, Duration::from_secs_f64(args.drain_timeout))
        .await?;
    let delivery_cpu = load_cpu.per(load.acked_measured).await;
    let (rows, orphans) = probe.snapshot(&prov.workspace).await?;
    probe.close().await;
    let v = verify(&load, &rows, orphans);
    let peak_rss_mib = server.and_then(Server::peak_rss_mib);

    let backend = match (server, &args.database_url) {
        (Some(s), _) => s.backend.to_string(),
        (None, Some(db)) if db.starts_with("sqlite:") => "sqlite".into(),
        (None, Some(_)) => "postgres".into(),
        (None, None) => "remote".into(),
    };
    let ack_rps = load.rps();
    let mut notes = v.notes;
    if !drained {
        notes.push(format!(
            "the pipeline did not drain within {}s",
            args.drain_timeout
        ));
    }
    Ok(Report {
        scenario: sc.name().into(),
        backend,
        connections: args.connections,
        acked: load.acked_measured,
        errors: load.errors.values().sum(),
        ack_rps: round(ack_rps, 1),
        ack_p50_ms: pct_ms(&load.hist, 50.0),
        ack_p90_ms: pct_ms(&load.hist, 90.0),
        ack_p99_ms: pct_ms(&load.hist, 99.0),
        ack_p999_ms: pct_ms(&load.hist, 99.9),
        e2e_sps: round(v.e2e_sps, 1),
        e2e_p99_ms: pct_ms(&v.e2e_hist, 99.0),
        baseline_rps: round(baseline_rps, 1),
        ratio_to_baseline: if baseline_rps > 0.0 {
            round(ack_rps / baseline_rps, 3)
        } else {
            0.0
        },
        peak_rss_mib: peak_rss_mib.map(|m| round(m, 1)),
        lost: v.lost,
        duplicates: v.duplicates,
        errors_by_status: load.errors.clone(),
        server_cpu_us_per_delivery: delivery_cpu.map(|c| round(c.process, 1)),
        baseline_cpu_us_per_request: baseline_cpu.map(|c| round(c.process, 1)),
        machine_cpu_us_per_delivery: delivery_cpu.and_then(|c| c.machine.map(|m| round(m, 1))),
        baseline_machine_cpu_us_per_request: baseline_cpu
            .and_then(|c| c.machine.map(|m| round(m, 1))),
        writer_cpu_us_per_delivery: delivery_cpu.and_then(|c| c.writer.map(|w| round(w, 1))),
        filtered: v.filtered,
        notes,
        offered: args.rate,
    })
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

fn pct_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    round(h.value_at_quantile(q / 100.0) as f64 / 1000.0, 3)
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant, valid histogram bounds")
}

/// A short random upper-case id (run ids, Slack team ids).
fn short_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    crate::crypto::random_bytes(8)
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

fn random_secret() -> String {
    hex::encode(crate::crypto::random_bytes(24))
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

/// Where requests go.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    base: String,
    admin_token: String,
}

impl Target {
    async fn parse(url: &str, admin_token: String) -> anyhow::Result<Target> {
        let rest = url
            .trim_end_matches('/')
            .strip_prefix("http://")
            .ok_or_else(|| {
                anyhow!("--url must be http://HOST:PORT (the benchmark speaks plain HTTP/1.1)")
            })?;
        if rest.contains('/') {
            bail!("--url must be http://HOST:PORT without a path");
        }
        let hostport = if rest.contains(':') {
            rest.to_string()
        } else {
            format!("{rest}:80")
        };
        let addr = tokio::net::lookup_host(&hostport)
            .await
            .with_context(|| format!("resolving {hostport}"))?
            .next()
            .ok_or_else(|| anyhow!("{hostport} does not resolve"))?;
        Ok(Target {
            addr,
            host: rest.to_string(),
            base: format!("http://{rest}"),
            admin_token,
        })
    }
}

/// A `signalbox serve` child process on a fresh database.
/// CPU time of the server process and of its SQLite writer thread, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    process: u64,
    writer: Option<u64>,
    /// Busy time of the whole machine (every process, the load generator and a local
    /// PostgreSQL included), summed over its CPUs.
    machine: Option<u64>,
}

/// Per-request CPU time, µs.
#[derive(Debug, Clone, Copy)]
struct CpuPer {
    process: f64,
    writer: Option<f64>,
    machine: Option<f64>,
}

/// `/proc` reports CPU time in USER_HZ ticks, which Linux fixes at 100 per second for
/// user space on every architecture it supports.
const TICK_US: f64 = 10_000.0;

/// user + system ticks from a `/proc/…/stat` line (fields 14 and 15; the command name in
/// field 2 may hold spaces, so count from its closing parenthesis).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = f.get(11)?.parse().ok()?;
    let system: u64 = f.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Busy ticks of all CPUs from `/proc/stat`'s first line: user, nice, system, irq and softirq
/// (not idle, iowait or steal).
fn machine_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
}

fn cpu_ticks(pid: u32) -> Option<CpuTicks> {
    let process = stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let writer = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "sqlite-writer")
        })
        .and_then(|t| stat_ticks(&std::fs::read_to_string(t.path().join("stat")).ok()?));
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_ticks(&s));
    Some(CpuTicks {
        process,
        writer,
        machine,
    })
}

/// Samples the server's CPU time when a phase's measured part starts (after its warm-up).
struct CpuWatch(Option<(u32, tokio::task::JoinHandle<Option<CpuTicks>>)>);

impl CpuWatch {
    fn start(pid: Option<u32>, warmup: Duration) -> CpuWatch {
        CpuWatch(pid.map(|pid| {
            let at = tokio::time::Instant::now() + warmup;
            (
                pid,
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    cpu_ticks(pid)
                }),
            )
        }))
    }

    /// CPU per request since the sample, over `requests` requests.
    async fn per(self, requests: u64) -> Option<CpuPer> {
        let (pid, first) = self.0?;
        let a = first.await.ok()??;
        let b = cpu_ticks(pid)?;
        if requests == 0 {
            return None;
        }
        let n = requests as f64;
        Some(CpuPer {
            process: b.process.saturating_sub(a.process) as f64 * TICK_US / n,
            writer: match (a.writer, b.writer) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 * TICK_US / n),
                _ => None,
            },
            machine: match (a.machine, b.machine) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 * TICK_US / n),
                _ => None,
            },
        })
    }
}

struct Server {
    child: tokio::process::Child,
    pid: Option<u32>,
    target: Target,
    database_url: String,
    backend: &'static str,
    cleanup: Cleanup,
}

enum Cleanup {
    Files(Vec<PathBuf>),
    Dir(PathBuf),
    PgDatabase { admin_url: String, name: String },
}

impl Server {
    async fn start(args: &BenchArgs, scenario: &str) -> anyhow::Result<Server> {
        let (database_url, backend, cleanup) = fresh_database(args, scenario).await?;
        progress(&format!(
            "{scenario}: starting a server on a fresh {backend} database"
        ));
        let exe = std::env::current_exe().context("locating the signalbox executable")?;
        let token = format!("bench-{}", random_secret());
        let keys = MasterKey::generate("bench");
        let mut last_err = anyhow!("the server did not start");
        for _ in 0..3 {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut child = tokio::process::Command::new(&exe)
                .arg("serve")
                .env("SIGNALBOX_DATABASE_URL", &database_url)
                .env("SIGNALBOX_BIND", addr.to_string())
                .env("SIGNALBOX_PUBLIC_URL", format!("http://{addr}"))
                .env("SIGNALBOX_ADMIN_TOKEN", &token)
                .env("SIGNALBOX_MASTER_KEYS", keys.to_spec().expose_secret())
                .env(
                    "RUST_LOG",
                    std::env::var("SIGNALBOX_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} serve", exe.display()))?;
            let target = Target {
                addr,
                host: addr.to_string(),
                base: format!("http://{addr}"),
                admin_token: token.clone(),
            };
            match wait_ready(&mut child, &target).await {
                Ok(()) => {
                    return Ok(Server {
                        pid: child.id(),
                        child,
                        target,
                        database_url,
                        backend,
                        cleanup,
                    });
                }
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    last_err = e;
                }
            }
        }
        cleanup.run(false).await;
        Err(last_err)
    }

    /// `VmHWM` of the server process, MiB.
    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    async fn stop(mut self, keep: bool) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.cleanup.run(keep).await;
    }
}

impl Cleanup {
    async fn run(&self, keep: bool) {
        if keep {
            match self {
                Cleanup::Files(f) => progress(&format!("kept {}", f[0].display())),
                Cleanup::Dir(d) => progress(&format!("kept {}", d.display())),
                Cleanup::PgDatabase { name, .. } => progress(&format!("kept database {name}")),
            }
            return;
        }
        match self {
            Cleanup::Files(files) => {
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
            }
            Cleanup::Dir(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
            Cleanup::PgDatabase { admin_url, name } => {
                let dropped = async {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect(admin_url)
                        .await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await?;
                    pool.close().await;
                    Ok::<_, sqlx::Error>(())
                }
                .await;
                if let Err(e) = dropped {
                    progress(&format!("could not drop database {name}: {e}"));
                }
            }
        }
    }
}

/// A fresh database for one scenario: its URL, backend name and how to remove it.
async fn fresh_database(
    args: &BenchArgs,
    scenario: &str,
) -> anyhow::Result<(String, &'static str, Cleanup)> {
    let id = crate::ids::new_id("x").trim_start_matches("x_").to_string();
    match args.database_url.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let name = format!("sbx_bench_{id}");
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .with_context(|| format!("connecting to {}", crate::config::redact_url(url)))?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await
                .with_context(|| format!("creating database {name}"))?;
            pool.close().await;
            Ok((
                replace_pg_database(url, &name),
                "postgres",
                Cleanup::PgDatabase {
                    admin_url: url.to_string(),
                    name,
                },
            ))
        }
        Some(url) => {
            let path = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .unwrap_or(url);
            let path = PathBuf::from(path.split('?').next().unwrap_or(path));
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("signalbox");
            let file = dir.join(format!("{stem}-bench-{scenario}-{id}.db"));
            let files = ["", "-wal", "-shm"]
                .iter()
                .map(|suffix| PathBuf::from(format!("{}{suffix}", file.display())))
                .collect();
            Ok((
                format!("sqlite://{}", file.display()),
                "sqlite",
                Cleanup::Files(files),
            ))
        }
        None => {
            let dir = std::env::temp_dir().join(format!("signalbox-bench-{id}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok((
                format!("sqlite://{}", dir.join("signalbox.db").display()),
                "sqlite",
                Cleanup::Dir(dir),
            ))
        }
    }
}

/// `postgres://u@h:5432/db?x=y` with the database replaced by `name`.
fn replace_pg_database(url: &str, name: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (url, None),
    };
    let after_scheme = main.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match main[after_scheme..].rfind('/') {
        Some(i) => &main[..after_scheme + i],
        None => main,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

async fn wait_ready(child: &mut tokio::process::Child, target: &Target) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the server exited during start-up ({status})");
        }
        if let Ok(r) = http.get(format!("{}/readyz", target.base)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the server was not ready within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Provisioning through the admin API
// ---------------------------------------------------------------------------------------------

/// What the load needs to address and sign requests.
#[derive(Debug, Clone)]
struct Provisioned {
    workspace: String,
    key_path: String,
    key: Vec<u8>,
    slack_path: String,
    slack_secret: Vec<u8>,
    slack_team: String,
    pylon_path: String,
    pylon_secret: Vec<u8>,
}

fn admin_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn admin_post(
    http: &reqwest::Client,
    t: &Target,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let resp = http
        .post(format!("{}{path}", t.base))
        .bearer_auth(&t.admin_token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST {path} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("POST {path}: not JSON"))
}

/// The path and query of a webhook URL printed by the server.
fn path_of(url: &str) -> String {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => url[after + i..].to_string(),
        None => "/".into(),
    }
}

fn str_field(v: &Value, k: &str) -> anyhow::Result<String> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the admin API answered without {k}: {v}"))
}

async fn provision(
    http: &reqwest::Client,
    t: &Target,
    run_id: &str,
) -> anyhow::Result<Provisioned> {
    let ws = admin_post(
        http,
        t,
        "/api/v1/workspaces",
        json!({"name": format!("bench {run_id}")}),
    )
    .await?;
    let workspace = str_field(&ws, "id")?;
    let key = admin_post(
        http,
        t,
        &format!("/api/v1/workspaces/{workspace}/webhook-keys"),
        json!({"name": "bench"}),
    )
    .await?;
    let secret = str_field(&key, "secret")?;
    let key_bytes = standard_webhooks::decode_secret(&secret)
        .ok_or_else(|| anyhow!("the webhook key secret is not a whsec_ secret"))?;
    let slack_team = format!("T{run_id}");
    let slack_secret = random_secret();
    let slack = admin_post(
        http,
        t,
        &format!("/api/v1/workspaces/{workspace}/integrations"),
        json!({"platform": "slack", "name": "bench slack", "slack_team_id": slack_team,
               "signing_secret": slack_secret}),
    )
    .await?;
    let pylon_secret = random_secret();
    let pylon = admin_post(
        http,
        t,
        &format!("/api/v1/workspaces/{workspace}/integrations"),
        json!({"platform": "pylon", "name": "bench pylon", "webhook_secret": pylon_secret}),
    )
    .await?;
    Ok(Provisioned {
        workspace,
        key_path: path_of(&str_field(&key, "webhook_url")?),
        key: key_bytes,
        slack_path: path_of(&str_field(&slack, "webhook_url")?),
        slack_secret: slack_secret.into_bytes(),
        slack_team,
        pylon_path: path_of(&str_field(&pylon, "webhook_url")?),
        pylon_secret: pylon_secret.into_bytes(),
    })
}

// ---------------------------------------------------------------------------------------------
// Realistic payloads (also used by the criterion benchmarks)
// ---------------------------------------------------------------------------------------------

/// Realistic request bodies of each source.
pub mod payloads {
    use std::sync::LazyLock;

    /// A Slack `event_callback` envelope carrying a channel `message` (~1.5 KB) with mentions,
    /// links and a `blocks` array. `k` makes `event_id` and `ts` unique; `ts` is
    /// `base_secs + k / 10^6` seconds. Returns the event id and the body.
    pub fn slack_event(
        team: &str,
        run: &str,
        k: u64,
        now: i64,
        base_secs: i64,
    ) -> (String, Vec<u8>) {
        let event_id = format!("Ev{run}{k:09}");
        let ts = format!(
            "{}.{:06}",
            base_secs + (k / 1_000_000) as i64,
            k % 1_000_000
        );
        let user = format!("U0CUST{:04}", k % 1000);
        let body = format!(
            concat!(
                r#"{{"token":"XXYYZZbenchTOKEN","team_id":"{team}","context_team_id":"{team}","context_enterprise_id":null,"#,
                r#""api_app_id":"A0BENCHAPP","event":{{"user":"{user}","type":"message","ts":"{ts}","client_msg_id":"6c0e4a5b-{k:012}-4e1f-9a63-bench","#,
                r#""text":"Hi <@U0SUPPORT|support>, since this morning exports of <https://acme.example.com/reports/weekly|the weekly report> fail with a 502 for the whole team in <#C0BENCH01|customer-acme>. Ticket {k}, we tried twice &amp; cleared the cache. Could you check? <!here>","#,
                r#""team":"{team}","blocks":[{{"type":"rich_text","block_id":"b{k}","elements":[{{"type":"rich_text_section","elements":["#,
                r#"{{"type":"text","text":"Hi "}},{{"type":"user","user_id":"U0SUPPORT"}},{{"type":"text","text":", since this morning exports of "}},"#,
                r#"{{"type":"link","url":"https://acme.example.com/reports/weekly","text":"the weekly report"}},"#,
                r#"{{"type":"text","text":" fail with a 502 for the whole team in "}},{{"type":"channel","channel_id":"C0BENCH01"}},"#,
                r#"{{"type":"text","text":". Ticket {k}, we tried twice & cleared the cache. Could you check? "}},{{"type":"broadcast","range":"here"}}]}}]}}],"#,
                r#""channel":"C0BENCH01","event_ts":"{ts}","channel_type":"channel"}},"type":"event_callback","event_id":"{event_id}","event_time":{now},"#,
                r#""authorizations":[{{"enterprise_id":null,"team_id":"{team}","user_id":"U0BENCHBOT","is_bot":true,"is_enterprise_install":false}}],"#,
                r#""is_ext_shared_channel":false,"event_context":"4-eyJldCI6Im1lc3NhZ2UiLCJ0aWQiOiJUMEJFTkNIIiwiYWlkIjoiQTBCRU5DSEFQUCIsImNpZCI6IkMwQkVOQ0gwMSJ9"}}"#
            ),
            team = team,
            user = user,
            ts = ts,
            k = k,
            event_id = event_id,
            now = now,
        );
        (event_id, body.into_bytes())
    }

    static TICKET_HTML: LazyLock<String> = LazyLock::new(|| {
        let mut s = String::from(
            "<div><p>Hello team,</p><p>Since the upgrade on <b>Monday</b> our nightly <a href='https://acme.example.com/exports'>CSV export</a> \
             fails for every workspace with more than 50&nbsp;000 rows. The job starts, runs for about 40 minutes and then stops with \
             <code>502 Bad Gateway</code>. Smaller workspaces are fine.</p>\
             <p>What we tried so far:</p><ol><li>Re-running the export manually from the <i>Reports</i> page</li>\
             <li>Splitting the export by region (EMEA, AMER, APAC)</li><li>Switching the format from CSV to XLSX</li>\
             <li>Clearing the browser cache &amp; logging in again</li></ol>\
             <p>None of this helped. Our finance team needs the numbers for the quarterly close on <u>Friday</u>, so this is \
             <strong>blocking</strong> for us.</p><blockquote>Error: upstream timed out (110: Connection timed out) while reading \
             response header from upstream, request: GET /api/export?format=csv&amp;workspace=acme-prod</blockquote>\
             <table><tr><th>Workspace</th><th>Rows</th><th>Result</th></tr><tr><td>acme-prod</td><td>1&nbsp;204&nbsp;332</td><td>502</td></tr>\
             <tr><td>acme-emea</td><td>402&nbsp;118</td><td>502</td></tr><tr><td>acme-test</td><td>12&nbsp;004</td><td>OK</td></tr></table>\
             <p>Screenshots: <img src='https://files.example.com/s1.png' alt='export page'> and \
             <img src='https://files.example.com/s2.png' alt='error'></p><ul><li>Browser: Firefox 131</li><li>OS: macOS 14.6</li>\
             <li>Account plan: Enterprise</li></ul><p>Could you also confirm whether the export API has a hard timeout, and if so how we \
             can page through the results instead? We would be happy to use the streaming endpoint if there is one.</p>",
        );
        while s.len() < 2900 {
            s.push_str("<p>Additional context from the customer call: the issue also reproduces with the API client v2.3 and with \
                         scheduled exports; the audit log shows the job as <em>running</em> until it is killed.</p>");
        }
        s.push_str("<p>Thanks a lot,<br>Ann Example<br>Head of Finance Ops, Acme Inc</p></div>");
        s
    });

    static TICKET_HTML_JSON: LazyLock<String> =
        LazyLock::new(|| serde_json::to_string(TICKET_HTML.as_str()).unwrap_or_default());

    /// A ~3 KB HTML ticket body.
    pub fn ticket_html() -> &'static str {
        &TICKET_HTML
    }

    /// A Pylon issue in the flattened template shape (`issue_*` keys) with ~3 KB of HTML and a
    /// unique issue id.
    pub fn pylon_issue(run: &str, k: u64) -> Vec<u8> {
        format!(
            concat!(
                r#"{{"event":"issue_new","issue_id":"iss_{run}_{k}","issue_number":"{k}","#,
                r#""issue_title":"Nightly CSV export fails with 502 for large workspaces (ticket {k})","#,
                r#""issue_body":{html},"issue_status":"new","issue_priority":"high","#,
                r#""issue_requester_email":"ann.{u}@acme.test","issue_requester_name":"Ann Example","#,
                r#""issue_account_id":"acc_acme_{u}","issue_account_name":"Acme Inc","#,
                r#""issue_link":"https://app.usepylon.com/issues/{k}","issue_assignee_email":"support@signalbox.test","#,
                r#""issue_team_name":"Support","issue_tags":"bug,export,enterprise","issue_created_at":"2026-11-29T09:00:00Z"}}"#
            ),
            run = run,
            k = k,
            u = k % 100,
            html = TICKET_HTML_JSON.as_str(),
        )
        .into_bytes()
    }

    /// A generic payload (`{"verbatim": …}` plus optional fields).
    pub fn webhook_payload(run: &str, k: u64) -> Vec<u8> {
        format!(
            concat!(
                r#"{{"verbatim":"Feedback {k} from the in-app widget: the new dashboard takes more than ten seconds to load on Monday "#,
                r#"mornings when our whole team opens it, and filtering by region freezes the tab. Otherwise we love the new charts!","#,
                r#""customer_email":"user{u}@acme.test","source_name":"In-app widget","source_url":"https://app.acme.test/feedback/{k}","#,
                r#""metadata":{{"plan":"enterprise","seat_count":40,"run":"{run}","seq":{k}}}}}"#
            ),
            run = run,
            k = k,
            u = k % 100,
        )
        .into_bytes()
    }
}

// ---------------------------------------------------------------------------------------------
// Request generation
// ---------------------------------------------------------------------------------------------

enum GenKind {
    Healthz,
    Load(Scenario, Provisioned),
}

struct Generator {
    kind: GenKind,
    host: HeaderValue,
    run: String,
    base_secs: i64,
}

struct Prepared {
    req: hyper::Request<Full<Bytes>>,
    key: Option<String>,
}

impl Generator {
    fn healthz(t: &Target) -> Generator {
        Generator {
            kind: GenKind::Healthz,
            host: HeaderValue::from_str(&t.host).unwrap_or(HeaderValue::from_static("localhost")),
            run: String::new(),
            base_secs: now_secs(),
        }
    }

    fn load(t: &Target, sc: Scenario, p: Provisioned, run: String) -> Generator {
        Generator {
            kind: GenKind::Load(sc, p),
            run,
            ..Generator::healthz(t)
        }
    }

    fn prepare(&self, k: u64) -> anyhow::Result<Prepared> {
        let (sc, p) = match &self.kind {
            GenKind::Healthz => {
                let req = hyper::Request::get("/healthz")
                    .header(HOST, self.host.clone())
                    .body(Full::new(Bytes::new()))?;
                return Ok(Prepared { req, key: None });
            }
            GenKind::Load(sc, p) => (*sc, p),
        };
        let now = now_secs();
        let builder = hyper::Request::post("/")
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json");
        let (builder, key, body) = match sc.source(k) {
            Source::Slack => {
                let (event_id, body) =
                    payloads::slack_event(&p.slack_team, &self.run, k, now, self.base_secs);
                let sig = slack::sign(&p.slack_secret, now, &body);
                (
                    builder
                        .uri(p.slack_path.as_str())
                        .header(USER_AGENT, "Slackbot 1.0 (+https://api.slack.com/robots)")
                        .header("x-slack-request-timestamp", now)
                        .header("x-slack-signature", sig),
                    event_id,
                    body,
                )
            }
            Source::Pylon => {
                let body = payloads::pylon_issue(&self.run, k);
                let sig = pylon::sign_x_pylon(&p.pylon_secret, &body);
                (
                    builder
                        .uri(p.pylon_path.as_str())
                        .header(USER_AGENT, "Pylon-Webhooks/1.0")
                        .header("x-pylon-signature", sig),
                    pylon::dedupe_key(&body),
                    body,
                )
            }
            Source::Webhook => {
                let id = format!("msg_{}_{k}", self.run);
                let body = payloads::webhook_payload(&self.run, k);
                let sig = standard_webhooks::sign(&p.key, &id, now, &body);
                (
                    builder
                        .uri(p.key_path.as_str())
                        .header(USER_AGENT, "signalbox-bench")
                        .header("webhook-id", id.as_str())
                        .header("webhook-timestamp", now)
                        .header("webhook-signature", sig),
                    id,
                    body,
                )
            }
        };
        Ok(Prepared {
            req: builder.body(Full::new(Bytes::from(body)))?,
            key: Some(key),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Amount {
    Duration(Duration),
    Requests(u64),
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    connections: usize,
    warmup: Duration,
    amount: Amount,
    rate: Option<f64>,
}

struct Shared {
    plan: Plan,
    t0: Instant,
    seq: AtomicU64,
    measured: AtomicU64,
}

/// The next request to send: its sequence number, intended send time (open loop) and whether
/// it belongs to the measured phase. `None`: the run is over.
struct Ticket {
    k: u64,
    intended: Option<Instant>,
    measured: bool,
}

impl Shared {
    fn next(&self) -> Option<Ticket> {
        let measure_start = self.t0 + self.plan.warmup;
        match self.plan.rate {
            Some(rate) => {
                let k = self.seq.fetch_add(1, Ordering::Relaxed);
                let at = self.t0 + Duration::from_secs_f64(k as f64 / rate);
                let measured = at >= measure_start;
                match self.plan.amount {
                    Amount::Duration(d) if at >= measure_start + d => return None,
                    Amount::Requests(n)
                        if measured && self.measured.fetch_add(1, Ordering::Relaxed) >= n =>
                    {
                        return None;
                    }
                    _ => {}
                }
                Some(Ticket {
                    k,
                    intended: Some(at),
                    measured,
                })
            }
            None => {
                let now = Instant::now();
                let measured = now >= measure_start;
                match self.plan.amount {
                    Amount::Duration(d) if now >= measure_start + d => return None,
                    Amount::Requests(n)
                        if measured && self.measured.fetch_add(1, Ordering::Relaxed) >= n =>
                    {
                        return None;
                    }
                    _ => {}
                }
                Some(Ticket {
                    k: self.seq.fetch_add(1, Ordering::Relaxed),
                    intended: None,
                    measured,
                })
            }
        }
    }
}

/// What the connections observed.
struct Outcome {
    hist: Histogram<u64>,
    acked_measured: u64,
    errors: BTreeMap<String, u64>,
    duplicate_acks: u64,
    acked_keys: Vec<String>,
    sent_keys: Vec<String>,
    measure_start: Instant,
    last_done: Option<Instant>,
}

impl Outcome {
    fn new(measure_start: Instant) -> Outcome {
        Outcome {
            hist: new_hist(),
            acked_measured: 0,
            errors: BTreeMap::new(),
            duplicate_acks: 0,
            acked_keys: Vec::new(),
            sent_keys: Vec::new(),
            measure_start,
            last_done: None,
        }
    }

    fn error(&mut self, measured: bool, what: impl Into<String>) {
        if measured {
            *self.errors.entry(what.into()).or_default() += 1;
        }
    }

    fn merge(&mut self, o: Outcome) {
        let _ = self.hist.add(&o.hist);
        self.acked_measured += o.acked_measured;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.duplicate_acks += o.duplicate_acks;
        self.acked_keys.extend(o.acked_keys);
        self.sent_keys.extend(o.sent_keys);
        self.last_done = self.last_done.max(o.last_done);
    }

    /// Acknowledged requests per second of the measured phase.
    fn rps(&self) -> f64 {
        match self.last_done {
            Some(end) if end > self.measure_start => {
                self.acked_measured as f64 / (end - self.measure_start).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn drive(target: &Target, generator: Arc<Generator>, plan: Plan) -> Outcome {
    let shared = Arc::new(Shared {
        plan,
        t0: Instant::now(),
        seq: AtomicU64::new(0),
        measured: AtomicU64::new(0),
    });
    let measure_start = shared.t0 + plan.warmup;
    let tasks: Vec<_> = (0..plan.connections)
        .map(|_| {
            let shared = shared.clone();
            let generator = generator.clone();
            let addr = target.addr;
            tokio::spawn(async move { connection_task(shared, generator, addr).await })
        })
        .collect();
    let mut total = Outcome::new(measure_start);
    for t in tasks {
        match t.await {
            Ok(o) => total.merge(o),
            Err(e) => total.error(true, format!("task: {e}")),
        }
    }
    total
}

async fn connection_task(
    shared: Arc<Shared>,
    generator: Arc<Generator>,
    addr: SocketAddr,
) -> Outcome {
    let mut out = Outcome::new(shared.t0 + shared.plan.warmup);
    let mut conn: Option<Sender> = None;
    while let Some(ticket) = shared.next() {
        if let Some(at) = ticket.intended {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        let prepared = match generator.prepare(ticket.k) {
            Ok(p) => p,
            Err(_) => {
                out.error(ticket.measured, "client");
                continue;
            }
        };
        if conn.is_none() {
            match connect(addr).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    out.error(ticket.measured, "connect");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(sender) = conn.as_mut() else {
            continue;
        };
        if let Some(key) = &prepared.key {
            out.sent_keys.push(key.clone());
        }
        let start = ticket.intended.unwrap_or_else(Instant::now);
        let exchange = async {
            sender.ready().await?;
            let resp = sender.send_request(prepared.req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let result = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
        let done = Instant::now();
        match result {
            Ok(Ok((status, body))) if status.is_success() => {
                if ticket.measured {
                    out.acked_measured += 1;
                    let us = (done - start).as_micros().max(1) as u64;
                    out.hist.saturating_record(us);
                }
                if let Some(key) = prepared.key {
                    if contains(&body, b"\"duplicate\":true") {
                        out.duplicate_acks += 1;
                    }
                    out.acked_keys.push(key);
                }
            }
            Ok(Ok((status, _))) => out.error(ticket.measured, status.as_u16().to_string()),
            Ok(Err(_)) => {
                out.error(ticket.measured, "io");
                conn = None;
            }
            Err(_) => {
                out.error(ticket.measured, "timeout");
                conn = None;
            }
        }
        if ticket.measured {
            out.last_done = out.last_done.max(Some(done));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

/// One stored delivery with its signal's creation time.
#[derive(Debug, Clone)]
struct Row {
    key: String,
    status: String,
    signal_id: Option<String>,
    received_at: i64,
    signal_created_at: Option<i64>,
}

enum Probe {
    Db(Store),
    Api {
        http: reqwest::Client,
        base: String,
        token: String,
    },
}

impl Probe {
    async fn db(url: &str) -> anyhow::Result<Probe> {
        let mut raw = RawConfig::defaults();
        raw.set("database_url", url).set("db_max_connections", "2");
        let cfg = raw.build()?;
        let store = Store::connect_without_migrating(&cfg)
            .await
            .context("connecting to the benchmark database for verification")?;
        Ok(Probe::Db(store))
    }

    async fn close(&self) {
        if let Probe::Db(s) = self {
            s.close().await;
        }
    }

    async fn any_pending(&self, ws: &str) -> anyhow::Result<bool> {
        match self {
            Probe::Db(store) => {
                const SQL: &str = "SELECT COUNT(*) FROM deliveries WHERE workspace_id = $1 AND status = 'pending'";
                let n: i64 = match store.pool() {
                    Pool::Sqlite(p) => sqlx::query_scalar(SQL).bind(ws).fetch_one(p).await?,
                    Pool::Postgres(p) => sqlx::query_scalar(SQL).bind(ws).fetch_one(p).await?,
                };
                Ok(n > 0)
            }
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

    async fn wait_drained(&self, ws: &str, timeout: Duration) -> anyhow::Result<bool> {
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
    async fn snapshot(&self, ws: &str) -> anyhow::Result<(Vec<Row>, u64)> {
        match self {
            Probe::Db(store) => {
                const ROWS: &str = "SELECT d.dedupe_key, d.status, d.signal_id, d.received_at, s.created_at \
                     FROM deliveries d LEFT JOIN signals s ON s.id = d.signal_id WHERE d.workspace_id = $1";
                const SIGNALS: &str = "SELECT id FROM signals WHERE workspace_id = $1";
                type T = (String, String, Option<String>, i64, Option<i64>);
                // Both reads in one snapshot, so a signal committed in between (with its
                // delivery, in one transaction) is never mistaken for an orphan.
                let (rows, signals): (Vec<T>, Vec<String>) = match store.pool() {
                    Pool::Sqlite(p) => {
                        let mut tx = p.begin().await?;
                        let rows = sqlx::query_as(ROWS).bind(ws).fetch_all(&mut *tx).await?;
                        let signals = sqlx::query_scalar(SIGNALS)
                            .bind(ws)
                            .fetch_all(&mut *tx)
                            .await?;
                        tx.rollback().await?;
                        (rows, signals)
                    }
                    Pool::Postgres(p) => {
                        let mut tx = p
                            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                            .await?;
                        let rows = sqlx::query_as(ROWS).bind(ws).fetch_all(&mut *tx).await?;
                        let signals = sqlx::query_scalar(SIGNALS)
                            .bind(ws)
                            .fetch_all(&mut *tx)
                            .await?;
                        tx.rollback().await?;
                        (rows, signals)
                    }
                };
                let rows: Vec<Row> = rows
                    .into_iter()
                    .map(|(key, status, signal_id, received_at, created)| Row {
                        key,
                        status,
                        signal_id,
                        received_at,
                        signal_created_at: created,
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

struct Verification {
    lost: u64,
    duplicates: u64,
    filtered: u64,
    notes: Vec<String>,
    e2e_hist: Histogram<u64>,
    e2e_sps: f64,
}

/// Every acknowledged delivery must be stored exactly once and be `processed` with its own
/// signal, or `filtered`; nothing else may have been stored or created.
fn verify(load: &Outcome, rows: &[Row], orphans: u64) -> Verification {
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

// ---------------------------------------------------------------------------------------------
// `--scenario lists`: filtered list pages over large tables
// ---------------------------------------------------------------------------------------------

/// `--scenario lists`: a fresh server and database, `--list-rows` rows in each of signals,
/// deliveries and activity_logs written directly (batched inserts, not through the pipeline),
/// then sequential calls of the API's filtered lists, first page and a deep page (the cursor
/// ~50k rows below the newest), over one keep-alive connection.
mod lists {
    use super::*;

    /// Rows per multi-row `INSERT` (SQLite allows 32,766 parameters per statement).
    const CHUNK: usize = 500;

    /// The figures of one list.
    #[derive(Debug, Clone, Serialize)]
    struct ListFigures {
        /// Path and query of the call (ids replaced by their role).
        list: String,
        first_p50_ms: f64,
        first_p99_ms: f64,
        deep_p50_ms: f64,
        deep_p99_ms: f64,
        /// Items on the first page and on the deep page (the page size is 50).
        first_items: usize,
        deep_items: usize,
    }

    /// The `--json` object of `--scenario lists`.
    #[derive(Debug, Clone, Serialize)]
    struct ListsReport {
        scenario: &'static str,
        backend: String,
        /// Rows in each of signals, deliveries and activity_logs.
        rows: u64,
        /// The deep page's cursor: the id this many rows below the newest of its table.
        deep_offset: u64,
        /// Measured calls per list and page.
        calls: u64,
        fill_secs: f64,
        lists: Vec<ListFigures>,
    }

    impl ListsReport {
        fn human(&self) -> String {
            let mut out = format!(
                "lists on {}: {} rows per table, deep cursor {} rows down, {} calls per page (filled in {:.1}s)\n",
                self.backend, self.rows, self.deep_offset, self.calls, self.fill_secs
            );
            out.push_str(&format!(
                "  {:<58} {:>9} {:>9} {:>9} {:>9}\n",
                "list", "first p50", "first p99", "deep p50", "deep p99"
            ));
            for l in &self.lists {
                out.push_str(&format!(
                    "  {:<58} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
                    l.list, l.first_p50_ms, l.first_p99_ms, l.deep_p50_ms, l.deep_p99_ms
                ));
            }
            out
        }
    }

    /// Ids the filled rows point at.
    struct Ids {
        ws: String,
        other_ws: String,
        slack: String,
        pylon: String,
        other_int: String,
    }

    pub(super) async fn run(args: &BenchArgs, json_out: bool) -> anyhow::Result<()> {
        if args.url.is_some() {
            bail!("--scenario lists starts its own server (it writes rows directly): drop --url");
        }
        if args.list_rows < 1_000 {
            bail!("--list-rows must be at least 1000");
        }
        let server = Server::start(args, "lists").await?;
        let result = measure(args, &server).await;
        server.stop(args.keep).await;
        let report = result?;
        if json_out {
            println!("{}", serde_json::to_string(&report)?);
            eprintln!("{}", report.human());
        } else {
            println!("{}", report.human());
        }
        Ok(())
    }

    async fn measure(args: &BenchArgs, server: &Server) -> anyhow::Result<ListsReport> {
        let t = &server.target;
        let http = admin_client()?;
        let run_id = short_id();
        let ws = admin_post(
            &http,
            t,
            "/api/v1/workspaces",
            json!({"name": format!("bench lists {run_id}")}),
        )
        .await?;
        let other = admin_post(
            &http,
            t,
            "/api/v1/workspaces",
            json!({"name": format!("bench lists other {run_id}")}),
        )
        .await?;
        let ws = str_field(&ws, "id")?;
        let slack = admin_post(
            &http,
            t,
            &format!("/api/v1/workspaces/{ws}/integrations"),
            json!({"platform": "slack", "name": "bench slack", "slack_team_id": format!("T{run_id}"),
                   "signing_secret": random_secret()}),
        )
        .await?;
        let ids = Ids {
            ws,
            other_ws: str_field(&other, "id")?,
            slack: str_field(&slack, "id")?,
            pylon: crate::ids::new_id("int"),
            other_int: crate::ids::new_id("int"),
        };

        let n = args.list_rows;
        progress(&format!(
            "lists: writing {n} signals, deliveries and activity entries"
        ));
        let started = Instant::now();
        let mut raw = RawConfig::defaults();
        raw.set("database_url", &server.database_url)
            .set("db_max_connections", "2");
        let store = Store::connect_without_migrating(&raw.build()?)
            .await
            .context("connecting to the benchmark database")?;
        let cursors = fill(&store, &ids, n).await;
        store.close().await;
        let cursors = cursors?;
        let fill_secs = round(started.elapsed().as_secs_f64(), 1);

        let calls = args.requests.unwrap_or(100);
        let deep_offset = (n / 2).min(50_000);
        let (ws, slack) = (&ids.ws, &ids.slack);
        let signals = format!("/api/v1/workspaces/{ws}/signals?limit=50");
        let deliveries = "/api/v1/deliveries?limit=50".to_string();
        let lists: Vec<(String, String, &str)> = vec![
            ("signals".into(), signals.clone(), &cursors.signal),
            (
                "signals?source=slack".into(),
                format!("{signals}&source=slack"),
                &cursors.signal,
            ),
            (
                "signals?status=deleted".into(),
                format!("{signals}&status=deleted"),
                &cursors.signal,
            ),
            (
                "signals?source=slack&status=deleted".into(),
                format!("{signals}&source=slack&status=deleted"),
                &cursors.signal,
            ),
            ("deliveries".into(), deliveries.clone(), &cursors.delivery),
            (
                "deliveries?status=dead".into(),
                format!("{deliveries}&status=dead"),
                &cursors.delivery,
            ),
            (
                "deliveries?workspace_id=W".into(),
                format!("{deliveries}&workspace_id={ws}"),
                &cursors.delivery,
            ),
            (
                "deliveries?workspace_id=W&status=dead".into(),
                format!("{deliveries}&workspace_id={ws}&status=dead"),
                &cursors.delivery,
            ),
            (
                "deliveries?integration_id=I".into(),
                format!("{deliveries}&integration_id={slack}"),
                &cursors.delivery,
            ),
            (
                "deliveries?integration_id=I&status=dead".into(),
                format!("{deliveries}&integration_id={slack}&status=dead"),
                &cursors.delivery,
            ),
            (
                "deliveries?status=failed (none)".into(),
                format!("{deliveries}&status=failed"),
                &cursors.delivery,
            ),
            (
                "deliveries?source=pylon".into(),
                format!("{deliveries}&source=pylon"),
                &cursors.delivery,
            ),
            (
                "activity".into(),
                format!("/api/v1/workspaces/{ws}/activity?limit=50"),
                &cursors.activity,
            ),
        ];
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(1)
            .build()?;
        let mut figures = Vec::new();
        for (name, path, cursor) in &lists {
            progress(&format!("lists: {name}"));
            let deep = format!("{path}&cursor={cursor}");
            let (first_hist, first_items) = time_calls(&client, t, path, None, calls).await?;
            let (deep_hist, deep_items) =
                time_calls(&client, t, &deep, Some(cursor), calls).await?;
            figures.push(ListFigures {
                list: name.clone(),
                first_p50_ms: pct_ms(&first_hist, 50.0),
                first_p99_ms: pct_ms(&first_hist, 99.0),
                deep_p50_ms: pct_ms(&deep_hist, 50.0),
                deep_p99_ms: pct_ms(&deep_hist, 99.0),
                first_items,
                deep_items,
            });
        }
        Ok(ListsReport {
            scenario: "lists",
            backend: server.backend.to_string(),
            rows: n,
            deep_offset,
            calls,
            fill_secs,
            lists: figures,
        })
    }

    /// Times `calls` sequential GETs of `path` (after 3 unmeasured ones); checks that the page
    /// is in id-descending order and below `cursor`. Returns the latencies (µs) and the items
    /// on the page.
    async fn time_calls(
        client: &reqwest::Client,
        t: &Target,
        path: &str,
        cursor: Option<&str>,
        calls: u64,
    ) -> anyhow::Result<(Histogram<u64>, usize)> {
        let mut hist = new_hist();
        let mut items = 0;
        for k in 0..calls + 3 {
            let start = Instant::now();
            let resp = client
                .get(format!("{}{path}", t.base))
                .bearer_auth(&t.admin_token)
                .send()
                .await
                .with_context(|| format!("GET {path}"))?;
            let status = resp.status();
            let body = resp.bytes().await?;
            let us = start.elapsed().as_micros() as u64;
            if !status.is_success() {
                bail!(
                    "GET {path} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if k >= 3 {
                hist.saturating_record(us.clamp(1, HIST_MAX_US));
            }
            if k == 0 {
                let v: Value = serde_json::from_slice(&body)?;
                let ids: Vec<&str> = v["items"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|i| i["id"].as_str()).collect())
                    .unwrap_or_default();
                if ids.windows(2).any(|w| w[0] <= w[1]) {
                    bail!("GET {path}: items not in id-descending order");
                }
                if let (Some(c), Some(first)) = (cursor, ids.first())
                    && *first >= c
                {
                    bail!("GET {path}: an item at or above the cursor");
                }
                items = ids.len();
            }
        }
        Ok((hist, items))
    }

    /// The deep pages' cursors: the id `min(n/2, 50k)` rows below the newest of each table.
    struct Cursors {
        signal: String,
        delivery: String,
        activity: String,
    }

    /// Writes `n` rows in each table (ids in creation order, so id order is row order) and, on
    /// PostgreSQL, runs `ANALYZE` as autovacuum would after such a load. SQLite is left without
    /// statistics, as a production database is (signalbox does not run `ANALYZE` there).
    ///
    /// The distribution (row `i`, `m = i % 1000`): the filters match little, as the lists
    /// people look at (dead deliveries, one integration, deleted signals) do.
    /// - signals: two thirds in the bench workspace W; `source` slack when `i % 500 == 0`
    ///   (0.2 %), else pylon or webhook; `status` deleted when `m` is 0 (slack) or 510
    ///   (0.2 %).
    /// - deliveries: W's Slack integration I when `i % 50 == 0` (2 %), W's Pylon integration
    ///   when `m == 25` (source pylon, 0.1 %), else another workspace; `status` dead when `m`
    ///   is 0 (I) or 370 (0.2 %), filtered when `i % 10 == 3`, else processed; none failed.
    /// - activity: two thirds in W.
    async fn fill(store: &Store, ids: &Ids, n: u64) -> anyhow::Result<Cursors> {
        let now = crate::clock::now_micros();
        let deep = (n / 2).min(50_000);
        let nth = |v: &[String]| v[(n - 1 - deep) as usize].clone();

        let signal_ids: Vec<String> = (0..n).map(|_| crate::ids::new_id("sig")).collect();
        let delivery_ids: Vec<String> = (0..n).map(|_| crate::ids::new_id("dlv")).collect();
        let activity_ids: Vec<String> = (0..n).map(|_| crate::ids::new_id("act")).collect();
        let ws_of = |i: u64| {
            if i % 3 == 2 {
                ids.other_ws.as_str()
            } else {
                ids.ws.as_str()
            }
        };
        let signals: Vec<(usize, &str, &str, &str)> = (0..n)
            .map(|i| {
                let source = if i % 500 == 0 {
                    "slack"
                } else if i % 2 == 0 {
                    "pylon"
                } else {
                    "webhook"
                };
                let status = if i % 1000 == 0 || i % 1000 == 510 {
                    "deleted"
                } else {
                    "new"
                };
                (i as usize, ws_of(i), source, status)
            })
            .collect();
        let deliveries: Vec<(usize, &str, &str, &str, &str)> = (0..n)
            .map(|i| {
                let m = i % 1000;
                let (ws, int, source) = if i % 50 == 0 {
                    (ids.ws.as_str(), ids.slack.as_str(), "slack")
                } else if m == 25 {
                    (ids.ws.as_str(), ids.pylon.as_str(), "pylon")
                } else {
                    (ids.other_ws.as_str(), ids.other_int.as_str(), "webhook")
                };
                let status = if m == 0 || m == 370 {
                    "dead"
                } else if i % 10 == 3 {
                    "filtered"
                } else {
                    "processed"
                };
                (i as usize, ws, int, source, status)
            })
            .collect();

        let activity: Vec<u64> = (0..n).collect();

        macro_rules! fill_on {
            ($p:expr, $db:ty) => {{
                let mut tx = $p.begin().await?;
                for chunk in signals.chunks(CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, \
                         source_metadata, status, created_at, updated_at) ",
                    );
                    q.push_values(chunk, |mut b, (i, ws, source, status)| {
                        b.push_bind(&signal_ids[*i])
                            .push_bind(*ws)
                            .push_bind(format!("bench signal {i}"))
                            .push_bind(*source)
                            .push_bind(format!("{source}-bench-{i}"))
                            .push_bind("{}")
                            .push_bind(*status)
                            .push_bind(now)
                            .push_bind(now);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                for chunk in deliveries.chunks(CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO deliveries (id, workspace_id, integration_id, source, \
                         dedupe_scope, dedupe_key, body, status, attempts, next_attempt_at, \
                         last_error, received_at, processed_at) ",
                    );
                    q.push_values(chunk, |mut b, (i, ws, int, source, status)| {
                        b.push_bind(&delivery_ids[*i])
                            .push_bind(*ws)
                            .push_bind(*int)
                            .push_bind(*source)
                            .push_bind(format!("bench:{int}"))
                            .push_bind(format!("k{i}"))
                            .push_bind(b"{}".as_slice())
                            .push_bind(*status)
                            .push_bind(if *status == "dead" { 5i64 } else { 1 })
                            .push_bind(now)
                            .push_bind((*status == "dead").then_some("bench: gave up"))
                            .push_bind(now)
                            .push_bind(now);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                for chunk in activity.chunks(CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, \
                         target_id, metadata, created_at) ",
                    );
                    q.push_values(chunk, |mut b, i| {
                        b.push_bind(&activity_ids[*i as usize])
                            .push_bind(ws_of(*i))
                            .push_bind(None::<&str>)
                            .push_bind("signal.created")
                            .push_bind("signal")
                            .push_bind("sig_bench")
                            .push_bind("{}")
                            .push_bind(now);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }};
        }
        match store.pool() {
            Pool::Sqlite(p) => fill_on!(p, sqlx::Sqlite),
            Pool::Postgres(p) => {
                fill_on!(p, sqlx::Postgres);
                sqlx::query("ANALYZE signals, deliveries, activity_logs")
                    .execute(p)
                    .await?;
            }
        }
        Ok(Cursors {
            signal: nth(&signal_ids),
            delivery: nth(&delivery_ids),
            activity: nth(&activity_ids),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio rt) worker)) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 567 0 0 20 0 6 0 100 0 0";
        assert_eq!(stat_ticks(stat), Some(1234 + 567));
        assert_eq!(stat_ticks("4242 (x) S 1 2"), None, "too few fields");
        assert_eq!(stat_ticks("no parenthesis"), None);
        let me = cpu_ticks(std::process::id()).expect("this process's own stat");
        assert_eq!(
            me.writer, None,
            "no thread of this test is named sqlite-writer"
        );
    }

    #[test]
    fn payloads_have_realistic_sizes_and_parse() {
        let (id, slack_body) =
            payloads::slack_event("T0BENCH", "RUN", 7, 1_700_000_000, 1_700_000_000);
        assert!(id.starts_with("EvRUN"));
        assert!(
            (1300..1800).contains(&slack_body.len()),
            "{}",
            slack_body.len()
        );
        let env = slack::parse_envelope(&slack_body).expect("valid JSON");
        assert_eq!(env.kind, "event_callback");
        assert_eq!(env.event_id.as_deref(), Some(id.as_str()));
        assert!(matches!(
            slack::normalize(&env, &slack::SlackSettings::default(), &slack::NoNames),
            crate::protocol::Effect::Upsert { .. }
        ));

        let pylon_body = payloads::pylon_issue("RUN", 7);
        assert!(
            (3000..4500).contains(&pylon_body.len()),
            "{}",
            pylon_body.len()
        );
        let raw: Value = serde_json::from_slice(&pylon_body).expect("valid JSON");
        let parsed = pylon::parse(&raw).expect("an issue");
        assert_eq!(parsed.issue.id, "iss_RUN_7");
        assert!(matches!(
            pylon::normalize(&parsed, &raw, &pylon::PylonSettings::default()),
            crate::protocol::Effect::Upsert { .. }
        ));

        let w: Value = serde_json::from_slice(&payloads::webhook_payload("RUN", 7)).expect("JSON");
        assert!(
            w["verbatim"]
                .as_str()
                .is_some_and(|s| s.contains("Feedback 7"))
        );
    }

    #[test]
    fn slack_ts_and_ids_are_unique() {
        let a = payloads::slack_event("T", "R", 999_999, 0, 100).1;
        let b = payloads::slack_event("T", "R", 1_000_000, 0, 100).1;
        let ts = |b: &[u8]| {
            let v: Value = serde_json::from_slice(b).expect("JSON");
            v["event"]["ts"].as_str().map(str::to_string)
        };
        assert_eq!(ts(&a).as_deref(), Some("100.999999"));
        assert_eq!(ts(&b).as_deref(), Some("101.000000"));
    }

    #[test]
    fn pg_database_is_replaced() {
        assert_eq!(
            replace_pg_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_pg_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            replace_pg_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }

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
