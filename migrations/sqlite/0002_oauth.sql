-- Slack OAuth install states and single-flight token refresh.
CREATE TABLE oauth_states (
    state_hash    TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    created_by    TEXT,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER
);
ALTER TABLE integrations ADD COLUMN refresh_lock_until INTEGER;
