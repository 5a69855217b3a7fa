"""The bounds and defaults of what callers send, written once.

Read by the marshmallow schemas (schemas.py), by the fast loaders of the hot bodies
(task_bodies.py), and by whatever needs a default when a stored row lacks it (a task's
policy timeout in the lease statement and the dispatcher). A change here is a change of
every reader; tests/test_task_bodies.py generates its bodies from the schemas' own
validators, so a bound the fast loaders do not read fails it.

Ranges are (lowest, highest), both allowed; lengths count characters or items.
"""
from __future__ import annotations

# Texts that go into an index or a key (ids, slugs, names, tags) are bounded: an index
# row has a size limit, and one oversized value must never reach it (a task whose
# context_id could not be indexed would stop every grant).
KEY_TEXT_MAX = 255
URL_MAX = 2048
AGENT_INFO_MAX = 4096
MAX_OFFSET = 2**31 - 1

# A task.
DEFAULT_TIMEOUT_SEC = 120  # policy.timeout_sec when a task gives none
TIMEOUT_SEC_RANGE = (1, 3600)
MAX_ATTEMPTS_RANGE = (1, 10)
DEFAULT_MAX_ATTEMPTS = 3
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
DEFAULT_PRIORITY = 0
RUN_AT_RANGE = (0, 2**62)  # epoch milliseconds
TASK_FORMATS = ("json", "text")
DEFAULT_FORMAT = "text"
MAX_TASKS_PER_BATCH = 1000
# A task's fairness key (concurrency_key): printable characters (str.isprintable: no
# control or format characters, no line breaks), and a cap on its key's running tasks.
CONCURRENCY_KEY_LENGTH = (1, 128)
MAX_RUNNING_PER_KEY_RANGE = (1, 1_000_000)

# A lease, a claim, a heartbeat.
TTL_SECONDS_RANGE = (1, 86400)
DEFAULT_TTL_SECONDS = 300
WAIT_SECONDS_RANGE = (0, 30)
MAX_TASKS_PER_CLAIM = 32
MAX_CLAIM_AGENT_SLUGS = 100
MAX_HEARTBEAT_LEASE_IDS = 1000

# A completion.
COMPLETION_STATUSES = ("success", "error")
COUNT_RANGE = (0, 2**62)  # metrics.duration_ms and metrics.tokens_used
ARTIFACT_TYPE_LENGTH = (1, 128)
DEFAULT_ARTIFACT_TYPE = "LLM_RESULT"
MAX_ARTIFACT_TAGS = 64

# A worker.
WORKER_STATUSES = ("online", "offline", "syncing", "error", "unknown")
MAX_CONCURRENCY_RANGE = (1, 32)
DEFAULT_AGENT_PORT = 8001
