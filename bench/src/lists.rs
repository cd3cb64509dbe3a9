//! `--scenario lists`: a fresh server and database, `--list-rows` rows in each of signals,
//! deliveries and activity_logs written directly (batched inserts, not through the pipeline),
//! then sequential calls of the API's filtered lists, first page and a deep page (the cursor
//! ~50k rows below the newest), over one keep-alive connection.

use std::time::Instant;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use signalbox::clock::now_micros;
use signalbox::config::RawConfig;
use signalbox::ids::new_id;
use signalbox::store::Store;
use signalbox::store::inspect::{SeedActivity, SeedDelivery, SeedSignal};

use crate::args::BenchArgs;
use crate::load::REQUEST_TIMEOUT;
use crate::provision::{admin_client, admin_post, str_field};
use crate::report::{HIST_MAX_US, new_hist, pct_ms, round};
use crate::server::{Server, Target};
use crate::{progress, random_secret, short_id};

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

/// Runs `--scenario lists`: one server, one fill, the timed calls, one report.
pub(crate) async fn run(args: &BenchArgs, json_out: bool) -> anyhow::Result<()> {
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
        pylon: new_id("int"),
        other_int: new_id("int"),
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
        let (deep_hist, deep_items) = time_calls(&client, t, &deep, Some(cursor), calls).await?;
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

/// Writes `n` rows in each table with `Store::seed_rows` (ids in creation order, so id order is
/// row order), which on PostgreSQL runs `ANALYZE` as autovacuum would after such a load. SQLite
/// is left without statistics, as a production database is (signalbox does not run `ANALYZE`
/// there).
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
    let now = now_micros();
    let deep = (n / 2).min(50_000);
    let nth = |v: &[String]| v[(n - 1 - deep) as usize].clone();

    let signal_ids: Vec<String> = (0..n).map(|_| new_id("sig")).collect();
    let delivery_ids: Vec<String> = (0..n).map(|_| new_id("dlv")).collect();
    let activity_ids: Vec<String> = (0..n).map(|_| new_id("act")).collect();
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

    let signals: Vec<SeedSignal> = signals
        .iter()
        .map(|&(i, ws, source, status)| SeedSignal {
            id: &signal_ids[i],
            workspace_id: ws,
            verbatim: format!("bench signal {i}"),
            source,
            source_ref: format!("{source}-bench-{i}"),
            status,
            created_at: now,
        })
        .collect();
    let deliveries: Vec<SeedDelivery> = deliveries
        .iter()
        .map(|&(i, ws, int, source, status)| SeedDelivery {
            id: &delivery_ids[i],
            workspace_id: ws,
            integration_id: int,
            source,
            dedupe_scope: format!("bench:{int}"),
            dedupe_key: format!("k{i}"),
            status,
            attempts: if status == "dead" { 5 } else { 1 },
            last_error: (status == "dead").then_some("bench: gave up"),
            at: now,
        })
        .collect();
    let activity: Vec<SeedActivity> = (0..n)
        .map(|i| SeedActivity {
            id: &activity_ids[i as usize],
            workspace_id: ws_of(i),
            action: "signal.created",
            target_type: "signal",
            target_id: "sig_bench",
            created_at: now,
        })
        .collect();
    store.seed_rows(&signals, &deliveries, &activity).await?;
    Ok(Cursors {
        signal: nth(&signal_ids),
        delivery: nth(&delivery_ids),
        activity: nth(&activity_ids),
    })
}
