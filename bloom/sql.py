"""Loads the named statements of `queries.sql` once: a reader sees the exact SQL that runs."""
from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import TextClause, text

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse_named_queries(source: str) -> dict[str, str]:
    """Split a file of `-- name: x` sections into {name: statement}."""
    queries: dict[str, str] = {}
    parts = _HEADER.split(source)
    for name, body in zip(parts[1::2], parts[2::2]):
        statement = body.strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not statement:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = statement
    return queries


def _load() -> dict[str, TextClause]:
    source = (Path(__file__).with_name("queries.sql")).read_text(encoding="utf-8")
    return {name: text(statement) for name, statement in parse_named_queries(source).items()}


QUERIES: dict[str, TextClause] = _load()
