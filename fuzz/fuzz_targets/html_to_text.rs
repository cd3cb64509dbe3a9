//! HTML to text on arbitrary input: never panics, output bounded.
#![no_main]
use libfuzzer_sys::fuzz_target;
use signalbox::protocol::html;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let out = html::html_to_text(&s);
    assert!(out.len() <= html::MAX_HTML_BYTES + 4);
});
