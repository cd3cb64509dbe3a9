//! A Slack Web API that never answers (a blackhole: connections accepted, nothing sent back) or
//! answers 5xx must not hold signals back: enrichment is bounded per batch, the API is skipped
//! while it is down, and it is used again once it answers.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    a_blackholed_slack_api_delays_no_signal_and_is_used_again_once_it_answers,
    slack_5xx_backs_off_instead_of_calling_for_every_event,
    a_slow_slack_api_holds_a_batch_once_not_once_per_delivery,
);

const SECRET: &str = "blackhole-signing-secret";
const TEAM: &str = "T0BLACK";
const CHANNEL: &str = "C0FEED";
/// Events sent while the API is blackholed.
const EVENTS: usize = 400;
/// Every one of them must be a signal within this (the bug took minutes: one delivery per
/// worker per 3 s deadline, ~10 minutes for 400 with the tests' two workers).
const BOUND: Duration = Duration::from_secs(30);

/// A TCP front for the fake Slack: while `target` is `None` it accepts connections and never
/// answers (keeping them open); with a target it forwards each new connection there.
struct Front {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    async fn start() -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (t, a) = (target.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::new();
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::Relaxed);
                let to = *t.lock().unwrap();
                match to {
                    None => held.push(sock),
                    Some(to) => {
                        tokio::spawn(async move {
                            if let Ok(mut up) = TcpStream::connect(to).await {
                                let _ = tokio::io::copy_bidirectional(&mut sock, &mut up).await;
                            }
                        });
                    }
                }
            }
        });
        Front {
            addr,
            target,
            accepted,
            task,
        }
    }

    fn forward_to(&self, mock: &MockServer) {
        *self.target.lock().unwrap() = Some(*mock.address());
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn mount_names(slack: &MockServer) {
    mount_slack_names(
        slack,
        None,
        "https://blackhole.slack.com/archives/C0FEED/p1",
    )
    .await;
}

fn event(i: usize, prefix: &str) -> (Value, String) {
    let ts = format!("1700000000.{i:06}");
    let body = message(
        TEAM,
        CHANNEL,
        "U0JANE",
        &format!("message {i} for <@U0JANE>"),
        &ts,
        &format!("{prefix}{i:06}"),
        json!({}),
    );
    (body, format!("slack-{CHANNEL}-{ts}"))
}

/// The newest signals' metadata by source_ref.
async fn newest_signal(app: &TestApp, ws: &str, source_ref: &str) -> Option<Value> {
    let (_, v) = app
        .api(
            "GET",
            &format!("/api/v1/workspaces/{ws}/signals?limit=20"),
            None,
        )
        .await;
    v["items"]
        .as_array()?
        .iter()
        .find(|s| s["source_ref"] == source_ref)
        .cloned()
}

async fn app_with_slack_at(b: Backend, base: String) -> (TestApp, String, String) {
    let app = spawn_app_with(b, move |c| {
        c.set("slack_api_base", &base);
    })
    .await;
    let ws = app.workspace("Acme").await;
    let integ = slack_integration(
        &app,
        &ws,
        TEAM,
        json!({"signing_secret": SECRET, "bot_token": "xoxb-blackhole-bot"}),
    )
    .await;
    let url = url_for(&integ);
    (app, ws, url)
}

async fn a_blackholed_slack_api_delays_no_signal_and_is_used_again_once_it_answers(b: Backend) {
    let front = Front::start().await;
    let (app, ws, url) = app_with_slack_at(b, format!("http://{}", front.addr)).await;
    let started = Instant::now();
    futures::stream::iter(0..EVENTS)
        .map(|i| {
            let (app, url) = (&app, &url);
            async move { send_ok(app, url, SECRET, &event(i, "EvBH").0).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    let sent = started.elapsed();
    loop {
        let n = app.count("SELECT COUNT(*) FROM signals").await;
        if n as usize >= EVENTS {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "only {n} of {EVENTS} signals after {:?} (sent in {sent:?})",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    eprintln!(
        "{b:?}: {EVENTS} events sent in {sent:?}, all signals after {took:?}; {} connections to the blackhole",
        front.accepted.load(Ordering::Relaxed)
    );
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), EVENTS);
    for s in &signals {
        let e = &s["source_metadata"]["enrichment"];
        assert_eq!(e["status"], "partial", "{s}");
        let errors = e["errors"].to_string();
        assert!(
            errors.contains("unavailable") || errors.contains("timed out"),
            "the reason is recorded: {e}"
        );
        assert!(s["source_metadata"].get("user_name").is_none(), "{s}");
    }
    // Far fewer connections than lookups: the API was skipped while down.
    let connections = front.accepted.load(Ordering::Relaxed);
    assert!(
        connections < EVENTS,
        "{connections} connections for {EVENTS} events: the down API was not skipped"
    );

    // The API answers again: after its down period a probe gets through and later messages are
    // enriched again.
    let slack = MockServer::start().await;
    mount_names(&slack).await;
    front.forward_to(&slack);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut i = EVENTS;
    loop {
        let (body, source_ref) = event(i, "EvUP");
        send_ok(&app, &url, SECRET, &body).await;
        app.drain().await;
        let s = newest_signal(&app, &ws, &source_ref).await.unwrap();
        let m = &s["source_metadata"];
        if m["enrichment"]["status"] == "ok" {
            assert_eq!(s["verbatim"], format!("message {i} for @Jane Doe"), "{s}");
            assert_eq!(m["user_name"], "Jane Doe");
            assert_eq!(m["channel_name"], "feedback");
            assert_eq!(
                m["permalink"],
                "https://blackhole.slack.com/archives/C0FEED/p1"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "enrichment did not come back after the API recovered: {m}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        i += 1;
    }
    app.stop().await;
}

async fn slack_5xx_backs_off_instead_of_calling_for_every_event(b: Backend) {
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/users.info"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/conversations.info"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": true, "channel": {"id": CHANNEL, "name": "feedback"}})),
        )
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/chat.getPermalink"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&slack)
        .await;
    let (app, ws, url) = app_with_slack_at(b, slack.uri()).await;
    const N: usize = 30;
    for i in 0..N {
        send_ok(&app, &url, SECRET, &event(i, "Ev5X").0).await;
        app.drain().await;
    }
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), N);
    for s in &signals {
        let m = &s["source_metadata"];
        assert_eq!(m["enrichment"]["status"], "partial", "{m}");
        let errors = m["enrichment"]["errors"].to_string();
        assert!(errors.contains("users.info"), "{m}");
        assert!(errors.contains("chat.getPermalink"), "{m}");
        assert_eq!(m["channel_name"], "feedback", "other methods keep working");
    }
    let calls = |p: &'static str| {
        let slack = &slack;
        async move {
            slack
                .received_requests()
                .await
                .unwrap()
                .iter()
                .filter(|r| r.url.path() == p)
                .count()
        }
    };
    // Without back-off every event calls each failing method (30 calls each); with it, the
    // first 503 marks the method down and only spaced probes follow.
    let users = calls("/users.info").await;
    let permalinks = calls("/chat.getPermalink").await;
    assert!(
        (1..=N / 3).contains(&users),
        "users.info called {users} times"
    );
    assert!(
        (1..=N / 3).contains(&permalinks),
        "chat.getPermalink called {permalinks} times"
    );
    app.stop().await;
}

/// A Slack that answers, but slowly (every permalink after 1.5 s, nothing marked down): the
/// deliveries waiting for a worker are enriched together, so 400 of them take a few rounds of
/// 1.5 s, not 400 (the tests' two workers took one inbox hand-off, often one delivery, at a
/// time: ~5 minutes).
async fn a_slow_slack_api_holds_a_batch_once_not_once_per_delivery(b: Backend) {
    let slack = MockServer::start().await;
    mount_names(&slack).await;
    Mock::given(method("POST"))
        .and(path("/chat.getPermalink"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": true, "permalink": "https://slow.slack.com/p1"}))
                .set_delay(Duration::from_millis(1500)),
        )
        .with_priority(1)
        .mount(&slack)
        .await;
    let (app, ws, url) = app_with_slack_at(b, slack.uri()).await;
    let started = Instant::now();
    futures::stream::iter(0..EVENTS)
        .map(|i| {
            let (app, url) = (&app, &url);
            async move { send_ok(app, url, SECRET, &event(i, "EvSL").0).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    loop {
        let n = app.count("SELECT COUNT(*) FROM signals").await;
        if n as usize >= EVENTS {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "only {n} of {EVENTS} signals after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{b:?}: {EVENTS} events with a 1.5 s Slack: all signals after {:?}",
        started.elapsed()
    );
    app.drain().await;
    let signals = app.signals(&ws).await;
    assert_eq!(signals.len(), EVENTS);
    for s in &signals {
        let m = &s["source_metadata"];
        assert_eq!(m["enrichment"]["status"], "ok", "{m}");
        assert_eq!(m["permalink"], "https://slow.slack.com/p1", "{m}");
    }
    app.stop().await;
}
