//! Provisioning through the admin API: a workspace, a webhook key, a Slack and a Pylon
//! integration per scenario.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use signalbox::protocol::standard_webhooks;

use crate::random_secret;
use crate::server::Target;

/// What the load needs to address and sign requests.
#[derive(Debug, Clone)]
pub(crate) struct Provisioned {
    pub(crate) workspace: String,
    pub(crate) key_path: String,
    pub(crate) key: Vec<u8>,
    pub(crate) slack_path: String,
    pub(crate) slack_secret: Vec<u8>,
    pub(crate) slack_team: String,
    pub(crate) pylon_path: String,
    pub(crate) pylon_secret: Vec<u8>,
}

pub(crate) fn admin_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

pub(crate) async fn admin_post(
    http: &reqwest::Client,
    t: &Target,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let resp = http
        .post(format!("{}{path}", t.base))
        .bearer_auth(&t.admin_token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST {path} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("POST {path}: not JSON"))
}

/// The path and query of a webhook URL printed by the server.
fn path_of(url: &str) -> String {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => url[after + i..].to_string(),
        None => "/".into(),
    }
}

pub(crate) fn str_field(v: &Value, k: &str) -> anyhow::Result<String> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the admin API answered without {k}: {v}"))
}

pub(crate) async fn provision(
    http: &reqwest::Client,
    t: &Target,
    run_id: &str,
) -> anyhow::Result<Provisioned> {
    let ws = admin_post(
        http,
        t,
        "/api/v1/workspaces",
        json!({"name": format!("bench {run_id}")}),
    )
    .await?;
    let workspace = str_field(&ws, "id")?;
    let key = admin_post(
        http,
        t,
        &format!("/api/v1/workspaces/{workspace}/webhook-keys"),
        json!({"name": "bench"}),
    )
    .await?;
    let secret = str_field(&key, "secret")?;
    let key_bytes = standard_webhooks::decode_secret(&secret)
        .ok_or_else(|| anyhow!("the webhook key secret is not a whsec_ secret"))?;
    let slack_team = format!("T{run_id}");
    let slack_secret = random_secret();
    let slack = admin_post(
        http,
        t,
        &format!("/api/v1/workspaces/{workspace}/integrations"),
        json!({"platform": "slack", "name": "bench slack", "slack_team_id": slack_team,
               "signing_secret": slack_secret}),
    )
    .await?;
    let pylon_secret = random_secret();
    let pylon = admin_post(
        http,
        t,
        &format!("/api/v1/workspaces/{workspace}/integrations"),
        json!({"platform": "pylon", "name": "bench pylon", "webhook_secret": pylon_secret}),
    )
    .await?;
    Ok(Provisioned {
        workspace,
        key_path: path_of(&str_field(&key, "webhook_url")?),
        key: key_bytes,
        slack_path: path_of(&str_field(&slack, "webhook_url")?),
        slack_secret: slack_secret.into_bytes(),
        slack_team,
        pylon_path: path_of(&str_field(&pylon, "webhook_url")?),
        pylon_secret: pylon_secret.into_bytes(),
    })
}
