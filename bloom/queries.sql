-- Every SQL statement the service runs, each under a `-- name: <name>` header.
-- Parameters are :named. Times are epoch milliseconds passed in by the caller.
-- `(prepared)` marks a hot path, prepared once per connection (see bloom/sql.py). Its
-- result is json or named columns, never `*`: a prepared statement whose result columns
-- changed (a column added by an upgrade) would fail until its connection is replaced.
-- Each state change is one statement whose precondition sits in its WHERE clause,
-- so two racing requests cannot both win.

-- name: apply_schema_lock
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:schema'));

-- name: ping
SELECT 1;

-- Workers -------------------------------------------------------------------

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
WITH upserted AS (
    INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs,
                         obs_count, db_sha, registered_at, agent_version, os_info, install_method,
                         evidence_at)
    VALUES (:worker_id, :worker_id, :url, :status,
            COALESCE(CAST(:capabilities AS jsonb), CAST(:default_capabilities AS jsonb)), :now,
            COALESCE(CAST(:ip_addrs AS jsonb), '[]'::jsonb), 0, NULL, :now,
            :agent_version, CAST(:os_info AS jsonb), :install_method, :now)
    ON CONFLICT (id) DO UPDATE
       SET url = COALESCE(EXCLUDED.url, workers.url),
           status = EXCLUDED.status,
           capabilities = COALESCE(CAST(:capabilities AS jsonb), workers.capabilities),
           ip_addrs = COALESCE(CAST(:ip_addrs AS jsonb), workers.ip_addrs),
           last_heartbeat = EXCLUDED.last_heartbeat,
           agent_version = COALESCE(EXCLUDED.agent_version, workers.agent_version),
           os_info = COALESCE(EXCLUDED.os_info, workers.os_info),
           install_method = COALESCE(EXCLUDED.install_method, workers.install_method),
           evidence_at = EXCLUDED.evidence_at
     -- Who may point an existing worker at another agent: an operator (:may_move), or
     -- Membridge through the sync. Anyone else's re-registration keeps the url it has.
     WHERE CAST(:may_move AS boolean) OR EXCLUDED.url IS NULL
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

-- Tasks ---------------------------------------------------------------------

-- name: create_task (prepared)
-- With an Idempotency-Key already used, inserts nothing (the caller then reads the
-- earlier task in a new snapshot: this one cannot see a racing insert's row).
WITH created AS (
    INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                           status, created_at, updated_at, lease_id, worker_id, attempts, max_attempts,
                           priority, idempotency_key, idempotency_fingerprint, run_at)
    VALUES (:task_id, :context_id, :agent_slug, :prompt, CAST(:context_hints AS jsonb),
            CAST(:policy AS jsonb), :desired_format, 'queued', :now, :now, NULL, NULL, 0, :max_attempts,
            :priority, :idempotency_key, :idempotency_fingerprint, :run_at)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'task_created', 'task', id, :actor,
           jsonb_build_object('context_id', context_id, 'agent_slug', agent_slug)
      FROM created
)
-- The payload is the task's agent_slug: each process wakes one waiting claim that would take it.
SELECT row_to_json(created) AS task, pg_notify('bloom_task_queued', agent_slug) IS NULL AS notified FROM created;

-- name: create_tasks
-- A batch in one statement, all or nothing. Items whose Idempotency key was used before
-- are not inserted (the earlier task answers for them); if any of those earlier tasks was
-- created by a different request, nothing is inserted (the caller answers 422). One
-- NOTIFY with an empty payload wakes every waiting claim: there may be work for all.
WITH incoming AS (
    SELECT *
      FROM jsonb_to_recordset(CAST(:tasks AS jsonb))
           AS i(position integer, id text, context_id text, agent_slug text, prompt text, context_hints jsonb,
                policy jsonb, desired_format text, max_attempts integer, priority integer, run_at bigint,
                idempotency_key text, idempotency_fingerprint text)
), earlier AS (
    SELECT t.*, i.position, i.idempotency_fingerprint AS wanted_fingerprint
      FROM llm_tasks t JOIN incoming i ON t.idempotency_key = i.idempotency_key
), mismatch AS (
    SELECT position FROM earlier WHERE idempotency_fingerprint IS DISTINCT FROM wanted_fingerprint
), created AS (
    INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                           status, created_at, updated_at, lease_id, worker_id, attempts, max_attempts,
                           priority, idempotency_key, idempotency_fingerprint, run_at)
    SELECT i.id, i.context_id, i.agent_slug, i.prompt, i.context_hints, i.policy, i.desired_format,
           'queued', :now, :now, NULL, NULL, 0, i.max_attempts, i.priority, i.idempotency_key,
           i.idempotency_fingerprint, i.run_at
      FROM incoming i
     WHERE NOT EXISTS (SELECT 1 FROM mismatch)
       AND NOT EXISTS (SELECT 1 FROM earlier e WHERE e.position = i.position)
     ORDER BY i.position
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT gen_random_uuid()::text, :now, 'task_created', 'task', id, :actor,
           jsonb_build_object('context_id', context_id, 'agent_slug', agent_slug, 'batch', true)
      FROM created
), notified AS (
    SELECT pg_notify('bloom_task_queued', '') FROM (SELECT 1 FROM created LIMIT 1) any_created
)
SELECT (SELECT COALESCE(json_agg(row_to_json(created)), '[]'::json) FROM created) AS created,
       (SELECT COALESCE(json_agg(row_to_json(earlier)), '[]'::json) FROM earlier) AS earlier,
       (SELECT count(*) FROM mismatch) AS mismatched,
       (SELECT count(*) FROM notified) AS notified;

