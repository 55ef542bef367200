"""Logging set-up shared by the ``dicom-node`` command and the node's worker processes.

A worker process is started fresh (``spawn``): it inherits the standard error stream but not the
logging configuration, so the command hands its :class:`LogSettings` to every worker, which calls
:func:`setup_logging` first.  Every process writes whole lines to the same stream.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LogSettings", "Throttle", "first_line", "setup_logging"]


@dataclass(frozen=True)
class LogSettings:
    """How the node logs.

    Attributes
    ----------
    level : str
        ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    fmt : str
        ``text`` (for people) or ``json`` (one object a line, for log collectors).
    """

    level: str = "INFO"
    fmt: str = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, thread, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: LogSettings) -> None:
    """Log to standard error as *settings* say, with the node's quieter third-party loggers.

    Parameters
    ----------
    settings : LogSettings
        Level and format.
    """
    handler = logging.StreamHandler(sys.stderr)
    if settings.fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    if settings.level != "DEBUG":  # pynetdicom narrates every PDU at INFO; our own lines say what matters
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # one INFO line per request
        logging.getLogger("retrying").setLevel(logging.ERROR)  # a traceback per failed request otherwise
        logging.getLogger("procrastinate").setLevel(logging.WARNING)  # a line per job; ours say what matters
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # a line per reconnection try; ours say it once
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per module copied into a presentation state
    # pydicom both logs and warns about damaged files; its log line is the one we keep.
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


class Throttle:
    """Whether a message that repeats (a database away, a lost connection) may be logged now.

    At most once every *seconds* per key; the calls in between are counted, so the next line can
    say how many were held back.  Thread-safe.
    """

    def __init__(self, seconds: float = 60.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def ready(self, key: str = "") -> int | None:
        """None when the message is held back; else how many were held back since the last one."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.seconds:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)

    def reset(self, key: str = "") -> bool:
        """Forget *key* (the trouble is over); True when it had been logged."""
        with self._lock:
            self._held.pop(key, None)
            return self._last.pop(key, None) is not None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): for one-line logs."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
