-- Push dispatch to Membridge agents (bloom/dispatch.py).
-- Conventions: bloom/sql.py.

-- name: current_delivery
-- The task's live delivery to an agent: its current lease, active, granted by a dispatch.
SELECT l.id AS lease_id, l.worker_id
  FROM llm_tasks t JOIN leases l ON l.id = t.lease_id
 WHERE t.id = :task_id AND t.status IN ('leased', 'running') AND l.status = 'active' AND l.dispatched;

-- name: dispatch_candidates
-- The next queued tasks (priority, then age), while some online push worker has room.
-- Each is then granted by lease_task, which re-checks everything under its locks: a
-- candidate another process or a pull worker took meanwhile is simply refused.
SELECT t.id
  FROM llm_tasks t
 WHERE t.status = 'queued'
   AND COALESCE(t.run_at, 0) <= :now AND COALESCE(t.retry_at, 0) <= :now
   AND EXISTS (
        SELECT 1 FROM workers w
         WHERE w.url IS NOT NULL AND w.status = 'online'
           AND COALESCE((w.capabilities ->> 'claude_cli')::boolean, true)
           AND (SELECT count(l.id) < min(COALESCE((sibling.capabilities ->> 'max_concurrency')::int, 1))
                  FROM workers sibling
                  LEFT JOIN leases l ON l.worker_id = sibling.id AND l.status = 'active'
                 WHERE sibling.address = w.address))
 ORDER BY t.priority DESC, t.created_at, t.id
 LIMIT :limit;
