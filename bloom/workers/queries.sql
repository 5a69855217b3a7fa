-- Workers: the registry, the Membridge sync and the runtime's own liveness evidence (bloom/workers/).
-- Conventions: bloom/sql.py.

-- name: list_workers
SELECT w.*,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active_leases
  FROM workers w
 ORDER BY w.registered_at DESC, w.id
 LIMIT :limit OFFSET :offset;

-- name: get_worker
SELECT w.*,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active_leases
  FROM workers w
 WHERE w.id = :worker_id;

-- name: list_active_leases_of_worker
SELECT * FROM leases
 WHERE worker_id = :worker_id AND status = 'active'
 ORDER BY started_at DESC, id DESC;

-- name: register_worker
-- A re-registration keeps registered_at, obs_count and db_sha, and the url,
-- capabilities, ip_addrs and agent details it already had when the request leaves them
-- out. Registering is the worker's own sign of life (evidence_at).
-- Not by an operator (:by_operator false: the workers' key), a re-registration of a push
-- worker (one with a url) changes only what an agent says of itself: its version, OS,
-- addresses and whether it has the Claude CLI. Its status and capacity stay as the
-- operator, Membridge and the runtime's own probes made them, so one agent's key cannot
-- overbook, or take out of rotation, another agent.
WITH upserted AS (
    INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs,
                         obs_count, db_sha, registered_at, agent_version, os_info, install_method,
                         evidence_at, approved)
    VALUES (:worker_id, :worker_id, :url, :status,
            COALESCE(CAST(:capabilities AS jsonb), CAST(:default_capabilities AS jsonb)), :now,
            COALESCE(CAST(:ip_addrs AS jsonb), '[]'::jsonb), 0, NULL, :now,
            :agent_version, CAST(:os_info AS jsonb), :install_method, :now,
            -- A push worker of the workers' own registration waits for an operator or Membridge.
            CAST(:by_operator AS boolean) OR CAST(:url AS text) IS NULL)
    ON CONFLICT (id) DO UPDATE
       SET url = COALESCE(EXCLUDED.url, workers.url),
           approved = workers.approved OR CAST(:by_operator AS boolean),
           status = CASE WHEN CAST(:by_operator AS boolean) OR workers.url IS NULL
                         THEN EXCLUDED.status ELSE workers.status END,
           capabilities = CASE WHEN CAST(:by_operator AS boolean) OR workers.url IS NULL
                               THEN COALESCE(CAST(:capabilities AS jsonb), workers.capabilities)
                               ELSE workers.capabilities || jsonb_strip_nulls(jsonb_build_object(
                                        'claude_cli', CAST(:capabilities AS jsonb) -> 'claude_cli'))
                          END,
           ip_addrs = COALESCE(CAST(:ip_addrs AS jsonb), workers.ip_addrs),
           last_heartbeat = EXCLUDED.last_heartbeat,
           agent_version = COALESCE(EXCLUDED.agent_version, workers.agent_version),
           os_info = COALESCE(EXCLUDED.os_info, workers.os_info),
           install_method = COALESCE(EXCLUDED.install_method, workers.install_method),
           evidence_at = EXCLUDED.evidence_at
     -- Who may point an existing worker at another agent: an operator (:by_operator), or
     -- Membridge through the sync. Anyone else's re-registration keeps the url it has.
     WHERE CAST(:by_operator AS boolean) OR EXCLUDED.url IS NULL
        OR rtrim(lower(EXCLUDED.url), '/') IS NOT DISTINCT FROM rtrim(lower(workers.url), '/')
    RETURNING workers.*, (xmax = 0) AS inserted
), unremembered AS (
    -- Its own registration brings back a worker an operator removed.
    DELETE FROM removed_workers WHERE id IN (SELECT id FROM upserted)
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now,
           CASE WHEN inserted THEN 'worker_registered' ELSE 'worker_updated' END,
           'worker', id, :actor,
           jsonb_build_object('url', url, 'status', status, 'capabilities', capabilities,
                              'agent_version', agent_version)
      FROM upserted
)
SELECT u.*,
       (SELECT count(*) FROM leases l WHERE l.worker_id = u.id AND l.status = 'active') AS active_leases
  FROM upserted u;