-- name: get_task_by_idempotency_key
SELECT * FROM llm_tasks WHERE idempotency_key = :idempotency_key;

-- name: list_tasks
SELECT * FROM llm_tasks
 WHERE (CAST(:status AS text) IS NULL OR status = :status)
 ORDER BY created_at DESC, id DESC
 LIMIT :limit OFFSET :offset;

-- name: get_task
SELECT * FROM llm_tasks WHERE id = :task_id;

-- name: get_task_with_result
-- A task and its latest result (null before any), for GET /llm-tasks/<id>.
SELECT t.*,
       (SELECT json_build_object('status', r.status, 'output', r.output, 'error_message', r.error_message,
                                 'metrics', r.metrics, 'completed_at', r.completed_at)
          FROM llm_results r WHERE r.task_id = t.id
         ORDER BY r.completed_at DESC, r.id DESC LIMIT 1) AS result
  FROM llm_tasks t
 WHERE t.id = :task_id;

-- name: requeue_task
WITH requeued AS (
    UPDATE llm_tasks
       SET status = 'queued', lease_id = NULL, worker_id = NULL, attempts = 0, retry_at = NULL, updated_at = :now
     WHERE id = :task_id AND status IN ('failed', 'dead')
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'task_requeued', 'task', id, :actor, '{}'::jsonb FROM requeued
)
SELECT requeued.*, pg_notify('bloom_task_queued', left(agent_slug, 1000)) IS NULL AS notified FROM requeued;

-- name: cancel_task
-- A queued, leased or running task becomes 'cancelled' and its active lease is released,
-- so the worker's next heartbeat is refused and a late completion stores nothing. Locks
-- in the order every statement takes them, lease then task (no deadlock with heartbeat,
-- complete or a worker heartbeat): statement 1 locks the lease the task holds now (if
-- any), statement 2, in a new snapshot, locks the task. A claim or lease that gave the
-- task a new lease between the two is seen there: nothing changes, the row says
-- `retry`, and the caller runs the script again (which then locks that lease). So a
-- cancelled task never keeps an active lease, whoever races it.
SELECT set_config('bloom.cancel_locked_lease',
                  COALESCE((SELECT l.id FROM llm_tasks t JOIN leases l ON l.id = t.lease_id
                             WHERE t.id = :task_id
                               FOR UPDATE OF l), ''), true);
