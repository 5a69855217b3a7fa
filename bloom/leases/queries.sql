-- Leases and claims: grant, renew, complete, expire (bloom/leases/service.py).
-- Conventions: bloom/sql.py.

-- fragment: address_load
-- The load of the agent a worker stands for (its address: README, "One agent, one
-- capacity"): the active leases of all its names, the worker's own among them, and the
-- capacity, the smallest max_concurrency any name declares. No row in the including
-- statement's `worker` CTE: no capacity (max_concurrency null, so nothing is granted).
SELECT count(l.id) AS active_leases,
       count(l.id) FILTER (WHERE sibling.id = worker.id) AS own_active_leases,
       min(COALESCE((sibling.capabilities ->> 'max_concurrency')::int, 1)) AS max_concurrency
  FROM worker
  JOIN workers sibling ON sibling.address = worker.address
  LEFT JOIN leases l ON l.worker_id = sibling.id AND l.status = 'active'

-- fragment: key_cap
-- `cap.key_cap`: the cap on running tasks of the task `t`'s fairness key (README, "Fair
-- shares"): its policy's max_running_per_key, else BLOOM_MAX_RUNNING_PER_KEY; null: no cap.
CROSS JOIN LATERAL (
      SELECT COALESCE(CAST(t.policy ->> 'max_running_per_key' AS integer),
                      CAST(:max_running_per_key AS integer)) AS key_cap
) cap

-- fragment: key_running
-- The running tasks (active leases) of the task `t`'s fairness key.
(SELECT count(*) FROM leases kl WHERE kl.fairness_key = t.fairness_key AND kl.status = 'active')

-- fragment: below_key_cap
-- The task `t` (joined with key_cap) may run now: its key has no cap, or is below it.
(cap.key_cap IS NULL OR
 -- include: key_running
 < cap.key_cap)

-- fragment: dead_task_result
-- A task that dies says why (GET /llm-tasks/<id> shows it as its result). The including
-- statement names them in a CTE `dead_tasks (id, worker_id, reason)`.
INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at)
SELECT gen_random_uuid()::text, d.id, d.worker_id, NULL, 'error', NULL, d.reason, '{}'::jsonb, :now
  FROM dead_tasks d

-- name: lease_task (prepared)
-- A whole lease in one round trip: four statements in one query, which PostgreSQL runs
-- as one transaction (no BEGIN/COMMIT needed), each in its own snapshot. Statement 1
-- picks the worker that would take the task (the one asked for, or the best eligible
-- one: sticky context first, then most free capacity) and locks it. Statement 2 locks
-- the worker's agent address (its url; a worker without one is its own address): one
-- agent registered under several names (its own registration, a Membridge entry, a
-- rename) is one capacity, the smallest max_concurrency any of its names declares, and
-- every grant to any of those names waits here. Counts taken before the locks may be
-- stale, so statement 4 counts the address's active leases again in a new snapshot and
-- grants only below its capacity; the task moves only from 'queued' and only once due
-- (run_at, retry_at), so of two racing grants for one task one wins. The transaction
-- commits as soon as statement 4 is done: the locks never wait for a hop to the client.
-- Statement 1 hands its pick on in a setting local to the transaction ('' when no worker
-- was eligible). Statement 4 also says why nothing was granted, if nothing was: the
-- task's status and due time and the worker's row as its snapshot saw them.
-- A dispatch (:push_only) considers only workers with a url, and without :ttl_seconds
-- its lease lasts the task's policy.timeout_sec + 60 s, so a slow live run is not swept.
-- It also leaves out :full_addresses, the agents holding their fair share of the
-- dispatching process's delivery slots (bloom/agents/delivery_slots.py; empty for a lease),
-- and agents ejected for failing runs (bloom/agents/outliers.py). A retry goes to another
-- worker than the one its last result came from, when one is eligible.
-- A task whose key has a cap (README, "Fair shares") is locked, and then its key, before
-- statement 4 counts the key's running tasks in a new snapshot: of racing grants for
-- one key, only those below the cap succeed. Keys are locked last, everywhere (here and
-- in claim_task), in one order: whoever holds a key's lock waits for nothing but the
-- locks of keys after it, so none deadlocks.
SELECT set_config('bloom.lease_picked_worker', COALESCE(picked.id, ''), true)
  FROM (SELECT CAST(:task_id AS text) AS id) wanted
  LEFT JOIN llm_tasks t ON t.id = wanted.id
  LEFT JOIN LATERAL (
        SELECT r.worker_id FROM llm_results r
         WHERE r.task_id = t.id AND t.attempts > 0
         ORDER BY r.completed_at DESC LIMIT 1
  ) last_run ON true
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
                          AND w.approved
                          AND load.active_leases < load.max_concurrency
                          AND (NOT :push_only OR (w.url IS NOT NULL AND w.ejected_until <= :now))
                          AND w.address <> ALL(:full_addresses)
                     ELSE w.id = :worker_id END)
         ORDER BY w.id IS NOT DISTINCT FROM last_run.worker_id, load.holds_context DESC,
                  load.max_concurrency - load.active_leases DESC, w.id
         LIMIT 1
           FOR UPDATE OF w
  ) picked ON true;
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:agent:' || address))
  FROM workers WHERE id = NULLIF(current_setting('bloom.lease_picked_worker'), '');
