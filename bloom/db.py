"""The engine, one transaction per unit of work, and the schema."""
from __future__ import annotations

import hashlib
import logging
import re
import select
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.pool import PoolProxiedConnection

from .db_reachability import Reachability
from .errors import Unavailable
from .sql import PREPARE_STATEMENTS, PREPARED_QUERIES, QUERIES

log = logging.getLogger(__name__)

_PREPARED_KEY = "bloom.statements_prepared"
_UNKNOWN_PREPARED_STATEMENT = "26000"  # invalid_sql_statement_name
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
SCHEMA_DIGEST_KEY = "schema_sha256"
# Every table schema.sql creates, read from it once.
SCHEMA_TABLES = re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA_PATH.read_text(encoding="utf-8"))


class Database:
    """Wraps one SQLAlchemy engine (psycopg2) and runs named statements.

    Every connection is in driver-level autocommit, and transactions are plain SQL
    (BEGIN ... COMMIT): a single-statement unit of work costs one round trip, a named
    list of statements sent as one query (see `script`) too, and no connection
    pays for switching its isolation mode back and forth on each checkout.

    SQLAlchemy's engine owns the connections (pool, checkout check, recycling, the
    driver's settings); the named statements run on the pooled driver connection itself.
    They are text written once in the .sql files with nothing to compile, and SQLAlchemy's
    Connection and Result around each call cost about as much CPU as the call itself
    (docs/PERFORMANCE.md). Driver errors are raised as SQLAlchemy's DBAPIError, as a
    Connection would raise them.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        max_overflow: int = 8,
        connect_timeout_s: int = 2,
        statement_timeout_ms: int = 15000,
        lock_timeout_ms: int = 5000,
    ) -> None:
        # No pre-ping (a round trip per request): a checkout looks at the socket instead
        # (see _discard_if_closed_by_server). A connection that died silently (no FIN
        # from a lost host) still fails its next statement (503) and is discarded; the
        # next request gets another.
        self.engine: Engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_recycle=1800,
            pool_timeout=5,
            # Bounded everywhere: a connection attempt, a statement, a wait for a row lock,
            # and a transaction left open by a client that vanished. A long poll waits
            # outside any statement (queue_events.py), so none of these cut it short.
            connect_args={
                "connect_timeout": connect_timeout_s,
                "application_name": "bloom-runtime",
                "options": (
                    f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={lock_timeout_ms}"
                    " -c idle_in_transaction_session_timeout=60000"
                ),
            },
        )
        event.listen(self.engine, "checkout", _discard_if_closed_by_server)
        # Whether PostgreSQL answers this process now (db_reachability.py): while it does
        # not, units of work fail at once and statements under way are cut.
        self.reachability = Reachability(make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False), connect_timeout_s=connect_timeout_s)
        self._ping_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bloom-ping")
        self._ping: Future | None = None
        self._ping_lock = threading.Lock()
        # The last time a statement failed for want of a resource (a full disk), and which.
        self._exhausted: tuple[float, str] | None = None

    EXHAUSTED_SAID_FOR_S = 30.0

    def note_exhausted(self, resource: str) -> None:
        """A statement failed because PostgreSQL is out of `resource` (errors.exhausted_resource)."""
        self._exhausted = (time.monotonic(), resource)

    def exhausted(self) -> str | None:
        """What PostgreSQL was out of at a statement of this process's in the last
        EXHAUSTED_SAID_FOR_S (writes fail while pings still answer), or None."""
        noted = self._exhausted
        if noted is None or time.monotonic() - noted[0] > self.EXHAUSTED_SAID_FOR_S:
            return None
        return noted[1]

    @contextmanager
    def autocommit(self) -> Iterator[Queries]:
        """Statements that are each a whole unit of work, committed as they run."""
        self.reachability.start()
        if not self.reachability.reachable:
            raise Unavailable("Database unreachable, try again")
        try:
            connection = self.engine.raw_connection()
        except psycopg2.Error as error:  # could not connect: as engine.connect() raises it
            raise DBAPIError.instance(None, None, error, psycopg2.Error) from error
        try:
            yield Queries(connection, self.engine.dialect, self.reachability)
        finally:
            connection.close()  # back to the pool (or gone, if it was invalidated)

    @contextmanager
    def transaction(self) -> Iterator[Queries]:
        """Several statements as one unit: commit on a clean exit, roll back on any exception."""
        with self.autocommit() as queries:
            queries.execute("begin")
            try:
                yield queries
            except BaseException:
                queries.rollback_quietly()
                raise
            queries.execute("commit")

    def script(self, query: str, **params: Any) -> dict[str, Any]:
        """Run a named list of statements in one round trip and return the row of the
        last. Sent as one query, the statements are one transaction on the server: all
        of it commits once the last is done, or an error rolls all of it back."""
        with self.autocommit() as queries:
            return queries.one(query, **params)

    def answers_within(self, seconds: float) -> bool:
        """Does PostgreSQL answer `SELECT 1` within `seconds`? For /ready: a server that is
        frozen (not down) accepts connections and never answers, and no driver timeout
        fires on a connection already open. The ping runs on a thread of its own; while a
        ping is still stuck, the answer is no, without starting another."""
        if not self.reachability.reachable:
            return False
        with self._ping_lock:
            if self._ping is None or self._ping.done():
                self._ping = self._ping_executor.submit(self._select_one)
            ping = self._ping
        try:
            ping.result(timeout=seconds)
            return True
        except Exception:  # timed out, or the database refused
            return False

    def _select_one(self) -> None:
        with self.autocommit() as queries:
            queries.one("ping")

    def dispose(self) -> None:
        self.reachability.close()
        self.engine.dispose()


def _discard_if_closed_by_server(dbapi_connection, connection_record, connection_proxy) -> None:
    """An idle pooled connection has nothing to read. If its socket is readable, the
    server has closed it (restart, failover, idle timeout) or is saying why it will:
    the pool then replaces it before any statement is sent. A poll(2), not a round trip."""
    if dbapi_connection.closed:
        raise DisconnectionError("closed while idle in the pool")
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN)
    if poller.poll(0):
        raise DisconnectionError("closed by the server while idle in the pool")


class Queries:
    """Runs named statements on one pooled driver connection (in a transaction, or
    autocommitting). Rows come back as dicts keyed by column name."""

    def __init__(self, connection: PoolProxiedConnection, dialect: Dialect, reachability: Reachability) -> None:
        self.connection = connection
        self._dialect = dialect
        self._reachability = reachability

    def _run(self, query: str, params: dict[str, Any]):
        """Execute a named query; return its cursor, holding the last statement's rows."""
        prepared = query in PREPARED_QUERIES
        if prepared and not self.connection.info.get(_PREPARED_KEY):
            self._prepare()
        try:
            return self._execute(QUERIES[query], params)
        except DBAPIError as error:
            if not (prepared and getattr(error.orig, "pgcode", None) == _UNKNOWN_PREPARED_STATEMENT):
                raise
            # The session forgot them (DISCARD ALL, or a pooler that hands out another
            # server session). Nothing ran: EXECUTE failed before its statement did. A
            # unit of work of its own has been rolled back by the server (the session is
            # idle again) and is sent once more; inside a caller's transaction, now
            # aborted, the error stands, and the next unit of work prepares again.
            self.connection.info.pop(_PREPARED_KEY, None)
            if self._transaction_status() != TRANSACTION_STATUS_IDLE:
                raise
            self._prepare()
            return self._execute(QUERIES[query], params)

    def _execute(self, statement: str, params: dict[str, Any] | None):
        cursor = self.connection.cursor()
        fd = self.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
        self._reachability.statement_started(fd)
        try:
            cursor.execute(statement, params)
        except psycopg2.Error as error:
            cursor.close()
            # While PostgreSQL is unreachable the watch cuts the sockets of statements under
            # way, and libpq says so in more ways than SQLAlchemy knows as a disconnect (a
            # bare DatabaseError with no SQLSTATE among them): whatever it says then, the
            # connection is gone, and the caller gets a 503, not a 500.
            raise self._wrapped(error, statement, params, cut=not self._reachability.reachable) from error
        finally:
            self._reachability.statement_ended(fd)
        return cursor

    def _wrapped(self, error: psycopg2.Error, statement: str, params: dict[str, Any] | None, *,
                 cut: bool = False) -> DBAPIError:
        """The driver's error as SQLAlchemy raises it; a connection that is gone is
        invalidated, so that the pool never hands it out again."""
        lost = cut or self._dialect.is_disconnect(error, self.connection.dbapi_connection, None)
        if lost:
            self.connection.invalidate(error)
        return DBAPIError.instance(statement, params, error, psycopg2.Error, connection_invalidated=lost)

    def _transaction_status(self) -> int:
        dbapi_connection: Any = self.connection.dbapi_connection
        return dbapi_connection.info.transaction_status

    def _prepare(self) -> None:
        """Prepare every hot statement on this connection: once per pooled connection
        (the mark goes with the connection when it is discarded). Prepared statements
        outlive a rollback; DEALLOCATE ALL first makes preparing again harmless."""
        self.run_sql("DEALLOCATE ALL;\n" + PREPARE_STATEMENTS)
        self.connection.info[_PREPARED_KEY] = True

    def run_sql(self, sql: str) -> None:
        """Send SQL text as it is, without arguments (the schema, PREPAREs)."""
        self._execute(sql, None).close()

    def execute(self, query: str, **params: Any) -> None:
        self._run(query, params).close()

    def rollback_quietly(self) -> None:
        try:
            self.execute("rollback")
        except Exception:  # a broken connection has rolled back by itself
            log.warning("rollback failed; the connection is discarded")

    def all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        with self._run(query, params) as cursor:
            names = _column_names(cursor)
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def one_or_none(self, query: str, **params: Any) -> dict[str, Any] | None:
        with self._run(query, params) as cursor:
            row = cursor.fetchone()
            return dict(zip(_column_names(cursor), row, strict=True)) if row is not None else None

    def one(self, query: str, **params: Any) -> dict[str, Any]:
        with self._run(query, params) as cursor:
            if cursor.rowcount != 1:
                raise LookupError(f"query {query!r} returned {cursor.rowcount} rows, expected exactly one")
            return dict(zip(_column_names(cursor), cursor.fetchone(), strict=True))


