"""The job store's database: SQLite (the embedded default) or PostgreSQL, behind one small interface.

:class:`node.store.jobstore.JobStore` writes its SQL once, in what both engines understand (``?``
placeholders, ``INSERT ... ON CONFLICT ... DO UPDATE``, ``RETURNING``); this module holds what
differs:

============================  ===============================  ===================================
                              SQLite                           PostgreSQL (psycopg 3)
============================  ===============================  ===================================
placeholders                  ``?``                            ``?`` rewritten to ``%s``
a write transaction           ``BEGIN IMMEDIATE`` (one writer  ``BEGIN`` + a transaction-scoped
                              at a time, across processes)     advisory lock: one writer at a time
column types                  ``INTEGER PRIMARY KEY``, REAL    identity ``BIGINT``, DOUBLE PRECISION
rows                          by name and by index             the same (:class:`Row`)
============================  ===============================  ===================================

Writers are serialised on PostgreSQL as they are on SQLite, so the job store's state machine runs
unchanged on both (read-then-write steps such as "create the series unless it exists" need no
retry loop).  Each write transaction is short (milliseconds, no file is read inside one); a row
commits in ~0.4 ms over loopback (../shared/field-notes.md), far below what one receiver records.

The schema's version is kept in ``schema_version``: an older database is upgraded at start-up, a
newer one (written by a later dicom-node) is refused with a message saying so.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from node.telemetry.logsetup import first_line

__all__ = [
    "Database", "DatabaseError", "PostgresDatabase", "Row", "SqliteDatabase", "describe_url", "unavailable",
]

#: The advisory lock key every job store write transaction takes on PostgreSQL ("dnod").
WRITE_LOCK_KEY = 0x646E6F64


class DatabaseError(Exception):
    """The job store's database cannot be used; the message says which and why (never a password)."""


class Database(Protocol):
    """What :class:`node.store.jobstore.JobStore` needs of a database connection."""

    dialect: str
    #: Serialises this connection's use by the threads of one process.
    lock: threading.RLock

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the result has ``fetchone``, ``fetchall``, ``rowcount`` and iteration."""

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""

    def transaction(self) -> Any:
        """A context manager: one write transaction (one writer at a time), rolled back on error."""

    def columns(self, table: str) -> set[str]:
        """The column names of *table* (empty when it does not exist)."""

    def close(self) -> None:
        """Close the connection."""


class SqliteDatabase:
    """One SQLite file in WAL mode, shared by the threads of a process (and by other processes).

    Parameters
    ----------
    path : Path
        The database file (its folder is created).
    check : callable, optional
        Called with the new connection before anything is written (an integrity check); an
        exception closes the connection and is raised.
    """

    dialect = "sqlite"

    def __init__(self, path: Path, *, check: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        if check is not None:
            try:
                check(self._db)  # before anything is written to the file
            except BaseException:
                self._db.close()
                raise
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        self._db.execute("PRAGMA foreign_keys=ON")

    def __repr__(self) -> str:
        return f"SQLite {self.path}"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[SqliteDatabase]:
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @property
    def connection(self) -> sqlite3.Connection:
        """The sqlite3 connection."""
        return self._db

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def schema_types(self, ddl: str) -> str:
        """*ddl* as SQLite takes it (the job store's schema is written for SQLite)."""
        return ddl

    def close(self) -> None:
        with self.lock:
            self._db.close()


class Row(tuple):
    """A result row readable by index and by column name (as :class:`sqlite3.Row` is)."""

    _names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return super().__getitem__(self._names.index(key))
            except ValueError:
                raise IndexError(f"no column {key!r}") from None
        return super().__getitem__(key)

    def keys(self) -> tuple[str, ...]:
        """Column names, so that ``dict(row)`` works."""
        return self._names


def _row_factory(cursor: Any) -> Any:
    names = tuple(column.name for column in cursor.description or ())
    row_class = type("Row", (Row,), {"_names": names, "__slots__": ()})
    return lambda values: row_class(values)


_PLACEHOLDER = re.compile(r"\?")
_PG_TYPES = (
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
)


def describe_url(url: str) -> str:
    """``host:port/database`` of a PostgreSQL URL (never its user's password): for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}/{parts.path.lstrip('/') or '?'}"


class PostgresDatabase:
    """One PostgreSQL connection (psycopg 3, autocommit between transactions).

    Parameters
    ----------
    url : str
        ``postgresql://user@host:port/database``.
    password : str, optional
        The password (from the environment variable the config names), kept out of *url*.
    connect_timeout : float
        Seconds to wait for the server.
    """

    dialect = "postgresql"

    def __init__(self, url: str, *, password: str | None = None, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.lock = threading.RLock()
        self._password = password
        self._timeout = max(1, int(connect_timeout))
        self._db = self._connect()

    def _connect(self) -> Any:
        import psycopg

        extra = {"password": self._password} if self._password else {}
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=self._timeout,
                                   row_factory=_row_factory, **extra)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL at {describe_url(self.url)}: "
                                f"{first_line(exc)}") from None

    def _connection(self) -> Any:
        """The connection, made again when the server closed it (a restart, a network cut).

        Only between statements: a statement that fails raises to its caller, whose next call
        reconnects.  Nothing is retried here, so nothing is done twice.
        """
        if self._db.closed or self._db.broken:
            self._db = self._connect()
        return self._db

    def __repr__(self) -> str:
        return f"PostgreSQL {describe_url(self.url)}"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.lock:
            return self._connection().execute(_PLACEHOLDER.sub("%s", sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.lock, self._connection().cursor() as cursor:
            cursor.executemany(_PLACEHOLDER.sub("%s", sql), rows)

    @contextmanager
    def transaction(self) -> Iterator[PostgresDatabase]:
        with self.lock:
            with self._begin():
                yield self

    @contextmanager
    def _begin(self) -> Iterator[None]:
        """BEGIN and the write lock; a connection the server dropped meanwhile (a restart) is made again
        once, before anything of the transaction was sent, so nothing is done twice."""
        import psycopg

        for attempt in (1, 2):
            transaction = self._connection().transaction()
            try:
                transaction.__enter__()
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            except psycopg.OperationalError:
                with contextlib.suppress(Exception):
                    self._db.close()
                if attempt == 2:
                    raise
                continue
            break
        try:
            yield
        except BaseException as exc:
            if not transaction.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            transaction.__exit__(None, None, None)

    @property
    def connection(self) -> Any:
        """The psycopg connection (inside :meth:`transaction`: the one the transaction runs on)."""
        return self._db

    def columns(self, table: str) -> set[str]:
        rows = self.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = ?", (table,))
        return {row[0] for row in rows}

    def schema_types(self, ddl: str) -> str:
        """The job store's (SQLite) *ddl* with PostgreSQL's types."""
        for pattern, replacement in _PG_TYPES:
            ddl = pattern.sub(replacement, ddl)
        return ddl

    def close(self) -> None:
        with self.lock:
            self._db.close()


def unavailable(exc: BaseException) -> bool:
    """Whether *exc* says the job store cannot be reached or used now (not a bug): for quieter logs."""
    if isinstance(exc, DatabaseError | OSError | sqlite3.OperationalError):
        return True
    import psycopg

    return isinstance(exc, psycopg.OperationalError)
