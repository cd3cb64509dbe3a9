//! signalbox-bench: the load-and-verify benchmark of signalbox (docs/PERFORMANCE.md).
//!
//! Per scenario it starts a server (the `signalbox` executable, `--server`) as a child process
//! on a fresh database (or targets `--url`), provisions a workspace, a webhook key, a Slack and
//! a Pylon integration through the admin API, measures the bare HTTP ceiling (`GET /healthz`,
//! the baseline), drives correctly signed deliveries over N keep-alive HTTP/1.1 connections
//! (closed loop, or open loop at `--rate` with latency measured from each request's intended
//! send time), waits for the pipeline to drain and then verifies in the database that every
//! acknowledged delivery is stored exactly once and became exactly one signal or a recorded
//! filter.
//!
//! It uses the product only through its public API (and `signalbox::store::inspect` for what
//! it reads and writes in the database directly).
//!
//! - [`args`]: the command line;
//! - `server`: the server under test (child process, fresh database, readiness);
//! - `provision`: the workspace and integrations, through the admin API;
//! - [`payloads`]: realistic request bodies (also the criterion benchmarks');
//! - `load`: the load generator;
//! - `cpu`: CPU accounting from `/proc`;
//! - `verify`: the verification after the pipeline drained;
//! - `report`: the figures, `--json` and human;
//! - `lists`: `--scenario lists`, filtered list pages over large tables.

pub mod args;
mod cpu;
mod lists;
mod load;
pub mod payloads;
mod provision;
mod report;
mod server;
mod verify;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use signalbox::crypto::random_bytes;

pub use args::{BenchArgs, Cli, ScenarioArg};
pub use report::Report;

use args::{Scenario, check_args};
use cpu::CpuWatch;
use load::{Amount, Generator, Plan, drive};
use provision::{admin_client, provision};
use report::{pct_ms, round};
use server::{Server, Target};
use verify::{Probe, verify};

/// Runs the benchmark; fails when any scenario fails verification.
pub async fn run(args: BenchArgs, json_out: bool) -> anyhow::Result<()> {
    signalbox::state::install_crypto_provider();
    check_args(&args)?;
    if args.url.is_none() {
        server::server_binary(&args)?;
    }
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

pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// A short random upper-case id (run ids, Slack team ids).
pub(crate) fn short_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    random_bytes(8)
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

pub(crate) fn random_secret() -> String {
    hex::encode(random_bytes(24))
}
