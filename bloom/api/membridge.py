"""Admin proxy to Membridge: the admin key stays on the server, never in a browser."""
from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, jsonify

from ..errors import BadGateway
from ..membridge.client import MembridgeClient, UpstreamResponse, UpstreamUnreachable, encode_segment
from ..services import services
from ..web.guards import json_body
from ..web.openapi import documented

bp = Blueprint("membridge", __name__, url_prefix="/api/membridge")

# Upstream answers pass through; an upstream error keeps its status, except a refused
# admin key (401/403), which is 502 so that callers can tell it from the runtime's own 401.
PROXIED: dict[int, str | None] = {200: "Any", 404: "Error", 422: "Error", 500: "Error", 502: "Error"}


def _client() -> MembridgeClient:
    return services().membridge


def _forward(method: str, path: str, body: Any = None):
    try:
        response = _client().request(method, path, json_body=body, caller_input=True)
    except UpstreamUnreachable as error:
        raise BadGateway(str(error)) from None
    return relay(response)


def relay(response: UpstreamResponse):
    """An upstream answer as ours: its body on success; an error keeps its status (a
    refused admin key is 502), with the admin key masked wherever upstream echoed it."""
    if response.ok:
        return jsonify(response.body), response.status
    body = {"error": _redacted(response.error_message()), "detail": _redacted_json(response.detail)}
    return jsonify(body), 502 if response.refused_admin_key else response.status


def _redacted(message: str) -> str:
    admin_key = services().membridge_settings.current().admin_key
    return message.replace(admin_key, "****") if admin_key else message


def _redacted_json(value: Any) -> Any:
    """Upstream's detail as JSON, with the admin key masked wherever it was echoed."""
    admin_key = services().membridge_settings.current().admin_key
    encoded = json.dumps(value)
    if admin_key and admin_key in encoded:
        return json.loads(encoded.replace(admin_key, "****"))
    return value


@bp.get("/health")
@documented("Membridge /health", responses=PROXIED)
def health():
    return _forward("GET", "/health")


@bp.get("/projects")
@documented("Membridge projects", responses=PROXIED)
def projects():
    return _forward("GET", "/projects")


@bp.get("/projects/<cid>/leadership")
@documented("A project's leadership", responses=PROXIED)
def leadership(cid: str):
    return _forward("GET", f"/projects/{encode_segment(cid)}/leadership")


@bp.get("/projects/<cid>/nodes")
@documented("A project's nodes", responses=PROXIED)
def nodes(cid: str):
    return _forward("GET", f"/projects/{encode_segment(cid)}/nodes")


@bp.post("/projects/<cid>/leadership/select")
@documented("Promote a primary node (body passed through; audited)", responses=PROXIED)
def select_leader(cid: str):
    body = json_body()
    response = _forward("POST", f"/projects/{encode_segment(cid)}/leadership/select", body)
    if 200 <= response[1] < 300:
        chosen = body.get("primary_node_id") if isinstance(body, dict) else None
        services().records.record_audit(
            "leadership_promote", "project", cid, {"primary_node_id": chosen}
        )
    return response
