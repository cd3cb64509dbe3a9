-- Retention (SIGNALBOX_RETENTION) and erasure: a purged delivery keeps its row (the dedupe key
-- stays, so a sender's retry is still a duplicate, and its status and signal link stay) but its
-- body becomes an empty blob, its headers '{}', and `purged_at` says when.
ALTER TABLE deliveries ADD COLUMN purged_at BIGINT;

-- The purge walks finished, not yet purged deliveries oldest first
-- (`… WHERE purged_at IS NULL AND status <> 'pending' AND received_at < $1 ORDER BY received_at
-- LIMIT 500`): one range scan from the oldest entry that stops after the batch. A purged row
-- leaves the index, so each batch starts where the previous one ended. Rows are inserted in
-- received_at order, so new entries go to the index's tail page.
CREATE INDEX deliveries_purge ON deliveries (received_at)
    WHERE purged_at IS NULL AND status <> 'pending';

-- Activity entries older than the retention are deleted oldest first.
CREATE INDEX activity_logs_created ON activity_logs (created_at);
-- (Plain CREATE INDEX, as in 0005: on a large table writes to it wait while the indexes build.)
