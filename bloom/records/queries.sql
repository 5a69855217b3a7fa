-- Records: artifacts, audit, stats, the queue gauges, retention (bloom/records/).
-- Conventions: bloom/sql.py.

-- name: get_artifact
SELECT a.*, t.desired_format
  FROM runtime_artifacts a LEFT JOIN llm_tasks t ON t.id = a.task_id
 WHERE a.id = :artifact_id;

-- name: list_artifacts
SELECT * FROM runtime_artifacts
 WHERE (CAST(:task_id AS text) IS NULL OR task_id = :task_id)
 ORDER BY created_at DESC, id DESC
 LIMIT :limit OFFSET :offset;

-- name: insert_audit
INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
VALUES (:audit_id, :now, :action, :entity_type, :entity_id, :actor, CAST(:detail AS jsonb));

-- name: list_audit
SELECT * FROM audit_logs
 ORDER BY timestamp DESC, id DESC
 LIMIT :limit OFFSET :offset;

-- name: queue_state
-- For /metrics: the live part of the queue only, each count over a small index range
-- (queued, leased, running; active leases), never a count of finished tasks.
SELECT (SELECT count(*) FROM llm_tasks WHERE status = 'queued') AS queued,
       (SELECT COALESCE(:now - min(created_at), 0) FROM llm_tasks
         WHERE status = 'queued' AND COALESCE(run_at, 0) <= :now AND COALESCE(retry_at, 0) <= :now)
           AS oldest_queued_age_ms,
       (SELECT count(*) FROM llm_tasks WHERE status = 'leased') AS leased,
       (SELECT count(*) FROM llm_tasks WHERE status = 'running') AS running,
       (SELECT count(*) FROM leases WHERE status = 'active') AS leases_active,
       (SELECT jsonb_object_agg(status, n) FROM (SELECT status, count(*) AS n FROM workers GROUP BY status) w)
           AS workers_by_status;

-- name: stats
-- Exact counts while the tasks table is small. Past :estimate_above rows, the finished
-- statuses and the lease total come from PostgreSQL's statistics (reltuples, and the
-- status column's most common values and their frequencies as of the last ANALYZE), so
-- the cost does not grow with the history kept. Live statuses (queued, leased, running),
-- active leases and workers are always counted exactly, over small index ranges; the
-- live tasks are counted per fairness key (keys with queued tasks, the busiest keys).
WITH sizes AS (
    SELECT (SELECT reltuples FROM pg_class WHERE oid = 'llm_tasks'::regclass) AS tasks,
           (SELECT reltuples FROM pg_class WHERE oid = 'leases'::regclass) AS leases
), live_by_key AS MATERIALIZED (
    -- One pass over the live tasks, one row per fairness key (README, "Fair shares").
    SELECT fairness_key,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'leased') AS leased,
           count(*) FILTER (WHERE status = 'running') AS running
      FROM llm_tasks
     WHERE status IN ('queued', 'leased', 'running') GROUP BY fairness_key
), live AS (
    SELECT counted.status, counted.n
      FROM (SELECT sum(queued) AS queued, sum(leased) AS leased, sum(running) AS running FROM live_by_key) sums
     CROSS JOIN LATERAL (VALUES ('queued', sums.queued), ('leased', sums.leased), ('running', sums.running))
           AS counted(status, n)
     WHERE counted.n > 0
), busiest_keys AS (
    -- The keys with the most tasks queued and running (leased or running).
    SELECT fairness_key AS key, queued, leased + running AS running
      FROM live_by_key
     ORDER BY queued + leased + running DESC, fairness_key LIMIT :busiest_keys
), finished_exact AS (
    SELECT status, count(*) AS n FROM llm_tasks
     WHERE status NOT IN ('queued', 'leased', 'running') AND (SELECT tasks FROM sizes) < :estimate_above
     GROUP BY status
), finished_estimated AS (
    SELECT m.status, round(m.freq * sizes.tasks)::bigint AS n
      FROM sizes, pg_stats s,
           unnest(CAST(CAST(s.most_common_vals AS text) AS text[]), s.most_common_freqs) AS m(status, freq)
     WHERE sizes.tasks >= :estimate_above
       AND s.schemaname = current_schema() AND s.tablename = 'llm_tasks' AND s.attname = 'status'
       AND m.status NOT IN ('queued', 'leased', 'running')
)
SELECT (SELECT COALESCE(jsonb_object_agg(status, n), '{}'::jsonb)
          FROM (SELECT * FROM live UNION ALL SELECT * FROM finished_exact
                UNION ALL SELECT * FROM finished_estimated) counted) AS tasks_by_status,
       CASE WHEN (SELECT leases FROM sizes) < :estimate_above THEN (SELECT count(*) FROM leases)
            ELSE CAST((SELECT leases FROM sizes) AS bigint) END AS leases_total,
       (SELECT count(*) FROM leases WHERE status = 'active') AS leases_active,
       (SELECT count(*) FROM workers) AS workers_total,
       (SELECT count(*) FROM workers WHERE status = 'online') AS workers_online,
       (SELECT count(*) FROM live_by_key WHERE queued > 0) AS keys_with_queued,
       (SELECT COALESCE(jsonb_agg(to_jsonb(busiest_keys) ORDER BY queued + running DESC, key), '[]'::jsonb)
          FROM busiest_keys) AS busiest_keys,
       (SELECT tasks FROM sizes) >= :estimate_above AS estimated;

-- name: prune_finished_tasks
-- One batch of finished tasks past their retention, oldest first, with their leases,
-- results and artifacts. SKIP LOCKED: a row some transaction holds waits for the next run.
-- Returns the object-store urls of the deleted artifacts, to remove after the commit.
WITH doomed AS (
    SELECT id FROM llm_tasks
     WHERE status IN ('completed', 'failed', 'dead', 'cancelled')
       AND updated_at < CASE WHEN status = 'completed' THEN CAST(:completed_before AS bigint)
                             ELSE CAST(:failed_before AS bigint) END
       -- Its Idempotency-Key is honoured for the whole window (retention.IDEMPOTENCY_WINDOW_S).
       AND (idempotency_key IS NULL OR created_at < :keyed_before)
     ORDER BY updated_at
     LIMIT :batch
       FOR UPDATE SKIP LOCKED
), leases_gone AS (
    DELETE FROM leases l USING doomed d WHERE l.task_id = d.id
), results_gone AS (
    DELETE FROM llm_results r USING doomed d WHERE r.task_id = d.id
), artifacts_gone AS (
    DELETE FROM runtime_artifacts a USING doomed d WHERE a.task_id = d.id RETURNING a.url
), tasks_gone AS (
    DELETE FROM llm_tasks t USING doomed d WHERE t.id = d.id RETURNING t.id
)
SELECT (SELECT count(*) FROM tasks_gone) AS tasks,
       (SELECT array_agg(url) FROM artifacts_gone WHERE url IS NOT NULL) AS object_urls;

-- name: prune_audit
WITH gone AS (
    DELETE FROM audit_logs
     WHERE id IN (SELECT id FROM audit_logs WHERE timestamp < :before ORDER BY timestamp LIMIT :batch)
    RETURNING 1
)
SELECT count(*) AS deleted FROM gone;