WITH current AS (
    -- The task as it is once locked (a racing grant's committed version, if there was one).
    SELECT t.id, t.status, t.lease_id FROM llm_tasks t WHERE t.id = :task_id FOR UPDATE OF t
), settled AS (
    -- Still on the lease statement 1 locked (or on none): safe to change.
    SELECT c.* FROM current c
     WHERE c.lease_id IS NOT DISTINCT FROM NULLIF(current_setting('bloom.cancel_locked_lease'), '')
), ended AS (
    UPDATE leases l SET status = 'released'
      FROM settled c
     WHERE l.id = c.lease_id AND l.task_id = c.id AND l.status = 'active'
    RETURNING l.id
), cancelled AS (
    UPDATE llm_tasks t
       SET status = 'cancelled', retry_at = NULL, updated_at = :now
      FROM settled c
     WHERE t.id = c.id AND c.status IN ('queued', 'leased', 'running')
    RETURNING t.*
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'task_cancelled', 'task', id, :actor,
           jsonb_build_object('lease_id', lease_id, 'worker_id', worker_id) FROM cancelled
)
SELECT (SELECT row_to_json(cancelled) FROM cancelled) AS task, (SELECT status FROM current) AS status,
       EXISTS (SELECT 1 FROM current) AND NOT EXISTS (SELECT 1 FROM settled) AS retry;

-- Leases --------------------------------------------------------------------

-- name: lease_task (prepared)
-- A whole lease in one round trip: three statements in one query, which PostgreSQL runs
-- as one transaction (no BEGIN/COMMIT needed), each in its own snapshot. Statement 1
-- picks the worker that would take the task (the one asked for, or the best eligible
-- one: sticky context first, then most free capacity) and locks it. Statement 2 locks
-- the worker's agent address (its url; a worker without one is its own address): one
-- agent registered under several names (its own registration, a Membridge entry, a
-- rename) is one capacity, the smallest max_concurrency any of its names declares, and
-- every grant to any of those names waits here. Counts taken before the locks may be
-- stale, so statement 3 counts the address's active leases again in a new snapshot and
-- grants only below its capacity; the task moves only from 'queued' and only once due
-- (run_at, retry_at), so of two racing grants for one task one wins. The transaction
-- commits as soon as statement 3 is done: the locks never wait for a hop to the client.
-- Statement 1 hands its pick on in a setting local to the transaction ('' when no worker
-- was eligible). Statement 3 also says why nothing was granted, if nothing was: the
-- task's status and due time and the worker's row as its snapshot saw them.
-- A dispatch (:push_only) considers only workers with a url, and without :ttl_seconds
-- its lease lasts the task's policy.timeout_sec + 60 s, so a slow live run is not swept.
SELECT set_config('bloom.lease_picked_worker', COALESCE(picked.id, ''), true)
  FROM (SELECT CAST(:task_id AS text) AS id) wanted
  LEFT JOIN llm_tasks t ON t.id = wanted.id
  LEFT JOIN LATERAL (
        SELECT w.id
          FROM workers w
          CROSS JOIN LATERAL (
                SELECT count(l.id) AS active_leases,
                       COALESCE(bool_or(l.context_id = t.context_id), false) AS holds_context,
                       min(COALESCE((sibling.capabilities ->> 'max_concurrency')::int, 1)) AS max_concurrency
                  FROM workers sibling
                  LEFT JOIN leases l ON l.worker_id = sibling.id AND l.status = 'active'
                 WHERE sibling.address = w.address) load
         WHERE t.status = 'queued'
           AND COALESCE(t.run_at, 0) <= :now AND COALESCE(t.retry_at, 0) <= :now
           AND (CASE WHEN CAST(:worker_id AS text) IS NULL
                     THEN w.status = 'online'
                          AND COALESCE((w.capabilities ->> 'claude_cli')::boolean, true)
                          AND load.active_leases < load.max_concurrency
                          AND (NOT :push_only OR w.url IS NOT NULL)
                     ELSE w.id = :worker_id END)
         ORDER BY load.holds_context DESC, load.max_concurrency - load.active_leases DESC, w.id
         LIMIT 1
           FOR UPDATE OF w
  ) picked ON true;
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:agent:' || address))
  FROM workers WHERE id = NULLIF(current_setting('bloom.lease_picked_worker'), '');
WITH picked AS (
    SELECT NULLIF(current_setting('bloom.lease_picked_worker'), '') AS worker_id
), worker AS (
    -- The picked worker, or else the one asked for (read only to say why it took nothing).
    SELECT w.* FROM workers w, picked
     WHERE w.id = COALESCE(picked.worker_id, CAST(:worker_id AS text))
), capacity AS (
    -- The agent address's active leases and capacity; no row in worker: no capacity.
    SELECT count(l.id) AS active_leases,
           count(l.id) FILTER (WHERE sibling.id = worker.id) AS own_active_leases,
           min(COALESCE((sibling.capabilities ->> 'max_concurrency')::int, 1)) AS max_concurrency
      FROM worker
      JOIN workers sibling ON sibling.address = worker.address
      LEFT JOIN leases l ON l.worker_id = sibling.id AND l.status = 'active'
), task AS (
    UPDATE llm_tasks t
       SET status = 'leased', lease_id = :lease_id, worker_id = worker.id,
           attempts = t.attempts + 1, updated_at = :now
      FROM worker, picked, capacity
     WHERE t.id = :task_id AND t.status = 'queued'
       AND COALESCE(t.run_at, 0) <= :now AND COALESCE(t.retry_at, 0) <= :now
       AND worker.id = picked.worker_id
       AND worker.status = 'online'
       AND COALESCE((worker.capabilities ->> 'claude_cli')::boolean, true)
       AND (NOT :push_only OR worker.url IS NOT NULL)
       AND capacity.active_leases < capacity.max_concurrency
    RETURNING t.*
), lease AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id, dispatched)
    SELECT :lease_id, id, worker_id, :now, :now + ttl.seconds * 1000, ttl.seconds, 'active',
           :now, context_id, :push_only
      FROM task
     CROSS JOIN LATERAL (
           SELECT COALESCE(:ttl_seconds, COALESCE((task.policy ->> 'timeout_sec')::int, 120) + 60) AS seconds
     ) ttl
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, CASE WHEN :push_only THEN 'task_dispatched' ELSE 'task_leased' END,
           'task', task_id, :actor,
           jsonb_build_object('lease_id', id, 'worker_id', worker_id, 'ttl_seconds', ttl_seconds)
      FROM lease
)
SELECT (SELECT row_to_json(lease) FROM lease) AS lease,
       (SELECT row_to_json(task) FROM task) AS task,
       (SELECT status FROM llm_tasks WHERE id = :task_id) AS task_status,
       (SELECT GREATEST(COALESCE(run_at, 0), COALESCE(retry_at, 0)) FROM llm_tasks WHERE id = :task_id)
           AS not_before,
       (SELECT worker_id FROM picked) IS NOT NULL AS worker_picked,
       (SELECT row_to_json(worker) FROM worker) AS worker,
       (SELECT own_active_leases FROM capacity) + (SELECT count(*) FROM lease) AS active_leases;

