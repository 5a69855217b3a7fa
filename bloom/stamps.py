"""The ids and times the service stamps on what it writes, and who it says did it."""
from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

# Who an audit entry says acted: a caller of the API (the default), or a background duty.
API_ACTOR = "api"


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return str(uuid.uuid4())


def iso(epoch_ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC time, for messages."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
