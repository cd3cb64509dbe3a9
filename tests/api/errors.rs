//! Every refusal is the contract's JSON envelope with a stable code and a message naming the
//! fact that helps: bad query parameters, unknown routes and methods, ids that are not there,
//! PATCH values the server cannot apply.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    bad_query_parameters_are_json_400s,
    unknown_routes_and_methods_are_json,
    not_found_names_the_id,
    patch_refuses_null_for_what_cannot_be_cleared,
);

fn assert_envelope(st: StatusCode, v: &Value, want: StatusCode, code: &str, needle: &str) {
    assert_eq!(st, want, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "message should name {needle:?}: {v}");
}

async fn bad_query_parameters_are_json_400s(b: Backend) {
    let Some(app) = spawn_app(b).await else {
        return;
    };
    let ws = app.workspace("Acme").await;
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
    let Some(app) = spawn_app(b).await else {
        return;
    };
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
    let Some(app) = spawn_app(b).await else {
        return;
    };
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
    let Some(app) = spawn_app(b).await else {
        return;
    };
    let ws = app.workspace("Acme").await;
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
