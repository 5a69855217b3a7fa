"""HTTP blueprints: parse and validate, call the service, answer JSON."""
from __future__ import annotations

from flask import Flask, current_app, request

from ..leases.service import LeaseService
from ..records.service import RecordService
from ..schemas import load
from ..tasks.service import TaskService
from ..workers.service import WorkerService


# The services of the areas of the domain, one per area, built once by create_app.
def task_service() -> TaskService:
    return current_app.extensions["bloom.tasks"]


def lease_service() -> LeaseService:
    return current_app.extensions["bloom.leases"]


def worker_service() -> WorkerService:
    return current_app.extensions["bloom.workers"]


def record_service() -> RecordService:
    return current_app.extensions["bloom.records"]


def query(schema_class) -> dict:
    return load(schema_class, request.args.to_dict())


def register_blueprints(app: Flask) -> None:
    """Every area of the API (the app, and the API reference, docs/API.md, use this)."""
    from . import agent_ops, config, health, membridge, metrics, projects, records, tasks, workers

    for module in (health, config, agent_ops, workers, tasks, records, projects, membridge, metrics):
        app.register_blueprint(module.bp)
    app.register_blueprint(agent_ops.install_bp)
