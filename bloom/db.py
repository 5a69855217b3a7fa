"""The engine, one transaction per unit of work, and the schema."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Connection, create_engine
from sqlalchemy.engine import Engine, Row

from .sql import QUERIES

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"


class Database:
    """Wraps one SQLAlchemy engine (psycopg2) and runs named statements in transactions."""

    def __init__(self, url: str, *, pool_size: int = 5, max_overflow: int = 5) -> None:
        self.engine: Engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_pre_ping=True,  # a PostgreSQL restart costs one failed request, not a dead process
            pool_recycle=1800,
            pool_timeout=5,
            connect_args={"connect_timeout": 5, "application_name": "bloom-runtime"},
        )

    @contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """Commit on a clean exit, roll back on any exception."""
        with self.engine.begin() as connection:
            yield Transaction(connection)

    def dispose(self) -> None:
        self.engine.dispose()


class Transaction:
    """One open transaction; every statement goes through a named query."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def execute(self, query: str, **params: Any) -> None:
        self.connection.execute(QUERIES[query], params)

    def all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        return [dict(row._mapping) for row in self.connection.execute(QUERIES[query], params)]

    def one_or_none(self, query: str, **params: Any) -> dict[str, Any] | None:
        row: Row | None = self.connection.execute(QUERIES[query], params).first()
        return dict(row._mapping) if row is not None else None

    def one(self, query: str, **params: Any) -> dict[str, Any]:
        return dict(self.connection.execute(QUERIES[query], params).one()._mapping)


def apply_schema(database: Database) -> None:
    """Apply schema.sql; an advisory lock keeps concurrently starting processes in line."""
    ddl = SCHEMA_PATH.read_text(encoding="utf-8")
    with database.transaction() as tx:
        tx.one("apply_schema_lock")
        tx.connection.exec_driver_sql(ddl)
    log.info("schema applied")
