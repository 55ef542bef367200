"""``dicom-node export``: a folder tree of series into a dataset of volumes with an index.

::

    dicom-node export /data/site-export --out /data/dataset --format nifti --workers 2

Every series becomes ``OUT/<StudyUID>/<SeriesUID>/volume[...].nii.gz|.npz`` with a ``.json``
sidecar each (:mod:`node.app.volumes`), and ``OUT/index.csv`` lists every volume of the dataset
folder: path, study and series UID, modality, shape, spacing, orientation, source file count (and
what the pipeline did).

Resumable: when a series is done, a record ``.export.json`` is written last into its folder, with a
key made of the pipeline (its fingerprint and output format) and the series' SOP Instance UIDs.  A
run finding a record with the same key, and its volumes in place, skips the series; a series killed
half way has no record and is done again (its half-written files are temporaries, never volumes).

Memory: the tree is scanned for three UIDs per file (never pixels, never whole headers); then one
series at a time per worker process is opened, and one volume at a time of it held.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TextIO

import pydicom
from pydicom.errors import InvalidDicomError

from node.app.volumes import OutputWriteError, write_series_volumes
from node.config.pipeline import Pipeline
from node.imaging.source import DecodeLimits, NotDicom
from node.process.series import find_files, group_series, open_images
from node.store.fsutil import atomic_output, remove_temporaries
from node.telemetry.logsetup import LogSettings, setup_logging

__all__ = ["INDEX_COLUMNS", "RECORD_NAME", "SeriesTask", "export", "export_series", "scan"]

log = logging.getLogger("node.export")

#: The columns of ``index.csv``, in order.
INDEX_COLUMNS = ("volume", "study_uid", "series_uid", "modality", "shape", "spacing", "orientation",
                 "source_files", "pipeline")
#: The record a finished series leaves in its folder (hidden: not a volume).
RECORD_NAME = ".export.json"
INDEX_NAME = "index.csv"

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SCAN_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass
class SeriesTask:
    """One series to export: its files (sorted) and SOP Instance UIDs, found by :func:`scan`."""

    study_uid: str
    series_uid: str
    paths: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)

    def folder(self, out: Path) -> Path:
        """``OUT/<StudyUID>/<SeriesUID>``: UIDs that are not valid UIDs become ``uid-<hash>``."""
        return out / folder_name(self.study_uid) / folder_name(self.series_uid)

    def key(self, pipeline: Pipeline) -> str:
        """What makes an export of this series the same: the pipeline and the instances."""
        digest = hashlib.sha256()
        digest.update(f"{pipeline.fingerprint()}|{pipeline.output.value}".encode())
        for uid in sorted(self.sop_uids):
            digest.update(b"\0" + uid.encode())
        return digest.hexdigest()


@dataclass
class SeriesOutcome:
    """What exporting (or skipping) one series gave: index rows and failure messages."""

    study_uid: str
    series_uid: str
    rows: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: bool = False
    seconds: float = 0.0


def folder_name(uid: str) -> str:
    """*uid* as a folder name: itself when it is a valid UID, else ``uid-`` and a hash (no path tricks)."""
    if 0 < len(uid) <= 64 and _UID.match(uid):
        return uid
    return "uid-" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:16]


def scan(inputs: Sequence[str | os.PathLike]) -> tuple[list[SeriesTask], int]:
    """Every DICOM file under *inputs*, grouped into series by Study and Series Instance UID.

    Reads three UIDs of each file, no pixels.  Returns the series (in order of their first file)
    and how many files were not DICOM.

    Raises
    ------
    FileNotFoundError
        An input does not exist.
    """
    tasks: dict[tuple[str, str], SeriesTask] = {}
    skipped = 0
    for path in find_files(inputs):
        uids = _scan_uids(path)
        if uids is None:
            skipped += 1
            continue
        study, series, sop = uids
        task = tasks.setdefault((study, series), SeriesTask(study, series))
        task.paths.append(path)
        task.sop_uids.append(sop or path.name)
    return list(tasks.values()), skipped


def _scan_uids(path: Path) -> tuple[str, str, str] | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_SCAN_TAGS))
    except InvalidDicomError:
        try:  # old archives: a data set without preamble or file meta (ImageFile reads those too)
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(_SCAN_TAGS))
        except Exception:  # not DICOM at all
            return None
        if "SOPInstanceUID" not in ds:
            return None
    except Exception:  # unreadable: ImageFile.open gives the reason when the series is exported
        return "", "", path.name
    return tuple(str(ds.get(tag) or "") for tag in _SCAN_TAGS)  # type: ignore[return-value]


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finished(task: SeriesTask, out: Path, key: str) -> SeriesOutcome | None:
    """The outcome recorded by an earlier run with the same key whose volumes are all there, else None."""
    folder = task.folder(out)
    record = _read_record(folder)
    if not record or record.get("key") != key:
        return None
    rows = record.get("rows") or []
    if not all((out / row.get("volume", "")).is_file() for row in rows):
        return None
    return SeriesOutcome(task.study_uid, task.series_uid, rows=rows, failures=list(record.get("failures") or []),
                         skipped=True)


def export_series(task: SeriesTask, out: Path, pipeline: Pipeline, limits: DecodeLimits) -> SeriesOutcome:
    """Open one series' files, write its volumes and sidecars, then its record (last).

    Runs in a worker process with ``--workers`` above 1.  Files that fail, stacks refused and
    volumes not written are said in the outcome's failures; the record is written unless an output
    could not be written (a full disk is worth another run; a refused stack is refused again).
    """
    started = time.monotonic()
    outcome = SeriesOutcome(task.study_uid, task.series_uid)
    folder = task.folder(out)
    images, failures = open_images(task.paths, limits)
    outcome.failures.extend(str(f) for f in failures if not isinstance(f, NotDicom))
    retry = False
    for series in group_series(images):  # one, unless headers changed since the scan
        if series.series_uid != task.series_uid:  # its own folder is another task's: never written over this one
            outcome.failures.append(f"{len(series.images)} files of series {task.series_uid} now name series "
                                    f"{series.series_uid} (changed since the scan): not exported, run again")
            retry = True
            continue
        result = write_series_volumes(series, pipeline, folder)
        outcome.failures.extend(str(f) for f in result.failures)
        outcome.rows.extend(dict(volume.index_row(out), pipeline=pipeline.describe()) for volume in result.volumes)
        retry = retry or any(isinstance(f, OutputWriteError) for f in result.failures)
    if not retry:
        record = {"key": task.key(pipeline), "study_uid": task.study_uid, "series_uid": task.series_uid,
                  "pipeline": pipeline.describe(), "format": pipeline.output.value, "files": len(task.paths),
                  "rows": outcome.rows, "failures": outcome.failures}
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / RECORD_NAME) as handle:
            handle.write(json.dumps(record, indent=2).encode() + b"\n")
    outcome.seconds = time.monotonic() - started
    return outcome


class Progress:
    """A one-line progress bar on a terminal; a log line per series otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.bar = self.stream.isatty()
        self.done = self.skipped = self.failed = 0
        self.started = time.monotonic()

    def update(self, outcome: SeriesOutcome) -> None:
        """Count one series finished (or skipped) and show it."""
        self.done += 1
        self.skipped += outcome.skipped
        self.failed += bool(outcome.failures)
        if self.bar:
            width = 30
            filled = width * self.done // max(1, self.total)
            self.stream.write(f"\rexport [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} series, "
                              f"{self.skipped} skipped, {self.failed} with failures, "
                              f"{time.monotonic() - self.started:.0f} s ")
            self.stream.flush()
        else:
            what = "skipped (already exported)" if outcome.skipped else f"{len(outcome.rows)} volume(s) in {outcome.seconds:.1f} s"
            log.info("series %d/%d %s: %s%s", self.done, self.total, outcome.series_uid, what,
                     f", {len(outcome.failures)} failure(s)" if outcome.failures else "")

    def close(self) -> None:
        """End the bar's line."""
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()