-- name: delete_worker
-- Run after take_workers_out in the same transaction (RuntimeService.remove_worker), which
-- ended the worker's leases and queued its tasks again. The id is remembered, so that the
-- worker sync does not bring the worker back while Membridge lists it; its own
-- registration does (register_worker).
WITH removed AS (
    DELETE FROM workers WHERE id = :worker_id RETURNING id
), remembered AS (
    INSERT INTO removed_workers (id, removed_at) SELECT id, :now FROM removed
    ON CONFLICT (id) DO UPDATE SET removed_at = EXCLUDED.removed_at
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'worker_removed', 'worker', id, :actor, '{}'::jsonb FROM removed
)
SELECT id FROM removed;

-- name: upsert_synced_workers
-- A worker Membridge lists with its url is vouched for (approved): the url is Membridge's.
-- Agents of one Membridge answer. Fields an agent leaves out (null here) keep their
-- stored values; registered_at is set once, when the worker is first seen. Upstream's
-- status decides only for workers of which the runtime has no recent evidence of its
-- own (evidence_at: their calls, probes of their url, dispatch outcomes): Membridge
-- changes an agent's status only when it calls the agent itself, so a dead agent can be
-- listed 'online' for hours. For the same reason a push worker (it has a url) that was
-- never probed is 'unknown', not leasable, until the probe that follows in the same job.
WITH incoming AS (
    SELECT *
      FROM jsonb_to_recordset(CAST(:agents AS jsonb))
           AS a(id text, url text, status text, capabilities jsonb, ip_addrs jsonb,
                obs_count integer, db_sha text, last_heartbeat bigint)
), updated AS (
    UPDATE workers w
       SET url = COALESCE(i.url, w.url),
           approved = w.approved OR i.url IS NOT NULL,
           status = CASE WHEN COALESCE(w.evidence_at, 0) >= :evidence_since OR w.status = 'error' THEN w.status
                         WHEN COALESCE(i.url, w.url) IS NOT NULL AND w.evidence_at IS NULL THEN 'unknown'
                         ELSE i.status END,
           capabilities = COALESCE(i.capabilities, w.capabilities),
           ip_addrs = COALESCE(i.ip_addrs, w.ip_addrs),
           obs_count = COALESCE(i.obs_count, w.obs_count),
           db_sha = COALESCE(i.db_sha, w.db_sha),
           last_heartbeat = GREATEST(i.last_heartbeat, w.evidence_at)
      FROM incoming i
     WHERE w.id = i.id
    RETURNING w.id
), inserted AS (
    INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs,
                         obs_count, db_sha, registered_at)
    -- A new name for an agent the runtime already knows (same url) takes that agent's own
    -- capabilities, not the defaults: the address's capacity is the smallest of its names'.
    SELECT i.id, i.id, i.url, CASE WHEN i.url IS NOT NULL THEN 'unknown' ELSE i.status END,
           COALESCE(i.capabilities,
                    (SELECT known.capabilities FROM workers known
                      WHERE known.address = rtrim(lower(i.url), '/')
                      ORDER BY known.registered_at, known.id LIMIT 1),
                    CAST(:default_capabilities AS jsonb)),
           i.last_heartbeat, COALESCE(i.ip_addrs, '[]'::jsonb), COALESCE(i.obs_count, 0), i.db_sha, :now
      FROM incoming i
     WHERE i.id NOT IN (SELECT id FROM updated)
       AND i.id NOT IN (SELECT id FROM removed_workers)  -- removed by an operator: see delete_worker
    ON CONFLICT (id) DO NOTHING  -- registered by hand meanwhile: the next sync updates it
    RETURNING id
)
SELECT (SELECT count(*) FROM updated) AS updated, (SELECT count(*) FROM inserted) AS inserted;

-- name: offline_stale_workers
-- Online workers that upstream no longer lists and that gave no sign of life of their
-- own for a while.
UPDATE workers SET status = 'offline'
 WHERE status = 'online'
   AND id <> ALL(CAST(:seen_ids AS text[]))
   AND COALESCE(last_heartbeat, 0) < :stale_before
   AND COALESCE(evidence_at, 0) < :evidence_since
RETURNING id;

