//! Micro-benchmarks of the pure protocol code on the hot paths: signature verification per
//! source (done by the HTTP handler before the ack) and payload parsing/normalisation per source
//! (done by the worker). The payloads are the load benchmark's (`signalbox_bench::payloads`).
//!
//! `cargo bench -p signalbox-bench --bench protocol` (add `-- slack` to run only matching
//! benchmarks).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::Value;
use signalbox::protocol::html::html_to_text;
use signalbox::protocol::pylon::{self, PylonSettings, Scheme, SignatureHeaders};
use signalbox::protocol::slack::{self, NoNames, SlackSettings};
use signalbox::protocol::standard_webhooks::{self, Headers};
use signalbox_bench::payloads;

const NOW: i64 = 1_764_000_000;

fn verification(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify");

    let key = standard_webhooks::decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .expect("a valid secret");
    let body = payloads::webhook_payload("RUN", 1);
    let sig = standard_webhooks::sign(&key, "msg_1", NOW, &body);
    let ts = NOW.to_string();
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("standard_webhooks", |b| {
        b.iter(|| {
            let h = Headers {
                id: Some("msg_1"),
                timestamp: Some(&ts),
                signature: Some(&sig),
            };
            standard_webhooks::verify(&[&key], black_box(&h), black_box(&body), NOW, 300)
        })
    });

    let secret = b"8f742231b10e8888abcd99yyyzzz85a5";
    let (_, body) = payloads::slack_event("T0BENCH", "RUN", 1, NOW, NOW);
    let sig = slack::sign(secret, NOW, &body);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("slack", |b| {
        b.iter(|| {
            slack::verify(
                &[secret],
                Some(&ts),
                Some(black_box(&sig)),
                black_box(&body),
                NOW,
                300,
            )
        })
    });

    let body = payloads::pylon_issue("RUN", 1);
    let sig = pylon::sign_x_pylon(secret, &body);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("pylon", |b| {
        b.iter(|| {
            let h = SignatureHeaders {
                x_pylon_signature: Some(&sig),
                ..Default::default()
            };
            pylon::verify(
                Scheme::Auto,
                &[secret],
                black_box(&h),
                black_box(&body),
                NOW,
                300,
            )
        })
    });
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_normalize");

    let (_, body) = payloads::slack_event("T0BENCH", "RUN", 1, NOW, NOW);
    let settings = SlackSettings::default();
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("slack", |b| {
        b.iter(|| {
            let env = slack::parse_envelope(black_box(&body)).expect("valid envelope");
            slack::normalize(&env, &settings, &NoNames)
        })
    });

    let body = payloads::pylon_issue("RUN", 1);
    let settings = PylonSettings::default();
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("pylon", |b| {
        b.iter(|| {
            let raw: Value = serde_json::from_slice(black_box(&body)).expect("JSON");
            let parsed = pylon::parse(&raw).expect("an issue");
            pylon::normalize(&parsed, &raw, &settings)
        })
    });

    let html = payloads::ticket_html();
    g.throughput(Throughput::Bytes(html.len() as u64));
    g.bench_function("html_to_text_3k", |b| {
        b.iter(|| html_to_text(black_box(html)))
    });
    g.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = quick();
    targets = verification, parsing
}
criterion_main!(benches);