-- name: claim_task (prepared)
-- A whole claim of up to :max_tasks tasks in one round trip: two statements in one query,
-- which PostgreSQL runs as one transaction, each in its own snapshot. Statement 1 locks
-- the worker row, so that concurrent claims of one worker count its leases one after the
-- other; statement 2 runs in a new snapshot with the row locked, so its capacity count is
-- exact, and it takes no more tasks than the worker has room for. A claim by an online
-- worker is a sign of life: it notes the worker's heartbeat. SKIP LOCKED: claimers never
-- wait on each other's tasks, nor get the same one. The i-th task taken (in queue order)
-- gets the i-th of :lease_ids and :audit_ids. The transaction commits as soon as
-- statement 3 is done. Statement 3 also says why nothing was claimed, if nothing was.
-- As in lease_task, statement 2 locks the worker's agent address, and the capacity is
-- that of the address: every name of one agent shares it.
SELECT id FROM workers WHERE id = :worker_id FOR UPDATE;
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:agent:' || address)) FROM workers WHERE id = :worker_id;
WITH worker AS (
    SELECT w.* FROM workers w WHERE w.id = :worker_id
), address AS (
    SELECT count(l.id) AS active_leases,
           count(l.id) FILTER (WHERE sibling.id = worker.id) AS own_active_leases,
           min(COALESCE((sibling.capabilities ->> 'max_concurrency')::int, 1)) AS max_concurrency
      FROM worker
      JOIN workers sibling ON sibling.address = worker.address
      LEFT JOIN leases l ON l.worker_id = sibling.id AND l.status = 'active'
), fit AS (
    UPDATE workers w
       SET last_heartbeat = :now, evidence_at = :now
      FROM worker, address
     WHERE w.id = worker.id
       AND worker.status = 'online'
       AND COALESCE((worker.capabilities ->> 'claude_cli')::boolean, true)
    RETURNING address.max_concurrency
), capacity AS (
    SELECT COALESCE((SELECT active_leases FROM address), 0) AS active_leases
), room AS (
    -- No row in fit (unknown worker, not online, no claude_cli) is no room: COALESCE,
    -- because LEAST and GREATEST ignore NULL and would read it as "no limit".
    SELECT GREATEST(0, LEAST(:max_tasks,
                             COALESCE((SELECT max_concurrency FROM fit), 0) - (SELECT active_leases FROM capacity)))
           AS tasks
), next_tasks AS (
    SELECT id, priority, created_at FROM llm_tasks
     WHERE status = 'queued'
       AND COALESCE(run_at, 0) <= :now AND COALESCE(retry_at, 0) <= :now
       AND (CAST(:agent_slugs AS text[]) IS NULL OR agent_slug = ANY(CAST(:agent_slugs AS text[])))
       AND (SELECT tasks FROM room) > 0
     ORDER BY priority DESC, created_at, id
     LIMIT (SELECT COALESCE(tasks, 0) FROM room)
       FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT id, row_number() OVER (ORDER BY priority DESC, created_at, id) AS n FROM next_tasks
), task AS (
    UPDATE llm_tasks t
       SET status = 'leased', lease_id = (CAST(:lease_ids AS text[]))[n.n], worker_id = :worker_id,
           attempts = t.attempts + 1, updated_at = :now
      FROM numbered n
     WHERE t.id = n.id
    RETURNING t.*, n.n AS position
), lease AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id)
    SELECT lease_id, id, :worker_id, :now, :now + :ttl_seconds * 1000, :ttl_seconds, 'active',
           :now, context_id
      FROM task
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT (CAST(:audit_ids AS text[]))[task.position], :now, 'task_leased', 'task', task.id, :actor,
           jsonb_build_object('lease_id', lease.id, 'worker_id', lease.worker_id,
                              'ttl_seconds', lease.ttl_seconds, 'claimed', true)
      FROM lease JOIN task ON task.id = lease.task_id
)
SELECT (SELECT jsonb_agg(to_jsonb(task) - 'position' ORDER BY task.position) FROM task) AS tasks,
       (SELECT jsonb_agg(to_jsonb(lease) ORDER BY task.position)
          FROM lease JOIN task ON task.id = lease.task_id) AS leases,
       (SELECT row_to_json(worker) FROM worker) AS worker,
       (SELECT active_leases FROM capacity) AS address_active_leases,
       (SELECT max_concurrency FROM address) AS address_capacity;

