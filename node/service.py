"""``dicom-node serve``: the node as one process.

Threads, each with one job, all talking through the job store:

- the DICOM listeners, plain and TLS (:mod:`node.netutil` bounds each connection's negotiation), then
  the pynetdicom SCP (ingest: spool + record, then Success);
- the assembler (receiving series quiet for ``settle_seconds`` become queued);
- processing workers (claim a queued series, run its route's pipeline, write outputs);
- the delivery loop (sends due deliveries, retries with backoff);
- an apscheduler job per ``[[sources]]`` entry, pulling new series from a DICOMweb archive into
  the same spool (:mod:`node.poller`).

Start-up first removes half-written spool files, re-records spooled instances the database does not
know, and puts in-flight work back in its queue, so a SIGKILL at any moment loses nothing that was
acknowledged.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Config, FolderDestination
from node.fsutil import remove_temporaries
from node.http import StatusServer
from node.imaging.source import DecodeLimits
from node.ingest import StoreHandler, build_application_entity, enable_streamed_receive
from node.jobstore import Delivery, JobStore, SeriesJob, SeriesState
from node.metrics import Metrics
from node.netutil import ConnectionGuard, ConnectionLimits, start_guarded_server
from node.poller import DicomWebPoller, schedule
from node.process import process_series
from node.senders import DeliveryError, Sender, sender_for
from node.series import InputSeries, instance_order, open_images
from node.spool import Spool
from node.tls import check_certificate_expiry, server_context, start_tls_server

__all__ = ["NodeService"]

log = logging.getLogger(__name__)

#: Seconds between two checks of the TLS certificates' expiry (the first is at start-up).
CERTIFICATE_CHECK_SECONDS = 6 * 3600.0


class NodeService:
    """The running node: SCP, assembler, workers and delivery, over one spool and job store.

    Parameters
    ----------
    config : Config
        The checked configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        data_dir = config.node.data_dir
        self.spool = Spool(data_dir / "spool")
        self.outputs = data_dir / "outputs"
        self.jobs = JobStore(data_dir / "jobs.sqlite")
        self.senders: dict[str, Sender] = {
            name: sender_for(dest) for name, dest in config.destinations.items()
        }
        self.metrics = Metrics(destinations=config.destinations)
        #: [node] max_decoded_mb / max_frame_mb, checked at C-STORE, before processing and thumbnails
        self.decode_limits = DecodeLimits.from_mb(config.node.max_decoded_mb, config.node.max_frame_mb)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._work = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._tls_server = None
        # TLS files are checked now: a ConfigError before anything starts
        self._tls_context = server_context(config.tls) if config.tls is not None else None
        self._send_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="send")
        self._render_threads = max(1, min(4, os.cpu_count() or 1))  # images of one series at once
        self.pollers = [
            DicomWebPoller(source, spool=self.spool, jobs=self.jobs, pipeline_names=config.pipelines)
            for source in config.sources.values()
        ]
        self._scheduler = BackgroundScheduler() if self.pollers else None
        self.http = StatusServer(
            host=config.http.host, port=config.http.port, jobs=self.jobs, metrics=self.metrics,
            outputs_dir=self.outputs, spool_dir=self.spool.root, pipelines=config.pipelines,
            decode_limits=self.decode_limits,
            is_alive=lambda: not self._stop.is_set() and all(t.is_alive() for t in self._threads),
            is_ready=lambda: self._ready.is_set() and not self._stop.is_set(),
        )

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover, then start the SCP and the background threads; returns at once."""
        self.http.start()  # /healthz answers during recovery
        log.info("HTTP status on http://%s:%d/", self.config.http.host, self.http.port)
        self._recover()
        for destination in self.config.destinations.values():
            if isinstance(destination, FolderDestination):
                try:
                    destination.path.mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # delivery retries it; say so now
                    log.warning("folder destination %s: %s", destination.name, exc)
        node = self.config.node
        tls = self.config.tls
        if node.port or tls is not None:
            ae = build_application_entity(
                node.ae_title, allowed_calling_aets=node.allowed_calling_aets, max_associations=node.max_associations,
                association_timeout=node.association_timeout_seconds,
            )
            guard = ConnectionGuard(ConnectionLimits(
                timeout=node.association_timeout_seconds, max_negotiating=node.max_negotiating_connections,
                max_per_address=node.max_connections_per_address,
            ), metrics=self.metrics)  # one for both listeners: their limits are over both
            min_free = node.min_free_disk_mb * 2**20
            enable_streamed_receive(self.spool.root, min_free_bytes=min_free)  # process-wide: see its docstring
            handler = StoreHandler(self.spool, self.jobs, metrics=self.metrics, min_free_bytes=min_free,
                                   match_tls_ae_title=tls is not None and tls.match_ae_title,
                                   decode_limits=self.decode_limits)
            if node.port:
                self._server = start_guarded_server(ae, (node.host, node.port), handler.handlers(), guard)
                log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)
            if tls is not None:
                self._tls_server = start_tls_server(ae, node.host, tls, handler.handlers(), context=self._tls_context,
                                                    guard=guard)
        self._spawn("assembler", self._assemble_loop)
        for number in range(node.workers):
            self._spawn(f"worker-{number + 1}", self._work_loop)
        self._spawn("delivery", self._delivery_loop)
        if node.retention_hours > 0:
            self._spawn("retention", self._retention_loop)
        if self._certificates():
            self._spawn("certificates", self._certificate_loop)
        if self._scheduler is not None:
            schedule(self.pollers, self._scheduler)
            self._scheduler.start()
            log.info("polling %d DICOMweb source(s): %s", len(self.pollers), ", ".join(self.config.sources))
        self._ready.set()
        log.info(
            "node started: data in %s, %d workers, %d routes, destinations: %s",
            node.data_dir, node.workers, len(self.config.routes),
            ", ".join(s.describe() for s in self.senders.values()) or "none",
        )

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
        with self._work:
            self._work.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
        self._send_pool.shutdown(wait=True)
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

    def _wake(self) -> None:
        with self._work:
            self._work.notify_all()

    # -- recovery -------------------------------------------------------------------------------

    def _recover(self) -> None:
        removed = self.spool.remove_temporaries()
        removed_outputs = remove_temporaries(self.outputs)  # outputs half-written when the node was killed
        recorded = self.jobs.reconcile(self.spool)
        attempts = self.config.node.max_processing_attempts
        counts = self.jobs.recover(max_attempts=attempts)
        log.info(
            "recovery: %d temporary spool files and %d temporary output files removed, %d spooled instances "
            "re-recorded, %d series re-queued, %d deliveries resumed", removed, removed_outputs,
            recorded.instances, counts["series_requeued"], counts["deliveries_resumed"],
        )
        for _ in range(counts["series_failed"]):
            self.metrics.series_failed()
        if counts["series_failed"]:
            log.error("recovery: %d series failed: their processing did not finish %d times (see dicom-node status)",
                      counts["series_failed"], attempts)

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
            except Exception:
                log.exception("series assembly failed; retrying")
                continue
            for why in sorted(set(ready.values())):
                log.info("%d series queued: %s", sum(1 for w in ready.values() if w == why), why)
            if ready:
                self._wake()

    def _trigger_of(self, series_id: int) -> str:
        """``series`` or ``study``: the trigger of the route the series' first instance takes."""
        for _, path in self.jobs.instances(series_id)[:1]:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # unreadable: the worker will say so; settle it as a series
                return "series"
            route = self.config.route_for(header)
            return route.trigger if route is not None else "series"
        return "series"

    # -- certificates ---------------------------------------------------------------------------

    def _certificates(self) -> dict[str, Path]:
        """The node's own TLS certificates, by the setting that names them."""
        found = {"tls.cert_file": self.config.tls.cert_file} if self.config.tls is not None else {}
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
        hours = self.config.node.retention_hours
        interval = min(600.0, max(1.0, hours * 3600 / 10))
        while not self._stop.wait(interval):
            try:
                self.clean_expired()
            except Exception:
                log.exception("retention clean-up failed; trying again later")

    def clean_expired(self) -> int:
        """Remove spool files, outputs and records of series delivered longer ago than retention."""
        removed = 0
        for row in self.jobs.expired(self.config.node.retention_hours * 3600):
            for path in row["paths"]:
                path.unlink(missing_ok=True)
                _remove_empty_parents(path.parent, self.spool.root)
            if row["output_dir"]:
                shutil.rmtree(row["output_dir"], ignore_errors=True)
                _remove_empty_parents(Path(row["output_dir"]).parent, self.outputs)
            shutil.rmtree(self.outputs / ".thumbs" / str(row["id"]), ignore_errors=True)
            self.jobs.forget(row["id"])  # files first: a crash in between leaves records, never orphans
            removed += 1
        if removed:
            log.info("retention: %d delivered series older than %g h removed", removed,
                     self.config.node.retention_hours)
        return removed

    # -- processing -----------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.claim_next()
            except Exception:
                log.exception("cannot claim work from the job store")
                job = None
            if job is None:
                with self._work:
                    self._work.wait(timeout=1.0)
                continue
            try:
                self.process(job)
            except Exception as exc:  # a bug must not kill the worker: the series fails, visibly
                log.exception("series %s: processing crashed", job.series_uid)
                self._fail(job, f"processing crashed: {type(exc).__name__}: {exc}")

    def process(self, job: SeriesJob) -> None:
        """Route, process and schedule delivery of one claimed series."""
        if self.jobs.is_derived(job.series_uid):
            reason = "a series this node derived came back: not processed again"
            log.warning("series %s: %s", job.series_uid, reason)
            self.jobs.set_outcome(job, SeriesState.UNROUTED, reason)
            return
        images, failures = open_images(job.instance_paths, self.decode_limits)
        for failure in failures:
            log.error("series %s: %s", job.series_uid, failure)
        if not images:
            reason = "; ".join(f.reason for f in failures[:3]) or "no instances"
            self._fail(job, f"no processable instance: {reason}")
            return
        route = self.config.route_for(images[0].header)
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
            series, pipeline, self.outputs, now=datetime.datetime.now().astimezone(), threads=self._render_threads
        )
        failures.extend(result.failures)
        if not result.outputs:
            reason = "; ".join(f.reason for f in failures[:3])
            self._fail(job, f"no output: {reason}")
            return
        error = f"{len(failures)} instances failed: {failures[0].reason}" if failures else None
        scheduled = self.jobs.processed(
            job, route=route.pipeline, pipeline=pipeline.name,
            output_dir=self.outputs / job.study_uid / result.derived_series_uid,
            derived_series_uid=result.derived_series_uid,
            outputs=len(result.outputs), destinations=route.destinations, seconds=result.seconds, error=error,
        )
        self.metrics.series_processed(result.seconds)
        log.info(
            "series %s -> %s: %d outputs in %.2f s%s", job.series_uid, result.derived_series_uid,
            len(result.outputs), result.seconds, "" if scheduled else " (new instances came: will run again)",
        )

    def _fail(self, job: SeriesJob, reason: str) -> None:
        log.error("series %s failed: %s", job.series_uid, reason)
        self.metrics.series_failed()
        self.jobs.set_outcome(job, SeriesState.FAILED, reason)

    # -- delivery -------------------------------------------------------------------------------

    def _delivery_loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                due = self.jobs.claim_due_deliveries()
            except Exception:
                log.exception("cannot read deliveries from the job store")
                continue
            for future in [self._send_pool.submit(self.deliver, d) for d in due]:
                future.result()

    def deliver(self, delivery: Delivery) -> None:
        """One attempt at one delivery, recorded in the job store."""
        sender = self.senders.get(delivery.destination)
        if sender is None:
            self._delivery_failed(delivery, f"destination {delivery.destination!r} is not configured", permanent=True)
            return
        files = sorted(
            p for p in delivery.output_dir.iterdir() if p.is_file() and not p.name.startswith(".")
        ) if delivery.output_dir.is_dir() else []
        if not files:
            self._delivery_failed(delivery, f"no output files in {delivery.output_dir}", permanent=True)
            return
        try:
            sender.send(files, study_uid=delivery.study_uid, series_uid=delivery.output_dir.name)
        except DeliveryError as exc:
            self._delivery_failed(delivery, exc.reason, permanent=exc.permanent)
            return
        except Exception as exc:  # an unexpected sender bug is retried like a transient failure
            log.exception("delivery of %s to %s crashed", delivery.series_uid, delivery.destination)
            self._delivery_failed(delivery, f"{type(exc).__name__}: {exc}", permanent=False)
            return
        self.jobs.delivered(delivery)
        self.metrics.delivery(delivery.destination, "delivered")
        log.info("series %s delivered to %s: %d files", delivery.series_uid, delivery.destination, len(files))

    def _delivery_failed(self, delivery: Delivery, reason: str, *, permanent: bool) -> None:
        """Record a failed attempt (retry with backoff, or failed for good), log and count it."""
        policy = self.config.delivery
        final = self.jobs.delivery_failed(
            delivery, reason, permanent=permanent, max_attempts=policy.max_attempts,
            retry_in=policy.delay(delivery.attempts + 1),
        )
        self.metrics.delivery(delivery.destination, "failed" if final else "retry")
        level = logging.ERROR if final else logging.WARNING
        log.log(level, "delivery of %s to %s %s: %s", delivery.series_uid, delivery.destination,
                "failed for good" if final else "failed, will retry", reason)


def _remove_empty_parents(folder: Path, root: Path) -> None:
    """Remove *folder* and its parents up to (not including) *root* while they are empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
