"""Records: artifacts, the audit log, stats and the queue gauges (retention.py prunes).

Knows nothing of Flask; every statement is in bloom/records/queries.sql.
"""
from __future__ import annotations

import json
from typing import Any

from ..artifacts import MinioArtifactStore
from ..db import Database
from ..errors import NotFound
from ..schemas import TASK_STATUSES
from ..shapes import artifact_json, audit_json
from ..stamps import API_ACTOR, new_id, now_ms

# Past this many tasks, /stats estimates the finished counts instead of counting them.
STATS_EXACT_BELOW_ROWS = 200_000
# The keys /stats lists, most queued and running first.
STATS_BUSIEST_KEYS = 10


class RecordService:
    def __init__(self, database: Database, artifacts: MinioArtifactStore | None = None) -> None:
        self.db = database
        self.artifacts = artifacts

    def get_artifact(self, artifact_id: str) -> dict[str, Any]:
        """The artifact row plus its task's desired_format; NotFound if unknown."""
        with self.db.autocommit() as tx:
            row = tx.one_or_none("get_artifact", artifact_id=artifact_id)
        if row is None:
            raise NotFound("Artifact not found")
        return row

    def list_artifacts(self, *, task_id: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        with self.db.autocommit() as tx:
            rows = tx.all("list_artifacts", task_id=task_id, limit=limit, offset=offset)
        return [artifact_json(row) for row in rows]

    def list_audit(self, *, limit: int, offset: int) -> list[dict[str, Any]]:
        with self.db.autocommit() as tx:
            rows = tx.all("list_audit", limit=limit, offset=offset)
        return [audit_json(row) for row in rows]

    def record_audit(
        self, action: str, entity_type: str, entity_id: str, detail: dict[str, Any], *, actor: str = API_ACTOR
    ) -> None:
        with self.db.autocommit() as tx:
            tx.execute(
                "insert_audit", audit_id=new_id(), now=now_ms(), action=action, entity_type=entity_type,
                entity_id=entity_id, actor=actor, detail=json.dumps(detail),
            )

    def queue_state(self) -> dict[str, Any]:
        with self.db.autocommit() as tx:
            return tx.one("queue_state", now=now_ms())

    def stats(self) -> dict[str, Any]:
        with self.db.autocommit() as tx:
            row = tx.one("stats", estimate_above=STATS_EXACT_BELOW_ROWS, busiest_keys=STATS_BUSIEST_KEYS)
        by_status = {status: 0 for status in TASK_STATUSES}
        by_status.update({status: int(count) for status, count in row["tasks_by_status"].items()})
        stats = {
            "tasks": {"total": sum(by_status.values()), "by_status": by_status},
            "leases": {"total": int(row["leases_total"]), "active": int(row["leases_active"])},
            "workers": {"total": int(row["workers_total"]), "online": int(row["workers_online"])},
            "concurrency_keys": {"with_queued": int(row["keys_with_queued"]), "busiest": row["busiest_keys"]},
        }
        if row["estimated"]:
            stats["estimated"] = True  # finished counts and the lease total from PostgreSQL's statistics
        return stats
