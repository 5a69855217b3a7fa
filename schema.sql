-- BLOOM Runtime schema (PostgreSQL). Idempotent: safe to apply at every start.
-- Table and column names and types are those of the Express service, so a database
-- it created keeps working. Times are epoch milliseconds (bigint); ids are text.
-- There is deliberately no `users` table: this database is shared with other services.

CREATE TABLE IF NOT EXISTS workers (
    id              text PRIMARY KEY,
    node_id         text,
    url             text,
    status          text NOT NULL DEFAULT 'unknown',
    capabilities    jsonb NOT NULL DEFAULT '{"claude_cli": true, "max_concurrency": 1, "labels": []}'::jsonb,
    last_heartbeat  bigint,
    ip_addrs        jsonb NOT NULL DEFAULT '[]'::jsonb,
    obs_count       integer NOT NULL DEFAULT 0,
    db_sha          text,
    registered_at   bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS llm_tasks (
    id              text PRIMARY KEY,
    context_id      text NOT NULL,
    agent_slug      text NOT NULL,
    prompt          text NOT NULL,
    context_hints   jsonb NOT NULL DEFAULT '[]'::jsonb,
    policy          jsonb NOT NULL DEFAULT '{"timeout_sec": 120, "budget": 0}'::jsonb,
    desired_format  text NOT NULL DEFAULT 'text',
    status          text NOT NULL DEFAULT 'queued',
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL,
    lease_id        text,
    worker_id       text,
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 3
);

CREATE TABLE IF NOT EXISTS leases (
    id              text PRIMARY KEY,
    task_id         text NOT NULL,
    worker_id       text NOT NULL,
    started_at      bigint NOT NULL,
    expires_at      bigint NOT NULL,
    ttl_seconds     integer NOT NULL,
    status          text NOT NULL DEFAULT 'active',
    last_heartbeat  bigint NOT NULL,
    context_id      text
);

CREATE TABLE IF NOT EXISTS runtime_artifacts (
    id              text PRIMARY KEY,
    task_id         text NOT NULL,
    job_id          text,
    type            text NOT NULL,
    created_at      bigint NOT NULL,
    finalized       boolean NOT NULL DEFAULT false,
    url             text,
    entity_refs     jsonb NOT NULL DEFAULT '[]'::jsonb,
    tags            jsonb NOT NULL DEFAULT '[]'::jsonb,
    content         text
);

CREATE TABLE IF NOT EXISTS llm_results (
    id              text PRIMARY KEY,
    task_id         text NOT NULL,
    worker_id       text,
    artifact_id     text,
    status          text NOT NULL,
    output          text,
    error_message   text,
    metrics         jsonb NOT NULL DEFAULT '{}'::jsonb,
    completed_at    bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS audit_logs (
    id              text PRIMARY KEY,
    timestamp       bigint NOT NULL,
    action          text NOT NULL,
    entity_type     text NOT NULL,
    entity_id       text,
    actor           text,
    detail          jsonb
);

CREATE TABLE IF NOT EXISTS runtime_settings (
    key             text PRIMARY KEY,
    value           text,
    updated_at      bigint
);

-- Added after the Express service (an old database upgrades in place): claim priority
-- (higher first) and the Idempotency-Key of the request that created the task.
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0;
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS idempotency_key text;
-- A digest of the request that used the Idempotency-Key: a reuse with another body is refused.
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS idempotency_fingerprint text;
-- Not to be claimed or dispatched before: the client's run_at, and the runtime's retry_at
-- (exponential backoff after a failed run). Epoch ms; null = now.
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS run_at bigint;
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS retry_at bigint;
-- What a Membridge agent tells about itself when it registers (null when unknown), and
-- the time of the runtime's own latest evidence of a worker's state: its own calls
-- (registration, claim, task heartbeat, completion), probes of its url and dispatch
-- outcomes. While that evidence is recent, Membridge's status for the worker is ignored.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS agent_version text;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS os_info jsonb;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS install_method text;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS evidence_at bigint;
-- The agent a worker stands for: its url (case and a trailing '/' aside), or the worker
-- itself when it has none. One agent known under several names (its own registration, a
-- Membridge entry, a rename) is one address, and one capacity (lease_task, claim_task).
ALTER TABLE workers ADD COLUMN IF NOT EXISTS address text
    GENERATED ALWAYS AS (COALESCE(rtrim(lower(url), '/'), 'id:' || id)) STORED;
CREATE INDEX IF NOT EXISTS workers_address_idx ON workers (address);
-- A lease granted by a dispatch (delivered to an agent), not by lease or claim: a second
-- dispatch of the task answers with this delivery.
ALTER TABLE leases ADD COLUMN IF NOT EXISTS dispatched boolean NOT NULL DEFAULT false;
-- A lease whose id its holder was given to fence with (a dispatch's delivery URL carries
-- it; a claim's answer gives it to the pull client, which sends it back): a heartbeat or
-- completion that does not name it cannot touch it, whoever sends it.
ALTER TABLE leases ADD COLUMN IF NOT EXISTS fenced boolean NOT NULL DEFAULT false;
-- Whether an operator or Membridge vouched for the worker. A push worker (one with a url)
-- that registered itself with the workers' key waits unapproved: the runtime sends it
-- nothing (no task, no probe, no agent key) until an operator approves it (or registers
-- it) or the Membridge sync lists it with its url. Workers that existed before stay trusted.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS approved boolean NOT NULL DEFAULT true;
-- Outlier ejection of push agents (bloom/agents/outliers.py): runs that failed in a row,
-- and until when the agent is sent no task because of them.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS failed_runs integer NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS ejected_until bigint NOT NULL DEFAULT 0;
-- Who dispatches, who runs each once-per-deployment job: a row per leadership, renewed
-- by its holder before expires_at; each change of holder adds one to the epoch
-- (bloom/leadership.py).
CREATE TABLE IF NOT EXISTS leaderships (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    epoch       bigint NOT NULL,
    expires_at  bigint NOT NULL
);
-- Workers removed by an operator: the worker sync does not bring them back while
-- Membridge still lists them; the worker's own registration does.
CREATE TABLE IF NOT EXISTS removed_workers (
    id              text PRIMARY KEY,
    removed_at      bigint NOT NULL
);

-- Fair shares across notebooks (README, "Fair shares"). A task's concurrency_key is what
-- its creator named (null: none given, or a row written by another service); fairness_key
-- is the key it is queued under: that, else its context_id (its first 255 characters: a
-- context_id another service wrote unbounded must not stop the index build, or the
-- insert, as an index row too large would). fair_rank is its turn among
-- the queued tasks of its priority: a key's tasks get consecutive turns from the current
-- head of the queue on, so the queue (priority, fair_rank, age) takes one task of each
-- key in turn. Rows from before the upgrade rank 0 (first, by age, as before).
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS concurrency_key text;
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS fairness_key text
    GENERATED ALWAYS AS (left(COALESCE(concurrency_key, context_id), 255)) STORED;
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS fair_rank bigint NOT NULL DEFAULT 0;
-- The key of the task a lease was granted for: a key's active leases are its running
-- tasks, counted for its cap (max_running_per_key).
ALTER TABLE leases ADD COLUMN IF NOT EXISTS fairness_key text;
CREATE INDEX IF NOT EXISTS leases_active_key_idx ON leases (fairness_key) WHERE status = 'active';

-- Indexes for every list filter and order, the lease capacity counts and the sweep.
CREATE INDEX IF NOT EXISTS llm_tasks_created_idx ON llm_tasks (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS llm_tasks_status_created_idx ON llm_tasks (status, created_at DESC, id DESC);
-- The queue in claim order (priority, turn, age), with the due times a claim filters on
-- in the index itself.
CREATE INDEX IF NOT EXISTS llm_tasks_fair_queue_idx ON llm_tasks (priority DESC, fair_rank, created_at, id)
    INCLUDE (run_at, retry_at) WHERE status = 'queued';
-- Each key's queued tasks by turn: where a key's next task goes, and /stats per key.
CREATE INDEX IF NOT EXISTS llm_tasks_key_queue_idx ON llm_tasks (fairness_key, priority, fair_rank)
    WHERE status = 'queued';
DROP INDEX IF EXISTS llm_tasks_claim_ready_idx;  -- the claim order before fair shares: priority, age
DROP INDEX IF EXISTS llm_tasks_claim_idx;  -- the one before it, without the due times
CREATE UNIQUE INDEX IF NOT EXISTS llm_tasks_idempotency_key_idx ON llm_tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS leases_started_idx ON leases (started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS leases_status_started_idx ON leases (status, started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS leases_active_worker_idx ON leases (worker_id, context_id) WHERE status = 'active';
-- No index on expires_at: every heartbeat rewrites it, and an indexed column would cost
-- each heartbeat a new entry in every index of leases (no HOT update). The sweep finds
-- expired leases among the active ones, through the partial index above: at most the
-- workers' total capacity. (Earlier versions created leases_active_expiry_idx.)
DROP INDEX IF EXISTS leases_active_expiry_idx;
-- Retention finds finished tasks by age, and their leases by task.
CREATE INDEX IF NOT EXISTS llm_tasks_finished_idx ON llm_tasks (updated_at)
    WHERE status IN ('completed', 'failed', 'dead', 'cancelled');
CREATE INDEX IF NOT EXISTS leases_task_idx ON leases (task_id);
CREATE INDEX IF NOT EXISTS runtime_artifacts_created_idx ON runtime_artifacts (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS runtime_artifacts_task_created_idx ON runtime_artifacts (task_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS llm_results_task_idx ON llm_results (task_id);
CREATE INDEX IF NOT EXISTS audit_logs_timestamp_idx ON audit_logs (timestamp DESC, id DESC);

-- The Express service could grant one task several active leases; those extra leases
-- stayed 'active' for ever and ate their worker's capacity. An active lease that is not
-- the current lease of a leased/running task is such debris: retire it, then let a
-- unique index make a second active lease per task impossible.
UPDATE leases l SET status = 'expired'
 WHERE l.status = 'active'
   AND NOT EXISTS (SELECT 1 FROM llm_tasks t
                    WHERE t.id = l.task_id AND t.lease_id = l.id AND t.status IN ('leased', 'running'));
CREATE UNIQUE INDEX IF NOT EXISTS leases_one_active_per_task ON leases (task_id) WHERE status = 'active';

-- Managed projects: git repositories the fleet keeps cloned (bloom/projects/), and where
-- each node stands with each (one row per project and node).
CREATE TABLE IF NOT EXISTS managed_projects (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    repo_url        text NOT NULL,
    canonical_id    text NOT NULL,
    target_path     text,
    clone_status    text NOT NULL DEFAULT 'pending',
    primary_node_id text,
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL,
    error_message   text
);
CREATE UNIQUE INDEX IF NOT EXISTS managed_projects_name_idx ON managed_projects (name);
CREATE INDEX IF NOT EXISTS managed_projects_created_idx ON managed_projects (created_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS project_node_status (
    id              text PRIMARY KEY,
    project_id      text NOT NULL,
    node_id         text NOT NULL,
    clone_status    text NOT NULL DEFAULT 'pending',
    last_sync_at    bigint,
    error_message   text,
    repo_path       text
);
CREATE UNIQUE INDEX IF NOT EXISTS project_node_status_one_idx ON project_node_status (project_id, node_id);
