//! Standard Webhooks secrets and effect merging on arbitrary input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use signalbox::protocol::effect::{Merge, NewSignal, mark_deleted, merge_into};
use signalbox::protocol::standard_webhooks;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = standard_webhooks::decode_secret(&s);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let n = NewSignal { source_ref: "r".into(), verbatim: s.to_string(), metadata: v.clone() };
        for m in [Merge::Keep, Merge::Edit, Merge::PatchMetadata] {
            let _ = merge_into("old", &v, &n, m, "t");
        }
        let _ = mark_deleted(&v, &v, "t");
    }
});