WITH capped AS MATERIALIZED (
    SELECT t.fairness_key
      FROM llm_tasks t
      -- include: key_cap
     WHERE t.id = :task_id AND t.status = 'queued' AND cap.key_cap IS NOT NULL
       FOR UPDATE OF t
)
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:key'), hashtext(fairness_key)) FROM capped;
WITH picked AS (
    SELECT NULLIF(current_setting('bloom.lease_picked_worker'), '') AS worker_id
), worker AS (
    -- The picked worker, or else the one asked for (read only to say why it took nothing).
    SELECT w.* FROM workers w, picked
     WHERE w.id = COALESCE(picked.worker_id, CAST(:worker_id AS text))
), capacity AS (
    -- include: address_load
), key_load AS (
    -- Counted (under the key's lock) only for a task whose key has a cap.
    SELECT cap.key_cap AS cap,
           CASE WHEN cap.key_cap IS NULL THEN 0 ELSE
           -- include: key_running
           END AS running
      FROM llm_tasks t
      -- include: key_cap
     WHERE t.id = :task_id
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
       AND worker.approved
       AND (NOT :push_only OR worker.url IS NOT NULL)
       AND worker.address <> ALL(:full_addresses)
       AND capacity.active_leases < capacity.max_concurrency
       AND (SELECT cap IS NULL OR running < cap FROM key_load)
       -- The dispatcher's grants carry the leadership epoch it holds: a leader that lost
       -- it (paused, cut off, and another took over) grants nothing (bloom/leadership.py).
       AND (CAST(:leader_epoch AS bigint) IS NULL
            OR EXISTS (SELECT 1 FROM leaderships
                        WHERE name = 'dispatch' AND holder = :leader AND epoch = :leader_epoch
                          AND expires_at >= :now))
    RETURNING t.*
), lease AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id, dispatched, fenced, fairness_key)
    SELECT :lease_id, id, worker_id, :now, :now + ttl.seconds * 1000, ttl.seconds, 'active',
           :now, context_id, :push_only, :push_only, fairness_key
      FROM task
     CROSS JOIN LATERAL (
           SELECT COALESCE(:ttl_seconds, COALESCE((task.policy ->> 'timeout_sec')::int, :default_timeout_sec) + 60) AS seconds
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
       (SELECT address = ANY(:full_addresses) FROM worker) AS worker_full,
       (SELECT row_to_json(key_load) FROM key_load) AS key_load,
       (SELECT own_active_leases FROM capacity) + (SELECT count(*) FROM lease) AS active_leases;

-- name: claim_task (prepared)
-- A whole claim of up to :max_tasks tasks in one round trip: four statements in one query,
-- which PostgreSQL runs as one transaction, each in its own snapshot. Statement 1 locks
-- the worker row, so that concurrent claims of one worker count its leases one after the
-- other; statement 2 locks the worker's agent address (as in lease_task: every name of
-- one agent shares its capacity). Statement 3 runs in a new snapshot with both locked, so
-- its capacity count is exact: it takes no more tasks than the address has room for, the
-- next ones in the queue's order (priority, then turn: one key after another, README
-- "Fair shares"), passing over the tasks of keys at their cap; SKIP LOCKED: claimers
-- never wait on each other's tasks, nor get the same one. It locks the keys of the capped
-- tasks it took (in one order everywhere: no deadlock) and hands its picks on in a
-- setting local to the transaction. Statement 4, in a new snapshot with those keys
-- locked, counts each capped key's running tasks again, leaves the picks that would pass
-- a cap, and grants the others. A claim by an online worker is a sign of life: it notes
-- the worker's heartbeat. The i-th task granted (in queue order) gets the i-th of
-- :lease_ids and :audit_ids. The transaction commits as soon as statement 4 is done; it
-- also says why nothing was claimed, if nothing was.
SELECT id FROM workers WHERE id = :worker_id FOR UPDATE;
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:agent:' || address)) FROM workers WHERE id = :worker_id;
WITH worker AS (
    SELECT w.* FROM workers w WHERE w.id = :worker_id
), address AS (
    -- include: address_load
), room AS (
    -- No worker, or one not online or without claude_cli: no room.
    SELECT COALESCE(max(GREATEST(0, LEAST(:max_tasks, address.max_concurrency - address.active_leases))), 0) AS tasks
      FROM worker, address
     WHERE worker.status = 'online'
       AND COALESCE((worker.capabilities ->> 'claude_cli')::boolean, true)
       AND worker.approved
), next_tasks AS MATERIALIZED (
    SELECT t.id, t.priority, t.fair_rank, t.created_at, t.fairness_key, cap.key_cap
      FROM llm_tasks t
      -- include: key_cap
     WHERE t.status = 'queued'
       AND COALESCE(t.run_at, 0) <= :now AND COALESCE(t.retry_at, 0) <= :now
       AND (CAST(:agent_slugs AS text[]) IS NULL OR t.agent_slug = ANY(CAST(:agent_slugs AS text[])))
       AND (SELECT tasks FROM room) > 0
       AND
       -- include: below_key_cap
     ORDER BY t.priority DESC, t.fair_rank, t.created_at, t.id
     LIMIT (SELECT tasks FROM room)
       FOR UPDATE OF t SKIP LOCKED
), key_locks AS (
    SELECT count(pg_advisory_xact_lock(hashtext('bloom-runtime:key'), key_lock)) AS taken
      FROM (SELECT DISTINCT hashtext(fairness_key) AS key_lock FROM next_tasks WHERE key_cap IS NOT NULL
             ORDER BY key_lock OFFSET 0) capped_keys
)
SELECT set_config('bloom.claim_picked',
                  COALESCE((SELECT jsonb_agg(jsonb_build_object('id', id, 'fairness_key', fairness_key, 'key_cap', key_cap)
                                             ORDER BY priority DESC, fair_rank, created_at, id)
                              FROM next_tasks)::text, '[]'), true),
       (SELECT taken FROM key_locks);
