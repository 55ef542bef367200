"""Rows of spooled instances on their way to the job store: written after the C-STORE is answered.

The spool file, written and fsync'd (with its folder entry) before Success, is the record of an
instance; the job store row is how the rest of the node learns of it.  The receiver therefore
answers Success as soon as the file is safe and hands the row to :class:`PendingRecords`, whose
thread (:meth:`PendingRecords.run`, started by the service) writes what has gathered in one
transaction (:meth:`node.store.jobstore.JobStore.record_instances`: a group commit), oldest first, each
row with the time it was received.  Measured with one storescu association of 512 KB CT slices,
that takes the job store write (0.2-0.4 ms on SQLite, more on PostgreSQL) off every C-STORE's
answer; with many associations at once, one transaction records the rows of all of them.

When the database is away (PostgreSQL restarting, a network cut, a locked or full disk), the rows
wait here and are written as soon as the store answers again; the node says so and is not ready
(:attr:`PendingRecords.failing`).  Should the receiver die first, start-up recovery re-records
every spooled file the store does not know (:meth:`node.store.jobstore.JobStore.reconcile`), as it
always did: a row is never needed for an instance to be safe.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any

from node.store.jobstore import JobStore
from node.telemetry.logsetup import first_line

__all__ = ["PendingRecords"]

log = logging.getLogger(__name__)

#: Seconds between two log lines while the job store stays unreachable.
LOG_EVERY_SECONDS = 60.0
#: Rows written in one transaction at most.
BATCH_ROWS = 500
#: Seconds between two attempts while the job store fails.
RETRY_SECONDS = 1.0
#: Seconds the recorder lets rows gather once one has come: one transaction for the C-STOREs of
#: that time (at 200 instances/s, ten), instead of one per instance competing for the GIL with
#: the receiving threads.
GATHER_SECONDS = 0.05


class PendingRecords:
    """Rows :meth:`node.store.jobstore.JobStore.record_instance` is to write (thread-safe).

    Parameters
    ----------
    jobs : JobStore
        The store to write them to.
    """

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._writing = threading.Lock()  # one flush at a time: rows go in in the order they came
        self._last_log = 0.0
        self._failing_since: float | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    @property
    def failing(self) -> bool:
        """Whether the last attempt to write failed (the store is away); rows wait until it answers."""
        return self._failing_since is not None

    def submit(self, row: dict[str, Any]) -> None:
        """Queue *row* (``record_instance``'s keyword arguments, with ``received_at``) for :meth:`run`."""
        with self._lock:
            self._rows.append(row)
            self._arrived.notify()

    def add(self, row: dict[str, Any], error: BaseException) -> None:
        """Keep *row*, which the store just refused with *error*, for later."""
        with self._lock:
            self._rows.append(row)
            waiting = len(self._rows)
        self._failing(error, waiting)

    def flush(self) -> int:
        """Record what waits, oldest first, a batch per transaction, until the store fails; returns how
        many rows were written."""
        written = 0
        with self._writing:
            while True:
                with self._lock:
                    batch = list(itertools.islice(self._rows, BATCH_ROWS))
                if not batch:
                    break
                try:
                    self.jobs.record_instances(batch)
                except Exception as exc:  # away (keep them, try again later), or one row the store refuses
                    if not self._set_aside_refused(batch):
                        self._failing(exc, len(self))
                        return written
                    continue
                with self._lock:
                    for _ in batch:
                        self._rows.popleft()
                written += len(batch)
        if written and self._failing_since is not None:
            log.warning("job store back after %.0f s: %d instances spooled meanwhile are recorded",
                        time.monotonic() - self._failing_since, written)
            self._failing_since = None
        return written

    def _set_aside_refused(self, batch: list[dict[str, Any]]) -> bool:
        """After *batch* failed: when the store answers, record its rows one by one and drop those it
        refuses from the queue, each logged with its spool file (which stays: the next start's
        :meth:`~node.store.jobstore.JobStore.reconcile` tries it again), so one bad row cannot hold
        back every instance after it.  Returns whether any row was set aside (False: the store is away).
        """
        if not self.jobs.reachable():
            return False
        refused = False
        for row in batch:
            try:
                self.jobs.record_instances([row])
            except Exception as exc:  # noqa: BLE001 - the store refuses this row, or went away
                if not self.jobs.reachable():
                    return refused
                log.error("job store refused the record of spooled file %s: %s (the file stays in the spool; "
                          "the next start records it again)", row.get("path"), first_line(exc))
                refused = True
            with self._lock:  # recorded or refused: not written again
                with contextlib.suppress(ValueError):
                    self._rows.remove(row)
        return True

    def run(self, stop: threading.Event) -> None:
        """Write rows as they come until *stop* is set, then what is left (the service's recorder thread)."""
        while not stop.is_set():
            with self._lock:
                if not self._rows:
                    self._arrived.wait(RETRY_SECONDS)
                gather = len(self._rows) < BATCH_ROWS
            if gather:
                stop.wait(GATHER_SECONDS)
            self.flush()
            if self.failing:
                stop.wait(RETRY_SECONDS)
        self.flush()

    def _failing(self, error: BaseException, waiting: int) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            log.error("job store unavailable (%s): %d spooled instances wait to be recorded (kept on disk; "
                      "C-STOREs still answered Success)", first_line(error), waiting)
