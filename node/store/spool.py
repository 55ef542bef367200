"""The on-disk spool: every received instance, durable before it is acknowledged.

Layout: ``<data_dir>/spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.  Each file is written
to a temporary name, fsync'd, renamed into place and its folder fsync'd, so after a crash a file
is either whole or absent.  UIDs are checked before they become path components: a UID such as
``../../x`` is refused and nothing is written outside the spool.

Data sets received streamed (see :func:`node.receive.scp.enable_streamed_receive`) are written as they
arrive into ``<spool>/.incoming/`` and moved into place by :meth:`Spool.adopt`: same filesystem,
so one rename.  Folders and files whose names start with a dot are never instances.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.store.fsutil import (
    FolderSyncs, atomic_output, remove_empty_parents, remove_temporaries, untouched_for,
)

log = logging.getLogger(__name__)

__all__ = ["INCOMING", "InvalidUID", "Spool", "SpooledInstance", "check_uid", "remove_spooled"]

#: The spool's sub-folder for data sets still arriving (hidden from :meth:`Spool.walk`).
INCOMING = ".incoming"

_CHUNK = 1 << 20
_FILE_MODE = 0o644

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 chars.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID (so it is never used as a file name)."""


def check_uid(value: object, keyword: str) -> str:
    """Return *value* as a UID string, or raise :class:`InvalidUID` naming *keyword*."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise InvalidUID(f"{keyword} missing")
    if len(text) > 64 or not _UID.match(text):
        raise InvalidUID(f"{keyword} {text[:80]!r} is not a valid UID")
    return text


def remove_spooled(paths: Iterable[Path], root: Path) -> int:
    """Remove spool files, then their folders under *root* that are left empty.

    Never creates the spool (a worker may call it on a shared one).

    Parameters
    ----------
    paths : iterable of Path
        The spool files (one already gone counts as removed).
    root : Path
        The spool folder; it and anything outside it are never removed.

    Returns
    -------
    int
        How many files are gone.
    """
    removed = 0
    folders = set()
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("spool file %s could not be removed: %s", path, exc.strerror or exc)
            continue
        removed += 1
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        remove_empty_parents(folder, root)
    return removed


@dataclass(frozen=True)
class SpooledInstance:
    """Where one received instance lives in the spool."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: Path
    size: int


