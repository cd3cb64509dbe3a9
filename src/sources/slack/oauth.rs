//! Slack OAuth v2 "Add to Slack": the install redirect (with a random, single-use, expiring
//! `state` bound to the workspace) and the redirect endpoint that exchanges the code and creates
//! or updates the workspace's Slack integration with encrypted tokens.

use axum::extract::State;

use crate::http::extract::Query;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admin::Principal;
use crate::clock::now_micros;
use crate::config::Config;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::Auth;
use crate::ids::{new_id, prefix};
use crate::protocol::{sha256_hex, url_encode as enc};
use crate::state::AppState;
use crate::store::Integration;

/// How long an install link stays valid.
pub const STATE_TTL_SECS: i64 = 600;

/// OAuth routes, each with its OpenAPI operation.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(install))
        .routes(routes!(callback))
}

/// The redirect URI registered with Slack.
pub fn redirect_uri(cfg: &Config) -> String {
    format!("{}/api/webhooks/slack/oauth", cfg.public_url)
}

/// Creates a state for `workspace_id` and returns the Slack authorize URL. With `team`, Slack
/// preselects that workspace, and a team another signalbox workspace owns is refused here,
/// before anyone authorises anything.
pub async fn install_url(
    admin: &crate::admin::Admin,
    who: &Principal,
    workspace_id: &str,
    team: Option<&str>,
) -> ApiResult<String> {
    let (store, cfg) = (&admin.store, &*admin.cfg);
    let client_id = cfg
        .slack_client_id
        .as_deref()
        .ok_or_else(|| ApiError::invalid("Slack OAuth is not configured: set SIGNALBOX_SLACK_CLIENT_ID and SIGNALBOX_SLACK_CLIENT_SECRET"))?;
    if !who.can_see(workspace_id) || store.get_workspace(workspace_id).await?.is_none() {
        return Err(ApiError::not_found("workspace", workspace_id));
    }
    if let Some(team) = team {
        if !crate::protocol::slack::is_team_id(team) {
            return Err(ApiError::invalid(
                "team_id must look like T0123ABCD or E0123ABCD",
            ));
        }
        admin
            .check_slack_owner(workspace_id, team, None, "")
            .await?;
    }
    let raw_state = crate::crypto::random_token("", 32);
    store
        .insert_oauth_state(
            &sha256_hex(raw_state.as_bytes()),
            workspace_id,
            who.actor(),
            now_micros() + STATE_TTL_SECS * 1_000_000,
        )
        .await?;
    let mut url = format!(
        "{}?client_id={}&scope={}&redirect_uri={}&state={}",
        cfg.slack_authorize_url,
        enc(client_id),
        enc(&cfg.slack_scopes),
        enc(&redirect_uri(cfg)),
        enc(&raw_state)
    );
    if let Some(team) = team {
        url.push_str("&team=");
        url.push_str(&enc(team));
    }
    Ok(url)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct InstallQuery {
    /// The workspace (`ws_…`) the installation will belong to.
    #[param(required = true, min_length = 1)]
    workspace_id: Option<String>,
    /// Slack team (`T…`) or enterprise (`E…`) to preselect; 409 when another workspace owns it.
    #[param(pattern = "^([TE][A-Z0-9]{1,20})?$")]
    team_id: Option<String>,
}

/// Redirects to Slack's OAuth v2 authorize page with a single-use state (valid 10 minutes).
#[utoipa::path(get, path = "/api/integrations/slack/install", tag = "slack",
    security(("bearer" = [])), params(InstallQuery),
    responses(
        (status = 302, description = "To Slack's authorize URL",
         headers(("Location" = String, description = "Slack's authorize URL"))),
        (status = 400, description = "`workspace_id` missing, or Slack OAuth not configured \
                        (SIGNALBOX_SLACK_CLIENT_ID, SIGNALBOX_SLACK_CLIENT_SECRET)",
         body = crate::admin::views::ErrorBody),
        (status = 409, description = "The team is already connected to another workspace",
         body = crate::admin::views::ErrorBody),
        crate::error::AdminErrors,
    ))]
