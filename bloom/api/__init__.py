"""HTTP blueprints: parse and validate, call the service, answer JSON."""
from __future__ import annotations

from flask import Flask, request

from ..schemas import load


def query(schema_class) -> dict:
    return load(schema_class, request.args.to_dict())


def register_blueprints(app: Flask) -> None:
    """Every area of the API (the app, and the API reference, docs/API.md, use this)."""
    from . import agent_ops, config, health, membridge, metrics, projects, records, tasks, workers

    for module in (health, config, agent_ops, workers, tasks, records, projects, membridge, metrics):
        app.register_blueprint(module.bp)
    app.register_blueprint(agent_ops.install_bp)
