"""Operations on a worker's agent: health, update, restart, uninstall (agents/operations.py)."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..agents.install_script import DEFAULT_REPO_URL, install_script
from ..agents.operations import AgentOperations
from ..errors import BadRequest
from ..schemas import AgentUpdateSchema, InstallScriptQuery
from ..services import services
from ..web.guards import json_body, load_body
from ..web.openapi import documented
from . import query

bp = Blueprint("agent_ops", __name__, url_prefix="/api/runtime/workers")
install_bp = Blueprint("agent_install", __name__, url_prefix="/api/runtime")

FAILURES = {400: "Error", 404: "Error", 502: "Error", 503: "Error"}


def operations() -> AgentOperations:
    return services().agent_ops


@bp.get("/<worker_id:worker_id>/agent-health")
@documented("Ask the worker's agent for its health; the worker is updated from it (offline if silent)",
            responses={200: "AgentHealth", **FAILURES})
def agent_health(worker_id: str):
    return jsonify(operations().health(worker_id))


@bp.post("/<worker_id:worker_id>/agent-update")
@documented("Have the worker's agent update itself (up to 120 s)", body=AgentUpdateSchema,
            responses={200: "AgentOperation", **FAILURES})
def agent_update(worker_id: str):
    body = load_body(AgentUpdateSchema)
    return jsonify(operations().update(worker_id, {key: value for key, value in body.items() if value is not None}))


@bp.post("/<worker_id:worker_id>/agent-restart")
@documented("Have the worker's agent restart (up to 30 s)", responses={200: "AgentOperation", **FAILURES})
def agent_restart(worker_id: str):
    json_body()  # the client sends {}; nothing in it is used
    return jsonify(operations().restart(worker_id))


@bp.post("/<worker_id:worker_id>/agent-uninstall")
@documented("Have the worker's agent uninstall itself; the worker goes offline and its tasks back to the queue",
            responses={200: "AgentOperation", **FAILURES})
def agent_uninstall(worker_id: str):
    json_body()
    return jsonify(operations().uninstall(worker_id))


@install_bp.get("/agent-install-script")
@documented("A bash script that installs the Membridge agent on a Linux node (no secret in it)",
            query=InstallScriptQuery, responses={200: "Text", 400: "Error"})
def agent_install_script():
    """Open like /health: it holds no secret. The runtime's address comes from the query
    or BLOOM_PUBLIC_URL, never from the request's Host."""
    params = query(InstallScriptQuery)
    runtime_url = params["server_url"] or services().settings.public_url
    if not runtime_url:
        raise BadRequest("server_url is needed (or set BLOOM_PUBLIC_URL): the address the node reaches the runtime at")
    script = install_script(
        runtime_url=runtime_url.rstrip("/"),
        control_plane_url=services().membridge_settings.current().server_url,
        node_id=params["node_id"], port=params["port"], repo_url=params["repo_url"] or DEFAULT_REPO_URL,
    )
    return Response(script, mimetype="text/plain")
