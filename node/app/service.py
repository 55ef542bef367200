"""``dicom-node serve``: a receiving process and its worker processes, in one role or both.

``--role receiver`` runs, as threads each with one job, all talking through the job store:

- the DICOM listeners, plain and TLS (:mod:`node.receive.guard` bounds each connection's negotiation), then
  the pynetdicom SCP (ingest: spool + record, then Success; :mod:`node.store.pending` keeps the rows
  when the store is away);
- the assembler (receiving series quiet for ``settle_seconds`` become queued);
- an apscheduler job per ``[[sources]]`` entry, pulling new series from a DICOMweb archive into
  the same spool (:mod:`node.receive.poller`).

``--role worker`` runs:

- the worker supervisor (:mod:`node.app.workers`): ``[node] workers`` processes process queued series
  and write outputs; a dead or stuck worker is replaced;
- the deliveries (:mod:`node.deliver.lanes`): a lane per destination, retried with backoff.

``--role all`` (the default) runs both.  On SQLite (one machine) workers claim from the job store;
with ``[store]`` (PostgreSQL) Procrastinate carries the jobs to workers on any machine
(:mod:`node.store.dispatch`).  Start-up first removes half-written files, re-records spooled instances
the database does not know, and (on one machine) puts in-flight work back in its queue, so a
SIGKILL at any moment loses nothing that was acknowledged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Config, FolderDestination
from node.process.routing import route_for
from node.store.database import unavailable
from node.deliver.lanes import DeliveryLanes, DispatchedDeliveries
from node.store.fsutil import remove_empty_parents, remove_temporaries
from node.app.http.server import StatusServer
from node.app.http.auth import HttpGuard
from node.imaging.source import DecodeLimits
from node.store.jobstore import job_store_for
from node.telemetry.logsetup import LogSettings, Throttle, first_line
from node.telemetry.metrics import Metrics
from node.receive.guard import start_guarded_server
from node.receive.poller import DicomWebPoller, schedule
from node.store.pending import PendingRecords
from node.deliver.sender import Sender
from node.deliver.senders import sender_for
from node.store.spool import Spool, shared_dir_problem
from node.net.pynetdicom_setup import configure_pynetdicom
from node.net.tls import check_certificate_expiry, https_server_context, server_context
from node.receive.tls_listener import start_tls_server
from node.app.receivers import ReceiverPool, receiving
from node.app.workers import DISCARDED, PROCESSED, WorkerPool

__all__ = ["ListenerError", "NodeService"]

log = logging.getLogger(__name__)

class ListenerError(Exception):
    """A listener cannot bind its address; the message is one line naming the config, the setting, the
    listener, host and port, and why."""


@contextlib.contextmanager
def _binding(config: Config, listener: str, setting: str, host: str, port: int) -> Iterator[None]:
    """Turn the OSError of binding *listener* to *host*:*port* into a :class:`ListenerError`."""
    try:
        yield
    except OSError as exc:
        why = (f"the port is in use (another dicom-node, or another program: `ss -ltnp 'sport = :{port}'` names "
               "it); stop it or choose another port" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        raise ListenerError(f"{config.source}: {setting}: {listener} cannot listen on {host}:{port}: {why}") from None


#: What ``dicom-node serve --role`` can run.
ROLES = ("all", "receiver", "worker")
#: On a shared spool and outputs, temporaries untouched this long are taken as left by a crash.
SHARED_TEMPORARY_SECONDS = 3600.0

#: Seconds between two checks of the TLS certificates' expiry (the first is at start-up).
CERTIFICATE_CHECK_SECONDS = 6 * 3600.0


class NodeService:
    """The running node: SCP, assembler, workers and delivery, over one spool and job store.

    Parameters
    ----------
    config : Config
        The checked configuration.
    log_settings : LogSettings, optional
        How the worker processes log (as the command does).
    role : str
        ``all`` (receive and process), ``receiver`` (SCP, DICOMweb poller, assembly) or ``worker``
        (processing and delivery); several of each may share one ``[store]`` and ``shared_dir``.
    """

    def __init__(self, config: Config, *, log_settings: LogSettings | None = None, role: str = "all") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.config = config
        self.role = role
        self.receives = role in ("all", "receiver")
        self.works = role in ("all", "worker")
        shared = config.node.shared
        spool_root = shared / "spool"
        # only a receiver makes the spool: a worker that finds none is looking at an unmounted share
        self.spool: Spool = Spool(spool_root) if self.receives else None  # type: ignore[assignment]
        self.outputs = shared / "outputs"
        self.jobs = job_store_for(config)
        self.senders: dict[str, Sender] = {
            name: sender_for(dest) for name, dest in config.destinations.items()
        }
        self.metrics = Metrics(destinations=config.destinations)
        #: [node] max_decoded_mb / max_frame_mb, checked at C-STORE, before processing and thumbnails
        self.decode_limits = DecodeLimits.from_mb(config.node.max_decoded_mb, config.node.max_frame_mb)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._tls_server = None
        # TLS files are checked now: a ConfigError before anything starts
        self._tls_context = server_context(config.tls) if config.tls is not None else None
        self._pending: PendingRecords | list = []  # the SCP's instances waiting for the job store
        self._store_ok = True  # the assembler's last use of the job store worked (for /readyz)
        self._store_trouble = Throttle(60.0)
        self._log_settings = log_settings or LogSettings()
        self.workers = WorkerPool(config, self.jobs, count=config.node.workers,
                                  log_settings=self._log_settings, on_report=self._worker_report)
        #: The receiver processes beside this one on the DICOM port (``[node] receivers`` > 1), once started.
        self.receivers: ReceiverPool | None = None
        lanes = DeliveryLanes(self.jobs, config.destinations, self.senders, config.delivery, self.metrics)
        self.deliveries: DeliveryLanes | DispatchedDeliveries = (
            lanes if config.store.url is None else DispatchedDeliveries(lanes, config.store, config.node.shared))
        self.pollers = [
            DicomWebPoller(source, spool=self.spool, jobs=self.jobs, pipeline_names=config.pipelines)
            for source in config.sources.values() if self.receives
        ]
        self._scheduler = BackgroundScheduler() if self.pollers else None
        self.http = StatusServer(
            host=config.http.host, port=config.http.port, jobs=self.jobs, metrics=self.metrics,
            outputs_dir=self.outputs, spool_dir=spool_root, pipelines=config.pipelines,
            decode_limits=self.decode_limits,
            is_alive=self._alive,
            is_ready=self._is_ready,
            guard=HttpGuard.for_settings(config.http),  # the secret is read now: a ConfigError before start
            tls=https_server_context(config.http),
            max_delivery_attempts=config.delivery.max_attempts,
        )

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover, then start the SCP and the background threads; returns at once."""
        configure_pynetdicom()  # pynetdicom's process-wide switches, before any association
        with _binding(self.config, "the HTTP listener", "http.port", self.config.http.host, self.config.http.port):
            self.http.start()  # /healthz answers during recovery; it logs where it listens
        self._recover()
        if self.receives:
            self._start_receiving()
        if self.works:
            self._start_working()
        if (self.config.node.retention_hours > 0 or self.config.node.failed_retention_hours > 0) and self.receives:
            self._spawn("retention", self._retention_loop)
        if self._certificates():
            self._spawn("certificates", self._certificate_loop)
        self._ready.set()
        node = self.config.node
        log.info(
            "node started (%s): data in %s, %s, %d routes, destinations: %s", self.role, node.shared,
            f"{node.workers} workers" if self.works else "no workers", len(self.config.routes),
            ", ".join(s.describe() for s in self.senders.values()) or "none",
        )

    def _start_receiving(self) -> None:
        """The SCP(s), the assembler and the DICOMweb pollers."""
        node = self.config.node
        tls = self.config.tls
        if node.port or tls is not None:
            parts = receiving(self.config, self.spool, self.jobs, self.metrics,
                              match_tls_ae_title=tls is not None and tls.match_ae_title)
            ae, guard, handler = parts.ae, parts.guard, parts.handler  # one guard: its limits are over both listeners
            self._pending = handler.pending
            self._spawn("recorder", self._record_loop)
            if node.port:
                shared = node.receivers > 1  # SO_REUSEPORT: the receiver processes listen beside this one
                with _binding(self.config, "the DICOM listener", "node.port", node.host, node.port):
                    self._server = start_guarded_server(ae, (node.host, node.port), handler.handlers(), guard,
                                                        reuse_port=shared)
                log.info("listening as %s on %s:%d%s", node.ae_title, node.host, node.port,
                         f" with {node.receivers - 1} more receiving process(es)" if shared else "")
                if shared:
                    self.receivers = ReceiverPool(self.config, count=node.receivers - 1,
                                                  log_settings=self._log_settings, metrics=self.metrics,
                                                  rerecord=self._rerecord_spool)
                    self.receivers.start()
            if tls is not None:
                with _binding(self.config, "the DICOM TLS listener", "tls.port", node.host, tls.port):
                    self._tls_server = start_tls_server(ae, node.host, tls, handler.handlers(),
                                                        context=self._tls_context, guard=guard)
        self._spawn("assembler", self._assemble_loop)
        if self._scheduler is not None:
            schedule(self.pollers, self._scheduler)
            self._scheduler.start()
            log.info("polling %d DICOMweb source(s): %s", len(self.pollers), ", ".join(self.config.sources))

    def _start_working(self) -> None:
        """The worker processes and the deliveries."""
        problem = shared_dir_problem(self.config.node.shared)
        if problem is not None:  # its jobs wait for another worker; /readyz says not ready until it is fixed
            self._store_trouble.ready("shared_dir")
            log.error("not ready: %s", problem)
        for destination in self.config.destinations.values():
            if isinstance(destination, FolderDestination):
                try:
                    destination.path.mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # delivery retries it; say so now
                    log.warning("folder destination %s: %s", destination.name, exc)
        self.workers.start()
        self.deliveries.start()

    def stop(self) -> None:
        """Stop accepting, let running work finish its current step, and close the store."""
        self._ready.clear()
        self._stop.set()
        for poller in self.pollers:
            poller.stop()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        if self.receivers is not None:
            self.receivers.stop()
        if self.works:
            self.workers.stop()
        for thread in self._threads:
            thread.join(timeout=60)
        if isinstance(self._pending, PendingRecords):
            self._pending.flush()  # rows of C-STOREs answered while the listeners stopped
        if self.works:
            self.deliveries.stop()
        self.http.stop()
        self.jobs.close()
        log.info("node stopped")

    def run_forever(self) -> None:
        """Start, then serve until SIGTERM or SIGINT."""
        self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _alive(self) -> bool:
        """For /healthz: every thread, the worker supervisor and the delivery lanes run (while starting:
        not stopped; the parts start one after the other, and readiness is /readyz's to say)."""
        if not self._ready.is_set():
            return not self._stop.is_set()
        return (not self._stop.is_set() and all(t.is_alive() for t in self._threads)
                and (self.receivers is None or self.receivers.alive())
                and (not self.works or (self.workers.alive() and self.deliveries.alive())))

    def _is_ready(self) -> bool:
        """For /readyz: started, the job store answering (now, to the assembler and to the recorder of
        received instances), and (a worker) the shared folder usable."""
        if not self._ready.is_set() or self._stop.is_set() or not self._store_ok or (
                isinstance(self._pending, PendingRecords) and self._pending.failing):
            return False
        if not self.jobs.reachable():
            return False
        if self.works:
            problem = shared_dir_problem(self.config.node.shared)
            if problem is not None:
                if self._store_trouble.ready("shared_dir") is not None:
                    log.error("not ready: %s", problem)
                return False
        return True

    def _worker_report(self, kind: str, seconds: float) -> None:
        """A worker processed, discarded or failed a series: count it; deliver what is due at once."""
        if kind == PROCESSED:
            self.metrics.series_processed(seconds)
            self.deliveries.wake()
        elif kind == DISCARDED:
            self.metrics.series_discarded()
        else:
            self.metrics.series_failed()

    # -- recovery -------------------------------------------------------------------------------

    def _rerecord_spool(self) -> None:
        """Record spooled instances the store lacks (a receiver process died with rows not yet written)."""
        recorded = self.jobs.reconcile(self.spool)
        log.warning("a receiver process died: %d spooled instances it had not recorded are recorded now",
                    recorded.instances)

    def _recover(self) -> None:
        """Half-written files removed, spooled instances the store missed recorded, interrupted work resumed.

        On one machine (SQLite) everything in flight was this node's and is resumed at once.  With
        a shared ``[store]`` other receivers and workers may be at work: only temporaries untouched
        for :data:`SHARED_TEMPORARY_SECONDS` are removed, and interrupted jobs are left to the queue's
        maintenance (their workers stop heartbeating: :mod:`node.store.dispatch`).
        """
        shared = self.config.store.url is not None
        age = SHARED_TEMPORARY_SECONDS if shared else 0.0
        removed = self.spool.remove_temporaries(older_than=age) if self.receives else 0
        removed_outputs = remove_temporaries(self.outputs, older_than=age) if self.works else 0
        recorded = self.jobs.reconcile(self.spool) if self.receives else None
        attempts = self.config.node.max_processing_attempts
        counts = {"series_requeued": 0, "series_failed": 0, "deliveries_resumed": 0}
        if not shared and self.works:  # a receiver restarting must not take back a worker's series
            counts = self.jobs.recover(max_attempts=attempts)
        log.info(
            "recovery: %d temporary spool files and %d temporary output files removed, %d spooled instances "
            "re-recorded, %d series re-queued, %d deliveries resumed", removed, removed_outputs,
            recorded.instances if recorded else 0, counts["series_requeued"], counts["deliveries_resumed"],
        )
        for _ in range(counts["series_failed"]):
            self.metrics.series_failed()
        if counts["series_failed"]:
            log.error("recovery: %d series failed: their processing did not finish %d times (see dicom-node status)",
                      counts["series_failed"], attempts)

    def _record_loop(self) -> None:
        """Record the instances the SCP spooled (after their C-STOREs were answered), in batches."""
        self._pending.run(self._stop)

    # -- series assembly --------------------------------------------------------------------------

    def _assemble_loop(self) -> None:
        node = self.config.node
        interval = max(0.05, min(1.0, node.settle_seconds / 4))  # a floor: a tiny settle time must not spin
        while not self._stop.wait(interval):
            try:
                ready = self.jobs.settle(
                    node.settle_seconds, study_settle_seconds=node.study_settle_seconds,
                    force_complete_seconds=node.force_complete_seconds, trigger_of=self._trigger_of,
                )
            except Exception as exc:  # the store away (or a bug): said once a minute, tried again
                self._store_ok = False
                held = self._store_trouble.ready("assembly")
                if held is not None:
                    log.error("series assembly: the job store cannot be used (%s); trying again every %.2g s%s",
                              first_line(exc), interval, f" ({held} failures since the last line)" if held else "",
                              exc_info=not unavailable(exc))
                continue
            if not self._store_ok:
                log.warning("series assembly: the job store answers again")
                self._store_ok = True
                self._store_trouble.reset("assembly")
            for why in sorted(set(ready.values())):
                log.info("%d series queued: %s", sum(1 for w in ready.values() if w == why), why)

    def _trigger_of(self, series_id: int) -> str:
        """``series`` or ``study``: the trigger of the route the series' first instance takes."""
        for _, path in self.jobs.instances(series_id)[:1]:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # unreadable: the worker will say so; settle it as a series
                return "series"
            route = route_for(self.config, header)
            return route.trigger if route is not None else "series"
        return "series"

    # -- certificates ---------------------------------------------------------------------------

    def _certificates(self) -> dict[str, Path]:
        """The node's own TLS certificates, by the setting that names them."""
        found = {"tls.cert_file": self.config.tls.cert_file} if self.config.tls is not None else {}
        if self.config.http.cert_file is not None:
            found["http.cert_file"] = self.config.http.cert_file
        for name, destination in self.config.destinations.items():
            if getattr(destination, "cert_file", None) is not None:
                found[f"destinations.{name}.cert_file"] = destination.cert_file
        return found

    def _certificate_loop(self) -> None:
        """Check the certificates' expiry at start-up and every CERTIFICATE_CHECK_SECONDS (files renewed
        in place are seen: destinations load theirs for every association)."""
        while True:
            try:
                self.metrics.certificates_expire(check_certificate_expiry(self._certificates()))
            except Exception:
                log.exception("certificate expiry check failed; trying again later")
            if self._stop.wait(CERTIFICATE_CHECK_SECONDS):
                return

    # -- retention ------------------------------------------------------------------------------

    def _retention_loop(self) -> None:
        hours = min(h for h in (self.config.node.retention_hours, self.config.node.failed_retention_hours) if h > 0)
        interval = min(600.0, max(1.0, hours * 3600 / 10))
        while not self._stop.wait(interval):
            try:
                self.clean_expired()
            except Exception:
                log.exception("retention clean-up failed; trying again later")

    def clean_expired(self) -> int:
        """Remove spool files, outputs and records of series whose retention is over.

        Delivered, unrouted and discarded series after ``retention_hours``; failed ones after
        ``failed_retention_hours`` (0: never).
        """
        node = self.config.node
        removed: dict[str, int] = {}
        for row in self.jobs.expired(node.retention_hours * 3600, node.failed_retention_hours * 3600):
            for path in row["paths"]:
                path.unlink(missing_ok=True)
                remove_empty_parents(path.parent, self.spool.root)
            if row["output_dir"]:
                shutil.rmtree(row["output_dir"], ignore_errors=True)
                remove_empty_parents(Path(row["output_dir"]).parent, self.outputs)
            shutil.rmtree(self.outputs / ".thumbs" / str(row["id"]), ignore_errors=True)
            self.jobs.forget(row["id"])  # files first: a crash in between leaves records, never orphans
            removed[row["state"]] = removed.get(row["state"], 0) + 1
        if removed:
            log.info("retention: %s removed (retention_hours %g, failed_retention_hours %g)",
                     ", ".join(f"{count} {state} series" for state, count in sorted(removed.items())),
                     node.retention_hours, node.failed_retention_hours)
        return sum(removed.values())