async fn install(
    State(state): State<AppState>,
    Auth(who): Auth,
    Query(q): Query<InstallQuery>,
) -> ApiResult<Response> {
    let ws = q
        .workspace_id
        .filter(|w| !w.is_empty())
        .ok_or_else(|| ApiError::invalid("workspace_id is required"))?;
    let team = q.team_id.as_deref().filter(|t| !t.is_empty());
    let url = install_url(&state.admin, &who, &ws, team).await?;
    Ok((StatusCode::FOUND, [(header::LOCATION, url)]).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct CallbackQuery {
    /// The authorization code Slack issued.
    code: Option<String>,
    /// The single-use state from the install link.
    state: Option<String>,
    /// Set by Slack when the install was cancelled (`access_denied`) or failed.
    error: Option<String>,
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    (
        status,
        Html(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
             <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\"><h1>{t}</h1><p>{b}</p></body></html>",
            t = esc(title),
            b = esc(body)
        )),
    )
        .into_response()
}

/// Slack's OAuth redirect: exchanges the code, stores the encrypted tokens, and answers a
/// page saying what happened.
#[utoipa::path(get, path = "/api/webhooks/slack/oauth", tag = "slack",
    params(CallbackQuery),
    responses(
        (status = 200, description = "Connected", content_type = "text/html", body = String),
        (status = 400, description = "Cancelled, or a missing, reused or expired state",
         content_type = "text/html", body = String),
        (status = 502, description = "Slack refused the code", content_type = "text/html", body = String),
        (status = 503, description = "Storage unavailable; retry", content_type = "text/html", body = String),
    ))]
async fn callback(State(state): State<AppState>, Query(q): Query<CallbackQuery>) -> Response {
    if let Some(err) = q.error.as_deref() {
        let msg = if err == "access_denied" {
            "The installation was cancelled in Slack, so nothing was connected. You can close this page and start again from signalbox.".to_string()
        } else {
            format!(
                "Slack reported an error ({}), so nothing was connected.",
                err.chars().take(64).collect::<String>()
            )
        };
        return page(StatusCode::BAD_REQUEST, "Slack was not connected", &msg);
    }
    let (Some(code), Some(raw_state)) = (
        q.code.filter(|c| !c.is_empty()),
        q.state.filter(|s| !s.is_empty()),
    ) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Invalid install link",
            "The link is missing its code or state. Start the installation again.",
        );
    };
    let ws = match state
        .store
        .consume_oauth_state(&sha256_hex(raw_state.as_bytes()))
        .await
    {
        Ok(Some(ws)) => ws,
        Ok(None) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Install link expired or already used",
                "This installation link is unknown, expired (links last 10 minutes) or was already used. Start the installation again.",
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "oauth state lookup failed");
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "signalbox cannot reach its database right now.",
            );
        }
    };
    match complete(&state, &ws, &code).await {
        Ok(team) => page(
            StatusCode::OK,
            "Slack connected",
            &format!(
                "signalbox is now connected to the Slack workspace {team}. Invite the app to the channels it should listen to."
            ),
        ),
        Err(msg) => page(StatusCode::BAD_GATEWAY, "Slack was not connected", &msg),
    }
}

/// Before team ownership needed proof, a workspace token could bind any team to the shared app.
/// Such a claim (made by a token, for exactly this team, in another workspace) gives way to the
/// install Slack just confirmed: it is deactivated, with an activity entry in its workspace.
async fn release_unproven_claim(state: &AppState, ws: &str, team_id: &str, except: &str) {
    let Ok(Some(other)) = state
        .store
        .slack_owner_conflict(ws, team_id, None, except)
        .await
    else {
        return;
    };
    let by_token = other
        .created_by
        .as_deref()
        .is_some_and(|c| crate::ids::looks_like(c, prefix::TOKEN));
    if other.workspace_id == ws || !by_token || other.slack_team_id.as_deref() != Some(team_id) {
        return;
    }
    let reason = "Slack's OAuth install of this team into another workspace replaced a claim made \
                  by a workspace token without proof of owning the team";
    match state
        .store
        .deactivate_integration(&other.id, "oauth", reason)
        .await
    {
        Ok(_) => {
            state.creds.changed(&other.id).await;
            tracing::warn!(integration_id = %other.id, team_id = %team_id, "unproven Slack team claim released");
        }
        Err(e) => tracing::error!(error = %e, "releasing an unproven Slack team claim failed"),
    }
}

/// Revokes a token of an installation signalbox refused, so no one holds a credential for it.
async fn give_back(state: &AppState, token: &secrecy::SecretString, team_id: &str) {
    match state.slack.revoke(token).await {
        Ok(()) => {
            tracing::warn!(team_id = %team_id, "Slack install refused: the team belongs to another workspace; token revoked")
        }
        Err(e) => {
            tracing::error!(team_id = %team_id, error = %e, "Slack install refused, and revoking its token failed")
        }
    }
}