def _column_names(cursor) -> list[str]:
    return [column.name for column in cursor.description]


def apply_schema(database: Database, *, force: bool = False) -> bool:
    """Apply schema.sql unless this very file was applied already; True if it ran.

    An advisory lock keeps concurrently starting processes in line, and the digest of
    the file applied last (in runtime_settings) lets every other start skip the DDL:
    ALTER TABLE takes an exclusive lock on its table even when there is nothing to add,
    and a process applying it while another one serves deadlocked with the requests.
    `force` (flask init-db) applies it whatever the digest says."""
    ddl = SCHEMA_PATH.read_text(encoding="utf-8")
    digest = hashlib.sha256(ddl.encode()).hexdigest()
    with database.transaction() as tx:
        tx.run_sql("SET LOCAL statement_timeout = 0")  # an upgrade may build indexes
        tx.one("apply_schema_lock")
        if not force and tx.one("settings_table_exists")["present"]:
            applied = tx.one_or_none("get_settings_value", key=SCHEMA_DIGEST_KEY)
            # The stored digest says which schema.sql was applied, not that its tables are
            # still there: a restore of some tables only (with runtime_settings among them)
            # carried the digest over, and the start skipped the DDL the missing tables need.
            missing = [row["name"] for row in tx.all("missing_tables", tables=SCHEMA_TABLES)]
            if applied is not None and applied["value"] == digest and not missing:
                return False
            if missing:
                log.warning("tables missing from the database (%s): applying the schema", ", ".join(missing))
        tx.run_sql(ddl)
        tx.execute("put_setting", key=SCHEMA_DIGEST_KEY, value=digest, now=int(time.time() * 1000))
    log.info("schema applied")
    return True
