"""Scale-out dispatch: Procrastinate carries series processing and deliveries to workers on any machine.

With ``[store]`` (PostgreSQL), the job store and the task queue live in one database, so a state
change and the task that acts on it commit together: :class:`Dispatcher` inserts the Procrastinate
job on the job store's own connection, inside the job store's write transaction
(``configure_task(..., connection=...)``).  A rollback leaves neither; a commit leaves both, and
PostgreSQL's NOTIFY wakes an idle worker within milliseconds.

Tasks (run by ``dicom-node serve --role worker`` or ``all``):

=====================  ====================  =================================================
task                   queue                 what
=====================  ====================  =================================================
``process_series``     ``process``           claim the series (:meth:`JobStore.claim`), run
                                             its route's pipeline, record the result (which
                                             defers its deliveries)
``deliver``            ``deliver.<name>``    one attempt at one delivery; a failure to retry
                                             defers the next attempt at its backoff time
``maintain``           ``maintenance``       periodic, once across workers: retry the jobs of
                                             workers that stopped heartbeating, and defer what
                                             the store says is due but has no job (reconcile)
=====================  ====================  =================================================

Each destination has its own queue, worked by ``concurrency`` slots in every worker: a hung
destination holds only its own.  Jobs are idempotent: a task whose series or delivery is no longer
waiting does nothing, and derived UIDs are deterministic, so a job run twice replaces its outputs.
A job retried after its worker died (heartbeats stop; ``[store] stalled_seconds``) finds its series
still claimed under its own job id: the attempt is counted (``max_processing_attempts``) and the
series processed again or failed.

Procrastinate's worker stops when its LISTEN connection fails (a database restart);
:class:`ResilientConnector` listens again instead, so a worker rides through an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import procrastinate
import psycopg

from node.store.database import DatabaseError
from node.telemetry.logsetup import Throttle, first_line

__all__ = [
    "DELIVER", "MAINTAIN", "MAINTENANCE_QUEUE", "PROCESS", "PROCESS_QUEUE", "Dispatcher", "ResilientConnector",
    "TaskHandlers", "WorkerTiming", "build_app", "delivery_queue", "ensure_schema", "maintenance", "retry_stalled",
    "run_workers",
]

log = logging.getLogger(__name__)

PROCESS = "dicomnode.process_series"
DELIVER = "dicomnode.deliver"
MAINTAIN = "dicomnode.maintain"
PROCESS_QUEUE = "process"
MAINTENANCE_QUEUE = "maintenance"
#: Advisory lock held while Procrastinate's schema is applied (many processes may start at once).
_SCHEMA_LOCK_KEY = 0x646E6F65


def delivery_queue(destination: str) -> str:
    """The queue of a destination's deliveries."""
    return f"deliver.{destination}"


class ResilientConnector(procrastinate.PsycopgConnector):
    """Procrastinate's psycopg connector whose LISTEN survives a database restart.

    Without it a worker stops (exit status 0) as soon as its LISTEN connection breaks (measured
    here: a 10 s PostgreSQL restart ended every worker).  Jobs deferred meanwhile are found by
    polling (``fetch_job_polling_interval``) until LISTEN is back.
    """

    _lost = Throttle(60.0)

    async def listen_notify(self, on_notification: Any, channels: Any) -> None:
        while True:
            try:
                await super().listen_notify(on_notification=on_notification, channels=channels)
            except procrastinate.exceptions.ConnectorException as exc:
                held = self._lost.ready()
                if held is not None:
                    log.warning("job queue: the database connection is lost (%s); trying again every second "
                                "meanwhile%s", first_line(exc.__cause__ or exc),
                                f" ({held} tries since the last line)" if held else "")
                await asyncio.sleep(1.0)


#: A job that met the database away (restarting, unreachable) or a shared_dir this machine cannot use
#: is run again later, by any worker; any other failure is recorded in the job store by the task
#: itself, so the job ends there.
_DATABASE_AWAY = procrastinate.RetryStrategy(max_attempts=10, wait=2, linear_wait=2,
                                             retry_exceptions={DatabaseError, psycopg.OperationalError, OSError})


@dataclass(frozen=True)
class TaskHandlers:
    """What a worker does with the tasks it runs (bound to its job store, pipeline runner, senders).

    A task without a handler is not registered: the app does not run it (jobs are still deferred
    to it by name, by :class:`Dispatcher`).
    """

    process_series: Callable[[int, int], None] | None = None
    deliver: Callable[[int, int], None] | None = None
    maintain: Callable[[procrastinate.App], Any] | None = None


