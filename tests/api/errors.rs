//! Every refusal is the contract's JSON envelope with a stable code and a message naming the
//! fact that helps: bad query parameters, unknown routes and methods, ids that are not there,
//! PATCH values the server cannot apply.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::{both_backends, sqlite_only};

// Query parsing and routing happen before any handler reads the store.
sqlite_only!(
    bad_query_parameters_are_json_400s,
    unknown_routes_and_methods_are_json,
);
both_backends!(
    not_found_names_the_id,
    patch_refuses_null_for_what_cannot_be_cleared,
    create_refuses_what_the_platform_would_ignore,
    optional_bodies_may_be_empty_or_null,
);

fn assert_envelope(st: StatusCode, v: &Value, want: StatusCode, code: &str, needle: &str) {
    assert_eq!(st, want, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "message should name {needle:?}: {v}");
}

async fn bad_query_parameters_are_json_400s(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    for list in [
        format!("/api/v1/workspaces/{ws}/signals"),
        format!("/api/v1/workspaces/{ws}/activity"),
        "/api/v1/deliveries".to_string(),
    ] {
        for (q, needle) in [
            ("limit=", "limit"),
            ("limit=abc", "limit"),
            ("limit=-1", "limit"),
            ("limit=0", "between 1 and 500"),
            ("limit=501", "between 1 and 500"),
        ] {
            let (st, v) = app.api("GET", &format!("{list}?{q}"), None).await;
            assert_envelope(st, &v, StatusCode::BAD_REQUEST, "invalid_request", needle);
        }
        let (st, v) = app.api("GET", &format!("{list}?limit=500"), None).await;
        assert_eq!(st, StatusCode::OK, "{list}: {v}");
    }
    app.stop().await;
}

async fn unknown_routes_and_methods_are_json(b: Backend) {
    let app = spawn_app(b).await;
    let (st, v) = app.api("GET", "/api/v1/nothing-here", None).await;
    assert_envelope(
        st,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "/api/v1/nothing-here",
    );
    let (st, v) = app.api("DELETE", "/api/v1/workspaces", None).await;
    assert_envelope(
        st,
        &v,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "DELETE",
    );
    app.stop().await;
}

async fn not_found_names_the_id(b: Backend) {
    let app = spawn_app(b).await;
    for (path, what) in [
        ("/api/v1/workspaces/ws_nope", "workspace ws_nope"),
        ("/api/v1/integrations/int_nope", "integration int_nope"),
        ("/api/v1/signals/sig_nope", "signal sig_nope"),
        ("/api/v1/deliveries/dlv_nope", "delivery dlv_nope"),
    ] {
        let (st, v) = app.api("GET", path, None).await;
        assert_envelope(st, &v, StatusCode::NOT_FOUND, "not_found", what);
    }
    // Another workspace's id gets the same answer as a missing one.
    let a = app.workspace("A").await;
    let other = app.workspace("B").await;
    let (_, token) = app.token(&a).await;
    let (st, v) = app
        .api_as(&token, "GET", &format!("/api/v1/workspaces/{other}"), None)
        .await;
    assert_envelope(st, &v, StatusCode::NOT_FOUND, "not_found", &other);
    app.stop().await;
}

async fn patch_refuses_null_for_what_cannot_be_cleared(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let int = app
        .integration(
            &ws,
            json!({"platform": "pylon", "name": "Support", "webhook_secret": "s3cr3t-s3cr3t-s3cr3t"}),
        )
        .await;
    let id = int["id"].as_str().unwrap();
    for field in ["name", "config", "is_active", "secrets"] {
        let (st, v) = app
            .api(
                "PATCH",
                &format!("/api/v1/integrations/{id}"),
                Some(json!({ field: null })),
            )
            .await;
        assert_envelope(st, &v, StatusCode::BAD_REQUEST, "invalid_request", field);
    }
    let (_, now) = app
        .api("GET", &format!("/api/v1/integrations/{id}"), None)
        .await;
    assert_eq!(
        now["name"], "Support",
        "a refused PATCH changes nothing: {now}"
    );
    assert_eq!(now["is_active"], true, "{now}");
    app.stop().await;
}

/// Each refusal here used to be accepted with the field silently dropped; the OpenAPI document
/// describes one body shape per platform, and the server holds to it.
async fn create_refuses_what_the_platform_would_ignore(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let path = format!("/api/v1/workspaces/{ws}/integrations");
    let pylon =
        json!({"platform": "pylon", "name": "Support", "webhook_secret": "s3cr3t-s3cr3t-s3cr3t"});
    let with = |k: &str, v: Value| {
        let mut b = pylon.clone();
        b[k] = v;
        b
    };
    for (body, needle) in [
        (
            with("signing_secret", json!("slack-secret-123")),
            "signing_secret is not a pylon field",
        ),
        (
            with("slack_team_id", json!("T0123ABCD")),
            "slack_team_id is not a pylon field",
        ),
        (with("api_token", Value::Null), "api_token cannot be null"),
        (
            with("required_header_value", json!("header-value-123")),
            "required_header_value needs config.required_header",
        ),
        (
            with("config", json!({"signature_scheme": null})),
            "config.signature_scheme cannot be null",
        ),
        (
            json!({"platform": "slack", "name": "S", "slack_team_id": "T0123ABCD",
                   "signing_secret": "slack-secret-123", "webhook_secret": "pylon-secret-123"}),
            "webhook_secret is not a slack field",
        ),
        (
            json!({"platform": "slack", "name": "S", "slack_team_id": " T0123ABCD",
                   "signing_secret": "slack-secret-123"}),
            "slack_team_id must look like",
        ),
    ] {
        let (st, v) = app.api("POST", &path, Some(body.clone())).await;
        assert_envelope(st, &v, StatusCode::BAD_REQUEST, "invalid_request", needle);
    }
    let (_, list) = app.api("GET", &path, None).await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        0,
        "nothing was created: {list}"
    );
    // The documented shapes are accepted.
    let (st, v) = app.api("POST", &path, Some(pylon)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = app
        .api(
            "POST",
            &path,
            Some(json!({"platform": "pylon", "name": "Gated", "webhook_secret": "s3cr3t-s3cr3t-s3cr3t",
                        "required_header_value": "header-value-123",
                        "config": {"required_header": "X-Gate"}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["config"]["required_header"], "x-gate", "{v}");
    assert_eq!(v["has_required_header_value"], true, "{v}");
    app.stop().await;
}

/// Bodies the document marks optional: absent, empty or `null` all mean "none given"; a
/// grace period may be written `30.0` (JSON Schema's integer) but not `1.5`.
async fn optional_bodies_may_be_empty_or_null(b: Backend) {
    let (app, ws) = app_with_workspace(b).await;
    let keys = format!("/api/v1/workspaces/{ws}/webhook-keys");
    let (st, v) = app.api("POST", &keys, None).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = app.api("POST", &keys, Some(Value::Null)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(v["name"].is_null(), "{v}");
    let id = v["id"].as_str().unwrap();
    let rotate = format!("/api/v1/webhook-keys/{id}/rotate");
    let (st, v) = app
        .api("POST", &rotate, Some(json!({"grace_period_secs": 30.0})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["previous_secret_valid_until"].is_string(), "{v}");
    let (st, v) = app
        .api("POST", &rotate, Some(json!({"grace_period_secs": 1.5})))
        .await;
    assert_envelope(
        st,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "whole number",
    );
    let (st, v) = app
        .api("POST", &rotate, Some(json!({"grace_period": 30})))
        .await;
    assert_envelope(
        st,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "grace_period",
    );
    app.stop().await;
}
