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
    """Wraps one SQLAlchemy engine (psycopg2) and runs named statements.

    Every connection is in driver-level autocommit, and transactions are plain SQL
    (BEGIN ... COMMIT): a single-statement unit of work costs one round trip, and no
    connection pays for switching its isolation mode back and forth on each checkout.
    """

    def __init__(self, url: str, *, pool_size: int = 5, max_overflow: int = 5) -> None:
        # No pre-ping (a round trip per request): after a PostgreSQL restart the first
        # statement on a dead connection fails (503), SQLAlchemy then discards every
        # connection of the pool, and the next request reconnects.
        self.engine: Engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_recycle=1800,
            pool_timeout=5,
            connect_args={"connect_timeout": 5, "application_name": "bloom-runtime"},
        )

    @contextmanager
    def autocommit(self) -> Iterator["Queries"]:
        """Statements that are each a whole unit of work, committed as they run."""
        with self.engine.connect() as connection:
            yield Queries(connection)

    @contextmanager
    def transaction(self) -> Iterator["Queries"]:
        """Several statements as one unit: commit on a clean exit, roll back on any exception."""
        with self.autocommit() as queries:
            queries.execute("begin")
            try:
                yield queries
            except BaseException:
                queries.rollback_quietly()
                raise
            queries.execute("commit")

    @contextmanager
    def scripted_transaction(self) -> Iterator["ScriptedTransaction"]:
        """A transaction whose BEGIN and COMMIT travel inside its own named statements."""
        with self.autocommit() as queries:
            transaction = ScriptedTransaction(queries)
            try:
                yield transaction
            finally:
                if not transaction.committed:
                    queries.rollback_quietly()

    def dispose(self) -> None:
        self.engine.dispose()


class ScriptedTransaction:
    """A transaction whose BEGIN and COMMIT travel inside its named statements.

    Used where a row lock must be held as briefly as possible: the locking statement
    opens the transaction, the last one commits it in the same round trip. Whatever
    does not reach that commit is rolled back on the way out.
    """

    def __init__(self, queries: "Queries") -> None:
        self.queries = queries
        self.committed = False

    def one(self, query: str, **params: Any) -> dict[str, Any]:
        return self.queries.one(query, **params)

    def all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        return self.queries.all(query, **params)

    def commit_with(self, query: str, **params: Any) -> dict[str, Any]:
        row = self.queries.one(query, **params)
        self.committed = True
        return row


class Queries:
    """Runs named statements on one connection (in a transaction, or autocommitting)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def execute(self, query: str, **params: Any) -> None:
        self.connection.execute(QUERIES[query], params)

    def rollback_quietly(self) -> None:
        try:
            self.execute("rollback")
        except Exception:  # a broken connection has rolled back by itself
            log.warning("rollback failed; the connection is discarded")

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
