-- Wake-ups for waiting claims and the dispatcher (bloom/queue_events.py).
-- Conventions: bloom/sql.py.

-- name: announce_queued
-- Tasks were queued and committed: one notification per payload (an agent_slug, with a
-- count when several tasks of it are announced together), in a short transaction of its
-- own. Only this transaction waits for the cluster-wide lock that notifying commits
-- take in turn; the creates it announces have committed already.
SELECT count(pg_notify('bloom_task_queued', payload)) AS sent
  FROM unnest(CAST(:payloads AS text[])) AS payload;
