//! The filtered lists (signals, deliveries, activity): exactly the right items, newest first,
//! with cursors that walk every page; and the planner answers each filtered list from an index
//! range scan (the queries name only the filters present; migrations `…list_indexes.sql`).

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use serde_json::Value;
use signalbox::ids::new_id;
use signalbox::store::{
    DeliveryFilter, ListQuery, Pool, SignalFilter, activity_query, deliveries_query, signals_query,
};

use crate::both_backends;
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, exec_sql, spawn_app};

both_backends!(
    filtered_lists_return_the_right_items_newest_first,
    filtered_list_queries_use_an_index
);

/// Every page of `path` (which has a query string) at `limit` per page, checking each page's
/// order and cursor; the ids in the order served.
async fn walk(app: &TestApp, token: &str, path: &str, limit: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let p = match &cursor {
            Some(c) => format!("{path}&limit={limit}&cursor={c}"),
            None => format!("{path}&limit={limit}"),
        };
        let (st, v) = app.api_as(token, "GET", &p, None).await;
        assert_eq!(st, StatusCode::OK, "GET {p}: {v}");
        let ids: Vec<String> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        assert!(ids.len() <= limit, "GET {p}: more than {limit} items");
        assert!(
            ids.windows(2).all(|w| w[0] > w[1]),
            "GET {p}: not in id-descending order: {ids:?}"
        );
        if let (Some(c), Some(first)) = (&cursor, ids.first()) {
            assert!(first < c, "GET {p}: an item at or above the cursor");
        }
        out.extend(ids.iter().cloned());
        match &v["next_cursor"] {
            Value::String(next) => {
                assert_eq!(ids.len(), limit, "GET {p}: a cursor after a short page");
                assert_eq!(Some(next), ids.last(), "GET {p}: the cursor is the last id");
                cursor = Some(next.clone());
            }
            Value::Null => {
                assert!(ids.len() < limit, "GET {p}: a full page without a cursor");
                return out;
            }
            other => panic!("GET {p}: next_cursor {other}"),
        }
    }
    panic!("GET {path}: more than 1000 pages");
}

/// Rows as the oracle sees them: (id, then the filtered columns).
type Rows = Vec<(String, Vec<Option<String>>)>;

/// The ids of `rows` whose columns match every `(column index, value)` of `want`, newest
/// first (the oracle: plain Rust over every row).
fn expected(rows: &Rows, want: &[(usize, &str)]) -> Vec<String> {
    let mut ids: Vec<String> = rows
        .iter()
        .filter(|(_, cols)| want.iter().all(|(k, v)| cols[*k].as_deref() == Some(*v)))
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids
}

fn sql_str(v: Option<&str>) -> String {
    v.map_or("NULL".into(), |v| format!("'{v}'"))
}

