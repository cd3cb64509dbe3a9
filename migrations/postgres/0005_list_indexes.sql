-- Indexes for the API's filtered lists. Each list pages by keyset (`… AND id < cursor ORDER BY
-- id DESC LIMIT n`) and its WHERE clause names only the filters present (store::ListQuery), so
-- an index on (the equality columns…, id) is one range scan that starts at the cursor and
-- stops after n rows, however large the table and however little the filter matches.
-- Plain CREATE INDEX (migrations run in a transaction): on a large table it blocks writes to
-- that table while it builds (seconds per million rows); the inbox answers 503 meanwhile and
-- senders retry.
-- Already there (0001): signals (workspace_id, id), deliveries (workspace_id, id),
-- deliveries (status, id), activity_logs (workspace_id, id).

-- Indexes with `status` skip the status nearly every row has ('new' signals, 'processed'
-- deliveries): those rows cost them nothing on the ingest path. A list filtered on that status
-- matches most rows, so the index without `status` finds its page at once. The list query is
-- planned for its values (an unnamed statement), so the planner proves the predicate from
-- `status = $k` itself.

-- GET /api/v1/workspaces/{ws}/signals?source=…&status=…
CREATE INDEX signals_workspace_source ON signals (workspace_id, source, id);
CREATE INDEX signals_workspace_status ON signals (workspace_id, status, id)
    WHERE status <> 'new';
CREATE INDEX signals_workspace_source_status ON signals (workspace_id, source, status, id)
    WHERE status <> 'new';

-- GET /api/v1/deliveries?workspace_id=…&integration_id=…&status=… (a workspace token's calls
-- always carry its workspace_id). `source` is not indexed: an integration implies its
-- platform, and two more entries per delivery cost ingest more than that filter is worth.
CREATE INDEX deliveries_workspace_status ON deliveries (workspace_id, status, id)
    WHERE status <> 'processed';
CREATE INDEX deliveries_integration ON deliveries (integration_id, id);
CREATE INDEX deliveries_integration_status ON deliveries (integration_id, status, id)
    WHERE status <> 'processed';

-- An integration's deliveries are all in its workspace and of its platform. Without this the
-- planner multiplies the selectivities of `integration_id = $1 AND workspace_id = $2` (what a
-- workspace token's `?integration_id=` becomes), expects fewer rows than a page, and reads all
-- of the integration's deliveries and sorts them instead of walking its index.
CREATE STATISTICS deliveries_integration_deps (dependencies)
    ON integration_id, workspace_id, source FROM deliveries;