class Spool:
    """The spool folder under *root*; thread-safe (each write is its own temporary file)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._folder_syncs = FolderSyncs()  # fsyncs of a folder shared by instances completing together

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The spool path of an instance; every UID is checked first."""
        return (
            self.root
            / check_uid(study_uid, "Study Instance UID (0020,000D)")
            / check_uid(series_uid, "Series Instance UID (0020,000E)")
            / f"{check_uid(sop_uid, 'SOP Instance UID (0008,0018)')}.dcm"
        )

    def store(self, study_uid: str, series_uid: str, sop_uid: str, chunks: Iterable[bytes]) -> SpooledInstance:
        """Write an instance durably (fsync'd, atomic rename) and return where it is.

        An instance already spooled under the same UIDs is replaced in one step (readers see the
        old file or the new one, never a mix); see :meth:`holds` to skip identical copies.

        Raises
        ------
        InvalidUID
            A UID that cannot be a file name.
        OSError
            The disk refused (full, read-only): nothing is left behind.
        """
        path = self.path_for(study_uid, series_uid, sop_uid)
        size = 0
        with atomic_output(path) as handle:
            for chunk in chunks:
                handle.write(chunk)
                size += len(chunk)
        return SpooledInstance(study_uid, series_uid, sop_uid, path, size)

    def adopt(self, path: str | os.PathLike, study_uid: str, series_uid: str, sop_uid: str) -> SpooledInstance:
        """Move the finished file *path* into the spool durably and return where it is.

        The file is fsync'd, renamed over the instance's spool path in one step (an older copy is
        replaced atomically, as by :meth:`store`) and the folder fsync'd (one fsync shared by the
        instances that complete together: :class:`node.store.fsutil.FolderSyncs`); a series or study
        folder made for it is fsync'd into its parent too.  *path* should be on the
        spool's filesystem (``<spool>/.incoming``); from elsewhere it is copied beside its
        destination first (slower, same guarantees) and then removed.

        Raises
        ------
        InvalidUID
            A UID that cannot be a file name (*path* is left where it is).
        OSError
            The disk refused; the spool is left as it was.
        """
        target = self.path_for(study_uid, series_uid, sop_uid)
        created = self._make_folders(target.parent)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fchmod(fd, _FILE_MODE)  # temporary files are 0600; the spool is for other programs too
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        try:
            os.replace(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(path, "rb") as source, atomic_output(target) as handle:
                shutil.copyfileobj(source, handle, _CHUNK)
            os.unlink(path)
        else:
            self._folder_syncs.sync(target.parent)
        for folder in created:  # a new series (and study) folder: its own entry too
            self._folder_syncs.sync(folder.parent)
        return SpooledInstance(study_uid, series_uid, sop_uid, target, size)

    def _make_folders(self, folder: Path) -> list[Path]:
        """Create *folder* and its missing parents below the spool; returns those created, innermost first."""
        missing = []
        while folder != self.root and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        if missing:
            missing[0].mkdir(parents=True, exist_ok=True)
        return missing

    def holds_file(self, study_uid: str, series_uid: str, sop_uid: str, path: str | os.PathLike) -> bool:
        """Whether the file *path* has exactly the bytes already spooled for this instance (a resend).

        Sizes first, then both files side by side a chunk at a time: neither is loaded whole.
        """
        spooled = self.path_for(study_uid, series_uid, sop_uid)
        try:
            if spooled.stat().st_size != os.stat(path).st_size:
                return False
            with spooled.open("rb") as old, open(path, "rb") as new:
                while True:
                    a, b = old.read(_CHUNK), new.read(_CHUNK)
                    if a != b:
                        return False
                    if not a:
                        return True
        except FileNotFoundError:
            return False

    def holds(self, study_uid: str, series_uid: str, sop_uid: str, chunks: Sequence[bytes]) -> bool:
        """Whether exactly these bytes are already spooled for this instance (a resend)."""
        path = self.path_for(study_uid, series_uid, sop_uid)
        try:
            if path.stat().st_size != sum(len(c) for c in chunks):
                return False
            with path.open("rb") as handle:
                return all(handle.read(len(chunk)) == chunk for chunk in chunks)
        except FileNotFoundError:
            return False

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        """The folder holding one series."""
        return self.root / check_uid(study_uid, "Study Instance UID") / check_uid(series_uid, "Series Instance UID")

    def walk(self) -> Iterator[SpooledInstance]:
        """Every instance file in the spool (for reconciling the job store after a crash)."""
        for study in sorted(self.root.iterdir()) if self.root.exists() else ():
            if not study.is_dir() or study.name.startswith("."):  # .incoming: still arriving
                continue
            for series in sorted(study.iterdir()):
                if not series.is_dir() or series.name.startswith("."):
                    continue
                for entry in sorted(series.iterdir()):
                    if entry.suffix == ".dcm" and not entry.name.startswith("."):
                        yield SpooledInstance(study.name, series.name, entry.stem, entry, entry.stat().st_size)

    def remove_temporaries(self, *, older_than: float = 0.0) -> int:
        """Delete temporary files a crash left half-written; returns how many.

        Also everything in ``<spool>/.incoming``: call it only while nothing is being received, or,
        on a spool other receivers share, with *older_than* (seconds untouched) above any transfer.
        """
        removed = 0
        incoming = self.root / INCOMING
        leftovers = [p for p in incoming.iterdir() if p.is_file()] if incoming.is_dir() else []
        for leftover in [p for p in leftovers if untouched_for(p, older_than)]:
            try:
                leftover.unlink()
                removed += 1
            except OSError as exc:  # harmless where it is (never counted as an instance); say so
                log.warning("cannot remove the half-written file %s: %s", leftover, exc)
        return removed + remove_temporaries(self.root, skip=incoming, older_than=older_than)


def shared_dir_problem(shared: Path) -> str | None:
    """What keeps this process from reading the spool and writing outputs under *shared* (None: nothing).

    The spool is never created here: a worker whose ``shared_dir`` holds no spool is looking at an
    empty mount point (the share not mounted), and must not take series whose files it cannot see.
    """
    spool, outputs = shared / "spool", shared / "outputs"
    if not spool.is_dir():
        return f"shared_dir {shared} has no spool folder (is the share mounted on this machine?)"
    try:
        outputs.mkdir(exist_ok=True)
    except OSError as exc:
        return f"shared_dir {shared}: cannot create {outputs}: {exc.strerror or exc}"
    for folder in (spool, outputs):
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            return f"shared_dir {shared}: {folder} is not readable and writable by this user"
    return None
