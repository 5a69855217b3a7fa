"""HTTP blueprints: parse and validate, call the service, answer JSON."""
from __future__ import annotations

from flask import current_app, request

from ..schemas import load
from ..service import RuntimeService


def service() -> RuntimeService:
    return current_app.extensions["bloom.service"]


def query(schema_class) -> dict:
    return load(schema_class, request.args.to_dict())
