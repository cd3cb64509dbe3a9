//! Slack envelope parsing and normalisation on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use signalbox::protocol::slack;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = slack::parse_envelope(data) {
        let _ = env.routing_ids();
        let _ = env.installing_team("E0ORG");
        let _ = env.dedupe_key(data);
        let settings = slack::SlackSettings {
            team_id: env.routing_ids().first().map(|t| env.installing_team(t)),
            bot_user_id: Some("U0BOT".into()),
            channels: vec!["C1".into()],
            channel_types: vec![],
        };
        let _ = slack::normalize(&env, &settings, &slack::NoNames);
        let _ = slack::normalize(&env, &slack::SlackSettings::default(), &slack::NoNames);
    }
});
