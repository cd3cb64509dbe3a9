-- Per-workspace retention: NULL follows SIGNALBOX_RETENTION, 0 keeps everything, otherwise the
-- number of seconds bodies, headers and activity entries of this workspace are kept.
ALTER TABLE workspaces ADD COLUMN retention_secs BIGINT;

-- The purge now runs per workspace (each with its own cutoff), so its indexes lead with the
-- workspace: one range scan per workspace from its oldest unpurged entry, stopping after the
-- batch. Deliveries that reached no workspace (workspace_id NULL) are the same index's NULL
-- prefix.
DROP INDEX deliveries_purge;
CREATE INDEX deliveries_purge_ws ON deliveries (workspace_id, received_at)
    WHERE purged_at IS NULL AND status <> 'pending';

DROP INDEX activity_logs_created;
CREATE INDEX activity_logs_purge_ws ON activity_logs (workspace_id, created_at);