WITH picked AS (
    SELECT p.id, p.fairness_key, p.key_cap, p.n
      FROM ROWS FROM (jsonb_to_recordset(CAST(current_setting('bloom.claim_picked') AS jsonb))
                      AS (id text, fairness_key text, key_cap integer)) WITH ORDINALITY
           AS p(id, fairness_key, key_cap, n)
), worker AS (
    SELECT w.* FROM workers w WHERE w.id = :worker_id
), address AS (
    -- include: address_load
), fit AS (
    UPDATE workers w
       SET last_heartbeat = :now, evidence_at = :now
      FROM worker
     WHERE w.id = worker.id
       AND worker.status = 'online'
       AND COALESCE((worker.capabilities ->> 'claude_cli')::boolean, true)
       AND worker.approved
), capped AS (
    SELECT t.id, t.n, t.key_cap,
           CASE WHEN t.key_cap IS NULL THEN 0 ELSE
           -- include: key_running
           END AS key_running,
           row_number() OVER (PARTITION BY t.fairness_key ORDER BY t.n) AS nth_of_key
      FROM picked t
), numbered AS (
    SELECT id, row_number() OVER (ORDER BY n) AS n
      FROM capped
     WHERE key_cap IS NULL OR key_running + nth_of_key <= key_cap
), task AS (
    UPDATE llm_tasks t
       SET status = 'leased', lease_id = (CAST(:lease_ids AS text[]))[n.n], worker_id = :worker_id,
           attempts = t.attempts + 1, updated_at = :now
      FROM numbered n
     WHERE t.id = n.id AND t.status = 'queued'
    RETURNING t.*, n.n AS position
), lease AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id, fenced, fairness_key)
    SELECT lease_id, id, :worker_id, :now, :now + :ttl_seconds * 1000, :ttl_seconds, 'active',
           :now, context_id, true, fairness_key
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
       -- Why nothing was claimed, if nothing was (not counted otherwise).
       (SELECT active_leases FROM address WHERE NOT EXISTS (SELECT 1 FROM task)) AS address_active_leases,
       (SELECT max_concurrency FROM address WHERE NOT EXISTS (SELECT 1 FROM task)) AS address_capacity;

