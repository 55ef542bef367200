"""Logging set-up shared by the ``dicom-node`` command and the node's worker processes.

A worker process is started fresh (``spawn``): it inherits the standard error stream but not the
logging configuration, so the command hands its :class:`LogSettings` to every worker, which calls
:func:`setup_logging` first.  Every process writes whole lines to the same stream.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import dataclass

__all__ = ["LogSettings", "setup_logging"]


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
    # pydicom both logs and warns about damaged files; its log line is the one we keep.
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
