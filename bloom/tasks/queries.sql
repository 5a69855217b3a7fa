-- Tasks: create, read, requeue, cancel (bloom/tasks/service.py).
-- Conventions: bloom/sql.py.

-- fragment: next_turn
-- Where a task `t` goes in the queue of its priority (schema.sql, fair_rank), when it is
-- created and when it goes back to the queue after its run failed or its lease expired:
-- after its key's queued tasks, and after the turn at the head of the queue (its first
-- due task's). A key that is new, or whose tasks were all taken, takes turns with the
-- keys waiting from the next turn on: neither ahead of them (a stream of newcomers would
-- starve a key with a backlog) nor behind their whole backlog. Two index probes.
GREATEST(
    COALESCE((SELECT q.fair_rank + 1 FROM llm_tasks q
               WHERE q.status = 'queued' AND q.priority = t.priority
                 AND COALESCE(q.run_at, 0) <= :now AND COALESCE(q.retry_at, 0) <= :now
               ORDER BY q.fair_rank LIMIT 1), 0),
    COALESCE((SELECT max(q.fair_rank) + 1 FROM llm_tasks q
               WHERE q.status = 'queued' AND q.fairness_key = t.fairness_key AND q.priority = t.priority), 0))

-- fragment: first_turns
-- The first turn of each key a create names (next_turn), in a CTE
-- `newcomers (fairness_key, priority)` of the including statement.
SELECT t.fairness_key, t.priority,
       -- include: next_turn
       AS first_turn
  FROM newcomers t

-- name: create_task (prepared)
-- With an Idempotency-Key already used, inserts nothing (the caller then reads the
-- earlier task in a new snapshot: this one cannot see a racing insert's row). No NOTIFY
-- here: a committing transaction that notified takes a cluster-wide lock, one at a time,
-- so every create would wait for every other; the caller announces the task after its
-- commit instead (bloom/queue_events.py, QueuedAnnouncer).
WITH newcomers AS (
    SELECT COALESCE(CAST(:concurrency_key AS text), :context_id) AS fairness_key, :priority AS priority
), turns AS (
    -- include: first_turns
), created AS (
    INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                           status, created_at, updated_at, lease_id, worker_id, attempts, max_attempts,
                           priority, idempotency_key, idempotency_fingerprint, run_at, concurrency_key,
                           fair_rank)
    SELECT :task_id, :context_id, :agent_slug, :prompt, CAST(:context_hints AS jsonb),
           CAST(:policy AS jsonb), :desired_format, 'queued', :now, :now, NULL, NULL, 0, :max_attempts,
           :priority, :idempotency_key, :idempotency_fingerprint, :run_at, :concurrency_key, first_turn
      FROM turns
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'task_created', 'task', id, :actor,
           jsonb_build_object('context_id', context_id, 'agent_slug', agent_slug)
      FROM created
)
SELECT row_to_json(created) AS task FROM created;

