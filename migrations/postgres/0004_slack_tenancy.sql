-- Slack tenancy: one active distributed-app integration per Slack team or enterprise, and
-- Slack signals keyed by channel and ts (not by team) inside a workspace.

-- Where two active integrations of the distributed app (no signing secret of their own) claim
-- one team, keep the one Slack's OAuth install created (Slack said who installed it), else the
-- newest, and deactivate the others so the unique index below can exist.
UPDATE integrations i SET is_active = FALSE
WHERE i.platform = 'slack' AND i.is_active AND i.webhook_secret_enc IS NULL
  AND i.slack_team_id IS NOT NULL
  AND EXISTS (
    SELECT 1 FROM integrations o
    WHERE o.platform = 'slack' AND o.is_active AND o.webhook_secret_enc IS NULL
      AND o.slack_team_id = i.slack_team_id AND o.id <> i.id
      AND ((COALESCE(o.created_by, '') = 'oauth') > (COALESCE(i.created_by, '') = 'oauth')
           OR ((COALESCE(o.created_by, '') = 'oauth') = (COALESCE(i.created_by, '') = 'oauth')
               AND o.id > i.id)));

CREATE UNIQUE INDEX integrations_one_active_slack_team ON integrations (slack_team_id)
WHERE platform = 'slack' AND is_active AND webhook_secret_enc IS NULL;

CREATE INDEX integrations_slack_enterprise ON integrations (slack_enterprise_id)
WHERE platform = 'slack';

-- `slack-{team}-{channel}-{ts}` becomes `slack-{channel}-{ts}` (team ids hold no '-'). Where
-- one workspace holds the same message under two teams, the oldest signal takes the new key
-- and the others keep theirs.
WITH renamed AS (
    SELECT id, workspace_id,
           'slack-' || substr(source_ref, 7 + strpos(substr(source_ref, 7), '-')) AS new_ref
    FROM signals
    WHERE source = 'slack' AND source_ref LIKE 'slack-%-%-%'
), ranked AS (
    SELECT id, new_ref,
           row_number() OVER (PARTITION BY workspace_id, new_ref ORDER BY id) AS n
    FROM renamed
)
UPDATE signals s SET source_ref = ranked.new_ref
FROM ranked WHERE ranked.id = s.id AND ranked.n = 1;
