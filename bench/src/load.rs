//! The load generator: requests built and signed per source, sent over N keep-alive HTTP/1.1
//! connections (one task each), closed loop or open loop at `--rate` with latency measured
//! from each request's intended send time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
use hyper_util::rt::TokioIo;
use signalbox::clock::now_secs;
use signalbox::protocol::{pylon, slack, standard_webhooks};

use crate::args::{Scenario, Source};
use crate::payloads;
use crate::provision::Provisioned;
use crate::report::new_hist;
use crate::server::Target;

/// Longest time one request may take before it counts as a `timeout` error.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

enum GenKind {
    Healthz,
    Load(Scenario, Provisioned),
}

pub(crate) struct Generator {
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
    pub(crate) fn healthz(t: &Target) -> Generator {
        Generator {
            kind: GenKind::Healthz,
            host: HeaderValue::from_str(&t.host).unwrap_or(HeaderValue::from_static("localhost")),
            run: String::new(),
            base_secs: now_secs(),
        }
    }

    pub(crate) fn load(t: &Target, sc: Scenario, p: Provisioned, run: String) -> Generator {
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

#[derive(Debug, Clone, Copy)]
pub(crate) enum Amount {
    Duration(Duration),
    Requests(u64),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) connections: usize,
    pub(crate) warmup: Duration,
    pub(crate) amount: Amount,
    pub(crate) rate: Option<f64>,
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
pub(crate) struct Outcome {
    pub(crate) hist: Histogram<u64>,
    pub(crate) acked_measured: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) duplicate_acks: u64,
    pub(crate) acked_keys: Vec<String>,
    pub(crate) sent_keys: Vec<String>,
    measure_start: Instant,
    last_done: Option<Instant>,
}

impl Outcome {
    pub(crate) fn new(measure_start: Instant) -> Outcome {
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
    pub(crate) fn rps(&self) -> f64 {
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

pub(crate) async fn drive(target: &Target, generator: Arc<Generator>, plan: Plan) -> Outcome {
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
