"""BLOOM Runtime: a lease-based task runtime for LLM work (Flask, PostgreSQL).

The package itself imports nothing heavy: the pull worker client (`python -m
bloom.worker`) needs only `requests`, not Flask, SQLAlchemy, psycopg2 or minio. The
service lives in bloom.app; its entry points are re-exported here, loaded on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ANNOUNCED_ENV", "announce_settings", "create_app", "start_background_jobs", "stop_background_jobs"]
_LIGHT = {"ANNOUNCED_ENV", "announce_settings"}  # from bloom.logs: no app imported


def __getattr__(name: str) -> Any:
    if name in _LIGHT:
        from . import logs

        return getattr(logs, name)
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'bloom' has no attribute {name!r}")
