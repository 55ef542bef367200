"""Durable file writes: temp file in the same folder, fsync, atomic rename, fsync the folder."""

from __future__ import annotations

import contextlib
import errno
import ctypes
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TEMPORARY_GLOB", "FolderSyncs", "atomic_output", "fsync_dir", "remove_empty_parents", "remove_temporaries",
    "start_writeback", "untouched_for",
]

log = logging.getLogger(__name__)

#: The names :func:`atomic_output` gives its temporary files: ``.<name>.<random>.tmp``.
TEMPORARY_GLOB = ".*.tmp"

_FILE_MODE = 0o644
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h> on Linux


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None where there is none.

    Python's ``os`` module has no binding for it, so it is looked up once, through ctypes.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).sync_file_range  # the C library the interpreter is linked with
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of *fd* to disk, without waiting.

    Not a durability step (only ``fsync`` is): a head start for it.  A file written piece by piece
    as it arrives over the network has most of its data on disk by the time it is complete, so the
    fsync before the C-STORE answer waits for the last piece and the journal only (measured on
    ext4/virtio: 0.3 ms instead of 1.0 ms for a 512 KB CT slice).  PostgreSQL does the same for
    the same reason (``pg_flush_data``, ``SYNC_FILE_RANGE_WRITE``).  Linux only; elsewhere, and on
    any error, nothing happens.
    """
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # the result is advice: ignored


class FolderSyncs:
    """:func:`fsync_dir` shared by the threads that need one of the same folder at the same time.

    A group commit: a thread that renamed a file into a folder calls :meth:`sync`; if an fsync of
    that folder is under way it waits for it to end, then one fsync (started after every rename
    that asked meanwhile) serves all of them.  Each caller returns only after an fsync that began
    after its own call, so what it put in the folder before calling is durable.  With ten
    associations sending one series, the instances completing together share the folder's fsync
    instead of queueing for it one by one.  Thread-safe; one object per spool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[str, _FolderSync] = {}

    def sync(self, folder: str | os.PathLike) -> None:
        """fsync *folder* (no-op where unsupported, as :func:`fsync_dir`), sharing it with concurrent callers."""
        key = os.fspath(folder)
        with self._lock:
            state = self._folders.get(key)
            if state is None:
                state = self._folders[key] = _FolderSync()
            state.users += 1
        try:
            state.sync(key)
        finally:
            with self._lock:
                state.users -= 1
                if not state.users:
                    del self._folders[key]


class _FolderSync:
    """One folder's group commit: tickets asked, tickets an fsync covered, whether one runs."""

    def __init__(self) -> None:
        self.users = 0
        self._changed = threading.Condition()
        self._asked = 0
        self._covered = 0
        self._running = False

    def sync(self, folder: str) -> None:
        with self._changed:
            self._asked += 1
            ticket = self._asked
            while self._covered < ticket:
                if self._running:
                    self._changed.wait()
                    continue
                self._running = True
                covers = self._asked  # every caller so far made its change before this fsync starts
                self._changed.release()
                try:
                    fsync_dir(folder)
                finally:
                    self._changed.acquire()
                    self._running = False
                    self._covered = max(self._covered, covers)
                    self._changed.notify_all()


#: What a filesystem that cannot fsync a folder answers (the rename is still atomic there).
_FOLDER_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename or new file in it survives a crash (no-op where unsupported).

    Raises
    ------
    OSError
        The folder cannot be opened, or its fsync failed (an I/O error): what was renamed into it
        may not survive a crash, so the caller must not report it as stored.  The message names
        the folder.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open folder {folder} to fsync it: {exc.strerror}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FOLDER_FSYNC_UNSUPPORTED:
            raise OSError(exc.errno, f"fsync of folder {folder} failed: {exc.strerror}") from exc
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file beside *path*; on success it replaces *path* in one step.

    Readers never see a partial file: on any exception the temporary file is removed and *path*
    is left as it was.  With *durable* the data and the rename are fsync'd before returning.

    Examples
    --------
    >>> with atomic_output("out/a.png") as f:
    ...     f.write(data)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # TEMPORARY_GLOB
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; outputs are for other programs to read
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_temporaries(root: str | os.PathLike, *, skip: str | os.PathLike | None = None,
                       older_than: float = 0.0) -> int:
    """Delete the temporary files :func:`atomic_output` left under *root* when its process was killed.

    Call it only while nothing writes under *root* (at start-up, before any worker runs), or, on a
    folder other machines write to, with *older_than* (seconds untouched) well above any write.
    Files in the folder *skip* are left alone.  Returns how many were removed; one that cannot be
    removed is logged (it is harmless where it is: hidden, and never an output).
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    for tmp in list(root.rglob(TEMPORARY_GLOB)):
        if (skip is not None and tmp.parent == Path(skip)) or not tmp.is_file() or not untouched_for(tmp, older_than):
            continue
        try:
            tmp.unlink()
            removed += 1
        except OSError as exc:
            log.warning("cannot remove the half-written file %s: %s", tmp, exc)
    return removed


def untouched_for(path: Path, seconds: float) -> bool:
    """Whether *path* was last modified at least *seconds* ago (True for 0)."""
    if seconds <= 0:
        return True
    try:
        return path.stat().st_mtime <= time.time() - seconds
    except OSError:
        return False


def remove_empty_parents(folder: Path, root: Path) -> None:
    """Remove *folder* and its parents up to (not including) *root* while they are empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