def build_app(url: str, password: str | None, handlers: TaskHandlers, *, maintain_every_seconds: int = 5
              ) -> procrastinate.App:
    """A Procrastinate worker app on the job store's database, with the tasks *handlers* run.

    Parameters
    ----------
    url, password : str
        The ``[store]`` database.
    handlers : TaskHandlers
        What the tasks do.
    maintain_every_seconds : int
        Period of the maintenance task (1-59).
    """
    kwargs = {"password": password} if password else {}
    app = procrastinate.App(connector=ResilientConnector(conninfo=url, kwargs=kwargs, min_size=1, max_size=4))
    if handlers.process_series is not None:
        run_process = handlers.process_series

        @app.task(name=PROCESS, queue=PROCESS_QUEUE, pass_context=True, retry=_DATABASE_AWAY)
        def process_series(context: procrastinate.JobContext, series_id: int) -> None:
            run_process(series_id, context.job.id)

    if handlers.deliver is not None:
        run_delivery = handlers.deliver

        @app.task(name=DELIVER, pass_context=True, retry=_DATABASE_AWAY)
        def deliver(context: procrastinate.JobContext, delivery_id: int) -> None:
            run_delivery(delivery_id, context.job.id)

    if handlers.maintain is not None:
        maintain_fn = handlers.maintain

        @app.periodic(cron=f"* * * * * */{maintain_every_seconds}", periodic_id="maintain")  # seconds: last
        @app.task(name=MAINTAIN, queue=MAINTENANCE_QUEUE, queueing_lock=MAINTAIN, pass_context=True)
        async def maintain(context: procrastinate.JobContext, timestamp: int) -> None:
            await maintain_fn(app)

    return app


def ensure_schema(connection: psycopg.Connection) -> bool:
    """Apply Procrastinate's schema unless present (under an advisory lock); True when applied now."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        row = connection.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
        if row[0]:
            return False
        connection.execute(procrastinate.schema.SchemaManager.get_schema())
        return True


class Dispatcher:
    """Defers the node's jobs inside the job store's transactions (PostgreSQL only).

    Its own app has a synchronous connector and is never opened: every job goes through the
    connection of the transaction (an app whose connector is asynchronous, as a worker's is,
    cannot defer on a synchronous connection; and one app cannot serve a worker's event loop and
    other threads at once).
    """

    def __init__(self) -> None:
        self.app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector())

    def series_queued(self, connection: psycopg.Connection, series_id: int) -> None:
        """Defer the processing of a series that just became ``queued``."""
        self._defer(connection, PROCESS, PROCESS_QUEUE, f"process-{series_id}", {"series_id": series_id}, None)

    def delivery_due(self, connection: psycopg.Connection, delivery_id: int, destination: str, at: float) -> None:
        """Defer an attempt at a delivery that just became ``pending``, at epoch time *at*."""
        when = datetime.datetime.fromtimestamp(at, tz=datetime.timezone.utc)
        self._defer(connection, DELIVER, delivery_queue(destination), f"deliver-{delivery_id}",
                    {"delivery_id": delivery_id}, when)

    def _defer(self, connection: psycopg.Connection, task: str, queue: str, queueing_lock: str,
               args: dict[str, int], at: datetime.datetime | None) -> None:
        options: dict[str, Any] = {"queue": queue, "queueing_lock": queueing_lock, "connection": connection}
        if at is not None:
            options["schedule_at"] = at
        try:
            with connection.transaction():  # a savepoint: a job already waiting must not abort ours
                self.app.configure_task(task, **options).defer(**args)
        except procrastinate.exceptions.AlreadyEnqueued:
            log.debug("%s %s: a job is already waiting", task, args)


    def reconcile(self, connection: psycopg.Connection) -> tuple[int, int]:
        """Defer a job for every queued series and pending delivery that has none (inside the job
        store's transaction: the store stays the truth); returns the counts."""
        series = [row[0] for row in connection.execute(_MISSING_PROCESS_JOBS)]
        deliveries = connection.execute(_MISSING_DELIVERY_JOBS).fetchall()
        for series_id in series:
            self.series_queued(connection, series_id)
        for delivery_id, destination, at in deliveries:
            self.delivery_due(connection, delivery_id, destination, at)
        return len(series), len(deliveries)


_MISSING_PROCESS_JOBS = f"""
SELECT s.id FROM series s WHERE s.state = 'queued' AND NOT EXISTS (
    SELECT 1 FROM procrastinate_jobs j WHERE j.task_name = '{PROCESS}' AND j.status IN ('todo', 'doing')
    AND (j.args->>'series_id')::bigint = s.id)
"""
_MISSING_DELIVERY_JOBS = f"""
SELECT d.id, d.destination, d.next_attempt_at FROM deliveries d WHERE d.state = 'pending' AND NOT EXISTS (
    SELECT 1 FROM procrastinate_jobs j WHERE j.task_name = '{DELIVER}' AND j.status IN ('todo', 'doing')
    AND (j.args->>'delivery_id')::bigint = d.id)
"""


async def retry_stalled(app: procrastinate.App, stalled_seconds: float) -> int:
    """Retry the jobs of workers that have not heartbeaten for *stalled_seconds*; returns how many."""
    retried = 0
    for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_seconds):
        with contextlib.suppress(procrastinate.exceptions.ConnectorException):
            await app.job_manager.retry_job(job)
            retried += 1
            log.warning("job %s (%s %s): its worker stopped heartbeating; retried", job.id, job.task_name,
                        job.task_kwargs)
    return retried


