"""Runtime config (Membridge URL and admin key) and the connection test."""
from __future__ import annotations

from flask import Blueprint, jsonify

from ..membridge.client import MembridgeClient, UpstreamUnreachable
from ..membridge.settings import MembridgeSettingsStore
from ..schemas import ConfigUpdateSchema
from ..services import services
from ..web.guards import load_body
from ..web.openapi import documented

bp = Blueprint("config", __name__, url_prefix="/api/runtime")

ACTOR = "api"


def membridge_settings() -> MembridgeSettingsStore:
    return services().membridge_settings


def membridge() -> MembridgeClient:
    return services().membridge


def _public(config) -> dict:
    return config.public(membridge().health.snapshot())


@bp.get("/config")
@documented("Membridge settings, with the admin key masked", responses={200: "RuntimeConfig"})
def get_config():
    return jsonify(_public(membridge_settings().current(fresh=True)))


@bp.post("/config")
@documented("Change the Membridge settings", body=ConfigUpdateSchema, responses={200: "RuntimeConfig"})
def update_config():
    body = load_body(ConfigUpdateSchema)
    membridge_settings().update(body["membridge_server_url"].rstrip("/"), body["admin_key"], actor=ACTOR)
    membridge().health.forget("Membridge settings changed; not tested since")
    return jsonify(_public(membridge_settings().current()))


@bp.post("/test-connection")
@documented(
    "Make an authenticated call to Membridge (/agents), then read its /health; record the outcome",
    responses={200: "ConnectionTest"},
)
def test_connection():
    try:
        authenticated = membridge().get("/agents")
        response = membridge().get("/health", admin=False) if authenticated.ok else authenticated
    except UpstreamUnreachable as error:
        membridge_settings().record_connection_test(False, actor=ACTOR)
        return jsonify({"connected": False, "error": str(error)})
    if not response.ok or not isinstance(response.body, dict):
        membridge_settings().record_connection_test(False, actor=ACTOR)
        return jsonify({"connected": False, "error": response.error_message()})
    membridge_settings().record_connection_test(True, actor=ACTOR)
    return jsonify({"connected": True, "health": response.body})