-- name: create_tasks
-- A batch in one statement, all or nothing. Items whose Idempotency key was used before
-- are not inserted (the earlier task answers for them); if any of those earlier tasks was
-- created by a different request, nothing is inserted (the caller answers 422). The
-- caller announces the tasks after the commit, as for create_task.
WITH incoming AS (
    -- Each item with the key it is queued under, as llm_tasks.fairness_key computes it
    -- (validated keys and context_ids are within its 255 characters).
    SELECT i.*, COALESCE(i.concurrency_key, i.context_id) AS fairness_key
      FROM jsonb_to_recordset(CAST(:tasks AS jsonb))
           AS i(position integer, id text, context_id text, agent_slug text, prompt text, context_hints jsonb,
                policy jsonb, desired_format text, max_attempts integer, priority integer, run_at bigint,
                idempotency_key text, idempotency_fingerprint text, concurrency_key text)
), newcomers AS (
    SELECT DISTINCT fairness_key, priority FROM incoming
), turns AS (
    -- include: first_turns
), ranked AS (
    -- A key's tasks in the batch take consecutive turns from its first, in the batch's order.
    SELECT i.*, t.first_turn - 1 + row_number() OVER (PARTITION BY t.fairness_key, t.priority ORDER BY i.position)
                AS fair_rank
      FROM incoming i
      JOIN turns t ON t.fairness_key = i.fairness_key AND t.priority = i.priority
), earlier AS (
    SELECT t.*, i.position, i.idempotency_fingerprint AS wanted_fingerprint
      FROM llm_tasks t JOIN incoming i ON t.idempotency_key = i.idempotency_key
), mismatch AS (
    SELECT position FROM earlier WHERE idempotency_fingerprint IS DISTINCT FROM wanted_fingerprint
), created AS (
    INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                           status, created_at, updated_at, lease_id, worker_id, attempts, max_attempts,
                           priority, idempotency_key, idempotency_fingerprint, run_at, concurrency_key, fair_rank)
    SELECT i.id, i.context_id, i.agent_slug, i.prompt, i.context_hints, i.policy, i.desired_format,
           'queued', :now, :now, NULL, NULL, 0, i.max_attempts, i.priority, i.idempotency_key,
           i.idempotency_fingerprint, i.run_at, i.concurrency_key, i.fair_rank
      FROM ranked i
     WHERE NOT EXISTS (SELECT 1 FROM mismatch)
       AND NOT EXISTS (SELECT 1 FROM earlier e WHERE e.position = i.position)
     -- Keyed rows in key order: two batches that share keys take them in one order, so one
     -- waits for the other instead of both deadlocking (a 503 before). The answer's order
     -- is the request's, whatever the order rows are written in.
     ORDER BY i.idempotency_key, i.position
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT gen_random_uuid()::text, :now, 'task_created', 'task', id, :actor,
           jsonb_build_object('context_id', context_id, 'agent_slug', agent_slug, 'batch', true)
      FROM created
)
SELECT (SELECT COALESCE(json_agg(row_to_json(created)), '[]'::json) FROM created) AS created,
       (SELECT COALESCE(json_agg(row_to_json(earlier)), '[]'::json) FROM earlier) AS earlier,
       (SELECT count(*) FROM mismatch) AS mismatched;

-- name: get_task_by_idempotency_key
SELECT * FROM llm_tasks WHERE idempotency_key = :idempotency_key;

-- name: list_tasks
SELECT * FROM llm_tasks
 WHERE (CAST(:status AS text) IS NULL OR status = :status)
 ORDER BY created_at DESC, id DESC
 LIMIT :limit OFFSET :offset;

-- name: list_tasks_overview
-- GET /llm-tasks with no limit, as the web client reads it: it counts statuses from the
-- rows and offers Requeue on failed ones, so every task in flight (leased, running: at
-- most the fleet's capacity, capped at :in_flight_rows), the newest :failed_rows failed
-- or dead ones and the newest :recent_rows of the rest. What needs an operator comes
-- first — in flight, then failed and dead — newest first within each part: the Runtime
-- page shows the first 50 rows. Each part is a short range of an index, whatever the
-- number of finished tasks kept.
SELECT * FROM (
    (SELECT * FROM llm_tasks WHERE status IN ('leased', 'running')
      ORDER BY created_at DESC, id DESC LIMIT :in_flight_rows)
    UNION ALL
    (SELECT * FROM llm_tasks WHERE status IN ('failed', 'dead')
      ORDER BY created_at DESC, id DESC LIMIT :failed_rows)
    UNION ALL
    (SELECT * FROM llm_tasks WHERE status NOT IN ('leased', 'running', 'failed', 'dead')
      ORDER BY created_at DESC, id DESC LIMIT :recent_rows)
) overview
 ORDER BY CASE WHEN status IN ('leased', 'running') THEN 0 WHEN status IN ('failed', 'dead') THEN 1 ELSE 2 END,
          created_at DESC, id DESC;

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
-- A failed or dead task back to the queue, with a new turn (next_turn).
WITH requeued AS (
    UPDATE llm_tasks t
       SET status = 'queued', lease_id = NULL, worker_id = NULL, attempts = 0, retry_at = NULL, updated_at = :now,
           fair_rank =
           -- include: next_turn
     WHERE t.id = :task_id AND t.status IN ('failed', 'dead')
    RETURNING t.*
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
