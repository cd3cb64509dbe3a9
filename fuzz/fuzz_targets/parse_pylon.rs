//! Pylon payload parsing, API enrichment and normalisation on arbitrary JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;
use signalbox::protocol::pylon;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Ok(mut p) = pylon::parse(&v) {
        let _ = pylon::normalize(&p, &v, &pylon::PylonSettings::default());
        p.enrich_from_api(&v);
        let _ = pylon::normalize(&p, &v, &pylon::PylonSettings { events: vec!["issue_new".into()] });
    }
});
