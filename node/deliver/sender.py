"""What every sender is: :class:`Sender`, and the parts the destination kinds share.

A sender delivers the output files of one derived series to one destination, in one call:

* ``send(files, *, study_uid, series_uid)`` delivers every file or raises
  :class:`~node.deliver.failures.DeliveryError` (permanent or transient);
* ``describe()`` names the destination for logs and job records.

One module per destination kind implements it (:mod:`node.deliver.dicom`,
:mod:`node.deliver.dicomweb`, :mod:`node.deliver.folder`); :func:`node.deliver.senders.sender_for`
picks the class from the destination's ``kind``.  Senders never retry: the delivery lanes do.

Nothing here logs patient-identifying data: messages name destinations, file names and UIDs only.
"""

from __future__ import annotations

import abc
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from node.config import Destination
from node.deliver.failures import DeliveryError

__all__ = ["PNG_TO_DICOM", "PROGRESS_SECONDS", "DeliveryProgress", "Sender", "check_uid", "reject_non_dicom"]

log = logging.getLogger(__name__)

#: Why a DICOM destination refuses a PNG output.
PNG_TO_DICOM = "PNG output cannot go to a DICOM destination"

#: Seconds between two progress lines of one delivery (a 1,000-instance series takes minutes).
PROGRESS_SECONDS = 10.0

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Sender(abc.ABC):
    """Delivers the files of one derived series to one destination (see the module notes).

    A subclass names its destination ``kind`` (the ``kind`` of its ``[[destinations]]`` table),
    builds itself from that destination (:meth:`from_destination`), says what it is
    (:meth:`describe`) and delivers (:meth:`_deliver`); :meth:`send` times that and logs it.
    """

    #: The ``[[destinations]] kind`` this sender delivers to.
    kind: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_destination(cls, destination: Destination) -> Sender:
        """The sender of a configured destination of this class's ``kind``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The destination as logs and job records name it, e.g. ``dicom PACS@10.0.0.5:104``."""

    @abc.abstractmethod
    def _deliver(self, files: list[Path], study_uid: str, series_uid: str) -> str | None:
        """Deliver every file or raise DeliveryError; returns a note for the success line, if any."""

    def send(self, files: Sequence[Path], *, study_uid: str, series_uid: str) -> None:
        """Deliver *files*, the outputs of one derived series, or raise DeliveryError.

        Parameters
        ----------
        files : Sequence of Path
            The series' output files.
        study_uid : str
            Study Instance UID the outputs belong to.
        series_uid : str
            Series Instance UID of the derived series.

        Raises
        ------
        DeliveryError
            Permanent or transient, naming the destination and the file at fault.
        """
        paths = [Path(f) for f in files]
        started = time.monotonic()
        try:
            note = self._deliver(paths, study_uid, series_uid)
        except DeliveryError as exc:
            kind = "permanent" if exc.permanent else "transient"
            log.debug("delivery of %d file(s) to %s failed (%s) after %.2f s: %s",
                      len(paths), self.describe(), kind, time.monotonic() - started, exc.reason)
            raise
        log.info("delivered %d file(s) to %s in %.2f s%s",
                 len(paths), self.describe(), time.monotonic() - started, note or "")

    def _fail(self, reason: str, *, permanent: bool, status: int | None = None) -> DeliveryError:
        """A DeliveryError whose reason starts with this destination."""
        return DeliveryError(f"{self.describe()}: {reason}", permanent=permanent, status=status)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class DeliveryProgress:
    """Counts the files one delivery has sent and logs a line at most every PROGRESS_SECONDS.

    Thread-safe: the associations of one delivery count into the same total.

    Parameters
    ----------
    destination : str
        The destination, as :meth:`Sender.describe` names it.
    total : int
        How many files the delivery sends.
    """

    def __init__(self, destination: str, total: int) -> None:
        self._destination = destination
        self._total = total
        self._sent = 0
        self._lock = threading.Lock()
        self._started = self._last = time.monotonic()

    def sent(self, count: int = 1) -> None:
        """*count* more files were accepted by the peer."""
        with self._lock:
            now = time.monotonic()
            self._sent += count
            if now - self._last < PROGRESS_SECONDS or self._sent >= self._total:
                return
            self._last = now
            sent = self._sent
        log.info("delivery to %s: %d of %d file(s) sent in %.0f s", self._destination, sent, self._total,
                 now - self._started)


def check_uid(kind: str, uid: str) -> None:
    """Refuse (permanently) a study or series UID that cannot name a folder or a STOW-RS URL.

    Raises
    ------
    DeliveryError
        Permanent, naming *kind* (``"study"``, ``"series"``) and the value.
    """
    if not isinstance(uid, str) or not _UID_RE.match(uid) or len(uid) > 64:
        raise DeliveryError(f"invalid {kind} UID {uid!r}", permanent=True)


def reject_non_dicom(files: Sequence[Path], destination: str) -> None:
    """Refuse (permanently) a file that is not DICOM (a PNG output) for a DICOM destination.

    Raises
    ------
    DeliveryError
        Permanent, naming *destination* and the file.
    """
    for path in files:
        if path.suffix.lower() != ".dcm":
            raise DeliveryError(f"{destination}: {path.name}: {PNG_TO_DICOM}", permanent=True)
