"""The job store: every series, instance and delivery, and the state each is in (SQLite, WAL).

Series move through::

    receiving -> queued -> processing -> delivering -> delivered
                                    \\-> unrouted     \\-> failed   (kept; ``dicom-node retry``)

An instance that arrives for a series in any state re-opens it (back to ``receiving``); one that
arrives while the series is being processed bumps its *generation*, and the worker's result for the
older generation then schedules nothing, so the series settles and is processed again whole.

The store is the hand-off between series assembly and processing: workers claim queued series
with one atomic UPDATE, so nothing in the pipeline depends on running in the receiver's process.
The spool stays the source of truth for received instances: :meth:`JobStore.reconcile` re-records
any spooled file the database does not know (after a crash between the two writes), and
:meth:`JobStore.rebuild` sets a damaged database aside and records the whole spool again.

A series whose processing never finishes (the worker was killed, e.g. by the kernel's out-of-memory
killer, or timed out) is not re-queued for ever: each claim is counted
(``series.processing_attempts``), a finished processing resets the count, and an interrupted one
(:meth:`JobStore.recover` at start-up, :meth:`JobStore.abandon` for a worker that died) is queued
again only while the count is below ``[node] max_processing_attempts``; then the series is failed
with that reason, kept for ``dicom-node retry`` (which resets the count).

Opening a store checks it (``PRAGMA quick_check``, bounded in time); a file that is damaged or
cannot be opened raises :class:`JobStoreError`, whose message names the file and the fix.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from node.store.database import Database, DatabaseError, PostgresDatabase, SqliteDatabase
from node.store.fsutil import fsync_dir
from node.store.spool import Spool

if TYPE_CHECKING:
    from node.config import Config
    from node.store.dispatch import Dispatcher

__all__ = [
    "DEFAULT_MAX_PROCESSING_ATTEMPTS", "Delivery", "DeliveryState", "JobStore", "JobStoreError", "Rebuilt",
    "Reconciled", "SeriesJob", "SeriesState", "job_store_for", "open_job_store",
]

log = logging.getLogger(__name__)

#: ``[node] max_processing_attempts`` when not configured.
DEFAULT_MAX_PROCESSING_ATTEMPTS = 2

#: Seconds the integrity check at open may take (0.2 s for a 300 MB store of a million instances,
#: warm); a check that has not finished by then is given up with a warning and the store is used.
CHECK_SECONDS = 20.0

#: Why a series' processing was interrupted when the node restarts with it still ``processing``.
NODE_STOPPED = "the node stopped during processing (killed, crashed or out of memory)"

_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


class SeriesState(str, Enum):
    """Where a series is in its life."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    UNROUTED = "unrouted"
    DISCARDED = "discarded"


class DeliveryState(str, Enum):
    """Where one series' delivery to one destination is."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    instances INTEGER NOT NULL DEFAULT 0,
    modality TEXT,
    calling_ae TEXT,
    first_received REAL,
    last_received REAL,
    opened_at REAL,
    trigger TEXT,
    route TEXT,
    pipeline TEXT,
    output_dir TEXT,
    derived_series_uid TEXT,
    outputs INTEGER,
    error TEXT,
    processing_seconds REAL,
    processing_attempts INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_received);
CREATE INDEX IF NOT EXISTS series_derived ON series(derived_series_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series(id),
    sop_class_uid TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    delivered_at REAL,
    updated_at REAL NOT NULL,
    UNIQUE(series_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_series ON events(series_id);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: Version of :data:`_SCHEMA` (kept in the ``schema_version`` table). 1: before the table existed.
SCHEMA_VERSION = 2
#: Columns of ``series`` added since the first release: a database without them gets them.
_ADDED_COLUMNS = {"derived_series_uid": "TEXT", "opened_at": "REAL", "trigger": "TEXT",
                  "processing_attempts": "INTEGER NOT NULL DEFAULT 0", "claimed_by": "TEXT"}


@dataclass(frozen=True)
class SeriesJob:
    """A series claimed for processing."""

    id: int
    study_uid: str
    series_uid: str
    generation: int
    instance_paths: tuple[Path, ...]


@dataclass(frozen=True)
class Delivery:
    """One series to send to one destination."""

    id: int
    series_id: int
    study_uid: str
    series_uid: str
    destination: str
    attempts: int
    generation: int
    output_dir: Path


class JobStoreError(DatabaseError):
    """The job store cannot be used: damaged, unreadable, or being rebuilt.

    Attributes
    ----------
    path : pathlib.Path
        The database file.
    problem : str
        What is wrong with it.
    damaged : bool
        True when the file itself is damaged (the fix is ``dicom-node store rebuild``).
    """

    def __init__(self, path: Path, problem: str, *, damaged: bool = False) -> None:
        self.path = Path(path)
        self.problem = problem
        self.damaged = damaged
        super().__init__(self.message())

    def message(self, config: Path | None = None) -> str:
        """One line for the operator: the file, what is wrong, and the fix (*config*: their config file)."""
        if not self.damaged:
            return f"{self.path}: {self.problem}"
        command = "dicom-node store rebuild" + (f" --config {config}" if config is not None else "")
        return (f"{self.path}: the job store is damaged ({self.problem}); every received instance is still in "
                f"the spool: stop the node and run `{command}` to set the damaged file aside and record the "
                "spool again")


def _cannot_open(path: Path, exc: BaseException) -> JobStoreError:
    """The :class:`JobStoreError` for *exc*, raised while opening or checking *path*."""
    if getattr(exc, "sqlite_errorname", None) in _DAMAGED:
        return JobStoreError(path, str(exc), damaged=True)
    return JobStoreError(path, f"the job store cannot be opened ({exc}): check that it and its folder are readable "
                               "and writable by the user the node runs as, and that the disk is not full or failing")


class _FolderLock:
    """An advisory lock (``flock``) on the folder of a job store.

    Every open :class:`JobStore` holds it shared; :meth:`JobStore.rebuild` holds it exclusive, so a
    store is never rebuilt under a running node, and a node never starts on one being rebuilt.
    Released when closed (or when the process ends, however it ends).
    """

    def __init__(self, path: Path, *, exclusive: bool) -> None:
        self._fd: int | None = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            if exclusive:
                raise JobStoreError(path, "the job store is in use (a running node, or another dicom-node command): "
                                          "stop the node first") from None
            raise JobStoreError(path, "the job store is being rebuilt (`dicom-node store rebuild`): "
                                      "start the node when it has finished") from None

    def close(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _check(db: Database, path: Path, seconds: float) -> None:
    """``PRAGMA quick_check`` of *db*, given up after *seconds*; raises :class:`JobStoreError` if damaged."""
    deadline = time.monotonic() + seconds
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.OperationalError as exc:
        if time.monotonic() <= deadline:
            raise
        log.warning("%s: the integrity check did not finish in %g s; the store is used unchecked", path, seconds)
        return
    finally:
        db.set_progress_handler(None, 0)
    if problems != ["ok"]:
        lines = [line.strip() for problem in problems for line in problem.splitlines()
                 if line.strip() and not line.startswith("***")]  # "*** in database main ***"
        raise JobStoreError(path, "integrity check failed: " + "; ".join(lines)[:300], damaged=True)


@dataclass(frozen=True)
class Reconciled:
    """What :meth:`JobStore.reconcile` recorded."""

    instances: int
    series: int
    unreadable: int


@dataclass(frozen=True)
class Rebuilt:
    """What :meth:`JobStore.rebuild` did.

    Attributes
    ----------
    damage : str or None
        What the check found wrong with the old file (None: it was readable, or absent).
    set_aside : tuple of pathlib.Path
        Where the old database and its ``-wal``/``-shm`` files were moved (empty: nothing rebuilt).
    recorded : Reconciled or None
        What was recorded from the spool (None: nothing rebuilt).
    """

    damage: str | None
    set_aside: tuple[Path, ...]
    recorded: Reconciled | None


def _damage(path: Path) -> str | None:
    """What is wrong with the database at *path* (None: it opens and passes ``quick_check``, or is absent)."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        _check(db, path, CHECK_SECONDS)
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except JobStoreError as exc:
        return exc.problem
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        db.close()
    return None