-- name: claim_candidates
-- The tasks a claim would take next, in its order: after a claim failed for a data
-- reason, each is tried on its own to find the one that cannot be granted.
SELECT id FROM llm_tasks
 WHERE status = 'queued'
   AND COALESCE(run_at, 0) <= :now AND COALESCE(retry_at, 0) <= :now
   AND (CAST(:agent_slugs AS text[]) IS NULL OR agent_slug = ANY(CAST(:agent_slugs AS text[])))
 ORDER BY priority DESC, created_at, id
 LIMIT :limit;

-- name: set_task_aside
-- A queued task that cannot be granted for a data reason (a value PostgreSQL cannot
-- index, written before lengths were checked or by another service) would stop every
-- claim that reaches it: it goes to 'dead', with the reason in its result and the audit
-- log, and the queue moves on.
WITH dead AS (
    UPDATE llm_tasks SET status = 'dead', lease_id = NULL, worker_id = NULL, updated_at = :now
     WHERE id = :task_id AND status = 'queued'
    RETURNING id
), result AS (
    INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message,
                             metrics, completed_at)
    SELECT :result_id, id, NULL, NULL, 'error', NULL, :reason, '{}'::jsonb, :now FROM dead
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'task_set_aside', 'task', id, :actor, jsonb_build_object('reason', :reason)
      FROM dead
)
SELECT count(*) AS set_aside FROM dead;

-- name: heartbeat_lease (prepared)
-- Renews the task's current lease if it is active and not past expires_at, and marks
-- the task running. The lease row is locked before the task row (as in complete and
-- the sweep), and a lease released by a racing completion is not renewed.
WITH current AS (
    SELECT t.id AS task_id, t.status AS task_status, t.lease_id, t.worker_id,
           l.status AS lease_status, l.expires_at
      FROM llm_tasks t LEFT JOIN leases l ON l.id = t.lease_id
     WHERE t.id = :task_id
), renewed AS (
    UPDATE leases l
       SET expires_at = :now + l.ttl_seconds * 1000, last_heartbeat = :now
      FROM current c
     WHERE l.id = c.lease_id AND l.task_id = c.task_id
       AND c.task_status IN ('leased', 'running')
       AND l.status = 'active' AND l.expires_at >= :now
       AND (CAST(:lease_id AS text) IS NULL OR l.id = :lease_id)
       AND (CAST(:worker_id AS text) IS NULL OR l.worker_id = :worker_id)
    RETURNING l.*
), task AS (
    UPDATE llm_tasks t
       SET status = 'running', updated_at = :now
      FROM renewed r
     WHERE t.id = r.task_id AND t.lease_id = r.id AND t.status IN ('leased', 'running')
    RETURNING t.id
), alive AS (
    -- The worker's own sign of life (SPEC §7), written at most every 5 s per worker so
    -- that most heartbeats leave the worker row alone. Locked after lease and task.
    UPDATE workers w
       SET evidence_at = :now, last_heartbeat = :now,
           status = CASE WHEN w.status = 'offline' THEN 'online' ELSE w.status END
      FROM renewed r
     WHERE w.id = r.worker_id
       AND (COALESCE(w.evidence_at, 0) < :now - 5000 OR w.status = 'offline')
)
SELECT c.*, (SELECT row_to_json(renewed) FROM renewed) AS lease
  FROM current c;

