-- signalbox schema, SQLite flavour. Timestamps are Unix microseconds; JSON is TEXT.
CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE webhook_keys (
    id                   TEXT PRIMARY KEY,
    workspace_id         TEXT NOT NULL REFERENCES workspaces(id),
    name                 TEXT,
    secret_enc           TEXT NOT NULL,
    previous_secret_enc  TEXT,
    previous_expires_at  INTEGER,
    is_active            INTEGER NOT NULL DEFAULT 1,
    last_used_at         INTEGER,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE INDEX webhook_keys_workspace ON webhook_keys (workspace_id);

CREATE TABLE integrations (
    id                          TEXT PRIMARY KEY,
    workspace_id                TEXT NOT NULL REFERENCES workspaces(id),
    platform                    TEXT NOT NULL,
    name                        TEXT NOT NULL,
    webhook_secret_enc          TEXT,
    previous_webhook_secret_enc TEXT,
    previous_secret_expires_at  INTEGER,
    access_token_enc            TEXT,
    refresh_token_enc           TEXT,
    token_expires_at            INTEGER,
    required_header_value_enc   TEXT,
    slack_team_id               TEXT,
    slack_team_name             TEXT,
    slack_bot_user_id           TEXT,
    slack_enterprise_id         TEXT,
    slack_app_id                TEXT,
    slack_scopes                TEXT,
    pylon_account_id            TEXT,
    is_active                   INTEGER NOT NULL DEFAULT 1,
    needs_reauth                INTEGER NOT NULL DEFAULT 0,
    config                      TEXT NOT NULL DEFAULT '{}',
    last_used_at                INTEGER,
    created_at                  INTEGER NOT NULL,
    updated_at                  INTEGER NOT NULL,
    created_by                  TEXT
);
CREATE INDEX integrations_workspace ON integrations (workspace_id);
CREATE INDEX integrations_slack_team ON integrations (platform, slack_team_id);

CREATE TABLE deliveries (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT,
    integration_id    TEXT,
    webhook_key_id    TEXT,
    source            TEXT NOT NULL,
    dedupe_scope      TEXT NOT NULL,
    dedupe_key        TEXT NOT NULL,
    body              BLOB NOT NULL,
    headers           TEXT NOT NULL DEFAULT '{}',
    status            TEXT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER NOT NULL,
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    last_error        TEXT,
    filter_reason     TEXT,
    signal_id         TEXT,
    received_at       INTEGER NOT NULL,
    processed_at      INTEGER,
    UNIQUE (dedupe_scope, dedupe_key)
);
CREATE INDEX deliveries_pending ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_workspace ON deliveries (workspace_id, id);
CREATE INDEX deliveries_status ON deliveries (status, id);

CREATE TABLE signals (
    id               TEXT PRIMARY KEY,
    workspace_id     TEXT NOT NULL REFERENCES workspaces(id),
    verbatim         TEXT NOT NULL,
    source           TEXT NOT NULL,
    source_ref       TEXT NOT NULL,
    source_metadata  TEXT NOT NULL DEFAULT '{}',
    status           TEXT NOT NULL DEFAULT 'new',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (workspace_id, source, source_ref)
);
CREATE INDEX signals_workspace ON signals (workspace_id, id);

CREATE TABLE activity_logs (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL,
    actor         TEXT,
    action        TEXT NOT NULL,
    target_type   TEXT NOT NULL,
    target_id     TEXT NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL
);
CREATE INDEX activity_logs_workspace ON activity_logs (workspace_id, id);

CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    name          TEXT,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    last_used_at  INTEGER
);

CREATE TABLE readiness_probe (
    id  INTEGER PRIMARY KEY,
    at  INTEGER NOT NULL
);
