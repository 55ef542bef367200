"""Folder destinations: the outputs copied into ``<root>/<study>/<series>/``, then ``.complete``."""

from __future__ import annotations

import shutil
from pathlib import Path

from node.config import FolderDestination
from node.config.file_names import delivered_names
from node.deliver.sender import Sender, check_uid
from node.store.fsutil import atomic_output, fsync_dir

__all__ = ["COMPLETE_MARKER", "FolderSender"]

#: Name of the marker file FolderSender writes last into a delivered series folder.
COMPLETE_MARKER = ".complete"

_COPY_CHUNK_BYTES = 1024 * 1024


class FolderSender(Sender):
    """Copies the files into ``<path>/<study_uid>/<series_uid>/`` and then writes ``.complete``.

    Every file is written atomically (temporary file, fsync, rename), so a
    watcher never sees a partial file; the ``.complete`` marker comes last and
    tells it the series is whole.  A ``.complete`` left by an earlier delivery
    of the same series is removed before any file is written.

    The root folder must exist (a missing root usually means an unmounted
    disk: transient); the study and series folders are created.

    With a ``file_names`` template each file is named from its header
    (:func:`node.config.file_names.delivered_names`: distinct names, the same on a
    re-delivery); without one, each keeps its own name.
    """

    kind = FolderDestination.kind

    def __init__(self, *, path: Path, file_names: str | None = None) -> None:
        self.path = Path(path)
        self.file_names = file_names

    @classmethod
    def from_destination(cls, destination: FolderDestination) -> FolderSender:
        """The sender of a ``kind = "folder"`` destination."""
        return cls(path=destination.path, file_names=destination.file_names)

    def describe(self) -> str:
        return f"folder {self.path}"

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        """Where the files of a series go."""
        return self.path / study_uid / series_uid

    def _deliver(self, files: list[Path], study_uid: str, series_uid: str) -> str | None:
        check_uid("study", study_uid)
        check_uid("series", series_uid)
        names = delivered_names(self.file_names, files)
        if len(set(names)) != len(names):
            raise self._fail("two files have the same name", permanent=True)
        series_dir = self._series_dir(study_uid, series_uid)
        marker = series_dir / COMPLETE_MARKER
        self._remove_marker(marker)
        for source, name in zip(files, names):
            self._copy(source, series_dir / name)
        try:
            with atomic_output(marker):
                pass
        except OSError as exc:
            raise self._fail(f"cannot write {marker}: {exc}", permanent=False) from exc
        return None

    def _series_dir(self, study_uid: str, series_uid: str) -> Path:
        """The series folder, created with its study folder under the existing root."""
        self._ensure_dir(self.path, create=False)
        study_dir = self.path / study_uid
        self._ensure_dir(study_dir, create=True)
        series_dir = study_dir / series_uid
        self._ensure_dir(series_dir, create=True)
        return series_dir

    def _ensure_dir(self, folder: Path, *, create: bool) -> None:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise self._fail(f"{folder} exists and is not a folder", permanent=True)
            return
        if not create:
            raise self._fail(f"{folder} does not exist", permanent=False)
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise self._fail(f"{folder} exists and is not a folder", permanent=True) from None
        except OSError as exc:
            raise self._fail(f"cannot create {folder}: {exc}", permanent=False) from exc

    def _remove_marker(self, marker: Path) -> None:
        """Remove the ``.complete`` of an earlier delivery before any file is written."""
        try:
            if marker.is_dir():
                raise self._fail(f"{marker} is a folder", permanent=True)
            if marker.exists():
                marker.unlink()
                fsync_dir(marker.parent)
        except OSError as exc:
            raise self._fail(f"cannot remove old {marker}: {exc}", permanent=False) from exc

    def _copy(self, source: Path, target: Path) -> None:
        """Copy one file atomically onto *target*."""
        if target.is_dir():
            raise self._fail(f"{target} exists and is a folder", permanent=True)
        try:
            src = open(source, "rb")
        except FileNotFoundError as exc:
            raise self._fail(f"{source.name}: source file missing: {exc}", permanent=True) from exc
        except OSError as exc:
            raise self._fail(f"{source.name}: cannot read: {exc}", permanent=False) from exc
        try:
            with src, atomic_output(target) as out:
                shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)
        except OSError as exc:
            raise self._fail(f"cannot write {target}: {exc}", permanent=False) from exc
