"""More processes receiving on the node's DICOM port: ``[node] receivers``, each with a GIL of its own.

One Python process receives with one GIL.  Measured on 2 cores (``scripts/bench/run scale``, 10
storescu associations of 30 CT slices at once): the node's process used one core, its CPU per
instance doubled against one association (3.0 -> 6.0 ms: 15 times as many futex calls, the threads
of ten associations taking turns at the GIL), and ten associations together received 0.55-0.65x the
images/s of one.  Two processes, each taking half the associations, received 1.7x what one did.

With ``receivers = N`` (N > 1, Linux), the service's own plain listener and N - 1 receiver
processes (:func:`receiver_main`, started with ``spawn`` like the worker processes) all listen on
``[node] host`` and ``port`` with ``SO_REUSEPORT``: the kernel gives each new connection to one of
the listening sockets.  Each process is a whole receiver: the same AE, C-STORE handler, disk
guard and limits (so ``max_associations`` and the connection limits hold per process), writing to
the same spool and recording in the same job store - on SQLite through its own connection (WAL
mode is made for several processes; the rows of each process are written in batches,
:mod:`node.store.pending`), on PostgreSQL as any other receiver.  What they count reaches the
service's /metrics over a pipe.  The TLS listener and the DICOMweb pollers stay in the service.

:class:`ReceiverPool` (in the service) starts them once recovery is done, restarts one that dies
(as :class:`node.app.workers.WorkerPool` does for workers) and stops them with the service; a
receiver dies with the service (Linux ``PR_SET_PDEATHSIG``).  A receiver killed mid-transfer leaves
its partly received file in ``<spool>/.incoming`` until the node's next start removes it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pynetdicom import AE

from node.config import Config
from node.imaging.source import DecodeLimits
from node.net import fastpath
from node.net.pynetdicom_setup import configure_pynetdicom
from node.receive.guard import ConnectionGuard, ConnectionLimits, GuardedAssociationServer, start_guarded_server
from node.receive.scp import StoreHandler, build_application_entity, enable_streamed_receive
from node.store.jobstore import JobStore, job_store_for
from node.store.spool import Spool
from node.telemetry.logsetup import LogSettings, setup_logging
from node.telemetry.metrics import Metrics

__all__ = ["REUSE_PORT", "ReceiverPool", "ReceiverSpec", "Receiving", "receiver_main", "receiving"]

log = logging.getLogger(__name__)

#: Whether this platform lets several sockets listen on one port (``SO_REUSEPORT``).
REUSE_PORT = hasattr(socket, "SO_REUSEPORT")
#: Seconds a receiver asked to stop waits for its associations to end before it exits.
STOP_GRACE_SECONDS = 10.0
#: A receiver that dies within this many seconds of its start is started again only after this long.
RESTART_DELAY_SECONDS = 2.0
#: What the service tells a receiver: stop.
STOP = "stop"
#: The counters a receiver may report over its pipe (methods of :class:`node.telemetry.metrics.Metrics`).
_REPORTED = frozenset({"instance_received", "instance_refused", "connection_refused"})


@dataclass
class Receiving:
    """One process's C-STORE receiving: its AE, connection guard and handler."""

    ae: AE
    guard: ConnectionGuard
    handler: StoreHandler