async fn filtered_lists_return_the_right_items_newest_first(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.workspace("lists").await;
    let o = app.workspace("other").await;
    let (_, w_token) = app.token(&w).await;
    let (int_i, int_j, int_k) = (new_id("int"), new_id("int"), new_id("int"));
    let now = signalbox::clock::now_micros();

    // Signals: three quarters in W; sources in turn; every fifth deleted.
    let mut signals: Rows = Vec::new();
    let mut values = Vec::new();
    for i in 0..300u32 {
        let id = new_id("sig");
        let ws = if i % 4 == 3 { &o } else { &w };
        let source = ["slack", "pylon", "webhook"][(i % 3) as usize];
        let status = if i % 5 == 0 { "deleted" } else { "new" };
        values.push(format!(
            "('{id}', '{ws}', 'text {i}', '{source}', 'ref-{i}', '{{}}', '{status}', {now}, {now})"
        ));
        signals.push((
            id,
            vec![Some(ws.clone()), Some(source.into()), Some(status.into())],
        ));
    }
    exec_sql(
        &app.state.store,
        &format!(
            "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, source_metadata, \
             status, created_at, updated_at) VALUES {}",
            values.join(", ")
        ),
    )
    .await;

    // Deliveries: W's integrations I (slack) and J (pylon), O's integration K, some without a
    // workspace (unroutable); statuses in turn (never pending: no worker touches them).
    let mut deliveries: Rows = Vec::new();
    let mut values = Vec::new();
    for i in 0..400u32 {
        let id = new_id("dlv");
        let (ws, int, source) = if i % 17 == 0 {
            (None, None, "slack")
        } else {
            match i % 4 {
                0 | 1 => (Some(&w), Some(&int_i), "slack"),
                2 => (Some(&w), Some(&int_j), "pylon"),
                _ => (Some(&o), Some(&int_k), "slack"),
            }
        };
        let status = ["processed", "filtered", "dead", "failed", "processed"][(i % 5) as usize];
        values.push(format!(
            "('{id}', {}, {}, '{source}', 'test', 'k{i}', '{{}}', '{status}', 1, {now}, {now})",
            sql_str(ws.map(String::as_str)),
            sql_str(int.map(String::as_str)),
        ));
        deliveries.push((
            id,
            vec![
                ws.cloned(),
                int.cloned(),
                Some(status.into()),
                Some(source.into()),
            ],
        ));
    }
    exec_sql(
        &app.state.store,
        &format!(
            "INSERT INTO deliveries (id, workspace_id, integration_id, source, dedupe_scope, \
             dedupe_key, body, status, attempts, next_attempt_at, received_at) VALUES {}",
            values.join(", ")
        ),
    )
    .await;

    // Activity: the entries the API wrote (workspace and token creation) plus these.
    let mut values = Vec::new();
    for i in 0..200u32 {
        let ws = if i % 3 == 2 { &o } else { &w };
        values.push(format!(
            "('{}', '{ws}', NULL, 'signal.created', 'signal', 'sig_{i}', '{{}}', {now})",
            new_id("act")
        ));
    }
    exec_sql(
        &app.state.store,
        &format!(
            "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, target_id, \
             metadata, created_at) VALUES {}",
            values.join(", ")
        ),
    )
    .await;
    let activity: Rows = match app.state.store.pool() {
        Pool::Sqlite(p) => {
            sqlx::query_as::<_, (String, String)>("SELECT id, workspace_id FROM activity_logs")
                .fetch_all(p)
                .await
                .unwrap()
        }
        Pool::Postgres(p) => {
            sqlx::query_as::<_, (String, String)>("SELECT id, workspace_id FROM activity_logs")
                .fetch_all(p)
                .await
                .unwrap()
        }
    }
    .into_iter()
    .map(|(id, ws)| (id, vec![Some(ws)]))
    .collect();

    // Signals (columns: workspace, source, status).
    let sig = format!("/api/v1/workspaces/{w}/signals?x=1");
    let cases: Vec<(String, Vec<(usize, &str)>)> = vec![
        (sig.clone(), vec![(0, w.as_str())]),
        (
            format!("{sig}&source=slack"),
            vec![(0, w.as_str()), (1, "slack")],
        ),
        (
            format!("{sig}&status=deleted"),
            vec![(0, w.as_str()), (2, "deleted")],
        ),
        (
            format!("{sig}&source=slack&status=deleted"),
            vec![(0, w.as_str()), (1, "slack"), (2, "deleted")],
        ),
        (
            format!("{sig}&source=pylon&status=new"),
            vec![(0, w.as_str()), (1, "pylon"), (2, "new")],
        ),
    ];
    for (path, want) in &cases {
        for limit in [7, 50] {
            let got = walk(&app, ADMIN_TOKEN, path, limit).await;
            let exp = expected(&signals, want);
            assert!(!exp.is_empty(), "{path}: the case matches nothing");
            assert_eq!(got, exp, "GET {path} limit {limit}");
        }
    }
    // The same lists through W's own token.
    for (path, want) in &cases[1..4] {
        let got = walk(&app, &w_token, path, 7).await;
        assert_eq!(got, expected(&signals, want), "GET {path} as W's token");
    }

    // Deliveries (columns: workspace, integration, status, source).
    let d = "/api/v1/deliveries?x=1";
    let cases: Vec<(String, Vec<(usize, &str)>)> = vec![
        (d.to_string(), vec![]),
        (format!("{d}&status=dead"), vec![(2, "dead")]),
        (format!("{d}&workspace_id={w}"), vec![(0, w.as_str())]),
        (
            format!("{d}&workspace_id={w}&status=failed"),
            vec![(0, w.as_str()), (2, "failed")],
        ),
        (
            format!("{d}&integration_id={int_i}"),
            vec![(1, int_i.as_str())],
        ),
        (
            format!("{d}&integration_id={int_i}&status=dead"),
            vec![(1, int_i.as_str()), (2, "dead")],
        ),
        (
            format!("{d}&integration_id={int_i}&workspace_id={w}&status=processed"),
            vec![(0, w.as_str()), (1, int_i.as_str()), (2, "processed")],
        ),
        (format!("{d}&source=pylon"), vec![(3, "pylon")]),
        (
            format!("{d}&workspace_id={w}&source=slack"),
            vec![(0, w.as_str()), (3, "slack")],
        ),
        (
            format!("{d}&status=dead&source=slack"),
            vec![(2, "dead"), (3, "slack")],
        ),
        (
            format!("{d}&integration_id={int_j}&source=pylon&status=filtered"),
            vec![(1, int_j.as_str()), (2, "filtered"), (3, "pylon")],
        ),
    ];
    for (path, want) in &cases {
        let got = walk(&app, ADMIN_TOKEN, path, 7).await;
        let exp = expected(&deliveries, want);
        assert!(!exp.is_empty(), "{path}: the case matches nothing");
        assert_eq!(got, exp, "GET {path}");
    }
    // A workspace token sees only its workspace: its filters are combined with it.
    let scoped: Vec<(String, Vec<(usize, &str)>)> = vec![
        (d.to_string(), vec![(0, w.as_str())]),
        (
            format!("{d}&status=dead"),
            vec![(0, w.as_str()), (2, "dead")],
        ),
        (
            format!("{d}&integration_id={int_i}&status=dead"),
            vec![(0, w.as_str()), (1, int_i.as_str()), (2, "dead")],
        ),
        (
            format!("{d}&source=pylon"),
            vec![(0, w.as_str()), (3, "pylon")],
        ),
    ];
    for (path, want) in &scoped {
        let got = walk(&app, &w_token, path, 7).await;
        assert_eq!(got, expected(&deliveries, want), "GET {path} as W's token");
    }
    // Another workspace's integration through W's token: nothing.
    let got = walk(&app, &w_token, &format!("{d}&integration_id={int_k}"), 7).await;
    assert!(got.is_empty(), "W's token saw O's deliveries: {got:?}");

    // Activity.
    let path = format!("/api/v1/workspaces/{w}/activity?x=1");
    for limit in [7, 50] {
        let got = walk(&app, ADMIN_TOKEN, &path, limit).await;
        assert_eq!(got, expected(&activity, &[(0, w.as_str())]), "GET {path}");
    }
    app.stop().await;
}

