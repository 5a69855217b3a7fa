"""Runtime config (Membridge URL and admin key) and the connection test."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from ..http import json_body
from ..membridge import MembridgeClient, UpstreamUnreachable
from ..openapi import documented
from ..runtime_config import RuntimeConfigStore
from ..schemas import ConfigUpdateSchema, load

bp = Blueprint("config", __name__, url_prefix="/api/runtime")

ACTOR = "api"


def config_store() -> RuntimeConfigStore:
    return current_app.extensions["bloom.runtime_config"]


def membridge() -> MembridgeClient:
    return current_app.extensions["bloom.membridge"]


@bp.get("/config")
@documented("Membridge settings, with the admin key masked", responses={200: "RuntimeConfig"})
def get_config():
    return jsonify(config_store().current().public())


@bp.post("/config")
@documented("Change the Membridge settings", body=ConfigUpdateSchema, responses={200: "RuntimeConfig"})
def update_config():
    body = load(ConfigUpdateSchema, json_body())
    updated = config_store().update(body["membridge_server_url"].rstrip("/"), body["admin_key"], actor=ACTOR)
    return jsonify(updated.public())


@bp.post("/test-connection")
@documented("Ask Membridge /health and record the outcome", responses={200: "ConnectionTest"})
def test_connection():
    try:
        response = membridge().get("/health", admin=False)
    except UpstreamUnreachable as error:
        config_store().record_connection_test(False, actor=ACTOR)
        return jsonify({"connected": False, "error": str(error)})
    if not response.ok or not isinstance(response.body, dict):
        config_store().record_connection_test(False, actor=ACTOR)
        return jsonify({"connected": False, "error": response.error_message()})
    config_store().record_connection_test(True, actor=ACTOR)
    return jsonify({"connected": True, "health": response.body})
