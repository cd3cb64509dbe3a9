//! The OpenAPI document against the real router: every documented operation is routed and
//! answers one of its documented statuses, and every operation that declares security refuses
//! a request without a token with a documented 401.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};
use utoipa::openapi::path::{Operation, ParameterIn};

use crate::helpers::*;
use crate::sqlite_only;

// The document and the router come from one list; what they describe does not depend on the
// database.
sqlite_only!(every_documented_operation_is_routed_and_answers_as_documented);

/// One operation of the document.
struct Op {
    method: &'static str,
    path: String,
    op: Operation,
}

impl Op {
    fn secured(&self) -> bool {
        self.op.security.as_ref().is_some_and(|s| !s.is_empty())
    }

    fn documents(&self, status: StatusCode) -> bool {
        self.op.responses.responses.contains_key(status.as_str())
    }

    fn has_body(&self) -> bool {
        self.op.request_body.is_some()
    }

    /// The operation's required query parameters.
    fn required_query(&self) -> Vec<String> {
        self.op
            .parameters
            .iter()
            .flatten()
            .filter(|p| {
                matches!(p.parameter_in, ParameterIn::Query)
                    && matches!(p.required, utoipa::openapi::Required::True)
            })
            .map(|p| p.name.clone())
            .collect()
    }
}

/// Every operation of the document the server is built with.
fn operations() -> Vec<Op> {
    documented_operations()
        .into_iter()
        .map(|(method, path, op)| Op { method, path, op })
        .collect()
}

/// A value for a required query parameter.
fn query_value(f: &Fixture, name: &str) -> String {
    let kind = match name {
        "key_id" => "webhook-keys",
        "integration_id" => "integrations",
        "workspace_id" => "workspaces",
        other => panic!("no value for the required query parameter {other}"),
    };
    f.id(kind).to_string()
}

async fn every_documented_operation_is_routed_and_answers_as_documented(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.set("slack_client_id", "123.456")
            .set("slack_client_secret", "openapi-client-secret")
            .set("public_url", "https://signals.example.test");
    })
    .await;
    let ops = operations();
    assert!(ops.len() >= 36, "only {} operations", ops.len());

    // One of everything an operation can name: real ids, so a documented answer cannot be a
    // 404 for a route the router does not know.
    let ids = Fixture::create(&app).await;

    // No redirects followed: the install operation documents its 302.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let send = |op: &Op, token: Option<&str>| {
        let mut url = format!("{}{}", app.base, ids.fill(&op.path));
        let query: Vec<String> = op
            .required_query()
            .iter()
            .map(|q| format!("{q}={}", query_value(&ids, q)))
            .collect();
        if !query.is_empty() {
            url = format!("{url}?{}", query.join("&"));
        }
        let m = reqwest::Method::from_bytes(op.method.as_bytes()).unwrap();
        let mut req = client.request(m, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if op.has_body() {
            req = req.json(&json!({}));
        }
        async move {
            let resp = req.send().await.unwrap();
            let st = resp.status();
            (st, resp.text().await.unwrap())
        }
    };

    // Deletions last, so every other operation sees the ids alive.
    let (deletes, others): (Vec<&Op>, Vec<&Op>) = ops.iter().partition(|o| o.method == "DELETE");
    for op in others.into_iter().chain(deletes) {
        let what = format!("{} {}", op.method, op.path);
        if op.secured() {
            assert!(
                op.documents(StatusCode::UNAUTHORIZED),
                "{what}: 401 undocumented"
            );
            let (st, text) = send(op, None).await;
            assert_eq!(
                st,
                StatusCode::UNAUTHORIZED,
                "{what} without a token: {text}"
            );
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], "unauthorized", "{what}: {v}");
        }
        let (st, text) = send(op, op.secured().then_some(ADMIN_TOKEN)).await;
        assert!(
            op.documents(st),
            "{what} answered {st}, which it does not document: {text}"
        );
        // Real ids and the admin token: the router knows the route and the method.
        assert!(
            st != StatusCode::NOT_FOUND && st != StatusCode::METHOD_NOT_ALLOWED,
            "{what} is documented but answered {st}: {text}"
        );
    }
    app.stop().await;
}
