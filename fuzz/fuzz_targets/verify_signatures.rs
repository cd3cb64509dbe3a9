//! Every signature verifier on arbitrary headers and bodies: never panics; never accepts a
//! signature it did not compute.
#![no_main]
use libfuzzer_sys::fuzz_target;
use signalbox::protocol::{pylon, slack, standard_webhooks};

fuzz_target!(|data: &[u8]| {
    // Layout: three header values separated by 0x00, then the body.
    let mut parts = data.splitn(4, |b| *b == 0);
    let a = parts.next().map(String::from_utf8_lossy).unwrap_or_default();
    let b = parts.next().map(String::from_utf8_lossy).unwrap_or_default();
    let c = parts.next().map(String::from_utf8_lossy).unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let key = b"fuzz-secret-key-0123456789";
    let now = 1_700_000_000;
    let h = standard_webhooks::Headers { id: Some(&a), timestamp: Some(&b), signature: Some(&c) };
    if standard_webhooks::verify(&[key], &h, body, now, 300).is_ok() {
        let ts: i64 = b.trim().parse().expect("verified timestamps are numbers");
        assert!(c.contains(&standard_webhooks::sign(key, a.trim(), ts, body)[3..]));
    }
    if slack::verify(&[key], Some(&a), Some(&b), body, now, 300).is_ok() {
        assert_eq!(b.trim().to_ascii_lowercase(), slack::sign(key, a.trim().parse().expect("number"), body));
    }
    let ph = pylon::SignatureHeaders { x_pylon_signature: Some(&a), webhook_signature: Some(&b), webhook_timestamp: Some(&c) };
    let _ = pylon::verify(pylon::Scheme::Auto, &[key], &ph, body, now, 300);
    let ph = pylon::SignatureHeaders { x_pylon_signature: Some(&a), ..Default::default() };
    if pylon::verify(pylon::Scheme::XPylonSignature, &[key], &ph, body, now, 300).is_ok() {
        assert_eq!(a.trim().to_ascii_lowercase(), pylon::sign_x_pylon(key, body));
    }
});