def _run(todo: Sequence[SeriesTask], out: Path, pipeline: Pipeline, limits: DecodeLimits,
         workers: int, log_settings: LogSettings | None) -> Iterator[SeriesOutcome]:
    """Export *todo*, in this process or in *workers* processes (at most *workers* series at once)."""
    if workers <= 1:
        for task in todo:
            yield export_series(task, out, pipeline, limits)
        return
    # spawn: a fresh interpreter per worker (no forked copy of this process's threads or memory)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             initializer=setup_logging if log_settings else None,
                             initargs=(log_settings,) if log_settings else ()) as pool:
        pending: set[Future[SeriesOutcome]] = set()
        queue = iter(todo)
        for task in queue:
            pending.add(pool.submit(export_series, task, out, pipeline, limits))
            if len(pending) >= workers:
                break
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
                task = next(queue, None)
                if task is not None:
                    pending.add(pool.submit(export_series, task, out, pipeline, limits))


def _index_rows(out: Path) -> list[dict[str, str]]:
    """Every volume recorded in the dataset folder (this run's and earlier runs'), by path."""
    rows = []
    for record_path in sorted(out.glob(f"*/*/{RECORD_NAME}")):
        record = _read_record(record_path.parent) or {}
        rows.extend(row for row in record.get("rows") or [] if (out / row.get("volume", "")).is_file())
    return sorted(rows, key=lambda row: row["volume"])


