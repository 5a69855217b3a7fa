"""Liveness (no I/O) and readiness (the database answers)."""
from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify

from ..services import services
from ..web.openapi import build_openapi, documented

bp = Blueprint("health", __name__, url_prefix="/api/runtime")

_STARTED_AT = time.monotonic()


@bp.get("/health")
@documented("Liveness: no I/O (the Membridge status shown is refreshed in the background)", responses={200: "Health"})
def health():
    membridge = _membridge_status()
    return jsonify({
        "status": "ok",
        "service": "bloom-runtime",
        "uptime": round(time.monotonic() - _STARTED_AT, 3),
        "storage": "postgresql",
        "membridge": membridge,
    })


def _membridge_status() -> dict:
    """The freshest of this process's own upstream calls and the deployment's last one."""
    mine = services().membridge.health.snapshot()
    return services().membridge_settings.cached().freshest_status(mine)


READY_TIMEOUT_S = 1.5


@bp.get("/ready")
@documented("Readiness: 200 when PostgreSQL answers within 1.5 s and has not refused a write for want of "
            "disk space (or another resource) in the last 30 s, else 503 saying which",
            responses={200: "Ready", 503: "Ready"})
def ready():
    database = services().database
    if not database.answers_within(READY_TIMEOUT_S):
        return jsonify({"status": "unavailable", "error": "database unreachable"}), 503
    exhausted = database.exhausted()
    if exhausted is not None:
        return jsonify({"status": "unavailable", "error": f"database out of {exhausted}: writes fail"}), 503
    return jsonify({"status": "ready"})


@bp.get("/openapi.json")
@documented("This document", responses={200: "Any"})
def openapi_document():
    built = services()
    if built.openapi_document is None:
        built.openapi_document = build_openapi(current_app)
    document = built.openapi_document
    return jsonify(document)
