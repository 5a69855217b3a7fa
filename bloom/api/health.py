"""Liveness (no I/O) and readiness (the database answers)."""
from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify

from . import service

bp = Blueprint("health", __name__, url_prefix="/api/runtime")

_STARTED_AT = time.monotonic()


@bp.get("/health")
def health():
    membridge = current_app.extensions["bloom.membridge_status"]()
    return jsonify({
        "status": "ok",
        "service": "bloom-runtime",
        "uptime": round(time.monotonic() - _STARTED_AT, 3),
        "storage": "postgresql",
        "membridge": membridge,
    })


@bp.get("/ready")
def ready():
    try:
        service().ping()
    except Exception:
        return jsonify({"status": "unavailable", "error": "database unreachable"}), 503
    return jsonify({"status": "ready"})