-- name: heartbeat_worker (prepared)
-- One heartbeat for all of a worker's runs: renews every active lease of the worker that
-- is not past expires_at, marks their leased tasks running, and says which of the leases
-- the caller named (:lease_ids) it has lost, and why. Lock order as everywhere: leases,
-- tasks, worker.
WITH renewed AS (
    -- Only leases whose task is still on them (not cancelled, not moved on).
    UPDATE leases l
       SET expires_at = :now + l.ttl_seconds * 1000, last_heartbeat = :now
      FROM llm_tasks t
     WHERE l.worker_id = :worker_id AND l.status = 'active' AND l.expires_at >= :now
       AND t.id = l.task_id AND t.lease_id = l.id AND t.status IN ('leased', 'running')
    RETURNING l.id, l.task_id, l.expires_at
), running AS (
    UPDATE llm_tasks t
       SET status = 'running', updated_at = :now
      FROM renewed r
     WHERE t.id = r.task_id AND t.lease_id = r.id AND t.status = 'leased'
), alive AS (
    UPDATE workers w
       SET evidence_at = :now, last_heartbeat = :now,
           status = CASE WHEN w.status = 'offline' THEN 'online' ELSE w.status END
     WHERE w.id = :worker_id
       AND (COALESCE(w.evidence_at, 0) < :now - 5000 OR w.status = 'offline')
), lost AS (
    SELECT named.id AS lease_id, l.task_id,
           CASE WHEN l.id IS NULL OR l.worker_id <> :worker_id THEN 'unknown'
                WHEN l.status = 'active' THEN 'expired'
                ELSE l.status END AS lease_status,
           t.status AS task_status
      FROM unnest(CAST(:lease_ids AS text[])) AS named(id)
      LEFT JOIN leases l ON l.id = named.id
      LEFT JOIN llm_tasks t ON t.id = l.task_id
     WHERE named.id NOT IN (SELECT id FROM renewed)
)
SELECT EXISTS (SELECT 1 FROM workers WHERE id = :worker_id) AS known,
       (SELECT COALESCE(json_agg(json_build_object('lease_id', id, 'task_id', task_id, 'expires_at', expires_at)
                                 ORDER BY id), '[]'::json) FROM renewed) AS renewed,
       (SELECT COALESCE(json_agg(json_build_object('lease_id', lease_id, 'task_id', task_id,
                                                   'lease_status', lease_status, 'task_status', task_status)
                                 ORDER BY lease_id), '[]'::json) FROM lost) AS lost;

-- name: lock_current_lease
-- Before an upload to the object store: holds the task's active lease (locked in the
-- same order as heartbeat and sweep) so no second completion uploads meanwhile.
SELECT t.status AS task_status, t.desired_format,
       (SELECT l.id FROM leases l WHERE l.id = t.lease_id AND l.status = 'active' FOR UPDATE) AS lease_id
  FROM llm_tasks t
 WHERE t.id = :task_id;