/// Fills `n` rows per table in SQL (ids `…_{i:08}`, ascending with `i`) with filters that
/// match little, then `ANALYZE`s them (PostgreSQL, as autovacuum would; SQLite is left without
/// statistics, as in production).
async fn fill_for_plans(app: &TestApp, ws: &str, other: &str, n: u32) {
    let (series, pad, text) = match app.backend {
        Backend::Sqlite => (
            format!(
                "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {}) ",
                n - 1
            ),
            "printf('%08d', i)",
            "CAST(i AS TEXT)",
        ),
        Backend::Postgres => (
            format!("WITH s(i) AS (SELECT generate_series(0, {})) ", n - 1),
            "lpad(i::text, 8, '0')",
            "i::text",
        ),
    };
    let now = signalbox::clock::now_micros();
    exec_sql(
        &app.state.store,
        &format!(
            "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref, source_metadata, \
             status, created_at, updated_at) {series}\
             SELECT 'sig_' || {pad}, CASE WHEN i % 3 = 2 THEN '{other}' ELSE '{ws}' END, 'text', \
             CASE WHEN i % 500 = 0 THEN 'slack' ELSE 'pylon' END, 'ref-' || {text}, '{{}}', \
             CASE WHEN i % 1000 IN (0, 510) THEN 'deleted' ELSE 'new' END, {now}, {now} FROM s"
        ),
    )
    .await;
    exec_sql(
        &app.state.store,
        &format!(
            "INSERT INTO deliveries (id, workspace_id, integration_id, source, dedupe_scope, \
             dedupe_key, body, status, attempts, next_attempt_at, received_at) {series}\
             SELECT 'dlv_' || {pad}, \
             CASE WHEN i % 50 = 0 OR i % 100 = 25 THEN '{ws}' ELSE '{other}' END, \
             CASE WHEN i % 50 = 0 THEN 'int_i' WHEN i % 100 = 25 THEN 'int_j' \
             WHEN i % 100 = 75 THEN 'int_l' ELSE 'int_k' END, \
             CASE WHEN i % 100 IN (25, 75) THEN 'pylon' ELSE 'webhook' END, 'plan', 'k' || {text}, '{{}}', \
             CASE WHEN i % 1000 IN (0, 370) THEN 'dead' WHEN i % 10 = 3 THEN 'filtered' \
             ELSE 'processed' END, 1, {now}, {now} FROM s"
        ),
    )
    .await;
    exec_sql(
        &app.state.store,
        &format!(
            "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type, target_id, \
             metadata, created_at) {series}\
             SELECT 'act_' || {pad}, CASE WHEN i % 3 = 2 THEN '{other}' ELSE '{ws}' END, NULL, \
             'signal.created', 'signal', 'sig_x', '{{}}', {now} FROM s"
        ),
    )
    .await;
    if app.backend == Backend::Postgres {
        exec_sql(
            &app.state.store,
            "ANALYZE signals, deliveries, activity_logs",
        )
        .await;
    }
}