def _set_aside(path: Path, label: str) -> tuple[Path, ...]:
    """Rename the database *path* and its -wal and -shm to ``<name>.<label>-<time>``; the new paths."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    number = 1
    while any(target.with_name(target.name + s).exists() for s in ("", "-wal", "-shm")):
        number += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}.{number}")
    moved = []
    for suffix in ("-wal", "-shm", ""):  # the WAL first: a new database must never meet the old WAL
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, target.with_name(target.name + suffix))
            moved.append(target.with_name(target.name + suffix))
    fsync_dir(path.parent)
    return tuple(reversed(moved))


class JobStore:
    """The job store over one database; safe to share between the threads of one process.

    Several processes (the receiver and its workers, or many machines on PostgreSQL) may each
    open their own :class:`JobStore` on the same database.

    Parameters
    ----------
    database : pathlib.Path or Database
        A SQLite file (created with its folder when absent), or an open :class:`node.store.database.Database`
        (PostgreSQL: :func:`open_job_store`).
    clock : callable, optional
        Returns the current time in seconds (``time.time``); injected by tests.
    dispatcher : node.store.dispatch.Dispatcher, optional
        On PostgreSQL: each series that becomes ``queued`` and each delivery that becomes
        ``pending`` gets its Procrastinate job in the same transaction (:mod:`node.store.dispatch`).

    Raises
    ------
    JobStoreError
        The SQLite file is damaged, cannot be opened, or is being rebuilt.
    DatabaseError
        The database was written by a newer dicom-node (its schema version is higher).
    """

    def __init__(self, database: Path | Database, *, clock: Any = time.time, dispatcher: Dispatcher | None = None,
                 _folder_lock: _FolderLock | None = None) -> None:
        self._clock = clock
        self._dispatcher = dispatcher
        self._folder_lock: _FolderLock | None = None
        if hasattr(database, "transaction"):
            self._db: Database = database
            self.path = getattr(database, "path", None)
        else:
            self.path = Path(database)
            self._db = self._open_sqlite(self.path, _folder_lock)
        self._lock = self._db.lock
        try:
            self._create_or_upgrade()
        except Exception as exc:
            if self._folder_lock is not None:  # opened here: closed here
                self.close()
            if isinstance(exc, sqlite3.Error):
                raise _cannot_open(self.path, exc) from exc
            raise

    def _open_sqlite(self, path: Path, folder_lock: _FolderLock | None) -> SqliteDatabase:
        """The SQLite file, locked against a rebuild and checked before anything is written to it."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._folder_lock = folder_lock or _FolderLock(path, exclusive=False)
        except OSError as exc:
            raise _cannot_open(path, exc) from exc
        try:
            return SqliteDatabase(path, check=lambda db: _check(db, path, CHECK_SECONDS))
        except (sqlite3.Error, JobStoreError) as exc:
            self._folder_lock.close()
            if isinstance(exc, JobStoreError):
                raise
            raise _cannot_open(path, exc) from exc

    def __repr__(self) -> str:
        return f"JobStore({self._db!r})"

    def _create_or_upgrade(self) -> None:
        """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`; refuse a newer one."""
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            found = row[0] if row is not None else None
            if found is not None and found > SCHEMA_VERSION:
                raise DatabaseError(
                    f"the job store {self._db!r} has schema version {found}, written by a newer dicom-node "
                    f"(this one knows up to {SCHEMA_VERSION}): run the newer version, or point [store] elsewhere")
            if found == SCHEMA_VERSION:
                return
            statements = [s.strip() for s in _SCHEMA.split(";") if s.strip()]
            for statement in statements:
                if statement.startswith("CREATE TABLE"):
                    db.execute(db.schema_types(statement))
            have = db.columns("series")
            for column, kind in _ADDED_COLUMNS.items():  # written by a version before schema_version existed
                if column not in have:
                    db.execute(f"ALTER TABLE series ADD COLUMN {column} {db.schema_types(kind)}")
            for statement in statements:
                if not statement.startswith("CREATE TABLE"):
                    db.execute(statement)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        """Close the database (and release the SQLite folder's lock)."""
        self._db.close()
        if self._folder_lock is not None:
            self._folder_lock.close()

    def _transaction(self) -> Any:
        return self._db.transaction()

    def _queued(self, db: Database, series_id: int) -> None:
        """A series became ``queued`` (inside a transaction): its processing job, when dispatching."""
        if self._dispatcher is not None:
            self._dispatcher.series_queued(db.connection, series_id)

    def _due(self, db: Database, delivery_id: int, destination: str, at: float) -> None:
        """A delivery became ``pending`` (inside a transaction): its job at *at*, when dispatching."""
        if self._dispatcher is not None:
            self._dispatcher.delivery_due(db.connection, delivery_id, destination, at)

    def _event(self, db: Database, series_id: int, state: str, detail: str | None = None) -> None:
        db.execute(
            "INSERT INTO events(series_id, at, state, detail) VALUES (?, ?, ?, ?)",
            (series_id, self._clock(), state, detail),
        )

    # -- ingest ---------------------------------------------------------------------------------

    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class_uid: str,
        path: Path,
        size: int,
        modality: str | None = None,
        calling_ae: str | None = None,
        received_at: float | None = None,
    ) -> bool:
        """Record a spooled instance and (re-)open its series; True if the instance is new."""
        with self._transaction() as db:
            return self._record(db, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                                sop_class_uid=sop_class_uid, path=path, size=size, modality=modality,
                                calling_ae=calling_ae, received_at=received_at)

    def record_instances(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Record several spooled instances in one transaction (a group commit); returns how many are new.

        Each row holds :meth:`record_instance`'s keyword arguments; they are recorded in order, each
        exactly as :meth:`record_instance` would. All or none: on an error nothing is recorded.
        """
        if not rows:
            return 0
        with self._transaction() as db:
            return sum(self._record(db, **row) for row in rows)

    def _record(self, db: Database, *, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str,
                path: Path, size: int, modality: str | None = None, calling_ae: str | None = None,
                received_at: float | None = None) -> bool:
        """:meth:`record_instance` inside the transaction *db*."""
        now = self._clock() if received_at is None else received_at
        row = db.execute("SELECT id, state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is None:
            series_id = db.execute(
                "INSERT INTO series(study_uid, series_uid, state, modality, calling_ae, first_received,"
                " last_received, opened_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (study_uid, series_uid, SeriesState.RECEIVING.value, modality, calling_ae, now, now, now, now),
            ).fetchone()[0]
            self._event(db, series_id, SeriesState.RECEIVING.value, f"first instance from {calling_ae}")
        else:
            series_id = row["id"]
            state = row["state"]
            if state == SeriesState.PROCESSING.value:
                new_state = state  # the worker sees the generation change and lets it settle again
            else:
                new_state = SeriesState.RECEIVING.value
                if state != new_state:
                    self._event(db, series_id, new_state, f"re-opened from {state} by a new instance")
            reopened = state not in (SeriesState.RECEIVING.value, SeriesState.PROCESSING.value)
            db.execute(
                "UPDATE series SET state = ?, generation = generation + 1, last_received = ?,"
                " opened_at = CASE WHEN ? THEN ? ELSE opened_at END, updated_at = ? WHERE id = ?",
                (new_state, now, reopened, now, now, series_id),
            )
        known = db.execute("SELECT series_id FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        db.execute(
            "INSERT INTO instances(sop_uid, series_id, sop_class_uid, path, size, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(sop_uid) DO UPDATE SET"
            " path = excluded.path, size = excluded.size, received_at = excluded.received_at",
            (sop_uid, series_id, sop_class_uid, str(path), size, now),
        )
        if known is None:
            db.execute("UPDATE series SET instances = instances + 1 WHERE id = ?", (series_id,))
        return known is None

    def is_derived(self, series_uid: str) -> bool:
        """Whether *series_uid* is a series this node produced (so it is never taken as new work)."""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM series WHERE derived_series_uid = ? LIMIT 1", (series_uid,)
            ).fetchone() is not None

    def known_paths(self) -> set[str]:
        """Every instance path recorded (for reconciling with the spool)."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT path FROM instances")}

    # -- series assembly ------------------------------------------------------------------------

    def settle(
        self,
        settle_seconds: float,
        *,
        study_settle_seconds: float | None = None,
        force_complete_seconds: float | None = None,
        trigger_of: Callable[[int], str] | None = None,
    ) -> dict[int, str]:
        """Queue the receiving series that are complete; returns their ids with the reason.

        DICOM never says a series is complete, so: a series is complete when no instance came for
        *settle_seconds*.  A series whose route has ``trigger = "study"`` (asked of *trigger_of*,
        once per series, then kept) waits until its whole study has had no instance for
        *study_settle_seconds*; then every such series of the study is queued together.  Anything
        still receiving *force_complete_seconds* after it (re-)opened is queued anyway, so a sender
        that never goes quiet cannot hold work back for ever.
        """
        now = self._clock()
        force = float("inf") if force_complete_seconds is None else force_complete_seconds

        def due(row: Any) -> tuple[bool, bool]:
            forced = row["opened_at"] is not None and row["opened_at"] <= now - force
            return row["last_received"] <= now - settle_seconds, forced

        if trigger_of is not None:
            self._find_triggers(trigger_of, lambda row: any(due(row)))
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, study_uid, instances, last_received, opened_at, trigger FROM series WHERE state = ?",
                (SeriesState.RECEIVING.value,),
            ).fetchall()
            ready: dict[int, str] = {}
            studies: dict[str, list[Any]] = {}
            for row in rows:
                quiet, forced = due(row)
                if not (quiet or forced):
                    continue
                trigger = row["trigger"]
                if trigger is None and trigger_of is not None:
                    continue  # settled since its trigger was looked up: the next pass has it
                if trigger == "study" and study_settle_seconds is not None:
                    studies.setdefault(row["study_uid"], [])
                elif forced and not quiet:
                    ready[row["id"]] = f"still receiving after {force:g} s: processed anyway"
                else:
                    ready[row["id"]] = f"settled with {row['instances']} instances"
            for study_uid in studies:
                members = [r for r in rows if r["study_uid"] == study_uid]
                last = max(r["last_received"] for r in members)
                opened = min(r["opened_at"] or r["last_received"] for r in members)
                if last <= now - study_settle_seconds:
                    why = f"study settled ({len(members)} series)"
                elif opened <= now - force:
                    why = f"study still receiving after {force:g} s: processed anyway"
                else:
                    continue
                for member in members:
                    ready[member["id"]] = why
            for series_id, why in ready.items():
                db.execute(
                    "UPDATE series SET state = ?, updated_at = ? WHERE id = ?",
                    (SeriesState.QUEUED.value, now, series_id),
                )
                self._event(db, series_id, SeriesState.QUEUED.value, why)
                self._queued(db, series_id)
        return ready

    def _find_triggers(self, trigger_of: Callable[[int], str], wanted: Callable[[Any], bool]) -> None:
        """Ask *trigger_of* (which reads a file) for the receiving series *wanted* that have no trigger yet.

        Outside any write transaction: recording instances never waits behind file reads.
        """
        with self._lock:
            rows = [r for r in self._db.execute(
                "SELECT id, last_received, opened_at FROM series WHERE state = ? AND trigger IS NULL",
                (SeriesState.RECEIVING.value,),
            ) if wanted(r)]
        triggers = {row["id"]: trigger_of(row["id"]) for row in rows}
        if triggers:
            with self._transaction() as db:
                db.executemany("UPDATE series SET trigger = ? WHERE id = ? AND trigger IS NULL",
                               [(trigger, series_id) for series_id, trigger in triggers.items()])

    def claim_next(self, worker: str | None = None) -> SeriesJob | None:
        """Take the oldest queued series for processing (atomic); None when there is none.

        Parameters
        ----------
        worker : str, optional
            Who claims it (kept in ``claimed_by`` until processing ends), so the claims of a worker
            that died can be found (:meth:`claimed_by`).

        Notes
        -----
        The claim is counted (``processing_attempts``) until a processing of the series finishes.
        """
        with self._lock:  # idle workers ask often: a read first, the write lock only when there is work
            if self._db.execute("SELECT 1 FROM series WHERE state = ? LIMIT 1",
                                (SeriesState.QUEUED.value,)).fetchone() is None:
                return None
        now = self._clock()
        with self._transaction() as db:
            row = db.execute("SELECT id FROM series WHERE state = ? ORDER BY last_received LIMIT 1",
                             (SeriesState.QUEUED.value,)).fetchone()
            return None if row is None else self._take(db, row["id"], worker, now)

    def claim(self, series_id: int, worker: str, *, max_attempts: int = DEFAULT_MAX_PROCESSING_ATTEMPTS
              ) -> SeriesJob | None:
        """Take series *series_id* for processing if it is queued (a dispatched job); None otherwise.

        A series still claimed by *worker* itself is an earlier run of the same job that did not
        finish (its worker died and the job was retried): that attempt is counted as
        :meth:`abandon` counts it, and the series is taken again unless it is now failed.
        """
        now = self._clock()
        with self._transaction() as db:
            row = db.execute("SELECT id, state, claimed_by, processing_attempts FROM series WHERE id = ?",
                             (series_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == SeriesState.PROCESSING.value and row["claimed_by"] == worker:
                reason = f"{worker}: its worker stopped heartbeating"
                if self._interrupted(db, row, reason, max_attempts, now, dispatch=False) == SeriesState.FAILED:
                    return None
            elif row["state"] != SeriesState.QUEUED.value:
                return None
            return self._take(db, series_id, worker, now)

    def _take(self, db: Database, series_id: int, worker: str | None, now: float) -> SeriesJob:
        """Mark a queued series ``processing`` under *worker*, counting the attempt (inside a transaction)."""
        row = db.execute("SELECT id, study_uid, series_uid, generation, processing_attempts FROM series WHERE id = ?",
                         (series_id,)).fetchone()
        db.execute(
            "UPDATE series SET state = ?, error = NULL, processing_attempts = processing_attempts + 1,"
            " claimed_by = ?, updated_at = ? WHERE id = ?",
            (SeriesState.PROCESSING.value, worker, now, series_id),
        )
        attempt = row["processing_attempts"] + 1
        detail = f"claimed by {worker}" if worker else None
        if attempt > 1:
            detail = f"attempt {attempt}: the last did not finish" + (f"; {detail}" if detail else "")
        self._event(db, series_id, SeriesState.PROCESSING.value, detail)
        paths = tuple(Path(r[0]) for r in db.execute(
            "SELECT path FROM instances WHERE series_id = ? ORDER BY path", (series_id,)))
        return SeriesJob(row["id"], row["study_uid"], row["series_uid"], row["generation"], paths)

    def claim_delivery(self, delivery_id: int) -> Delivery | None:
        """Take delivery *delivery_id* (``pending`` or, after its worker died, ``sending``); None otherwise."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT d.id, d.series_id, d.destination, d.attempts, d.generation, d.state, s.study_uid,"
                " s.series_uid, s.output_dir FROM deliveries d JOIN series s ON s.id = d.series_id WHERE d.id = ?",
                (delivery_id,)).fetchone()
            if row is None or row["state"] not in (DeliveryState.PENDING.value, DeliveryState.SENDING.value):
                return None
            db.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                       (DeliveryState.SENDING.value, now, delivery_id))
        return Delivery(row["id"], row["series_id"], row["study_uid"], row["series_uid"], row["destination"],
                        row["attempts"], row["generation"], Path(row["output_dir"]))

    def dispatch_missing(self) -> tuple[int, int]:
        """Defer a job for each queued series and pending delivery that has none (PostgreSQL); the counts."""
        if self._dispatcher is None:
            return 0, 0
        with self._transaction() as db:
            return self._dispatcher.reconcile(db.connection)

    def claimed_by(self, worker: str) -> list[int]:
        """Ids of the series *worker* is processing (claimed, not yet finished)."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM series WHERE state = ? AND claimed_by = ?", (SeriesState.PROCESSING.value, worker))]

    def _still_current(self, db: Database, job: SeriesJob) -> bool:
        row = db.execute("SELECT generation, state FROM series WHERE id = ?", (job.id,)).fetchone()
        current = row["generation"] == job.generation and row["state"] == SeriesState.PROCESSING.value
        if not current:
            now = self._clock()
            db.execute(
                "UPDATE series SET state = ?, processing_attempts = 0, updated_at = ? WHERE id = ? AND state = ?",
                (SeriesState.RECEIVING.value, now, job.id, SeriesState.PROCESSING.value),
            )
            self._event(db, job.id, SeriesState.RECEIVING.value, "new instances arrived while processing")
        return current

    def processed(
        self,
        job: SeriesJob,
        *,
        route: str,
        pipeline: str,
        output_dir: Path,
        derived_series_uid: str,
        outputs: int,
        destinations: Sequence[str],
        seconds: float,
        error: str | None = None,
    ) -> bool:
        """Record a finished processing and schedule its deliveries (all at once).

        Returns False (and schedules nothing) when newer instances arrived meanwhile.
        """
        now = self._clock()
        with self._transaction() as db:
            if not self._still_current(db, job):
                return False
            db.execute(
                "UPDATE series SET state = ?, route = ?, pipeline = ?, output_dir = ?, derived_series_uid = ?,"
                " outputs = ?, processing_seconds = ?, error = ?, processing_attempts = 0, updated_at = ? WHERE id = ?",
                (SeriesState.DELIVERING.value, route, pipeline, str(output_dir), derived_series_uid, outputs,
                 seconds, error, now, job.id),
            )
            for name in destinations:
                delivery_id = db.execute(
                    "INSERT INTO deliveries(series_id, destination, state, generation, attempts, next_attempt_at,"
                    " updated_at) VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT(series_id, destination) DO UPDATE SET"
                    " state = excluded.state, generation = excluded.generation, attempts = 0,"
                    " next_attempt_at = excluded.next_attempt_at, last_error = NULL, updated_at = excluded.updated_at"
                    " RETURNING id",
                    (job.id, name, DeliveryState.PENDING.value, job.generation, now, now),
                ).fetchone()[0]
                self._due(db, delivery_id, name, now)
            detail = f"{outputs} outputs by {pipeline} for {', '.join(destinations)}"
            self._event(db, job.id, SeriesState.DELIVERING.value, detail + (f"; {error}" if error else ""))
        return True

    def set_outcome(self, job: SeriesJob, state: SeriesState, reason: str) -> bool:
        """End processing as ``unrouted``, ``discarded`` or ``failed`` with *reason* (unless newer instances came)."""
        now = self._clock()
        with self._transaction() as db:
            if not self._still_current(db, job):
                return False
            db.execute(
                "UPDATE series SET state = ?, error = ?, processing_attempts = 0, updated_at = ? WHERE id = ?",
                (state.value, reason, now, job.id),
            )
            self._event(db, job.id, state.value, reason)
        return True

    # -- delivery -------------------------------------------------------------------------------

    def claim_due_deliveries(self, limit: int = 16, *, destination: str | None = None) -> list[Delivery]:
        """Take pending deliveries whose time has come (marked ``sending``).

        Parameters
        ----------
        limit : int
            At most this many.
        destination : str, optional
            Only deliveries to this destination (each destination has its own lane).
        """
        now = self._clock()
        only = "" if destination is None else " AND d.destination = ?"
        args: tuple[Any, ...] = (DeliveryState.PENDING.value, now) + (() if destination is None else (destination,))
        query = ("SELECT d.id, d.series_id, d.destination, d.attempts, d.generation, s.study_uid, s.series_uid,"
                 " s.output_dir FROM deliveries d JOIN series s ON s.id = d.series_id"
                 f" WHERE d.state = ? AND d.next_attempt_at <= ?{only} ORDER BY d.next_attempt_at LIMIT ?")
        with self._lock:  # lanes ask often: a read first, the write lock only when something is due
            if not self._db.execute(query, args + (1,)).fetchall():
                return []
        with self._transaction() as db:
            rows = db.execute(query, args + (limit,)).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                    (DeliveryState.SENDING.value, now, row["id"]),
                )
        return [
            Delivery(r["id"], r["series_id"], r["study_uid"], r["series_uid"], r["destination"], r["attempts"],
                     r["generation"], Path(r["output_dir"]))
            for r in rows
        ]

    def pending_delivery_destinations(self) -> list[str]:
        """The destinations that pending (or interrupted) deliveries go to."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT DISTINCT destination FROM deliveries WHERE state IN (?, ?) ORDER BY destination",
                (DeliveryState.PENDING.value, DeliveryState.SENDING.value))]

    def delivered(self, delivery: Delivery) -> None:
        """Record a successful delivery; the series is delivered when all of its are."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, delivered_at = ?, last_error = NULL,"
                " updated_at = ? WHERE id = ? AND state = ?",
                (DeliveryState.DELIVERED.value, now, now, delivery.id, DeliveryState.SENDING.value),
            )
            self._event(db, delivery.series_id, "delivered-to", delivery.destination)
            self._update_series_after_delivery(db, delivery.series_id, now)

    def delivery_failed(
        self, delivery: Delivery, reason: str, *, permanent: bool, max_attempts: int, retry_in: float
    ) -> bool:
        """Record a failed attempt: retried after *retry_in* seconds, or failed for good.

        Returns True when the delivery is now failed for good.
        """
        now = self._clock()
        attempts = delivery.attempts + 1
        final = permanent or attempts >= max_attempts
        state = DeliveryState.FAILED if final else DeliveryState.PENDING
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
                " updated_at = ? WHERE id = ? AND state = ?",
                (state.value, attempts, now + retry_in, reason, now, delivery.id, DeliveryState.SENDING.value),
            )
            if not final:
                self._due(db, delivery.id, delivery.destination, now + retry_in)
            what = "failed" if final else f"attempt {attempts} failed, retry in {retry_in:.0f} s"
            self._event(db, delivery.series_id, "delivery-" + ("failed" if final else "retry"),
                        f"{delivery.destination}: {what}: {reason}")
            self._update_series_after_delivery(db, delivery.series_id, now)
        return final

    def _update_series_after_delivery(self, db: Database, series_id: int, now: float) -> None:
        states = [r[0] for r in db.execute("SELECT state FROM deliveries WHERE series_id = ?", (series_id,))]
        series_state = db.execute("SELECT state FROM series WHERE id = ?", (series_id,)).fetchone()[0]
        if series_state != SeriesState.DELIVERING.value:
            return  # re-opened meanwhile: the next processing decides
        if states and all(s == DeliveryState.DELIVERED.value for s in states):
            new, error = SeriesState.DELIVERED, None
        elif any(s == DeliveryState.FAILED.value for s in states) and not any(
            s in (DeliveryState.PENDING.value, DeliveryState.SENDING.value) for s in states
        ):
            failed = db.execute(
                "SELECT destination, last_error FROM deliveries WHERE series_id = ? AND state = ?",
                (series_id, DeliveryState.FAILED.value),
            ).fetchall()
            new, error = SeriesState.FAILED, "; ".join(f"{r[0]}: {r[1]}" for r in failed)
        else:
            return
        db.execute("UPDATE series SET state = ?, error = ?, updated_at = ? WHERE id = ?", (new.value, error, now, series_id))
        self._event(db, series_id, new.value, error)

    # -- recovery and operators -----------------------------------------------------------------

    def recover(self, *, max_attempts: int = DEFAULT_MAX_PROCESSING_ATTEMPTS) -> dict[str, int]:
        """After a restart: work that was in flight goes back to its queue. Returns counts.

        A series still ``processing`` was interrupted: it is queued again, or failed when its
        processing has now not finished *max_attempts* times (see :meth:`abandon`).  Deliveries
        being sent are due again at once.
        """
        now = self._clock()
        with self._transaction() as db:
            interrupted = db.execute(
                "SELECT id, processing_attempts FROM series WHERE state = ?", (SeriesState.PROCESSING.value,)
            ).fetchall()
            outcomes = [self._interrupted(db, row, NODE_STOPPED, max_attempts, now) for row in interrupted]
            sending = db.execute("SELECT id, destination FROM deliveries WHERE state = ?",
                                 (DeliveryState.SENDING.value,)).fetchall()
            resent = db.execute(
                "UPDATE deliveries SET state = ?, next_attempt_at = ?, updated_at = ? WHERE state = ?",
                (DeliveryState.PENDING.value, now, now, DeliveryState.SENDING.value),
            ).rowcount
            for row in sending:
                self._due(db, row[0], row[1], now)
        return {
            "series_requeued": outcomes.count(SeriesState.QUEUED),
            "series_failed": outcomes.count(SeriesState.FAILED),
            "deliveries_resumed": resent,
        }

    def abandon(self, series_id: int, reason: str, *, max_attempts: int = DEFAULT_MAX_PROCESSING_ATTEMPTS
                ) -> SeriesState | None:
        """Give up a processing that will not finish (its worker died or timed out).

        The series is queued again, unless its processing has now not finished *max_attempts*
        times: then it is failed with that reason (a series whose input kills its worker must not
        take the node down for ever), and kept for ``dicom-node retry``.

        Parameters
        ----------
        series_id : int
            The claimed series (:attr:`SeriesJob.id`).
        reason : str
            Why this attempt did not finish, e.g. ``"worker 2 killed by signal 9"``; recorded.
        max_attempts : int
            ``[node] max_processing_attempts``.

        Returns
        -------
        SeriesState or None
            ``QUEUED`` or ``FAILED``; None when the series was not being processed (nothing changed).
        """
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, processing_attempts FROM series WHERE id = ? AND state = ?",
                (series_id, SeriesState.PROCESSING.value),
            ).fetchone()
            return None if row is None else self._interrupted(db, row, reason, max_attempts, now)

    def _interrupted(self, db: Database, row: Any, reason: str, max_attempts: int,
                     now: float, *, dispatch: bool = True) -> SeriesState:
        """Queue again, or fail, a series whose processing did not finish (inside a transaction)."""
        attempts = row["processing_attempts"]
        if attempts >= max_attempts:
            error = (f"processing did not finish {attempts} times: the worker died or timed out (last: {reason}); "
                     "see the node's log and the kernel's (out of memory?) at the times of this series' events; "
                     f"`dicom-node retry {row['id']}` tries again")
            db.execute("UPDATE series SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                       (SeriesState.FAILED.value, error, now, row["id"]))
            self._event(db, row["id"], SeriesState.FAILED.value, error)
            return SeriesState.FAILED
        db.execute("UPDATE series SET state = ?, updated_at = ? WHERE id = ?",
                   (SeriesState.QUEUED.value, now, row["id"]))
        self._event(db, row["id"], SeriesState.QUEUED.value,
                    f"{reason}: attempt {attempts} of {max_attempts} did not finish, queued again")
        if dispatch:
            self._queued(db, row["id"])
        return SeriesState.QUEUED

    def retry(self, series_ids: Iterable[int] | None = None) -> int:
        """Retry failed series (all failed ones when *series_ids* is None); returns how many.

        Failed deliveries are sent again; a series that failed before delivery is processed again,
        with its count of unfinished processings (``max_processing_attempts``) back to 0.
        """
        now = self._clock()
        with self._transaction() as db:
            if series_ids is None:
                ids = [r[0] for r in db.execute("SELECT id FROM series WHERE state = ?", (SeriesState.FAILED.value,))]
            else:
                ids = list(series_ids)
            count = 0
            for series_id in ids:
                row = db.execute("SELECT state FROM series WHERE id = ?", (series_id,)).fetchone()
                if row is None or row[0] not in (SeriesState.FAILED.value, SeriesState.UNROUTED.value):
                    continue
                failed = db.execute("SELECT id, destination FROM deliveries WHERE series_id = ? AND state = ?",
                                    (series_id, DeliveryState.FAILED.value)).fetchall()
                db.execute(
                    "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ?"
                    " WHERE series_id = ? AND state = ?",
                    (DeliveryState.PENDING.value, now, now, series_id, DeliveryState.FAILED.value),
                )
                state = SeriesState.DELIVERING if failed else SeriesState.QUEUED
                db.execute("UPDATE series SET state = ?, error = NULL, processing_attempts = 0, updated_at = ?"
                           " WHERE id = ?", (state.value, now, series_id))
                self._event(db, series_id, state.value, "retry asked by operator")
                for delivery_id, destination in failed:
                    self._due(db, delivery_id, destination, now)
                if not failed:
                    self._queued(db, series_id)
                count += 1
        return count

    def reconcile(self, spool: Spool) -> Reconciled:
        """Record every spooled instance the store does not know (after a crash, or into a new store).

        Each file's header is read outside any transaction, then the instance is recorded in its own
        (:meth:`record_instance`, received at the file's modification time); its series (re-)opens
        and is processed once it settles.  A file whose header cannot be read is kept where it is,
        logged and counted.
        """
        known = self.known_paths()
        recorded = 0
        unreadable = 0
        series: set[str] = set()
        for item in spool.walk():
            if str(item.path) in known:
                continue
            try:
                header = pydicom.dcmread(item.path, stop_before_pixels=True)
                received_at = item.path.stat().st_mtime
            except Exception as exc:  # a spooled file we cannot read again: keep it, say so
                log.error("spool file %s cannot be read: %s", item.path, exc)
                unreadable += 1
                continue
            self.record_instance(
                study_uid=item.study_uid, series_uid=item.series_uid, sop_uid=item.sop_uid,
                sop_class_uid=str(header.get("SOPClassUID", "")), path=item.path, size=item.size,
                modality=str(header.get("Modality") or "") or None, received_at=received_at,
            )
            recorded += 1
            series.add(item.series_uid)
        return Reconciled(recorded, len(series), unreadable)

    @classmethod
    def rebuild(cls, path: Path, spool: Spool, *, only_if_damaged: bool = True, clock: Any = time.time) -> Rebuilt:
        """Set the database at *path* aside and record the spool into a new one (``dicom-node store rebuild``).

        The old file and its ``-wal`` and ``-shm`` are renamed ``<name>.corrupt-<time>[-wal|-shm]``
        (``<name>.set-aside-<time>`` when it was readable), the WAL first, so a new database never
        meets an old WAL.  Every spooled instance is then recorded (:meth:`reconcile`): every series
        is processed and delivered again (derived UIDs are deterministic, so receivers get
        replacements, not duplicates).  The history (states, deliveries, events) stays in the file
        set aside.

        Parameters
        ----------
        path : pathlib.Path
            The job store file.
        spool : Spool
            The node's spool.
        only_if_damaged : bool
            When the file passes the integrity check, change nothing (:attr:`Rebuilt.set_aside` empty).

        Raises
        ------
        JobStoreError
            The store is in use (a node or another command has it open), or cannot be replaced.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = _FolderLock(path, exclusive=True)
        except OSError as exc:
            raise _cannot_open(path, exc) from exc
        try:
            damage = _damage(path)
            if damage is None and only_if_damaged and path.exists():
                lock.close()
                return Rebuilt(None, (), None)
            set_aside = _set_aside(path, "corrupt" if damage is not None else "set-aside")
            store = cls(path, clock=clock, _folder_lock=lock)
        except OSError as exc:
            lock.close()
            raise JobStoreError(path, f"cannot set the job store aside: {exc}") from exc
        except BaseException:
            lock.close()
            raise
        try:
            recorded = store.reconcile(spool)
        finally:
            store.close()
        return Rebuilt(damage, set_aside, recorded)

    def forget_discarded_instances(self, job: SeriesJob) -> int:
        """Drop the instance records of a series discarded as *job* (after its spool files were removed).

        Nothing is dropped when the series is no longer that discarded generation (an instance came
        since: it is assembled and routed again).  A series re-opened later then holds only the
        instances received after it was discarded.

        Returns
        -------
        int
            How many instance records were dropped.
        """
        with self._transaction() as db:
            row = db.execute("SELECT generation, state FROM series WHERE id = ?", (job.id,)).fetchone()
            if row is None or row["generation"] != job.generation or row["state"] != SeriesState.DISCARDED.value:
                return 0
            return db.execute("DELETE FROM instances WHERE series_id = ?", (job.id,)).rowcount

    def expired(self, retention_seconds: float, failed_retention_seconds: float = 0.0) -> list[dict[str, Any]]:
        """Series whose retention is over (with their paths), to remove.

        Parameters
        ----------
        retention_seconds : float
            Delivered, unrouted and discarded series last changed longer ago than this; 0: none.
        failed_retention_seconds : float
            Failed series last changed longer ago than this; 0: none (the default: kept for ever).
        """
        now = self._clock()
        clauses: list[str] = []
        args: list[Any] = []
        if retention_seconds > 0:
            clauses.append("(state IN (?, ?, ?) AND updated_at <= ?)")
            args += [SeriesState.DELIVERED.value, SeriesState.UNROUTED.value, SeriesState.DISCARDED.value,
                     now - retention_seconds]
        if failed_retention_seconds > 0:
            clauses.append("(state = ? AND updated_at <= ?)")
            args += [SeriesState.FAILED.value, now - failed_retention_seconds]
        if not clauses:
            return []
        with self._lock:
            rows = [dict(r) for r in self._db.execute(
                "SELECT id, series_uid, state, output_dir FROM series WHERE " + " OR ".join(clauses)  # noqa: S608
                + " ORDER BY id", args)]
            for row in rows:
                row["paths"] = [Path(r[0]) for r in self._db.execute(
                    "SELECT path FROM instances WHERE series_id = ?", (row["id"],))]
        return rows

    def forget(self, series_id: int) -> None:
        """Remove a series and everything recorded about it (after its files were removed)."""
        with self._transaction() as db:
            for table in ("instances", "deliveries", "events"):
                db.execute(f"DELETE FROM {table} WHERE series_id = ?", (series_id,))  # noqa: S608 - fixed names
            db.execute("DELETE FROM series WHERE id = ?", (series_id,))

    # -- reading --------------------------------------------------------------------------------

    def series(self, series_id: int) -> dict[str, Any] | None:
        """One series with its deliveries and events, as plain data."""
        with self._lock:
            row = self._db.execute("SELECT * FROM series WHERE id = ?", (series_id,)).fetchone()
            if row is None:
                return None
            result = dict(row)
            result["deliveries"] = [dict(r) for r in self._db.execute(
                "SELECT destination, state, attempts, last_error, delivered_at, next_attempt_at FROM deliveries"
                " WHERE series_id = ? ORDER BY destination", (series_id,))]
            result["events"] = [dict(r) for r in self._db.execute(
                "SELECT at, state, detail FROM events WHERE series_id = ? ORDER BY id", (series_id,))]
        return result

    def instances(self, series_id: int) -> list[tuple[str, Path]]:
        """(SOP Instance UID, spool path) of every instance of a series."""
        with self._lock:
            return [(r[0], Path(r[1])) for r in self._db.execute(
                "SELECT sop_uid, path FROM instances WHERE series_id = ? ORDER BY path", (series_id,))]

    def list_series(self, *, limit: int = 100, state: str | None = None) -> list[dict[str, Any]]:
        """The most recently updated series, newest first."""
        query = "SELECT * FROM series"
        args: list[Any] = []
        if state:
            query += " WHERE state = ?"
            args.append(state)
        query += " ORDER BY updated_at DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [dict(r) for r in self._db.execute(query, args)]

    def reachable(self) -> bool:
        """Whether the database answers now (a trivial query; for /readyz)."""
        try:
            with self._lock:
                self._db.execute("SELECT 1").fetchone()
        except Exception:  # noqa: BLE001 - any failure means "not now"
            return False
        return True

    def counts(self) -> dict[str, int]:
        """How many series are in each state."""
        with self._lock:
            return {r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state")}

    def get_value(self, key: str) -> Any:
        """A small JSON value kept by name (e.g. a poll watermark), or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_value(self, key: str, value: Any) -> None:
        """Keep a small JSON value by name."""
        with self._transaction() as db:
            db.execute("INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       (key, json.dumps(value)))


def open_job_store(url: str | None, data_dir: Path, *, password: str | None = None, clock: Any = time.time
                   ) -> JobStore:
    """The job store a configuration names: PostgreSQL at *url*, else SQLite ``data_dir/jobs.sqlite``.

    On PostgreSQL, Procrastinate's schema is applied when missing, and state changes defer their
    jobs in the same transaction (:mod:`node.store.dispatch`).

    Raises
    ------
    DatabaseError
        PostgreSQL cannot be reached (the message names host, port and database), or the schema
        is newer than this dicom-node.
    """
    if url is None:
        return JobStore(data_dir / "jobs.sqlite", clock=clock)
    from node.store.dispatch import Dispatcher, ensure_schema

    database = PostgresDatabase(url, password=password)
    try:
        ensure_schema(database.connection)
    except Exception as exc:
        database.close()
        raise DatabaseError(f"cannot prepare the job queue in {database!r}: {exc}") from None
    return JobStore(database, clock=clock, dispatcher=Dispatcher())


def job_store_for(config: Config) -> JobStore:
    """The job store of *config* (``[store]``, else SQLite in ``[node] data_dir``); see :func:`open_job_store`."""
    return open_job_store(config.store.url, config.node.data_dir, password=config.store.password())
