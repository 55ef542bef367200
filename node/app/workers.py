"""Series processing in worker processes, supervised by the receiving process.

The receiving process receives, spools, records and answers; every series is processed in one of
``[node] workers`` processes of its own, so decoding and rendering never hold the receiver's GIL nor
share its memory.  Measured on main before this module (2 cores, one storescu association, 300-slice
CT): a push while the node processed the previous series took 2.1x the same push into an idle node
(``scripts/bench/run contention`` measures it again; docs/benchmarks.md has the numbers).

A worker (:func:`worker_main`) is started with ``spawn`` (the receiver has threads: ``fork`` would copy
their locks), opens its own connection to the job store (SQLite in WAL mode is made for several
processes), claims queued series under its name (``claimed_by``), runs the route's pipeline
(:class:`SeriesProcessor`) and records the result.  It runs at a lower CPU priority (``nice``
:data:`WORKER_NICENESS`): when both compete for the cores, answering senders comes first, and an idle
receiver leaves the worker every core.  Each outcome is reported over a pipe, for the receiver's
metrics; the job store stays the record of the work.

:class:`WorkerPool` (in the receiver) supervises: a worker that dies (killed for memory, a crash in a
decoder, ``kill -9``) is started again and its series given back to the queue with
:meth:`node.store.jobstore.JobStore.abandon`, which fails a series once its attempts are used up; a series
still being processed after ``processing_timeout_seconds`` has its worker killed, the same way.  A
worker's death never takes down the receiver.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.config import Config
from node.process.routing import route_for
from node.imaging.source import DecodeLimits
from node.store.jobstore import JobStore, SeriesJob, SeriesState, job_store_for
from node.telemetry.logsetup import LogSettings, setup_logging
from node.app.process_series import SeriesResult, process_series
from node.process.series import InputSeries, instance_order, open_images
from node.store.spool import remove_spooled, shared_dir_problem

__all__ = ["WORKER_NICENESS", "SeriesProcessor", "WorkerPool", "worker_main"]

log = logging.getLogger(__name__)

#: CPU priority of a worker process relative to the receiver (``nice`` increment).
WORKER_NICENESS = 10
#: Seconds an idle worker waits before it asks the job store for work again.
IDLE_POLL_SECONDS = 0.25
#: Seconds a worker asked to stop may take to finish its series before it is killed.
STOP_GRACE_SECONDS = 30.0
#: A worker that dies within this many seconds of its start is started again only after this long.
RESTART_DELAY_SECONDS = 2.0

#: What a worker reports (message kinds on its pipe).
BUSY, IDLE, PROCESSED, FAILED, DISCARDED = "busy", "idle", "processed", "failed", "discarded"
#: What the receiver tells a worker: finish the current series, then exit.
STOP = "stop"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class SeriesProcessor:
    """Route, process and record one claimed series (in whatever process runs it).

    Parameters
    ----------
    config : Config
        The checked configuration (routes, pipelines).
    jobs : JobStore
        The job store the series was claimed from.
    outputs : Path
        Folder of the derived series (``<outputs>/<StudyUID>/<DerivedSeriesUID>/``).
    render_threads : int
        Images of one series rendered at once.
    report : callable, optional
        Called with ``(kind, seconds)`` for each outcome: ``("processed", seconds)`` or ``("failed", 0)``.
    """

    def __init__(
        self,
        config: Config,
        jobs: JobStore,
        outputs: Path,
        *,
        render_threads: int,
        report: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.jobs = jobs
        self.outputs = outputs
        self.render_threads = render_threads
        self.decode_limits = DecodeLimits.from_mb(config.node.max_decoded_mb, config.node.max_frame_mb)
        self._report = report or (lambda kind, seconds: None)

    def run(self, job: SeriesJob) -> None:
        """Process *job*; any exception fails the series (a bug must not kill the worker)."""
        try:
            self._process(job)
        except Exception as exc:
            log.exception("series %s: processing crashed", job.series_uid)
            self._fail(job, f"processing crashed: {type(exc).__name__}: {exc}")

    def _process(self, job: SeriesJob) -> None:
        if self.jobs.is_derived(job.series_uid):
            reason = "a series this node derived came back: not processed again"
            log.warning("series %s: %s", job.series_uid, reason)
            self.jobs.set_outcome(job, SeriesState.UNROUTED, reason)
            return
        discard = self._discard_reason(job)
        if discard is not None:
            self._discard(job, discard)
            return
        images, failures = open_images(job.instance_paths, self.decode_limits)
        for failure in failures:
            log.error("series %s: %s", job.series_uid, failure)
        if not images:
            reason = "; ".join(f.reason for f in failures[:3]) or "no instances"
            self._fail(job, f"no processable instance: {reason}")
            return
        route = route_for(self.config, images[0].header)
        if route is None:
            first = images[0].header
            reason = f"no route matches (Modality {first.get('Modality')}, SOP Class {first.get('SOPClassUID')})"
            log.warning("series %s kept unrouted: %s", job.series_uid, reason)
            self.jobs.set_outcome(job, SeriesState.UNROUTED, reason)
            return
        pipeline = self.config.pipelines[route.pipeline]
        series = InputSeries(job.study_uid, job.series_uid, sorted(images, key=instance_order))
        log.info("series %s: %d instances -> pipeline %s", job.series_uid, len(series.images), pipeline.name)
        result = process_series(
            series, pipeline, self.outputs, now=datetime.datetime.now().astimezone(), threads=self.render_threads,
            histograms=True,
        )
        failures.extend(result.failures)
        if not result.outputs:
            self._fail(job, "no output: " + "; ".join(f.reason for f in failures[:3]))
            return
        error = f"{len(failures)} instances failed: {failures[0].reason}" if failures else None
        output_dir = self.outputs / job.study_uid / result.derived_series_uid
        _keep_histograms(output_dir, result)
        scheduled = self.jobs.processed(
            job, route=route.pipeline, pipeline=pipeline.name,
            output_dir=output_dir,
            derived_series_uid=result.derived_series_uid,
            outputs=len(result.outputs), destinations=route.destinations, seconds=result.seconds, error=error,
        )
        self._report(PROCESSED, result.seconds)
        log.info(
            "series %s -> %s: %d outputs in %.2f s%s", job.series_uid, result.derived_series_uid,
            len(result.outputs), result.seconds, "" if scheduled else " (new instances came: will run again)",
        )

    def _discard_reason(self, job: SeriesJob) -> str | None:
        """Why *job* is dropped unprocessed (a discard route, or ``unrouted = "discard"``), or None.

        The route is decided on the first readable header (no pixel data is read), so a series
        whose pixels could not be decoded is discarded all the same.
        """
        header = _first_header(job.instance_paths)
        if header is None:
            return None  # nothing readable: processing reports why
        route = route_for(self.config, header)
        what = f"Modality {header.get('Modality')}, SOP Class {header.get('SOPClassUID')}"
        if route is not None and route.discards:
            return f"a discard route matches ({what})"
        if route is None and self.config.node.unrouted == "discard":
            return f"no route matches and unrouted = \"discard\" ({what})"
        return None

    def _discard(self, job: SeriesJob, reason: str) -> None:
        """Mark *job* discarded, then remove its spool files and forget its instances."""
        if not self.jobs.set_outcome(job, SeriesState.DISCARDED, reason):
            return  # new instances came: it settles and is routed again
        removed = remove_spooled(job.instance_paths, self.config.node.shared / "spool")
        self.jobs.forget_discarded_instances(job)
        self._report(DISCARDED, 0.0)
        log.info("series %s discarded: %s; %d spool files removed", job.series_uid, reason, removed)

    def _fail(self, job: SeriesJob, reason: str) -> None:
        log.error("series %s failed: %s", job.series_uid, reason)
        self._report(FAILED, 0.0)
        self.jobs.set_outcome(job, SeriesState.FAILED, reason)


def _first_header(paths: tuple[Path, ...]) -> Dataset | None:
    """The header (no pixel data) of the first of *paths* that can be read, or None."""
    for path in paths:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError, EOFError):
            continue
    return None


class SharedDirUnavailable(OSError):
    """This machine cannot use ``shared_dir`` (a missing mount, permissions): its jobs wait for another worker."""


# -- the worker process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (pickled to it at start)."""

    name: str
    config: Config
    log_settings: LogSettings
    render_threads: int


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process: process series until the receiver says stop.

    On SQLite it claims queued series from the job store; on PostgreSQL it runs the series jobs
    Procrastinate hands it (:mod:`node.store.dispatch`).  SIGINT and SIGTERM are ignored (a Ctrl-C or
    ``kill`` of the process group reaches the workers too: the receiver decides, and sends
    :data:`STOP` on the pipe once it stops; the current series is finished first).  When the
    receiver dies, the worker is killed with it (Linux ``PR_SET_PDEATHSIG``) or stops at its next
    look for work: an orphan never goes on claiming.
    """
    setup_logging(spec.log_settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    os.nice(WORKER_NICENESS)
    if spec.config.store.url is None:
        _claim_from_store(spec, conn)
    else:
        _run_dispatched(spec, conn)


def _processor(spec: WorkerSpec, jobs: JobStore, conn: Connection) -> SeriesProcessor:
    def report(kind: str, seconds: float) -> None:
        conn.send((kind, seconds))

    return SeriesProcessor(spec.config, jobs, spec.config.node.shared / "outputs",
                           render_threads=spec.render_threads, report=report)


def _claim_from_store(spec: WorkerSpec, conn: Connection) -> None:
    """SQLite: claim the oldest queued series, process it, and again, until told to stop."""
    parent = os.getppid()
    jobs = job_store_for(spec.config)
    processor = _processor(spec, jobs, conn)
    try:
        while not _told_to_stop(conn, 0.0) and os.getppid() == parent:
            job = jobs.claim_next(worker=spec.name)
            if job is None:
                if _told_to_stop(conn, IDLE_POLL_SECONDS):
                    break
                continue
            conn.send((BUSY, job.id))
            processor.run(job)
            conn.send((IDLE, job.id))
    finally:
        jobs.close()


def _run_dispatched(spec: WorkerSpec, conn: Connection) -> None:
    """PostgreSQL: run the ``process_series`` jobs of the queue, one at a time, until told to stop."""
    from node.store.dispatch import PROCESS_QUEUE, TaskHandlers, WorkerTiming, build_app, run_workers

    store = spec.config.store
    holder: dict[str, Any] = {}

    def process_series(series_id: int, job_id: int) -> None:
        problem = shared_dir_problem(spec.config.node.shared)
        if problem is not None:  # the job goes back to the queue (retried later, by any worker)
            raise SharedDirUnavailable(f"{spec.name}: {problem}: series id {series_id} left queued")
        job = holder["jobs"].claim(series_id, f"job:{job_id}", max_attempts=spec.config.node.max_processing_attempts)
        if job is None:
            log.debug("series id %d: no longer queued; job %d does nothing", series_id, job_id)
            return
        conn.send((BUSY, job.id))
        holder["processor"].run(job)
        conn.send((IDLE, job.id))

    app = build_app(store.url, store.password(), TaskHandlers(process_series=process_series))
    jobs = holder["jobs"] = job_store_for(spec.config)
    holder["processor"] = _processor(spec, jobs, conn)
    stop = threading.Event()
    threading.Thread(target=_wait_for_stop, args=(conn, stop), name="stop-watch", daemon=True).start()
    try:
        run_workers(app, {PROCESS_QUEUE: 1}, name=spec.name, timing=WorkerTiming(store.stalled_seconds), stop=stop,
                    problem=lambda: shared_dir_problem(spec.config.node.shared))
    finally:
        jobs.close()


def _wait_for_stop(conn: Connection, stop: threading.Event) -> None:
    """Set *stop* when the receiver sends :data:`STOP`, or is gone."""
    while not _told_to_stop(conn, 1.0):
        pass
    stop.set()


def _told_to_stop(conn: Connection, wait: float) -> bool:
    """Whether the receiver sent :data:`STOP` (or is gone), waiting up to *wait* seconds for a word."""
    try:
        return conn.poll(wait) and conn.recv() == STOP
    except (EOFError, OSError):
        return True


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)


# -- the supervisor (in the receiving process) ----------------------------------------------------


@dataclass
class _Worker:
    """One worker process as the supervisor sees it."""

    name: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started: float
    busy_with: int | None = None
    busy_since: float = 0.0
    kill_reason: str | None = None
    restart_at: float | None = None


def _death(exitcode: int | None) -> str:
    """How a process ended, in words."""
    if exitcode is None:
        return "ended"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


class WorkerPool:
    """``count`` worker processes, started, watched and restarted by one supervisor thread.

    Parameters
    ----------
    config : Config
        The checked configuration (pickled to each worker).
    jobs : JobStore
        The receiver's job store (to give back the series of a dead worker).
    count : int
        Number of worker processes.
    log_settings : LogSettings
        How the workers log.
    on_report : callable
        Called in the supervisor thread with ``(kind, seconds)`` for each processed or failed series.
    """

    def __init__(
        self,
        config: Config,
        jobs: JobStore,
        *,
        count: int,
        log_settings: LogSettings,
        on_report: Callable[[str, float], None],
    ) -> None:
        self.config = config
        self.jobs = jobs
        self.count = count
        self.log_settings = log_settings
        self.on_report = on_report
        self.timeout = config.node.processing_timeout_seconds
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._stop = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._render_threads = max(1, min(4, os.cpu_count() or 1))

    def start(self) -> None:
        """Start the workers and their supervisor; returns at once."""
        self._workers = [self._spawn(f"worker-{number + 1}") for number in range(self.count)]
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask every worker to finish its series and stop; kill those still running after the grace time.

        The supervisor goes on reading reports meanwhile (restarting nobody); it ends last, because
        Linux kills a worker when the thread that started it ends.
        """
        self._stopping.set()
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(STOP)  # finish the current series, then exit
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("%s still processing at the end of the %g s given to stop: killed (its series is "
                            "taken back at the next start, or by another worker)", worker.name, STOP_GRACE_SECONDS)
                worker.process.kill()
                worker.process.join(timeout=5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for worker in self._workers:
            worker.conn.close()

    def alive(self) -> bool:
        """Whether the supervisor runs (it restarts dead workers itself)."""
        return self._thread is not None and self._thread.is_alive()

    # -- supervision ------------------------------------------------------------------------------

    def _spawn(self, name: str) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        spec = WorkerSpec(name, self.config, self.log_settings, self._render_threads)
        process = self._context.Process(target=worker_main, args=(spec, child_end), name=name, daemon=True)
        process.start()
        child_end.close()
        log.info("%s started (pid %d)", name, process.pid)
        return _Worker(name, process, parent_end, time.monotonic())

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch_once()
            except Exception:  # the supervisor must outlive any surprise
                log.exception("worker supervision failed; going on")
                self._stop.wait(1.0)

    def _watch_once(self) -> None:
        running = [w for w in self._workers if w.restart_at is None]
        waitables = [w.conn for w in running] + [w.process.sentinel for w in running]
        ready = multiprocessing.connection.wait(waitables, timeout=0.5) if waitables else []
        if not waitables:
            self._stop.wait(0.5)
        for worker in running:
            if worker.conn in ready:
                self._read(worker)
            if worker.process.sentinel in ready:
                self._read(worker)  # what it said before it died
                self._died(worker)
        now = time.monotonic()
        for index, worker in enumerate(self._workers):
            if worker.restart_at is not None and now >= worker.restart_at and not self._stopping.is_set():
                worker.conn.close()
                self._workers[index] = self._spawn(worker.name)
            elif worker.busy_with is not None and worker.kill_reason is None and now - worker.busy_since > self.timeout:
                worker.kill_reason = f"was killed: processing took longer than processing_timeout_seconds ({self.timeout:g} s)"
                log.error("%s: series id %d: %s", worker.name, worker.busy_with, worker.kill_reason)
                worker.process.kill()

    def _read(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                kind, value = worker.conn.recv()
                if kind == BUSY:
                    worker.busy_with, worker.busy_since = int(value), time.monotonic()
                elif kind == IDLE:
                    worker.busy_with = None
                else:
                    self.on_report(kind, float(value))
        except (EOFError, OSError, ValueError, TypeError):
            return  # the worker is gone (or died mid-message): its sentinel says so

    def _died(self, worker: _Worker) -> None:
        worker.process.join(timeout=5)
        worker.restart_at = float("inf")  # not waited on again; a finite time below restarts it
        if self._stopping.is_set():
            return  # stopped as asked, or killed after the grace time (stop() says so)
        how = worker.kill_reason or _death(worker.process.exitcode)
        reason = f"{worker.name} (pid {worker.process.pid}) {how}"
        claimed = sorted(set(self.jobs.claimed_by(worker.name)) | ({worker.busy_with} if worker.busy_with else set()))
        for series_id in claimed:
            outcome = self.jobs.abandon(series_id, reason, max_attempts=self.config.node.max_processing_attempts)
            if outcome == SeriesState.FAILED:
                log.error("series id %d failed: its processing did not finish %d times (see dicom-node status)",
                          series_id, self.config.node.max_processing_attempts)
                self.on_report(FAILED, 0.0)
        log.error("%s (pid %s) %s%s; starting it again", worker.name, worker.process.pid, how,
                  f" while processing series id {', '.join(map(str, claimed))}" if claimed else "")
        quick = time.monotonic() - worker.started < RESTART_DELAY_SECONDS
        worker.restart_at = time.monotonic() + (RESTART_DELAY_SECONDS if quick else 0.0)


def _keep_histograms(folder: Path, result: SeriesResult) -> None:
    """Keep the series' histograms beside its outputs for the status page (a failure is a warning only)."""
    from node.outputs.histogram import write_histogram_data

    if result.histograms is None:
        return
    try:
        write_histogram_data(folder, result.histograms)
    except OSError as exc:
        log.warning("series %s: histograms not kept in %s: %s", result.series_uid, folder, exc.strerror or exc)
