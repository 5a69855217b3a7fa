"""Read-only views: leases, artifacts, audit log and aggregate stats."""
from __future__ import annotations

from flask import Blueprint, jsonify

from ..schemas import ArtifactListQuery, LeaseListQuery, PageQuery
from . import query, service

bp = Blueprint("records", __name__, url_prefix="/api/runtime")


@bp.get("/leases")
def list_leases():
    params = query(LeaseListQuery)
    return jsonify(service().list_leases(status=params["status"], limit=params["limit"], offset=params["offset"]))


@bp.get("/artifacts")
def list_artifacts():
    params = query(ArtifactListQuery)
    return jsonify(
        service().list_artifacts(task_id=params["task_id"], limit=params["limit"], offset=params["offset"])
    )


@bp.get("/audit")
def list_audit():
    params = query(PageQuery)
    return jsonify(service().list_audit(limit=params["limit"], offset=params["offset"]))


@bp.get("/stats")
def stats():
    return jsonify(service().stats())
