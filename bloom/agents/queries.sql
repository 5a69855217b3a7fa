-- Push delivery to Membridge agents (bloom/agents/): dispatch (dispatch.py), liveness
-- probes (liveness.py), and what operations on an agent change (operations.py).
-- Conventions: bloom/sql.py.

-- name: current_delivery
-- The task's live delivery to an agent: its current lease, active, granted by a dispatch.
SELECT l.id AS lease_id, l.worker_id
  FROM llm_tasks t JOIN leases l ON l.id = t.lease_id
 WHERE t.id = :task_id AND t.status IN ('leased', 'running') AND l.status = 'active' AND l.dispatched;

-- name: dispatch_candidates
-- The next queued tasks in the queue's order (priority, then turn: one key after another,
-- README "Fair shares"), but for those of keys at their cap, while some online push
-- worker has room. Each is then granted by lease_task, which re-checks everything under
-- its locks: a candidate another process or a pull worker took meanwhile, or whose key
-- reached its cap, is simply refused.
SELECT t.id
  FROM llm_tasks t
  -- include: key_cap
 WHERE t.status = 'queued'
   AND COALESCE(t.run_at, 0) <= :now AND COALESCE(t.retry_at, 0) <= :now
   AND
   -- include: below_key_cap
   AND EXISTS (
        SELECT 1 FROM workers w
         WHERE w.url IS NOT NULL AND w.status = 'online' AND w.approved AND w.ejected_until <= :now
           AND COALESCE((w.capabilities ->> 'claude_cli')::boolean, true)
           AND (SELECT count(l.id) < min(COALESCE((sibling.capabilities ->> 'max_concurrency')::int, 1))
                  FROM workers sibling
                  LEFT JOIN leases l ON l.worker_id = sibling.id AND l.status = 'active'
                 WHERE sibling.address = w.address))
 ORDER BY t.priority DESC, t.fair_rank, t.created_at, t.id
 LIMIT :limit;

-- name: note_agent_run
-- How a delivered run ended (bloom/agents/outliers.py): a failure adds one to the runs
-- that failed in a row, and from :eject_after of them on keeps the agent out of the
-- dispatch for a back-off that doubles with each further failure; a good run clears the
-- count. Counted per agent, not per name: every name of one agent (its address: README,
-- "One agent, one capacity") shares the count and the ejection, so an agent known under
-- two names is not tried three times under each. Its rows are locked in id order first,
-- so two outcomes of one agent count one after the other. A good run of an agent with no
-- failures writes nothing.
WITH agent AS MATERIALIZED (
    SELECT sibling.id, sibling.failed_runs
      FROM workers named JOIN workers sibling ON sibling.address = named.address
     WHERE named.id = :worker_id
     ORDER BY sibling.id
       FOR UPDATE OF sibling
), counted AS (
    SELECT max(failed_runs) AS failed_runs FROM agent
), noted AS (
    UPDATE workers w
       SET failed_runs = CASE WHEN :failed THEN c.failed_runs + 1 ELSE 0 END,
           ejected_until = CASE WHEN :failed AND c.failed_runs + 1 >= :eject_after
                                THEN :now + CAST(LEAST(:first_ejection_ms * power(2, c.failed_runs + 1 - :eject_after),
                                                       :longest_ejection_ms) AS bigint)
                                ELSE w.ejected_until END
      FROM agent a, counted c
     WHERE w.id = a.id AND (:failed OR c.failed_runs > 0)
    RETURNING w.failed_runs, w.ejected_until
)
SELECT max(failed_runs) AS failed_runs, max(ejected_until) AS ejected_until FROM noted;

-- name: delivery_started
-- Whether the agent said its run started (its first heartbeat makes the task 'running').
SELECT EXISTS (SELECT 1 FROM llm_tasks WHERE id = :task_id AND lease_id = :lease_id AND status = 'running')
       AS started;

-- name: push_workers
-- Workers the runtime pushes tasks to (they have a url), to probe.
SELECT id, url, address FROM workers WHERE url IS NOT NULL AND approved ORDER BY id;

-- name: mark_workers_alive
-- Push workers whose url answered a probe: online (still not leasable if they said
-- they have no Claude CLI: capabilities.claude_cli stays false until they register again).
-- A worker held out for taking tasks and never answering ('error') stays out: its
-- /health answered all along.
UPDATE workers
   SET status = 'online', evidence_at = :now, last_heartbeat = :now
 WHERE id = ANY(CAST(:worker_ids AS text[])) AND url IS NOT NULL AND status <> 'error'
RETURNING id;

-- name: note_agent_health
-- What an agent said of itself in answer to GET /workers/<id>/agent-health: its version,
-- OS, capabilities (merged over the stored ones) and addresses; it answered, so it is
-- online (unless held out, 'error', until it registers again) and heard from now.
UPDATE workers
   SET agent_version = COALESCE(:agent_version, agent_version),
       os_info = COALESCE(CAST(:os_info AS jsonb), os_info),
       capabilities = capabilities || CAST(:capabilities AS jsonb),
       ip_addrs = COALESCE(CAST(:ip_addrs AS jsonb), ip_addrs),
       status = CASE WHEN status = 'error' THEN status ELSE 'online' END,
       evidence_at = :now, last_heartbeat = :now
 WHERE id = :worker_id
RETURNING id;

-- name: set_agent_version
-- After an operation on the agent (self-update, uninstall); 'uninstalled' also takes the
-- worker offline (its leases were ended by take_workers_out, in the same transaction).
UPDATE workers
   SET agent_version = COALESCE(:agent_version, agent_version),
       status = CASE WHEN :agent_version = 'uninstalled' THEN 'offline' ELSE status END
 WHERE id = :worker_id
RETURNING id;