-- name: claim_candidates
-- The tasks a claim would take next, in its order: after a claim failed for a data
-- reason, each is tried on its own to find the one that cannot be granted.
SELECT id FROM llm_tasks
 WHERE status = 'queued'
   AND COALESCE(run_at, 0) <= :now AND COALESCE(retry_at, 0) <= :now
   AND (CAST(:agent_slugs AS text[]) IS NULL OR agent_slug = ANY(CAST(:agent_slugs AS text[])))
 ORDER BY priority DESC, fair_rank, created_at, id
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

-- fragment: worker_alive
-- The worker's own sign of life: its evidence and heartbeat times now, and an
-- offline worker back online. Written at most every 5 s per worker, so that most calls
-- leave the worker row alone; locked after lease and task, as everywhere. A statement
-- that includes it names the worker in a CTE `alive_worker (worker_id)`.
UPDATE workers w
   SET evidence_at = :now, last_heartbeat = :now,
       status = CASE WHEN w.status = 'offline' THEN 'online' ELSE w.status END
  FROM alive_worker a
 WHERE w.id = a.worker_id
   AND (COALESCE(w.evidence_at, 0) < :now - 5000 OR w.status = 'offline')

-- name: heartbeat_lease (prepared)
-- Renews the task's current lease if it is active and not past expires_at, and marks
-- the task running. The lease row is locked before the task row (as in complete and
-- the sweep), and a lease released by a racing completion is not renewed. A fenced
-- lease (a dispatch's or a claim's) is renewed only by a heartbeat that names it.
WITH current AS (
    SELECT t.id AS task_id, t.status AS task_status, t.lease_id, t.worker_id,
           l.status AS lease_status, l.expires_at, COALESCE(l.fenced, false) AS fenced
      FROM llm_tasks t LEFT JOIN leases l ON l.id = t.lease_id
     WHERE t.id = :task_id
), renewed AS (
    UPDATE leases l
       SET expires_at = :now + l.ttl_seconds * 1000, last_heartbeat = :now
      FROM current c
     WHERE l.id = c.lease_id AND l.task_id = c.task_id
       AND c.task_status IN ('leased', 'running')
       AND l.status = 'active' AND l.expires_at >= :now
       AND ((CAST(:lease_id AS text) IS NULL AND NOT l.fenced) OR l.id = :lease_id)
       AND (CAST(:worker_id AS text) IS NULL OR l.worker_id = :worker_id)
    RETURNING l.*
), task AS (
    -- Only the first heartbeat changes the task: a running task's row (and its index
    -- entries: updated_at is indexed) is not written again on every renewal.
    UPDATE llm_tasks t
       SET status = 'running', updated_at = :now
      FROM renewed r
     WHERE t.id = r.task_id AND t.lease_id = r.id AND t.status = 'leased'
    RETURNING t.id
), alive_worker AS (
    SELECT worker_id FROM renewed
), alive AS (
    -- include: worker_alive
)
SELECT c.*, (SELECT row_to_json(renewed) FROM renewed) AS lease
  FROM current c;