@dataclass(frozen=True)
class WorkerTiming:
    """How a Procrastinate worker of the node heartbeats and polls.

    Attributes
    ----------
    stalled_seconds : float
        ``[store] stalled_seconds``: a worker silent this long is taken for dead and its jobs retried.
    """

    stalled_seconds: float = 30.0

    @property
    def heartbeat_seconds(self) -> float:
        """Three heartbeats per stall period: one late beat is not a death."""
        return max(0.2, self.stalled_seconds / 3)

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``run_worker_async``."""
        return {
            "install_signal_handlers": False,  # the node stops its workers itself
            "listen_notify": True,  # a deferred job wakes an idle worker (ms)
            "fetch_job_polling_interval": 1.0,  # retries and scheduled attempts (no NOTIFY for them)
            "update_heartbeat_interval": self.heartbeat_seconds,
            "stalled_worker_timeout": self.stalled_seconds,
            "delete_jobs": "successful",  # the job store keeps the history; the queue stays small
        }


def run_workers(app: procrastinate.App, queues: dict[str, int], *, name: str, timing: WorkerTiming,
                stop: threading.Event, problem: Callable[[], str | None] = lambda: None) -> None:
    """Work *queues* (queue name: concurrency) in this thread's own event loop until *stop* is set.

    No job is taken while *problem()* says what keeps this process from doing them (a shared
    folder not mounted here): they wait for another worker, and this one looks again every 5 s.

    One Procrastinate worker per queue, so a queue whose jobs hang (a destination that never
    answers) holds only its own slots.  Synchronous tasks run in this loop's thread pool, sized to
    the total concurrency (Procrastinate's default pool has ``cpu + 4`` threads: 6 here).  A worker
    that stops on an error (the database away longer than its pool waits) is started again.
    """

    async def one_queue(queue: str, concurrency: int) -> None:
        while not stop.is_set():
            try:
                await app.run_worker_async(queues=[queue], concurrency=concurrency, name=f"{name}:{queue}",
                                           wait=True, **timing.options)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the worker: log, wait, start again
                log.error("job queue worker %s:%s stopped: %s; starting it again in 2 s", name, queue, exc)
                await asyncio.sleep(2.0)

    async def main() -> None:
        if not await asyncio.to_thread(_wait_until_fit, problem, stop, name):
            return
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=sum(queues.values()) + 2,
                                                     thread_name_prefix=name))
        async with app.open_async():
            workers = [asyncio.create_task(one_queue(q, c)) for q, c in queues.items()]
            await asyncio.to_thread(stop.wait)
            for worker in workers:
                worker.cancel()  # graceful: a running job finishes first
            await asyncio.gather(*workers, return_exceptions=True)

    asyncio.run(main())


def maintenance(jobs: Any, stalled_seconds: float) -> Callable[[procrastinate.App], Any]:
    """The periodic maintenance of the queue, over the job store *jobs* (the truth).

    Retries the jobs of workers silent for *stalled_seconds* (killed, their machine gone), then
    defers a job for every queued series and pending delivery that has none (deferred while the
    database was away, or by a version that did not dispatch).
    """

    async def maintain(app: procrastinate.App) -> None:
        retried = await retry_stalled(app, stalled_seconds)
        series, deliveries = await asyncio.to_thread(jobs.dispatch_missing)
        if series or deliveries:
            log.warning("job queue: %d series and %d deliveries had no job: deferred", series, deliveries)
        if retried:
            log.info("job queue: %d jobs of stalled workers retried", retried)

    return maintain


def _wait_until_fit(problem: Callable[[], str | None], stop: threading.Event, name: str) -> bool:
    """Wait until *problem()* is None (True) or *stop* is set (False), saying why once a minute."""
    throttle = Throttle(60.0)
    while (why := problem()) is not None:
        if throttle.ready() is not None:
            log.error("%s takes no job: %s", name, why)
        if stop.wait(5.0):
            return False
    return not stop.is_set()