def receiving(config: Config, spool: Spool, jobs: JobStore, metrics: Any, *, match_tls_ae_title: bool = False
              ) -> Receiving:
    """The AE, guard and C-STORE handler of ``[node]``, with the receive path set up (process-wide:
    streamed receive into the spool, :func:`node.net.fastpath.enable`); the same in every receiving process.

    Parameters
    ----------
    config : Config
        The checked configuration.
    spool, jobs : Spool, JobStore
        Where instances go and are recorded (this process's connection).
    metrics : Metrics or a stand-in with its counting methods
        What the handler and the guard count.
    match_tls_ae_title : bool
        ``[tls] match_ae_title`` (the service's TLS listener uses the same handler).
    """
    node = config.node
    ae = build_application_entity(
        node.ae_title, allowed_calling_aets=node.allowed_calling_aets, max_associations=node.max_associations,
        association_timeout=node.association_timeout_seconds,
    )
    guard = ConnectionGuard(ConnectionLimits(
        timeout=node.association_timeout_seconds, max_negotiating=node.max_negotiating_connections,
        max_per_address=node.max_connections_per_address,
    ), metrics=metrics)
    min_free = node.min_free_disk_mb * 2**20
    enable_streamed_receive(spool.root, min_free_bytes=min_free)  # process-wide: see its docstring
    fastpath.enable()  # process-wide: prompt wake-ups for the associations the handler attaches
    handler = StoreHandler(spool, jobs, metrics=metrics, min_free_bytes=min_free, match_tls_ae_title=match_tls_ae_title,
                           decode_limits=DecodeLimits.from_mb(node.max_decoded_mb, node.max_frame_mb),
                           record_later=True)
    return Receiving(ae, guard, handler)


# -- the receiver process -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiverSpec:
    """What a receiver process needs (pickled to it at start)."""

    name: str
    config: Config
    log_settings: LogSettings


class _Named(logging.Filter):
    """Puts the receiver's name before each of its log messages (which process served an association)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.prefix = f"{name}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith(self.prefix):
            record.msg = self.prefix + record.msg
        return True


class _CountsOverPipe:
    """Stands in for :class:`Metrics` in a receiver process: each count goes to the service's."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # one message at a time on the pipe, from any thread

    def __getattr__(self, name: str) -> Any:
        if name not in _REPORTED:
            raise AttributeError(name)

        def count(*args: Any) -> None:
            with self._lock, contextlib.suppress(OSError, ValueError):
                self._conn.send((name, args))
        return count


def receiver_main(spec: ReceiverSpec, conn: Connection) -> None:
    """Entry point of a receiver process: receive on the shared port until the service says stop.

    SIGINT and SIGTERM are ignored (the service decides, and sends :data:`STOP` on the pipe); when
    the service dies, the receiver is killed with it (Linux) or stops when its pipe closes.
    """
    from node.app.workers import _die_with_parent, _told_to_stop

    setup_logging(spec.log_settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Named(spec.name))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    configure_pynetdicom()
    node = spec.config.node
    spool = Spool(node.shared / "spool")
    jobs = job_store_for(spec.config)
    stop = threading.Event()
    try:
        parts = receiving(spec.config, spool, jobs, _CountsOverPipe(conn))
        recorder = threading.Thread(target=parts.handler.pending.run, args=(stop,), name="recorder", daemon=True)
        recorder.start()
        server = start_guarded_server(parts.ae, (node.host, node.port), parts.handler.handlers(), parts.guard,
                                      reuse_port=True)
        log.info("listening as %s on %s:%d (the port shared with the node's other receiving processes)",
                 node.ae_title, node.host, node.port)
        while not _told_to_stop(conn, 1.0):
            pass
        server.shutdown()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while parts.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        recorder.join(timeout=30)
        parts.handler.pending.flush()
    finally:
        stop.set()
        jobs.close()


# -- the supervisor (in the service) --------------------------------------------------------------


@dataclass
class _Receiver:
    name: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started: float
    restart_at: float | None = None