def write_index(out: Path) -> Path:
    """Write ``OUT/index.csv`` (atomically) from the records of the dataset folder."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=INDEX_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(_index_rows(out))
    path = out / INDEX_NAME
    with atomic_output(path) as handle:
        handle.write(text.getvalue().encode("utf-8"))
    return path


def export(inputs: Iterable[str | os.PathLike], out: Path, pipeline: Pipeline, *, limits: DecodeLimits,
           workers: int = 1, log_settings: LogSettings | None = None, stream: TextIO | None = None) -> int:
    """Export every series under *inputs* into the dataset folder *out*; returns the exit code.

    Parameters
    ----------
    inputs : iterable of path
        DICOM files or folders (searched recursively).
    out : pathlib.Path
        The dataset folder (created).
    pipeline : Pipeline
        Output ``nifti`` or ``npz``.
    limits : DecodeLimits
        Decoded sizes allowed per file.
    workers : int
        Series exported at once, each in its own process.
    log_settings : LogSettings, optional
        How the worker processes log (as this process does).
    stream : text stream, optional
        Where the progress bar goes when it is a terminal (default: standard error).

    Returns
    -------
    int
        0 when every series was exported, 1 when a file or a volume failed, 2 for a missing input.
    """
    if not pipeline.output.is_volume:
        raise ValueError(f"export writes volumes (nifti, npz), not {pipeline.output.value}")
    try:
        tasks, not_dicom = scan(list(inputs))
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_temporaries(out)  # half-written files of a run that was killed
    log.info("export: %d series in %d files (%d not DICOM) -> %s; pipeline: %s%s", len(tasks),
             sum(len(t.paths) for t in tasks), not_dicom, out, pipeline.describe(),
             f"; {removed} half-written file(s) of an earlier run removed" if removed else "")
    progress = Progress(len(tasks), stream)
    todo = []
    outcomes: list[SeriesOutcome] = []
    for task in tasks:
        done = _finished(task, out, task.key(pipeline))
        if done is None:
            todo.append(task)
        else:
            outcomes.append(done)
            progress.update(done)
    broken = False
    try:
        for outcome in _run(todo, out, pipeline, limits, workers, log_settings):
            outcomes.append(outcome)
            progress.update(outcome)
            for failure in outcome.failures:
                log.error("series %s: %s", outcome.series_uid, failure)
    except BrokenProcessPool as exc:  # a worker killed (out of memory?): what is done stays done
        broken = True
        log.error("export stopped: a worker process died (%s); run the same command again to finish the "
                  "%d series not exported", exc, len(todo) - (len(outcomes) - (len(tasks) - len(todo))))
    finally:
        progress.close()
        index = write_index(out)
    volumes = sum(len(o.rows) for o in outcomes)
    failed = [o for o in outcomes if o.failures]
    log.info("export done: %d series (%d skipped as already exported), %d volumes, %d series with failures; "
             "index %s", len(outcomes), sum(o.skipped for o in outcomes), volumes, len(failed), index)
    return 1 if failed or broken else 0