/// Exchanges the code and creates or updates the workspace's Slack integration.
async fn complete(state: &AppState, ws: &str, code: &str) -> Result<String, String> {
    let (Some(client_id), Some(secret)) =
        (&state.cfg.slack_client_id, &state.cfg.slack_client_secret)
    else {
        return Err("Slack OAuth is not configured on this server.".into());
    };
    let tokens = state
        .slack
        .exchange_code(client_id, secret, code, &redirect_uri(&state.cfg))
        .await
        .map_err(|e| format!("Slack refused the installation ({e}). Start again."))?;
    let team_id = tokens
        .team_id
        .clone()
        .or_else(|| tokens.enterprise_id.clone())
        .ok_or("Slack's answer named no team.")?;
    let store = &state.store;
    let fail = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "storing the Slack installation failed");
        "signalbox could not store the installation; try again.".to_string()
    };
    let existing = store
        .find_slack_integrations(&team_id)
        .await
        .map_err(fail)?;
    // The installation of the distributed app this workspace already has for the team, if any.
    let mine = existing
        .into_iter()
        .find(|i| i.workspace_id == ws && i.webhook_secret_enc.is_none());
    let except = mine.as_ref().map(|i| i.id.clone()).unwrap_or_default();
    release_unproven_claim(state, ws, &team_id, &except).await;
    let conflict = state
        .admin
        .check_slack_owner(ws, &team_id, tokens.enterprise_id.as_deref(), &except)
        .await;
    if let Err(e) = conflict {
        give_back(state, &tokens.access_token, &team_id).await;
        return Err(match e {
            ApiError::Conflict(msg) => format!("{msg}. Nothing was connected."),
            other => {
                tracing::error!(error = %other, "checking the Slack installation's owner failed");
                "signalbox could not check the installation; try again.".to_string()
            }
        });
    }
    let now = now_micros();
    let mut row = mine.unwrap_or_else(|| Integration {
        id: new_id(prefix::INTEGRATION),
        workspace_id: ws.to_string(),
        platform: "slack".into(),
        name: format!("Slack {}", tokens.team_name.as_deref().unwrap_or(&team_id)),
        config: json!({"slack_channels": []}).to_string(),
        created_at: now,
        updated_at: now,
        created_by: Some("oauth".into()),
        ..Default::default()
    });
    let is_new = row.created_at == now;
    let id = row.id.clone();
    row.access_token_enc = Some(state.creds.encrypt(
        "integrations",
        &id,
        "access_token_enc",
        tokens.access_token.expose_secret(),
    ));
    row.refresh_token_enc = tokens.refresh_token.as_ref().map(|r| {
        state
            .creds
            .encrypt("integrations", &id, "refresh_token_enc", r.expose_secret())
    });
    row.token_expires_at = tokens.expires_in.map(|s| now + s * 1_000_000);
    row.slack_team_id = Some(team_id.clone());
    row.slack_team_name = tokens.team_name.clone().or(row.slack_team_name);
    row.slack_bot_user_id = tokens.bot_user_id.clone().or(row.slack_bot_user_id);
    row.slack_enterprise_id = tokens.enterprise_id.clone();
    row.slack_scopes = tokens.scope.clone();
    row.slack_app_id = tokens.app_id.clone();
    row.is_active = true;
    row.needs_reauth = false;
    let stored = if is_new {
        store.insert_integration(&row).await
    } else {
        store.update_integration(&row).await.map(|_| ())
    };
    if let Err(e) = stored {
        // The unique index: another workspace bound the team meanwhile.
        give_back(state, &tokens.access_token, &team_id).await;
        return Err(match e {
            crate::store::StoreError::Conflict => format!(
                "Slack team {team_id} was connected to another signalbox workspace meanwhile. Nothing was connected."
            ),
            e => fail(e),
        });
    }
    state.creds.changed(&id).await;
    let _ = store
        .log_activity(
            ws,
            Some("oauth"),
            "integration.installed",
            "integration",
            &id,
            &json!({"team_id": team_id, "reinstall": !is_new, "scopes": tokens.scope}),
        )
        .await;
    tracing::info!(integration_id = %id, team_id = %team_id, reinstall = !is_new, "Slack installed");
    Ok(tokens.team_name.unwrap_or(team_id))
}
