//! Slack mrkdwn rendering on arbitrary text: never panics, output bounded.
#![no_main]
use libfuzzer_sys::fuzz_target;
use signalbox::protocol::slack;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let out = slack::render_text(&s, &slack::NoNames);
    assert!(out.len() <= s.len() * 4 + 16);
});