-- name: complete_task (prepared)
-- Releases the current lease, finishes the task and writes artifact, result and audit
-- entry in one statement: all of it happens, or none. A failed run (an error, or a
-- "success" whose output is not JSON for a task that asked for JSON) goes back to the
-- queue while it has attempts left, not before retry_at: 10 s × 2^(attempts - 1), ±25 %,
-- at most 1 h. Its result is kept all the same.
WITH current AS (
    SELECT t.id AS task_id, t.status AS task_status, t.lease_id, t.worker_id
      FROM llm_tasks t
     WHERE t.id = :task_id
), released AS (
    UPDATE leases l
       SET status = 'released'
      FROM current c
     WHERE l.id = c.lease_id AND l.task_id = c.task_id
       AND c.task_status IN ('leased', 'running') AND l.status = 'active'
       AND (CAST(:lease_id AS text) IS NULL OR l.id = :lease_id)
       AND (CAST(:worker_id AS text) IS NULL OR l.worker_id = :worker_id)
    RETURNING l.id, l.task_id, l.worker_id
), verdict AS (
    SELECT t.id AS task_id,
           (:result_status = 'error' OR (t.desired_format = 'json' AND NOT :output_is_json)) AS failed,
           (:result_status = 'success' AND t.desired_format = 'json' AND NOT :output_is_json) AS not_json,
           t.attempts < t.max_attempts AS retries
      FROM llm_tasks t JOIN released r ON r.task_id = t.id
), task AS (
    UPDATE llm_tasks t
       SET status = CASE WHEN NOT v.failed THEN 'completed' WHEN v.retries THEN 'queued' ELSE 'failed' END,
           lease_id = CASE WHEN v.failed AND v.retries THEN NULL ELSE t.lease_id END,
           worker_id = CASE WHEN v.failed AND v.retries THEN NULL ELSE t.worker_id END,
           retry_at = CASE WHEN v.failed AND v.retries
                           THEN :now + CAST(LEAST(10000 * power(2, GREATEST(t.attempts - 1, 0)), 3600000)
                                            * (0.75 + random() * 0.5) AS bigint)
                           ELSE NULL END,
           updated_at = :now
      FROM released r, verdict v
     WHERE t.id = r.task_id AND v.task_id = t.id AND t.lease_id = r.id AND t.status IN ('leased', 'running')
    RETURNING t.*
), artifact AS (
    INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url,
                                   entity_refs, tags, content)
    SELECT :artifact_id, task.id, r.id, :artifact_type, :now, true, :artifact_url,
           '[]'::jsonb, CAST(:artifact_tags AS jsonb), :artifact_content
      FROM task JOIN released r ON r.task_id = task.id
    RETURNING *
), result AS (
    INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message,
                             metrics, completed_at)
    SELECT :result_id, task.id, r.worker_id, :artifact_id,
           CASE WHEN v.failed THEN 'error' ELSE 'success' END,
           :output,
           CASE WHEN v.not_json THEN 'output is not valid JSON, and the task asked for desired_format json'
                ELSE :error_message END,
           CAST(:metrics AS jsonb), :now
      FROM task JOIN released r ON r.task_id = task.id JOIN verdict v ON v.task_id = task.id
    RETURNING *
), alive AS (
    -- As in heartbeat_lease: the worker's own sign of life, at most every 5 s.
    UPDATE workers w
       SET evidence_at = :now, last_heartbeat = :now,
           status = CASE WHEN w.status = 'offline' THEN 'online' ELSE w.status END
      FROM released r
     WHERE w.id = r.worker_id
       AND (COALESCE(w.evidence_at, 0) < :now - 5000 OR w.status = 'offline')
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'task_completed', 'task', task.id, :actor,
           jsonb_build_object('status', task.status, 'lease_id', r.id, 'worker_id', r.worker_id,
                              'artifact_id', :artifact_id, 'retry_at', task.retry_at)
      FROM task JOIN released r ON r.task_id = task.id
)
SELECT c.*,
       (SELECT row_to_json(task) FROM task) AS task,
       (SELECT row_to_json(artifact) FROM artifact) AS artifact,
       (SELECT row_to_json(result) FROM result) AS result
  FROM current c;

-- name: sweep_expired_leases
-- Expires every active lease past expires_at. Its task (leased or running) goes back
-- to the queue, or to 'dead' once its attempts are spent, but only while the expiring
-- lease is still the task's current lease.
WITH expired AS (
    UPDATE leases SET status = 'expired'
     WHERE status = 'active' AND expires_at < :now
    RETURNING id, task_id, worker_id
), recovered AS (
    UPDATE llm_tasks t
       SET status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'dead' END,
           lease_id = NULL, worker_id = NULL, updated_at = :now
      FROM expired e
     WHERE t.id = e.task_id AND t.lease_id = e.id AND t.status IN ('leased', 'running')
    RETURNING t.id, t.status, e.id AS lease_id, e.worker_id
), died AS (
    -- A task that dies says why (GET /llm-tasks/<id> shows it as its result).
    INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
                             completed_at)
    SELECT gen_random_uuid()::text, r.id, r.worker_id, NULL, 'error', NULL,
           'dead: its last attempt''s lease expired on worker ' || r.worker_id || ' with no result', '{}'::jsonb, :now
      FROM recovered r WHERE r.status = 'dead'
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT gen_random_uuid()::text, :now, 'lease_expired', 'task', id, :actor,
           jsonb_build_object('lease_id', lease_id, 'worker_id', worker_id, 'task_status', status)
      FROM recovered
)
SELECT counts.*,
       CASE WHEN counts.requeued > 0 THEN pg_notify('bloom_task_queued', '') IS NULL END AS notified
  FROM (SELECT (SELECT count(*) FROM expired) AS expired,
               (SELECT count(*) FROM recovered WHERE status = 'queued') AS requeued,
               (SELECT count(*) FROM recovered WHERE status = 'dead') AS dead) counts;

