"""Loads every named SQL statement once: a reader sees the exact SQL that runs.

Each area of the domain keeps its statements beside its service, in a `.sql` file of
its own (`bloom/tasks/queries.sql`, `bloom/leases/queries.sql`, ...; the infrastructure's
in `bloom/db.sql`, `bloom/scheduler.sql`, ...); names are unique across all of them.
Conventions, everywhere:
- Each statement sits under a `-- name: <name>` header; parameters are `:named`; times
  are epoch milliseconds passed in by the caller.
- Each state change is one statement whose precondition sits in its WHERE clause, so two
  racing requests cannot both win.
- A `-- fragment: <name>` section is a piece of SQL that several statements share (the
  worker's "alive" update); a statement says `-- include: <name>` on a line of its own
  where the fragment's text goes. One place to read it and to change it.
- `(prepared)` marks a hot path. Each of its statements is prepared once per pooled
  connection (PREPARE ... AS, with `:name` parameters numbered in order of first use),
  and every call sends EXECUTE with the arguments instead: PostgreSQL parses and plans
  the statement once per connection rather than on every call. Planning was most of
  PostgreSQL's CPU time on the lease path (docs/PERFORMANCE.md). Its result is json or
  named columns, never `*`: a prepared statement whose result columns changed (a column
  added by an upgrade) would fail until its connection is replaced.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEADER = re.compile(r"^--\s*(name|fragment):\s*(\w+)(\s+\(prepared\))?\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"^([ \t]*)--\s*include:\s*(\w+)\s*$", re.MULTILINE)
_COMMENT_LINE = re.compile(r"^\s*--.*(?:\n|$)", re.MULTILINE)
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)
# SQLAlchemy's own rule for a :named parameter (a `::type` cast is not one).
_PARAMETER = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")

# Declared types of the parameters of prepared statements; any other is text.
PARAMETER_TYPES = {
    "now": "bigint",  # epoch milliseconds
    "ttl_seconds": "integer",
    "default_timeout_sec": "integer",
    "leader_epoch": "bigint",
    "max_attempts": "integer",
    "priority": "integer",
    "max_running_per_key": "integer",
    "agent_slugs": "text[]",
    "lease_ids": "text[]",
    "full_addresses": "text[]",
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


def parse_named_queries(*sources: str) -> dict[str, NamedQuery]:
    """Split files of `-- name: x` (and `-- fragment: x`) sections into {name: query},
    with every `-- include: x` line replaced by fragment x."""
    queries: dict[str, NamedQuery] = {}
    fragments: dict[str, str] = {}
    for source in sources:
        parts = _HEADER.split(source)
        for kind, name, prepared, body in zip(parts[1::4], parts[2::4], parts[3::4], parts[4::4], strict=True):
            text = body.strip()
            if name in queries or name in fragments:
                raise ValueError(f"query {name!r} is defined twice")
            if not text:
                raise ValueError(f"query {name!r} is empty")
            if kind == "fragment":
                fragments[name] = text
            else:
                queries[name] = NamedQuery(name, text, bool(prepared))
    return {name: NamedQuery(name, _with_fragments(query.sql, fragments), query.prepared)
            for name, query in queries.items()}


def _with_fragments(sql: str, fragments: dict[str, str], including: tuple[str, ...] = ()) -> str:
    """Every `-- include:` line replaced by its fragment, whose own includes are
    replaced in turn (a fragment that includes itself, directly or not, is an error)."""
    def include(match: re.Match) -> str:
        name = match.group(2)
        if name not in fragments:
            raise ValueError(f"fragment {name!r} is not defined")
        if name in including:
            raise ValueError(f"fragment {name!r} includes itself")
        text = _with_fragments(fragments[name], fragments, (*including, name))
        return "\n".join(match.group(1) + line for line in text.splitlines())

    return _INCLUDE.sub(include, sql)


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
    files = sorted(Path(__file__).parent.rglob("*.sql"))
    queries = parse_named_queries(*(path.read_text(encoding="utf-8") for path in files))
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