class ReceiverPool:
    """``count`` receiver processes on the service's port, started, watched and restarted by one thread.

    Parameters
    ----------
    config : Config
        The checked configuration (pickled to each receiver).
    count : int
        Receiver processes besides the service's own listener (``[node] receivers`` - 1).
    log_settings : LogSettings
        How they log.
    metrics : Metrics
        Where their counts go.
    rerecord : callable, optional
        Called (in the supervisor's thread) when a receiver died: it answered Success for instances
        it spooled but may not have recorded yet (rows are written after Success), so the service
        records the spool again (:meth:`node.store.jobstore.JobStore.reconcile`) before the restart.
    """

    def __init__(self, config: Config, *, count: int, log_settings: LogSettings, metrics: Metrics,
                 rerecord: Callable[[], object] | None = None) -> None:
        self.config = config
        self.count = count
        self.log_settings = log_settings
        self.metrics = metrics
        self.rerecord = rerecord
        self._context = multiprocessing.get_context("spawn")
        self._receivers: list[_Receiver] = []
        self._stop = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the receivers and their supervisor; returns at once."""
        self._receivers = [self._spawn(f"receiver-{number + 2}") for number in range(self.count)]
        self._thread = threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask every receiver to stop (finishing its associations), kill those still running after the grace time."""
        self._stopping.set()
        for receiver in self._receivers:
            with contextlib.suppress(OSError):
                receiver.conn.send(STOP)
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 30
        for receiver in self._receivers:
            receiver.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if receiver.process.is_alive():
                log.warning("%s had not stopped %g s after it was asked: killed", receiver.name,
                            STOP_GRACE_SECONDS + 30)
                receiver.process.kill()
                receiver.process.join(timeout=5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for receiver in self._receivers:
            self._read(receiver)
            receiver.conn.close()

    def alive(self) -> bool:
        """Whether the supervisor runs (it restarts dead receivers itself)."""
        return self._thread is not None and self._thread.is_alive()

    def pids(self) -> list[int]:
        """The receiver processes' ids (for logs and tests)."""
        return [r.process.pid for r in self._receivers if r.process.pid is not None]

    def _spawn(self, name: str) -> _Receiver:
        parent_end, child_end = self._context.Pipe()
        spec = ReceiverSpec(name, self.config, self.log_settings)
        process = self._context.Process(target=receiver_main, args=(spec, child_end), name=name, daemon=True)
        process.start()
        child_end.close()
        log.info("%s started (pid %d)", name, process.pid)
        return _Receiver(name, process, parent_end, time.monotonic())

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch_once()
            except Exception:  # the supervisor must outlive any surprise
                log.exception("receiver supervision failed; going on")
                self._stop.wait(1.0)

    def _watch_once(self) -> None:
        running = [r for r in self._receivers if r.restart_at is None]
        waitables = [r.conn for r in running] + [r.process.sentinel for r in running]
        ready = multiprocessing.connection.wait(waitables, timeout=0.5) if waitables else []
        if not waitables:
            self._stop.wait(0.5)
        for receiver in running:
            if receiver.conn in ready:
                self._read(receiver)
            if receiver.process.sentinel in ready:
                self._read(receiver)
                self._died(receiver)
        now = time.monotonic()
        for index, receiver in enumerate(self._receivers):
            if receiver.restart_at is not None and now >= receiver.restart_at and not self._stopping.is_set():
                receiver.conn.close()
                self._receivers[index] = self._spawn(receiver.name)

    def _read(self, receiver: _Receiver) -> None:
        try:
            while receiver.conn.poll():
                name, args = receiver.conn.recv()
                if name in _REPORTED:
                    getattr(self.metrics, name)(*args)
        except (EOFError, OSError, ValueError, TypeError):
            return  # gone (or died mid-message): its sentinel says so

    def _died(self, receiver: _Receiver) -> None:
        from node.app.workers import _death

        receiver.process.join(timeout=5)
        receiver.restart_at = float("inf")
        if self._stopping.is_set():
            return
        log.error("%s (pid %s) %s; starting it again", receiver.name, receiver.process.pid,
                  _death(receiver.process.exitcode))
        if self.rerecord is not None:
            try:
                self.rerecord()
            except Exception:  # noqa: BLE001 - the files stay in the spool; the next start records them
                log.exception("%s died: recording its spooled instances failed (the next start records them)",
                              receiver.name)
        quick = time.monotonic() - receiver.started < RESTART_DELAY_SECONDS
        receiver.restart_at = time.monotonic() + (RESTART_DELAY_SECONDS if quick else 0.0)


def shares_port(server: GuardedAssociationServer) -> bool:
    """Whether *server*'s socket was bound with ``SO_REUSEPORT`` (other processes may listen beside it)."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    return False