/// Asserts that `plan` reads `table` through one of `indexes` in index order (no full scan,
/// no sort).
fn assert_index_plan(backend: Backend, what: &str, plan: &str, table: &str, indexes: &[&str]) {
    let uses = |index: &&str| match backend {
        Backend::Sqlite => {
            plan.contains(&format!("USING INDEX {index} "))
                || plan.contains(&format!("USING COVERING INDEX {index} "))
        }
        Backend::Postgres => {
            plan.contains(&format!("Index Scan Backward using {index} on {table}"))
                || plan.contains(&format!(
                    "Index Only Scan Backward using {index} on {table}"
                ))
        }
    };
    assert!(
        indexes.iter().any(uses),
        "{what}: expected an index range scan of {indexes:?}, got:\n{plan}"
    );
    assert!(
        !plan.contains(&format!("SCAN {table}")) && !plan.contains("Seq Scan"),
        "{what}: a full scan of {table}:\n{plan}"
    );
    assert!(!plan.contains("Bitmap"), "{what}: a bitmap scan:\n{plan}");
    assert!(
        !plan.contains("TEMP B-TREE") && !plan.contains("Sort"),
        "{what}: a sort instead of index order:\n{plan}"
    );
}

async fn filtered_list_queries_use_an_index(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.workspace("plans").await;
    let other = app.workspace("plans other").await;
    fill_for_plans(&app, &ws, &other, 60_000).await;
    let store = &app.state.store;
    // A cursor about half-way down each table.
    let deep = |p: &str| Some(format!("{p}_{:08}", 30_000));
    let s = |source: Option<&str>, status: Option<&str>| SignalFilter {
        workspace_id: ws.clone(),
        source: source.map(str::to_string),
        status: status.map(str::to_string),
        cursor: None,
        limit: 50,
    };
    let d = |ws: Option<&str>, int: Option<&str>, status: Option<&str>, source: Option<&str>| {
        DeliveryFilter {
            workspace_id: ws.map(str::to_string),
            integration_id: int.map(str::to_string),
            status: status.map(str::to_string),
            source: source.map(str::to_string),
            cursor: None,
            limit: 50,
        }
    };
    let w = Some(ws.as_str());
    // The workspace holds two thirds of the signals and activity entries: walking the
    // primary key backwards finds a page as fast as the workspace's index does, and
    // PostgreSQL's statistics say so.
    let signal_cases = [
        (s(None, None), "signals_workspace"),
        (s(Some("slack"), None), "signals_workspace_source"),
        (s(None, Some("deleted")), "signals_workspace_status"),
        (
            s(Some("slack"), Some("deleted")),
            "signals_workspace_source_status",
        ),
    ];
    let delivery_cases = [
        (d(None, None, Some("dead"), None), "deliveries_status"),
        (d(w, None, None, None), "deliveries_workspace"),
        (
            d(w, None, Some("dead"), None),
            "deliveries_workspace_status",
        ),
        (d(None, Some("int_i"), None, None), "deliveries_integration"),
        (
            d(None, Some("int_i"), Some("dead"), None),
            "deliveries_integration_status",
        ),
        // A workspace token's calls carry its workspace too.
        (d(w, Some("int_i"), None, None), "deliveries_integration"),
        (
            d(w, Some("int_i"), Some("dead"), None),
            "deliveries_integration_status",
        ),
    ];
    let mut queries: Vec<(String, ListQuery, &str, &str)> = Vec::new();
    for (f, index) in signal_cases {
        for cursor in [None, deep("sig")] {
            let f = SignalFilter {
                cursor,
                ..f.clone()
            };
            queries.push((
                format!("{f:?}"),
                signals_query(&f, backend == Backend::Sqlite),
                "signals",
                index,
            ));
        }
    }
    for (f, index) in delivery_cases {
        for cursor in [None, deep("dlv")] {
            let f = DeliveryFilter {
                cursor,
                ..f.clone()
            };
            queries.push((
                format!("{f:?}"),
                deliveries_query(&f, backend == Backend::Sqlite),
                "deliveries",
                index,
            ));
        }
    }
    for cursor in [None, deep("act")] {
        queries.push((
            format!("activity {cursor:?}"),
            activity_query(&ws, 50, cursor.as_deref()),
            "activity_logs",
            "activity_logs_workspace",
        ));
    }
    for (what, q, table, index) in &queries {
        assert!(
            !q.sql.contains("IS NULL"),
            "{what}: the query names absent filters: {}",
            q.sql
        );
        let plan = store.explain_list(q).await.unwrap();
        eprintln!("{what}\n{}\n{plan}\n", q.sql);
        let pkey = format!("{table}_pkey");
        let unselective = ["signals_workspace", "activity_logs_workspace"].contains(index);
        let accepted: Vec<&str> = if unselective {
            vec![index, &pkey]
        } else if *index == "deliveries_integration_status" {
            // Integration and status: PostgreSQL may instead range-scan the workspace's rows of
            // that status (as few, for a rare status); which it picks depends on ANALYZE's
            // random sample. Both read only rows of that status from the cursor.
            vec![index, "deliveries_workspace_status"]
        } else {
            vec![index]
        };
        assert_index_plan(backend, what, &plan, table, &accepted);
    }
    app.stop().await;
}
