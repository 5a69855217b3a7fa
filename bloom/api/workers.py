"""Worker registry: list, show, register, remove."""
from __future__ import annotations

from flask import Blueprint, jsonify

from ..http import json_body
from ..schemas import PageQuery, RegisterWorkerSchema, load
from . import query, service

bp = Blueprint("workers", __name__, url_prefix="/api/runtime/workers")


@bp.get("")
def list_workers():
    page = query(PageQuery)
    return jsonify(service().list_workers(limit=page["limit"], offset=page["offset"]))


@bp.get("/<worker_id>")
def get_worker(worker_id: str):
    return jsonify(service().get_worker(worker_id))


@bp.post("")
def register_worker():
    body = load(RegisterWorkerSchema(), json_body())
    worker, created = service().register_worker(body)
    return jsonify(worker), 201 if created else 200


@bp.delete("/<worker_id>")
def remove_worker(worker_id: str):
    return jsonify(service().remove_worker(worker_id))
