//! The command line.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, ValueEnum};

/// signalbox-bench: the load-and-verify benchmark of signalbox (docs/PERFORMANCE.md). Starts
/// a signalbox server per scenario on a fresh database (or targets --url), drives correctly
/// signed deliveries, then verifies that every acknowledged one was stored and processed
/// exactly once.
#[derive(Debug, Parser)]
#[command(name = "signalbox-bench", version, about)]
pub struct Cli {
    /// Print one JSON object per scenario on stdout (the human line goes to stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub bench: BenchArgs,
}

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

/// The benchmark's flags (`signalbox-bench …`).
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
    /// The signalbox executable started as the server under test (`PATH serve`). Default: the
    /// `signalbox` beside this executable (the same `target/<profile>/` directory). Another
    /// build here measures it with the same load generator, so builds can be alternated.
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub server: Option<PathBuf>,
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

    pub(crate) fn source(self, k: u64) -> Source {
        match self {
            Scenario::Slack => Source::Slack,
            Scenario::Pylon => Source::Pylon,
            Scenario::Webhook => Source::Webhook,
            Scenario::Mixed => [Source::Slack, Source::Pylon, Source::Webhook][(k % 3) as usize],
        }
    }
}

/// Where one request of a scenario comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Slack,
    Pylon,
    Webhook,
}

pub(crate) fn check_args(a: &BenchArgs) -> anyhow::Result<()> {
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
