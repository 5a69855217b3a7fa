"""Read-only views: leases, artifacts, audit log and aggregate stats."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..artifacts import ObjectStoreUnavailable
from ..errors import BadGateway, NotFound
from ..schemas import ArtifactListQuery, LeaseListQuery, PageQuery
from ..services import services
from ..shapes import artifact_json
from ..web.openapi import documented
from . import query

bp = Blueprint("records", __name__, url_prefix="/api/runtime")


@bp.get("/leases")
@documented("Leases, newest first", query=LeaseListQuery, responses={200: "Lease[]"})
def list_leases():
    params = query(LeaseListQuery)
    return jsonify(services().leases.list_leases(status=params["status"], limit=params["limit"], offset=params["offset"]))


@bp.get("/artifacts")
@documented("Artifacts, newest first", query=ArtifactListQuery, responses={200: "RuntimeArtifact[]"})
def list_artifacts():
    params = query(ArtifactListQuery)
    return jsonify(
        services().records.list_artifacts(task_id=params["task_id"], limit=params["limit"], offset=params["offset"])
    )


@bp.get("/artifacts/<artifact_id>")
@documented("An artifact, with a presigned download_url when object-stored", responses={200: "RuntimeArtifact", 404: "Error"})
def get_artifact(artifact_id: str):
    row = services().records.get_artifact(artifact_id)
    artifact = artifact_json(row)
    store = services().records.artifacts
    if artifact["url"] and store is not None:
        artifact["download_url"] = store.presigned_download_url(artifact["url"])
    return jsonify(artifact)


@bp.get("/artifacts/<artifact_id>/content")
@documented("The output itself, from the database or the object store", responses={200: "Text", 404: "Error", 502: "Error"})
def get_artifact_content(artifact_id: str):
    """The output itself, from the database row or streamed from the object store."""
    row = services().records.get_artifact(artifact_id)
    mimetype = "application/json" if row.get("desired_format") == "json" else "text/plain"
    if row["content"] is not None:
        return Response(row["content"], mimetype=mimetype)
    if not row["url"]:
        raise NotFound("Artifact has no content")
    store = services().records.artifacts
    if store is None:
        raise BadGateway("Object store is not configured")
    try:
        chunks = store.open(row["url"])
    except ObjectStoreUnavailable as error:
        raise BadGateway(str(error)) from None
    return Response(chunks, mimetype=mimetype)


@bp.get("/audit")
@documented("Audit entries, newest first", query=PageQuery, responses={200: "AuditLogEntry[]"})
def list_audit():
    params = query(PageQuery)
    return jsonify(services().records.list_audit(limit=params["limit"], offset=params["offset"]))


@bp.get("/stats")
@documented("Counts by SQL aggregates", responses={200: "Stats"})
def stats():
    return jsonify(services().records.stats())
