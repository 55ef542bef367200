"""Instances spooled while the job store could not record them, recorded once it can again.

The spool file, written and fsync'd before Success, is the record of an instance; the job store
row is how the rest of the node learns of it.  When the database is away (PostgreSQL restarting, a
network cut, a locked or full disk), the receiver still answers Success for what it spooled and
keeps the rows to write here; a thread of the service writes them as soon as the store answers
again, oldest first, each with the time it was received.  Should the receiver die first, start-up
recovery re-records every spooled file the store does not know, as it always did.
"""

from __future__ import annotations

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


class PendingRecords:
    """Rows :meth:`node.store.jobstore.JobStore.record_instance` could not write yet (thread-safe).

    Parameters
    ----------
    jobs : JobStore
        The store to write them to.
    """

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._last_log = 0.0
        self._failing_since: float | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def add(self, row: dict[str, Any], error: BaseException) -> None:
        """Keep *row* (``record_instance``'s keyword arguments, with ``received_at``) for later."""
        with self._lock:
            self._rows.append(row)
            waiting = len(self._rows)
        self._failing(error, waiting)

    def flush(self) -> int:
        """Record what waits, oldest first, until the store fails again; returns how many were written."""
        written = 0
        while True:
            with self._lock:
                if not self._rows:
                    break
                row = self._rows[0]
            try:
                self.jobs.record_instance(**row)
            except Exception as exc:  # still away: keep it, try again later
                self._failing(exc, len(self))
                return written
            with self._lock:
                self._rows.popleft()
            written += 1
        if written and self._failing_since is not None:
            log.warning("job store back after %.0f s: %d instances spooled meanwhile are recorded",
                        time.monotonic() - self._failing_since, written)
            self._failing_since = None
        return written

    def _failing(self, error: BaseException, waiting: int) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            log.error("job store unavailable (%s): %d spooled instances wait to be recorded (kept on disk; "
                      "C-STOREs still answered Success)", first_line(error), waiting)
