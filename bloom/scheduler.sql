-- Background jobs, once per deployment (bloom/scheduler.py).
-- Conventions: bloom/sql.py.

-- name: claim_job_run
-- A job runs at most once per interval in the whole deployment: the run that moves
-- the stored last-run time forward wins; every other process sees it too recent.
INSERT INTO runtime_settings (key, value, updated_at)
VALUES (:setting_key, CAST(:now AS text), :now)
ON CONFLICT (key) DO UPDATE
   SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
 WHERE runtime_settings.value IS NULL
    OR runtime_settings.value !~ '^[0-9]+$'
    OR CAST(runtime_settings.value AS bigint) <= :now - :min_gap_ms
RETURNING key;