-- name: take_workers_out
-- Workers found dead by the runtime's own evidence (a failed probe of their url, a
-- refused dispatch) leave the rotation at once, and their tasks go back to the queue now,
-- not after the lease TTL. A task whose run never started ('leased': the agent never
-- took it) gets back the attempt it was charged; a started one keeps it, and is 'dead'
-- once its attempts are spent, as in the sweep. Without :requeue_started (the agent
-- answered, so it lives: it refused one task) only tasks that never started are
-- requeued, and the runs it has started go on. With :claude_cli_missing (it answered
-- that it cannot run anything) the worker stays online but is not leasable (claude_cli
-- false) until it registers again. :out_status is 'offline' (found dead: an answer to a
-- probe brings it back) or 'error' (it takes tasks and never answers while its /health
-- says ok: out until it registers again). Each row is changed under its precondition
-- (lease active, task still on that lease), so a racing completion or heartbeat either
-- wins or finds the task requeued. A task that dies here gets a result saying why.
WITH ended AS (
    UPDATE leases l
       SET status = CASE WHEN t.status = 'leased' THEN 'released' ELSE 'failed' END
      FROM llm_tasks t
     WHERE l.worker_id = ANY(CAST(:worker_ids AS text[])) AND l.status = 'active'
       AND t.id = l.task_id AND t.lease_id = l.id
       AND (:requeue_started OR t.status = 'leased')
    RETURNING l.id, l.task_id, l.worker_id
), requeued AS (
    UPDATE llm_tasks t
       SET status = CASE WHEN t.status = 'leased' OR t.attempts < t.max_attempts THEN 'queued' ELSE 'dead' END,
           attempts = CASE WHEN t.status = 'leased' THEN GREATEST(t.attempts - 1, 0) ELSE t.attempts END,
           lease_id = NULL, worker_id = NULL, updated_at = :now
      FROM ended e
     WHERE t.id = e.task_id AND t.lease_id = e.id AND t.status IN ('leased', 'running')
    RETURNING t.id, t.status, e.id AS lease_id, e.worker_id
), dead_tasks AS (
    SELECT id, worker_id,
           'dead: its last attempt was on worker ' || worker_id || ', taken out of rotation (' || :reason || ')' AS reason
      FROM requeued WHERE status = 'dead'
), died AS (
    -- include: dead_task_result
), before AS (
    SELECT id, status FROM workers WHERE id = ANY(CAST(:worker_ids AS text[]))
), taken_out AS (
    UPDATE workers w
       SET status = CASE WHEN :claude_cli_missing THEN w.status ELSE :out_status END,
           capabilities = CASE WHEN :claude_cli_missing
                               THEN jsonb_set(w.capabilities, '{claude_cli}', 'false'::jsonb)
                               ELSE w.capabilities END,
           evidence_at = :now
     WHERE w.id = ANY(CAST(:worker_ids AS text[]))
    RETURNING w.id
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT gen_random_uuid()::text, :now, 'worker_out_of_rotation', 'worker', o.id, :actor,
           jsonb_build_object('reason', :reason,
                              'requeued', (SELECT COALESCE(jsonb_agg(r.id), '[]'::jsonb)
                                             FROM requeued r WHERE r.worker_id = o.id))
      FROM taken_out o JOIN before b ON b.id = o.id
     -- Once per going out, not every round that finds it still out; not at all when the
     -- worker is being removed (its worker_removed entry says so).
     WHERE CAST(:audit_out AS boolean)
       AND (b.status <> :out_status OR :claude_cli_missing OR EXISTS (SELECT 1 FROM requeued r WHERE r.worker_id = o.id))
), ended_notices AS (
    -- The processes delivering to these leases drop their connections at once
    -- (bloom/agents/dispatch.py): a hung agent's delivery is not kept open for its run's
    -- whole timeout. At most 150 lease ids a notification (its payload's limit is 8000 bytes).
    SELECT pg_notify('bloom_leases_ended', string_agg(id, ',')) AS sent
      FROM (SELECT id, (row_number() OVER ()) / 150 AS chunk FROM ended) numbered
     GROUP BY chunk
)
SELECT (SELECT count(*) FROM taken_out) AS workers,
       (SELECT count(*) FROM requeued WHERE status = 'queued') AS requeued,
       (SELECT count(*) FROM requeued WHERE status = 'dead') AS dead,
       (SELECT count(*) FROM ended_notices) AS ended_notices,
       CASE WHEN EXISTS (SELECT 1 FROM requeued WHERE status = 'queued')
            THEN pg_notify('bloom_task_queued', '') IS NULL END AS notified;

-- name: approve_worker
-- An operator vouches for a worker (POST /workers/<id>/approve): it may be sent tasks,
-- probes and the agent key from now on.
WITH approved AS (
    UPDATE workers SET approved = true WHERE id = :worker_id RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'worker_approved', 'worker', id, :actor, jsonb_build_object('url', url)
      FROM approved
)
SELECT a.*,
       (SELECT count(*) FROM leases l WHERE l.worker_id = a.id AND l.status = 'active') AS active_leases
  FROM approved a;
