"""Managed projects: list, create, read, delete, clone, propagate, sync memory (projects/service.py)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from ..membridge.client import UpstreamResponse
from ..projects.service import ProjectService
from ..schemas import CloneSchema, CreateProjectSchema, PageQuery, SyncMemorySchema
from ..services import services
from ..web.guards import json_body, load_body
from ..web.openapi import documented
from . import query
from .membridge import relay

bp = Blueprint("projects", __name__, url_prefix="/api/runtime/projects")


def projects() -> ProjectService:
    return services().projects


@bp.get("")
@documented("Managed projects, newest first", query=PageQuery, responses={200: "ManagedProject[]"})
def list_projects():
    page = query(PageQuery)
    return jsonify(projects().list_projects(limit=page["limit"], offset=page["offset"]))


@bp.post("")
@documented("Create a managed project (pending)", body=CreateProjectSchema,
            responses={201: "ManagedProject", 409: "Error"})
def create_project():
    return jsonify(projects().create_project(load_body(CreateProjectSchema))), 201


@bp.get("/<project_id>")
@documented("A project and its node statuses", responses={200: "ProjectDetail", 404: "Error"})
def get_project(project_id: str):
    return jsonify(projects().get_project(project_id))


@bp.delete("/<project_id>")
@documented("Delete a project and its node statuses", responses={200: "Removed", 404: "Error"})
def delete_project(project_id: str):
    return jsonify(projects().delete_project(project_id))


@bp.get("/<project_id>/node-status")
@documented("The project's node statuses", responses={200: "ProjectNodeStatus[]", 404: "Error"})
def node_status(project_id: str):
    return jsonify(projects().node_statuses(project_id))


@bp.post("/<project_id>/clone")
@documented("Clone the project on a node (default its primary node) through the node's agent (up to 60 s)",
            body=CloneSchema, responses={200: "ProjectCloned", 400: "Error", 404: "Error", 502: "Error"})
def clone(project_id: str):
    body = load_body(CloneSchema)
    return jsonify(projects().clone(project_id, body["node_id"]))


@bp.post("/<project_id>/propagate")
@documented("Clone the project on every node with a url that does not hold it yet",
            responses={200: "Propagated", 400: "Error", 404: "Error"})
def propagate(project_id: str):
    json_body()
    return jsonify(projects().propagate(project_id))


@bp.post("/<project_id>/sync-memory")
@documented("Sync the project's memory through Membridge (push or pull, for a node)", body=SyncMemorySchema,
            responses={200: "MemorySynced", 400: "Error", 404: "Error", 422: "Error", 502: "Error"})
def sync_memory(project_id: str):
    body = load_body(SyncMemorySchema)
    answer = projects().sync_memory(project_id, body["direction"], body["node_id"])
    if isinstance(answer, UpstreamResponse):
        return relay(answer)
    return jsonify(answer)
