"""Managed projects: git repositories the fleet keeps cloned, for the web client's
Membridge page (README, "Managed projects").

A project is cloned to a node by that node's agent (`POST {url}/clone`), to every node
at once (propagate), and its memory is synced through Membridge (`POST /sync/<direction>`
with the admin key). Calls to agents and to Membridge hold no database connection while
they wait; statuses are written before and after. Knows nothing of Flask.
"""
from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..agents.client import AgentClient
from ..db import Database
from ..errors import BadGateway, BadRequest, Conflict, NotFound
from ..membridge.client import MembridgeClient, UpstreamResponse, UpstreamUnreachable
from ..records.service import RecordService
from ..shapes import node_status_json, project_json
from ..stamps import API_ACTOR, new_id, now_ms
from ..workers.service import agent_url_of

CLONE_S = 60.0
PROPAGATE_AT_ONCE = 4
# What the agent accepts as a project's directory name.
AGENT_PROJECT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SYNC_DIRECTIONS = ("push", "pull")


def canonical_id(name: str) -> str:
    """Membridge's id of a project: the first 16 hex digits of sha256(name)."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


class ProjectService:
    def __init__(self, database: Database, agents: AgentClient, membridge: MembridgeClient,
                 records: RecordService) -> None:
        self._db = database
        self._agents = agents
        self._membridge = membridge
        self._records = records

    def list_projects(self, *, limit: int, offset: int) -> list[dict[str, Any]]:
        with self._db.autocommit() as tx:
            return [project_json(row) for row in tx.all("list_projects", limit=limit, offset=offset)]

    def get_project(self, project_id: str) -> dict[str, Any]:
        with self._db.autocommit() as tx:
            project = tx.one_or_none("get_project", project_id=project_id)
            if project is None:
                raise NotFound("Project not found")
            nodes = tx.all("project_node_statuses", project_id=project_id)
        return {**project_json(project), "nodes": [node_status_json(node) for node in nodes]}

    def node_statuses(self, project_id: str) -> list[dict[str, Any]]:
        return self.get_project(project_id)["nodes"]

    def create_project(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._db.autocommit() as tx:
            created = tx.one_or_none(
                "create_project", project_id=new_id(), name=body["name"], repo_url=body["repo_url"],
                canonical_id=canonical_id(body["name"]), target_path=body["target_path"],
                primary_node_id=body["primary_node_id"], now=now_ms(), audit_id=new_id(), actor=API_ACTOR,
            )
        if created is None:
            raise Conflict(f"A project named '{body['name']}' exists already")
        return project_json(created)

    def delete_project(self, project_id: str) -> dict[str, Any]:
        with self._db.autocommit() as tx:
            removed = tx.one_or_none("delete_project", project_id=project_id, now=now_ms(), audit_id=new_id(),
                                     actor=API_ACTOR)
        if removed is None:
            raise NotFound("Project not found")
        return {"removed": True, "id": removed["id"]}

    # Cloning ------------------------------------------------------------------------

    def clone(self, project_id: str, node_id: str | None) -> dict[str, Any]:
        project = self.get_project(project_id)
        node_id = node_id or project["primary_node_id"]
        if not node_id:
            raise BadRequest("No node given, and the project has no primary_node_id")
        self._check_agent_name(project["name"])
        url = agent_url_of(self._db, node_id)
        outcome = self._clone_to(project, node_id, url)
        if outcome["status"] != "cloned":
            raise BadGateway(f"Clone on {node_id} failed: {outcome['error']}")
        self._records.record_audit("project_cloned", "project", project_id, {"node_id": node_id})
        return {"status": "cloned", "node": outcome["node"], "result": outcome["result"]}

    def propagate(self, project_id: str) -> dict[str, Any]:
        project = self.get_project(project_id)
        self._check_agent_name(project["name"])
        with self._db.autocommit() as tx:
            targets = tx.all("propagation_targets", project_id=project_id)
        if not targets:
            return {"status": "nothing_to_propagate", "message": "Every node with a url holds the project already"}
        with ThreadPoolExecutor(max_workers=min(PROPAGATE_AT_ONCE, len(targets)),
                                thread_name_prefix="bloom-propagate") as pool:
            outcomes = list(pool.map(lambda target: self._clone_to(project, target["id"], target["url"]), targets))
        results = [{"node_id": target["id"], "status": outcome["status"],
                    **({"error": outcome["error"]} if outcome["error"] else {})}
                   for target, outcome in zip(targets, outcomes, strict=True)]
        every = all(result["status"] == "cloned" for result in results)
        with self._db.autocommit() as tx:
            tx.one_or_none("set_project_status", project_id=project_id, status="synced" if every else "failed",
                           error_message=None if every else "some nodes failed to clone", now=now_ms())
        self._records.record_audit("project_propagated", "project", project_id,
                                   {"results": [{k: v for k, v in r.items() if k != "error"} for r in results]})
        return {"status": "synced" if every else "partial", "results": results}

    def _clone_to(self, project: dict[str, Any], node_id: str, url: str) -> dict[str, Any]:
        """One node: 'cloning', the agent's clone, then 'cloned' or 'failed' with the reason."""
        self._set(project["id"], node_id, "cloning", None)
        answer = self._agents.call(url, "POST", "/clone", {
            "repo_url": project["repo_url"], "project_name": project["name"], "target_path": project["target_path"],
        }, within_s=CLONE_S)
        said = answer.body if isinstance(answer.body, dict) else {}
        if not answer.ok or said.get("ok") is False:
            error = answer.describe() if not answer.ok else str(said.get("detail") or "the agent reported a failure")[:200]
            self._set(project["id"], node_id, "failed", error)
            return {"status": "failed", "error": error, "node": None, "result": said}
        repo_path = said.get("path") if isinstance(said.get("path"), str) else project["target_path"]
        node = self._set(project["id"], node_id, "cloned", None, synced_at=now_ms(), repo_path=repo_path)
        # The project may have been deleted meanwhile: then there is no node row to show.
        return {"status": "cloned", "error": None, "node": node_status_json(node) if node else None, "result": said}

    def _set(self, project_id: str, node_id: str, status: str, error: str | None, *,
             synced_at: int | None = None, repo_path: str | None = None) -> dict[str, Any] | None:
        with self._db.autocommit() as tx:
            return tx.one_or_none("set_clone_status", project_id=project_id, node_id=node_id, status=status,
                                  error_message=error, synced_at=synced_at, repo_path=repo_path, row_id=new_id(),
                                  now=now_ms())

    @staticmethod
    def _check_agent_name(name: str) -> None:
        if not AGENT_PROJECT_NAME.match(name):
            raise BadRequest(f"The agent accepts only letters, digits, '_', '.' and '-' in a project name; "
                             f"'{name}' has others")

    # Memory sync through Membridge ----------------------------------------------------

    def sync_memory(self, project_id: str, direction: str, node_id: str | None) -> dict[str, Any] | UpstreamResponse:
        """Membridge's POST /sync/<direction> {project, agent}: our answer, or Membridge's
        refusal to relay as the proxy routes do."""
        if direction not in SYNC_DIRECTIONS:
            raise BadRequest("direction must be push or pull")
        project = self.get_project(project_id)
        node_id = node_id or project["primary_node_id"]
        if not node_id:
            raise BadRequest("No node given, and the project has no primary_node_id")
        try:
            upstream = self._membridge.post(f"/sync/{direction}", {"project": project["name"], "agent": node_id},
                                            caller_input=True)
        except UpstreamUnreachable as error:
            raise BadGateway(str(error)) from None
        if not upstream.ok:
            return upstream
        self._records.record_audit(f"memory_sync_{direction}", "project", project_id, {"node_id": node_id})
        return {"status": "ok", "direction": direction, "node": node_id, "result": upstream.body}