-- name: heartbeat_worker (prepared)
-- One heartbeat for all of a worker's runs: renews the active leases of the worker that
-- it names (:lease_ids; none when it names none) and that are not past expires_at,
-- marks their leased tasks running, and says which of the named leases it has lost, and
-- why. A lease the worker does not name is not renewed: a heartbeat naming no lease is a
-- sign of life and nothing more (one sent for a dead worker keeps nothing alive), and one
-- granted by a claim
-- whose answer never reached the worker (its connection cut, the serving process killed)
-- runs out at its TTL and its task goes back to the queue, instead of being kept alive
-- for ever by a worker that does not know it holds it. Lock order as everywhere: leases,
-- tasks, worker.
WITH renewed AS (
    -- Only leases whose task is still on them (not cancelled, not moved on).
    UPDATE leases l
       SET expires_at = :now + l.ttl_seconds * 1000, last_heartbeat = :now
      FROM llm_tasks t
     WHERE l.worker_id = :worker_id AND l.status = 'active' AND l.expires_at >= :now
       AND l.id = ANY(:lease_ids)
       AND t.id = l.task_id AND t.lease_id = l.id AND t.status IN ('leased', 'running')
    RETURNING l.id, l.task_id, l.expires_at
), running AS (
    UPDATE llm_tasks t
       SET status = 'running', updated_at = :now
      FROM renewed r
     WHERE t.id = r.task_id AND t.lease_id = r.id AND t.status = 'leased'
), alive_worker AS (
    SELECT CAST(:worker_id AS text) AS worker_id
), alive AS (
    -- include: worker_alive
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

-- name: release_worker_leases
-- A pull worker gives back leases it will not run to the end: a grant that reached it
-- after it stopped taking work, or a run it ended when its grace period ran out. Each
-- named active lease of the worker ends 'released', and its task goes back to the queue
-- at once, with the attempt it was charged given back (the worker ended the run, not the
-- task's fault). Only while the task is still on that lease; lock order: leases, tasks.
WITH released AS (
    UPDATE leases l
       SET status = 'released'
      FROM llm_tasks t
     WHERE l.worker_id = :worker_id AND l.status = 'active' AND l.id = ANY(:lease_ids)
       AND t.id = l.task_id AND t.lease_id = l.id AND t.status IN ('leased', 'running')
    RETURNING l.id, l.task_id
), requeued AS (
    UPDATE llm_tasks t
       SET status = 'queued', attempts = GREATEST(t.attempts - 1, 0),
           lease_id = NULL, worker_id = NULL, updated_at = :now
      FROM released r
     WHERE t.id = r.task_id AND t.lease_id = r.id
    RETURNING t.id, r.id AS lease_id
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT gen_random_uuid()::text, :now, 'lease_given_back', 'task', id, :actor,
           jsonb_build_object('lease_id', lease_id, 'worker_id', :worker_id)
      FROM requeued
)
SELECT EXISTS (SELECT 1 FROM workers WHERE id = :worker_id) AS known,
       (SELECT COALESCE(json_agg(lease_id ORDER BY lease_id), '[]'::json) FROM requeued) AS released,
       CASE WHEN EXISTS (SELECT 1 FROM requeued) THEN pg_notify('bloom_task_queued', '') IS NULL END AS notified;

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
-- at most 1 h. Its result is kept all the same. A fenced lease (a dispatch's or a
-- claim's) is released only by a completion that names it.
WITH current AS (
    SELECT t.id AS task_id, t.status AS task_status, t.lease_id, t.worker_id,
           COALESCE((SELECT l.fenced FROM leases l WHERE l.id = t.lease_id), false) AS fenced
      FROM llm_tasks t
     WHERE t.id = :task_id
), released AS (
    UPDATE leases l
       SET status = 'released'
      FROM current c
     WHERE l.id = c.lease_id AND l.task_id = c.task_id
       AND c.task_status IN ('leased', 'running') AND l.status = 'active'
       AND ((CAST(:lease_id AS text) IS NULL AND NOT l.fenced) OR l.id = :lease_id)
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
           -- A retry takes a new turn, as a new task of its key would (next_turn).
           fair_rank = CASE WHEN v.failed AND v.retries THEN
                       -- include: next_turn
                       ELSE t.fair_rank END,
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
), alive_worker AS (
    SELECT worker_id FROM released
), alive AS (
    -- include: worker_alive
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
           lease_id = NULL, worker_id = NULL, updated_at = :now,
           -- Its run went silent: a new turn, as a new task of its key would take (next_turn).
           fair_rank = CASE WHEN t.attempts < t.max_attempts THEN
                       -- include: next_turn
                       ELSE t.fair_rank END
      FROM expired e
     WHERE t.id = e.task_id AND t.lease_id = e.id AND t.status IN ('leased', 'running')
    RETURNING t.id, t.status, e.id AS lease_id, e.worker_id
), dead_tasks AS (
    SELECT id, worker_id, 'dead: its last attempt''s lease expired on worker ' || worker_id || ' with no result' AS reason
      FROM recovered WHERE status = 'dead'
), died AS (
    -- include: dead_task_result
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

-- name: list_leases_overview
-- GET /leases with no limit, as the web client reads it (its Active Leases panel): every
-- active lease (at most the fleet's capacity, capped at :active_rows) and the newest
-- :recent_rows of the others, newest first.
SELECT * FROM (
    (SELECT * FROM leases WHERE status = 'active' ORDER BY started_at DESC, id DESC LIMIT :active_rows)
    UNION ALL
    (SELECT * FROM leases WHERE status <> 'active' ORDER BY started_at DESC, id DESC LIMIT :recent_rows)
) overview
 ORDER BY started_at DESC, id DESC;