-- name: list_leases
SELECT * FROM leases
 WHERE (CAST(:status AS text) IS NULL OR status = :status)
 ORDER BY started_at DESC, id DESC
 LIMIT :limit OFFSET :offset;

-- Artifacts, audit, stats ---------------------------------------------------

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
-- active leases and workers are always counted exactly, over small index ranges.
WITH sizes AS (
    SELECT (SELECT reltuples FROM pg_class WHERE oid = 'llm_tasks'::regclass) AS tasks,
           (SELECT reltuples FROM pg_class WHERE oid = 'leases'::regclass) AS leases
), live AS (
    SELECT status, count(*) AS n FROM llm_tasks
     WHERE status IN ('queued', 'leased', 'running') GROUP BY status
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
       (SELECT tasks FROM sizes) >= :estimate_above AS estimated;

-- Retention (bloom/retention.py) -------------------------------------------------

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

-- Background jobs -----------------------------------------------------------

-- name: begin
BEGIN;

-- name: commit
COMMIT;

-- name: rollback
ROLLBACK;

-- name: try_job_lock
SELECT pg_try_advisory_lock(hashtext(:lock_name)) AS locked;

-- name: release_job_lock
SELECT pg_advisory_unlock(hashtext(:lock_name));

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

-- Runtime settings (Membridge config, connection test, shared sync status) -------

-- name: get_settings
SELECT key, value, updated_at FROM runtime_settings WHERE key = ANY(CAST(:keys AS text[]));

-- name: save_membridge_config
WITH saved AS (
    INSERT INTO runtime_settings (key, value, updated_at)
    VALUES ('membridge_server_url', :server_url, :now), ('admin_key', :admin_key, :now)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    RETURNING key
), audit AS (
    -- The key itself is never written to the audit log.
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    VALUES (:audit_id, :now, 'config_updated', 'config', 'membridge', :actor,
            jsonb_build_object('membridge_server_url', :server_url, 'admin_key_changed', true))
)
SELECT count(*) AS saved FROM saved;

-- name: save_connection_test
WITH saved AS (
    INSERT INTO runtime_settings (key, value, updated_at)
    VALUES ('connected', :connected_text, :now), ('last_test', CAST(:now AS text), :now)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    RETURNING key
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'connection_test', 'config', 'membridge', :actor,
           jsonb_build_object('membridge_server_url', :server_url, 'connected', true)
     WHERE :connected
)
SELECT count(*) AS saved FROM saved;

-- name: put_setting
INSERT INTO runtime_settings (key, value, updated_at)
VALUES (:key, :value, :now)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at;

-- Worker sync ---------------------------------------------------------------------

-- name: upsert_synced_workers
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

-- Liveness and dispatch (the runtime's own evidence of its push workers) -------------

-- name: push_workers
-- Workers the runtime pushes tasks to (they have a url), to probe.
SELECT id, url, address FROM workers WHERE url IS NOT NULL ORDER BY id;

-- name: mark_workers_alive
-- Push workers whose url answered a probe: online (still not leasable if they said
-- they have no Claude CLI: capabilities.claude_cli stays false until they register again).
-- A worker held out for taking tasks and never answering ('error') stays out: its
-- /health answered all along.
UPDATE workers
   SET status = 'online', evidence_at = :now, last_heartbeat = :now
 WHERE id = ANY(CAST(:worker_ids AS text[])) AND url IS NOT NULL AND status <> 'error'
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
), died AS (
    INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
                             completed_at)
    SELECT gen_random_uuid()::text, r.id, r.worker_id, NULL, 'error', NULL,
           'dead: its last attempt was on worker ' || r.worker_id || ', taken out of rotation (' || :reason || ')',
           '{}'::jsonb, :now
      FROM requeued r WHERE r.status = 'dead'
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
)
SELECT (SELECT count(*) FROM taken_out) AS workers,
       (SELECT count(*) FROM requeued WHERE status = 'queued') AS requeued,
       (SELECT count(*) FROM requeued WHERE status = 'dead') AS dead,
       CASE WHEN EXISTS (SELECT 1 FROM requeued WHERE status = 'queued')
            THEN pg_notify('bloom_task_queued', '') IS NULL END AS notified;

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

