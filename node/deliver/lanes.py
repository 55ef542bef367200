"""Delivery: each destination has its own lane, so a slow or hung destination delays no other one.

A lane is ``concurrency`` threads (``[[destinations]] concurrency``, default 1) that take the due
deliveries of their destination only (:meth:`node.store.jobstore.JobStore.claim_due_deliveries`), send each
with that destination's sender and record the outcome: delivered, retried with backoff, or failed for
good (``[delivery]`` policy; a permanent refusal fails at once).  Before lanes, one loop sent a batch
of due deliveries and waited for all of it: a destination that accepted TCP and never answered held a
series routed only to a folder for 28 s, and again at each retry of the hung destination.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

from node.config import DeliverySettings, Destination, StoreSettings
from node.store.jobstore import Delivery, JobStore
from node.telemetry.metrics import Metrics
from node.deliver.failures import DeliveryError
from node.deliver.sender import Sender

__all__ = ["DeliveryLanes", "DispatchedDeliveries"]

log = logging.getLogger(__name__)

#: Seconds an idle lane waits before it asks the job store again (a processed series wakes it at once).
IDLE_POLL_SECONDS = 0.5


class DeliveryLanes:
    """The delivery threads of every destination, over one job store.

    Parameters
    ----------
    jobs : JobStore
        Where deliveries are claimed and recorded.
    destinations : Mapping of str to Destination
        The configured destinations (their ``concurrency``).
    senders : Mapping of str to Sender
        The sender of each destination, by name.
    policy : DeliverySettings
        Attempts and backoff.
    metrics : Metrics
        Counts each outcome.
    """

    def __init__(
        self,
        jobs: JobStore,
        destinations: Mapping[str, Destination],
        senders: Mapping[str, Sender],
        policy: DeliverySettings,
        metrics: Metrics,
    ) -> None:
        self.jobs = jobs
        self.destinations = destinations
        self.senders = senders
        self.policy = policy
        self.metrics = metrics
        self._stop = threading.Event()
        self._wake: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start every lane's threads; returns at once.

        Deliveries still pending to a destination no longer configured get a lane too, which fails
        them at once ("not configured") instead of leaving them pending for ever.
        """
        lanes = {name: destination.concurrency for name, destination in self.destinations.items()}
        for name in self.jobs.pending_delivery_destinations():
            lanes.setdefault(name, 1)
        for name, concurrency in lanes.items():
            self._wake[name] = threading.Event()
            for number in range(concurrency):
                thread = threading.Thread(target=self._lane, args=(name,), name=f"send-{name}-{number + 1}",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking deliveries; a send under way ends (or times out) first."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout=timeout)

    def wake(self) -> None:
        """Look for due deliveries now (called when a series was processed)."""
        for event in self._wake.values():
            event.set()

    def alive(self) -> bool:
        """Whether every lane thread runs."""
        return all(t.is_alive() for t in self._threads)

    def _lane(self, destination: str) -> None:
        wake = self._wake[destination]
        while not self._stop.is_set():
            try:
                due = self.jobs.claim_due_deliveries(1, destination=destination)
            except Exception:
                log.exception("cannot read deliveries to %s from the job store", destination)
                due = []
            if not due:
                wake.wait(IDLE_POLL_SECONDS)
                wake.clear()
                continue
            self.deliver(due[0])

    def deliver(self, delivery: Delivery) -> None:
        """One attempt at one delivery, recorded in the job store."""
        sender = self.senders.get(delivery.destination)
        if sender is None:
            self._failed(delivery, f"destination {delivery.destination!r} is not configured", permanent=True)
            return
        files = _output_files(delivery.output_dir)
        if not files:
            self._failed(delivery, f"no output files in {delivery.output_dir}", permanent=True)
            return
        try:
            sender.send(files, study_uid=delivery.study_uid, series_uid=delivery.output_dir.name)
        except DeliveryError as exc:
            self._failed(delivery, exc.reason, permanent=exc.permanent)
            return
        except Exception as exc:  # an unexpected sender bug is retried like a transient failure
            log.exception("delivery of %s to %s crashed", delivery.series_uid, delivery.destination)
            self._failed(delivery, f"{type(exc).__name__}: {exc}", permanent=False)
            return
        self.jobs.delivered(delivery)
        self.metrics.delivery(delivery.destination, "delivered")
        log.info("series %s delivered to %s: %d files", delivery.series_uid, delivery.destination, len(files))

    def _failed(self, delivery: Delivery, reason: str, *, permanent: bool) -> None:
        """Record a failed attempt (retry with backoff, or failed for good), log and count it."""
        final = self.jobs.delivery_failed(
            delivery, reason, permanent=permanent, max_attempts=self.policy.max_attempts,
            retry_in=self.policy.delay(delivery.attempts + 1),
        )
        self.metrics.delivery(delivery.destination, "failed" if final else "retry")
        level = logging.ERROR if final else logging.WARNING
        log.log(level, "delivery of %s to %s %s: %s", delivery.series_uid, delivery.destination,
                "failed for good" if final else "failed, will retry", reason)


def _output_files(folder: Path) -> list[Path]:
    """The files of a derived series, in name order (hidden temporary files left out)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


class DispatchedDeliveries:
    """Deliveries as Procrastinate jobs (``[store]`` on PostgreSQL): one queue per destination.

    A thread of this process works each destination's queue with ``concurrency`` slots, and the
    maintenance queue (stalled jobs retried, missing jobs deferred: :mod:`node.store.dispatch`).  Each
    job is one attempt (:meth:`DeliveryLanes.deliver`); a failure to retry defers the next attempt
    at its backoff time, in the transaction that records the failure.

    Parameters
    ----------
    lanes : DeliveryLanes
        Does the sending and recording (its own threads are not started).
    store : StoreSettings
        The database, and how long a silent worker is taken for dead.
    shared : Path
        ``shared_dir``: no delivery is taken while this machine cannot use it (not mounted here).
    """

    def __init__(self, lanes: DeliveryLanes, store: StoreSettings, shared: Path) -> None:
        self.lanes = lanes
        self.store = store
        self.shared = shared
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start working the queues; returns at once."""
        from node.store.dispatch import (
            MAINTENANCE_QUEUE, TaskHandlers, WorkerTiming, build_app, delivery_queue, maintenance, run_workers,
        )
        from node.store.spool import shared_dir_problem

        jobs = self.lanes.jobs
        timing = WorkerTiming(self.store.stalled_seconds)
        handlers = TaskHandlers(deliver=self._deliver, maintain=maintenance(jobs, timing.stalled_seconds))
        app = build_app(self.store.url, self.store.password(), handlers)
        concurrency = {name: d.concurrency for name, d in self.lanes.destinations.items()}
        for name in jobs.pending_delivery_destinations():  # no longer configured: failed at once
            concurrency.setdefault(name, 1)
        queues = {delivery_queue(name): slots for name, slots in concurrency.items()} | {MAINTENANCE_QUEUE: 1}
        self._thread = threading.Thread(target=run_workers, args=(app, queues), name="deliveries", daemon=True,
                                        kwargs={"name": "deliveries", "timing": timing, "stop": self._stop,
                                                "problem": lambda: shared_dir_problem(self.shared)})
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking jobs; a send under way ends (or times out) first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wake(self) -> None:
        """Nothing to do: PostgreSQL's NOTIFY wakes the queue's workers."""

    def alive(self) -> bool:
        """Whether the queue thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _deliver(self, delivery_id: int, job_id: int) -> None:
        delivery = self.lanes.jobs.claim_delivery(delivery_id)
        if delivery is None:
            log.debug("delivery %d: no longer pending; job %d does nothing", delivery_id, job_id)
            return
        self.lanes.deliver(delivery)
