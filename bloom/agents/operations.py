"""Operations on a worker's agent, for operators and the web client's Nodes page: read its
health, update, restart or uninstall it (README, "Agent operations").

Each call goes to the agent's own API with the agent key (X-MEMBRIDGE-AGENT) and is
bounded in all (10 s for health, up to 120 s for a self-update). It holds no database
connection while it waits, and at most OPERATIONS_AT_ONCE run at once per process, so a
few slow agents never take the threads other requests need (past that: 503). What the
agent answered is written back to the worker afterwards, in a short unit of work.
"""
from __future__ import annotations

import json
import threading
from typing import Any

from ..db import Database
from ..errors import BadGateway, Unavailable
from ..records.service import RecordService
from ..stamps import API_ACTOR, now_ms
from ..workers.service import agent_url_of
from .client import AgentAnswer, AgentClient
from .liveness import take_workers_out

OPERATIONS_AT_ONCE = 8
HEALTH_S, UPDATE_S, RESTART_S, UNINSTALL_S = 10.0, 120.0, 30.0, 60.0


class AgentOperations:
    def __init__(self, database: Database, agents: AgentClient, records: RecordService) -> None:
        self._db = database
        self._agents = agents
        self._records = records
        self._slots = threading.BoundedSemaphore(OPERATIONS_AT_ONCE)

    def health(self, worker_id: str) -> dict[str, Any]:
        """The agent's /health; the worker updated from it (or taken offline when silent)."""
        answer = self._call(worker_id, "GET", "/health", None, HEALTH_S)
        if not answer.ok:
            take_workers_out(self._db, [worker_id], reason=f"agent health check failed: {answer.describe()}")
            return {"reachable": False, "error": answer.describe()}
        said = answer.body if isinstance(answer.body, dict) else {}
        with self._db.autocommit() as tx:
            tx.one_or_none(
                "note_agent_health", worker_id=worker_id, now=now_ms(),
                agent_version=_text(said.get("version")),
                os_info=_json(said.get("os_info") if said.get("os_info") is not None else _text(said.get("hostname"))),
                capabilities=json.dumps(_capabilities(said.get("capabilities"))),
                ip_addrs=_json(said["ip_addrs"]) if _text_list(said.get("ip_addrs")) else None,
            )
        return {**said, "reachable": True}

    def update(self, worker_id: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._succeeded(self._call(worker_id, "POST", "/self-update", body, UPDATE_S))
        version = _text(answer.get("version"))
        with self._db.autocommit() as tx:
            tx.one_or_none("set_agent_version", worker_id=worker_id, agent_version=version)
        self._records.record_audit("agent_updated", "worker", worker_id, {"version": version, **body})
        return {**answer, "status": "updated"}

    def restart(self, worker_id: str) -> dict[str, Any]:
        answer = self._succeeded(self._call(worker_id, "POST", "/restart", {}, RESTART_S))
        self._records.record_audit("agent_restarted", "worker", worker_id, {})
        return {**answer, "status": "restarted"}

    def uninstall(self, worker_id: str) -> dict[str, Any]:
        """Uninstalled: offline, agent_version 'uninstalled', its leases ended and their
        tasks queued again, in one transaction."""
        answer = self._succeeded(self._call(worker_id, "POST", "/uninstall", {}, UNINSTALL_S))
        now = now_ms()
        with self._db.transaction() as tx:
            tx.one("take_workers_out", worker_ids=[worker_id], reason="agent uninstalled", requeue_started=True,
                   claude_cli_missing=False, out_status="offline", audit_out=True, now=now, actor=API_ACTOR)
            tx.one_or_none("set_agent_version", worker_id=worker_id, agent_version="uninstalled")
        self._records.record_audit("agent_uninstalled", "worker", worker_id, {})
        return {**answer, "status": "uninstalled"}

    # The call -----------------------------------------------------------------------

    def _call(self, worker_id: str, method: str, path: str, body: Any, within_s: float) -> AgentAnswer:
        url = agent_url_of(self._db, worker_id)
        if not self._slots.acquire(blocking=False):
            raise Unavailable("Too many agent operations under way; try again shortly")
        try:
            return self._agents.call(url, method, path, body, within_s=within_s)
        finally:
            self._slots.release()

    @staticmethod
    def _succeeded(answer: AgentAnswer) -> dict[str, Any]:
        if not answer.ok:
            raise BadGateway(answer.describe())
        return answer.body if isinstance(answer.body, dict) else {}


def _text(value: Any) -> str | None:
    return value[:255] if isinstance(value, str) and value else None


def _text_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(isinstance(item, str) and len(item) <= 255
                                                                 for item in value)


def _json(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def _capabilities(said: Any) -> dict[str, Any]:
    """The capabilities an agent reports, kept only where they have the right type."""
    if not isinstance(said, dict):
        return {}
    kept: dict[str, Any] = {}
    if isinstance(said.get("claude_cli"), bool):
        kept["claude_cli"] = said["claude_cli"]
    concurrency = said.get("max_concurrency")
    if isinstance(concurrency, int) and not isinstance(concurrency, bool) and 1 <= concurrency <= 32:
        kept["max_concurrency"] = int(concurrency)
    if _text_list(said.get("labels")):
        kept["labels"] = said["labels"]
    return kept
