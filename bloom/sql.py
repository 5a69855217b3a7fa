"""Loads the named statements of `queries.sql` once: a reader sees the exact SQL that runs.

A query whose header reads `-- name: <name> (prepared)` is a hot path. Each of its
statements is prepared once per pooled connection (PREPARE ... AS, with `:name`
parameters numbered in order of first use), and every call sends EXECUTE with the
arguments instead: PostgreSQL parses and plans the statement once per connection rather
than on every call. Planning was most of PostgreSQL's CPU time on the lease path
(docs/PERFORMANCE.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEADER = re.compile(r"^--\s*name:\s*(\w+)(\s+\(prepared\))?\s*$", re.MULTILINE)
_COMMENT_LINE = re.compile(r"^\s*--.*(?:\n|$)", re.MULTILINE)
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)
# SQLAlchemy's own rule for a :named parameter (a `::type` cast is not one).
_PARAMETER = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")

# Declared types of the parameters of prepared statements; any other is text.
PARAMETER_TYPES = {
    "now": "bigint",  # epoch milliseconds
    "ttl_seconds": "integer",
    "max_attempts": "integer",
    "priority": "integer",
    "agent_slugs": "text[]",
    "lease_ids": "text[]",
    "audit_ids": "text[]",
    "max_tasks": "integer",
    "push_only": "boolean",
    "output_is_json": "boolean",
    "run_at": "bigint",
}


@dataclass(frozen=True)
class NamedQuery:
    name: str
    sql: str
    prepared: bool


def parse_named_queries(source: str) -> dict[str, NamedQuery]:
    """Split a file of `-- name: x` sections into {name: query}."""
    queries: dict[str, NamedQuery] = {}
    parts = _HEADER.split(source)
    for name, prepared, body in zip(parts[1::3], parts[2::3], parts[3::3]):
        statement = body.strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not statement:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = NamedQuery(name, statement, bool(prepared))
    return queries


def prepared_form(query: NamedQuery) -> tuple[list[str], str]:
    """The PREPARE statements of a query, and the statement list that EXECUTEs them."""
    prepares: list[str] = []
    calls: list[str] = []
    body = _COMMENT_LINE.sub("", query.sql)
    statements = [statement.strip() for statement in _STATEMENT_END.split(body) if statement.strip()]
    for index, statement in enumerate(statements):
        numbered, names = _number_parameters(statement)
        handle = f"bloom_{query.name}_{index}"
        types = ", ".join(PARAMETER_TYPES.get(name, "text") for name in names)
        prepares.append(f"PREPARE {handle} ({types}) AS {numbered}" if names else f"PREPARE {handle} AS {numbered}")
        calls.append(f"EXECUTE {handle} ({', '.join(':' + name for name in names)})" if names else f"EXECUTE {handle}")
    return prepares, ";\n".join(calls)


def _number_parameters(statement: str) -> tuple[str, list[str]]:
    """`:name` parameters as `$1, $2, ...` in order of first use, and their names."""
    names = list(dict.fromkeys(_PARAMETER.findall(statement)))
    positions = {name: position for position, name in enumerate(names, start=1)}
    return _PARAMETER.sub(lambda match: f"${positions[match.group(1)]}", statement), names


def driver_form(statement: str) -> str:
    """The statement as psycopg2 takes it with a dict of arguments: `:name` becomes
    `%(name)s`, and a literal `%` is doubled."""
    return _PARAMETER.sub(r"%(\1)s", statement.replace("%", "%%"))


def _load() -> tuple[dict[str, str], frozenset[str], str]:
    source = (Path(__file__).with_name("queries.sql")).read_text(encoding="utf-8")
    queries = parse_named_queries(source)
    statements: dict[str, str] = {}
    prepares: list[str] = []
    for name, query in queries.items():
        if query.prepared:
            query_prepares, calls = prepared_form(query)
            prepares.extend(query_prepares)
            statements[name] = driver_form(calls)
        else:
            statements[name] = driver_form(query.sql)
    prepared = frozenset(name for name, query in queries.items() if query.prepared)
    return statements, prepared, ";\n".join(prepares)


# What is sent for each named query (in psycopg2's parameter style); which of them are
# prepared; the PREPAREs of all of them (sent without arguments, so as they are).
QUERIES, PREPARED_QUERIES, PREPARE_STATEMENTS = _load()
