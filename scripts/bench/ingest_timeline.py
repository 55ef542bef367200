"""Where each millisecond of one C-STORE goes: the node's receive path against the bare SCP's.

Run from the checkout::

    .venv/bin/python scripts/bench/ingest_timeline.py [--reps 5]

In this one process, the same 300-slice CT push (dcmtk ``/usr/bin/storescu``, one association,
``TCP_NODELAY=1``) goes alternately into

* ``node``: ``node.receive.scp.StoreHandler`` as ``dicom-node serve`` runs it (the node's AE from
  ``build_application_entity``, its guarded listener, streamed receive into the spool's
  ``.incoming``, the disk guard, a SQLite job store), and
* ``bare``: the fair floor of ``bare_scp.py`` (the node's max PDU and TCP_NODELAY; the handler
  writes ``event.encoded_dataset()``; no fsync, no database).

pynetdicom's own events stamp each instance's life (``time.perf_counter``): the first P-DATA-TF
PDU of its C-STORE-RQ read from the socket, the whole message decoded (``EVT_DIMSE_RECV``, in the
DUL thread), the C-STORE handler's start and end (in the association thread), and the
C-STORE-RSP's PDU sent. Each phase is the median over the instances of every run of a receiver:

1. ``sender``: our last C-STORE-RSP sent -> the next request's first PDU read (storescu reads the
   response and its next file; our DUL thread notices the data: it sleeps 1 ms when idle);
2. ``receive``: first PDU -> message decoded (the DUL thread reads the PDUs, 4 KiB per
   ``recv``, and writes the data set: into memory, or into the spool file);
3. ``hand-over``: decoded -> handler called (the association thread polls its queue every 1 ms);
4. ``handler``: the C-STORE handler (the node: header, disk guard, fsync of file and folder,
   job store; the bare SCP: one file write);
5. ``respond``: handler returned -> C-STORE-RSP sent (encode, queue to the DUL thread, which
   sleeps 1 ms when idle).

The node's handler is also split by step timers (same runs). Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

N = 300
PHASES = ("sender", "receive", "hand-over", "handler", "respond")


def node_modules() -> SimpleNamespace:
    """The node's modules: the stage layout, or the flat one of an older node (``--code-root``)."""
    try:
        from node.net import sockets
        from node.receive import guard, scp
        from node.store import fsutil, jobstore, spool
        from node.telemetry import logsetup
    except ImportError:
        import node.fsutil as fsutil
        import node.ingest as scp
        import node.jobstore as jobstore
        import node.logsetup as logsetup
        import node.netutil as guard
        import node.spool as spool
        sockets = guard
    return SimpleNamespace(scp=scp, fsutil=fsutil, jobstore=jobstore, spool=spool, guard=guard, sockets=sockets,
                           logsetup=logsetup)


class Stamps:
    """perf_counter stamps of one association's C-STOREs, by pynetdicom event."""

    def __init__(self) -> None:
        self.first_pdu: list[float] = []
        self.decoded: list[float] = []
        self.handler: list[tuple[float, float]] = []
        self.sent: list[float] = []
        self._waiting_first = True

    def handlers(self) -> list[tuple]:
        from pynetdicom import evt
        from pynetdicom.pdu import P_DATA_TF

        def pdu_recv(event) -> None:
            if self._waiting_first and isinstance(event.pdu, P_DATA_TF):
                self.first_pdu.append(time.perf_counter())
                self._waiting_first = False

        def dimse_recv(event) -> None:
            self.decoded.append(time.perf_counter())

        def pdu_sent(event) -> None:
            if isinstance(event.pdu, P_DATA_TF):
                self.sent.append(time.perf_counter())
                self._waiting_first = True

        return [(evt.EVT_PDU_RECV, pdu_recv), (evt.EVT_DIMSE_RECV, dimse_recv), (evt.EVT_PDU_SENT, pdu_sent)]

    def timed(self, handler: Callable) -> Callable:
        def wrapped(event):
            started = time.perf_counter()
            try:
                return handler(event)
            finally:
                self.handler.append((started, time.perf_counter()))
        return wrapped

    def phases(self) -> dict[str, list[float]]:
        """Milliseconds per phase per C-STORE (the first instance has no "sender" phase)."""
        count = min(len(self.first_pdu), len(self.decoded), len(self.handler), len(self.sent))
        out: dict[str, list[float]] = defaultdict(list)
        for i in range(count):
            if i:
                out["sender"].append(1000 * (self.first_pdu[i] - self.sent[i - 1]))
            out["receive"].append(1000 * (self.decoded[i] - self.first_pdu[i]))
            out["hand-over"].append(1000 * (self.handler[i][0] - self.decoded[i]))
            out["handler"].append(1000 * (self.handler[i][1] - self.handler[i][0]))
            out["respond"].append(1000 * (self.sent[i] - self.handler[i][1]))
        return out


def serve(files: list[Path], ae, handlers: list[tuple], *, guarded: bool) -> float:
    """One storescu push into *ae* served in this process; returns the push's seconds."""
    port = bl.free_port()
    if guarded:
        guard = node_modules().guard
        server = guard.start_guarded_server(ae, ("127.0.0.1", port), handlers, guard.ConnectionGuard())
    else:
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        bl.sync_disks()
        return bl.push(port, files, called_aet=ae.ae_title)
    finally:
        server.shutdown()


def bare_run(files: list[Path], folder: Path, stamps: Stamps) -> float:
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    m = node_modules()
    build_application_entity, disable_streamed_receive = m.scp.build_application_entity, m.scp.disable_streamed_receive
    no_delay = m.sockets.no_delay

    disable_streamed_receive()
    folder.mkdir(parents=True)

    def on_store(event) -> int:
        with open(folder / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as handle:
            handle.write(event.encoded_dataset())
        return 0

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = build_application_entity("BARE").maximum_pdu_size
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
    handlers = [(evt.EVT_C_STORE, stamps.timed(on_store)), (evt.EVT_CONN_OPEN, lambda event: no_delay(event.assoc)),
                *stamps.handlers()]
    return serve(files, ae, handlers, guarded=False)


def node_run(files: list[Path], folder: Path, stamps: Stamps, steps: dict[str, float], *, streamed: bool = True,
             writeback: bool = True, wake: bool = True, fast: bool = True, record_later: bool = True,
             encode_answers: bool = True) -> float:
    from pynetdicom import evt

    m = node_modules()
    scp, fsutil, spool_module = m.scp, m.fsutil, m.spool
    StoreHandler, build_application_entity = scp.StoreHandler, scp.build_application_entity
    disable_streamed_receive, enable_streamed_receive = scp.disable_streamed_receive, scp.enable_streamed_receive
    JobStore, Spool = m.jobstore.JobStore, spool_module.Spool

    try:
        from node.net import fastpath
    except ImportError:  # --code-root of a node from before it
        fastpath = None

    guard = 16 << 20
    if fastpath is not None and wake and fast:
        fastpath.enable()
    elif fastpath is not None:
        fastpath.disable()
    spool, jobs = Spool(folder / "spool"), JobStore(folder / "jobs.sqlite")
    if streamed:
        enable_streamed_receive(spool.root, min_free_bytes=guard)
    else:
        disable_streamed_receive()
    later = {"record_later": True} if record_later and fastpath is not None else {}
    handler = StoreHandler(spool, jobs, min_free_bytes=guard, **later)
    stop = threading.Event()
    recorder = threading.Thread(target=handler.pending.run if later else (lambda stop: None), args=(stop,),
                                name="recorder")
    saved: list[tuple[object, str, object]] = []

    def timed(owner: object, name: str, label: str) -> None:
        func = getattr(owner, name, None)
        if func is None:  # not in this version of the node
            return
        saved.append((owner, name, func))

        def wrapped(*args, **kwargs):
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                steps[label] += time.perf_counter() - started
        setattr(owner, name, wrapped)

    if not encode_answers and fastpath is not None:
        saved.append((fastpath, "encoded_store_response", fastpath.encoded_store_response))
        fastpath.encoded_store_response = lambda primitive: None  # every answer through pynetdicom
    if not fast and fastpath is not None:
        saved.append((fastpath, "attach", fastpath.attach))
        fastpath.attach = lambda assoc: False
    if not writeback:
        saved.append((scp, "start_writeback", scp.start_writeback))
        scp.start_writeback = lambda fd, offset, length: None
    timed(scp, "_read_file_header", "header")
    timed(scp, "_read_header", "header")
    timed(scp._IncomingFile, "write", "receive writes")
    timed(scp.StoreHandler, "_disk_guard", "disk guard")
    timed(spool_module.os, "fsync", "fsync (file + folder)")
    timed(fsutil, "fsync_dir", "folder fsync")
    timed(spool_module, "fsync_dir", "folder fsync")  # nodes that imported it into their spool module
    timed(spool, "store", "adopt")
    timed(spool, "adopt", "adopt")
    timed(jobs, "record_instance", "job store")
    timed(jobs, "record_instances", "job store, later")
    handlers = [(event, stamps.timed(func) if event is evt.EVT_C_STORE else func)
                for event, func in handler.handlers()]
    recorder.start()
    try:
        return serve(files, build_application_entity("DICOMNODE"), [*handlers, *stamps.handlers()], guarded=True)
    finally:
        stop.set()
        recorder.join(timeout=60)
        if len(jobs.known_paths()) != N:
            raise RuntimeError(f"{len(jobs.known_paths())} of {N} recorded")
        for owner, name, func in reversed(saved):
            setattr(owner, name, func)
        disable_streamed_receive()
        jobs.close()



VARIANTS: dict[str, Callable[..., float]] = {
    "node": node_run,
    "bare": lambda files, folder, stamps, steps: bare_run(files, folder, stamps),
    "node-nowriteback": lambda *a: node_run(*a, writeback=False),
    "node-memory": lambda *a: node_run(*a, streamed=False),
    "node-polling": lambda *a: node_run(*a, wake=False),
    "node-pynetdicom": lambda *a: node_run(*a, fast=False),
    "node-record-first": lambda *a: node_run(*a, record_later=False),
    "node-pynetdicom-answers": lambda *a: node_run(*a, encode_answers=False),
    "node-before": lambda *a: node_run(*a, fast=False, record_later=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--code-root", type=Path, help="the checkout whose node/ the node variants import "
                        "(default this one; e.g. a worktree of main before these changes: benchlib.checkout)")
    parser.add_argument("--work", type=Path, help="folder for the spools (default: under the cache folder; "
                        "/dev/shm takes the disk out of the picture)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["node", "bare"])
    args = parser.parse_args()
    if args.code_root:
        sys.path.insert(0, str(args.code_root.resolve()))
    logsetup = node_modules().logsetup
    logsetup.setup_logging(logsetup.LogSettings())  # the node's default: INFO, pynetdicom at WARNING
    print(f"# ingest timeline (in-process)\n{bl.machine_info()}")
    files = bl.ct_series(N)
    bl.warm_cache(files)
    names = list(args.variants)
    phases: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    steps: dict[str, dict[str, float]] = {name: defaultdict(float) for name in names}
    with (contextlib.nullcontext(args.work) if args.work else bl.tempdir("timeline-")) as work:
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                stamps = Stamps()
                took = VARIANTS[name](files, work / f"{name}-{rep}", stamps, steps[name])
                seconds[name].append(took)
                for phase, values in stamps.phases().items():
                    phases[name][phase].extend(values)
                print(f"  rep {rep + 1} {name}: {took:.2f} s, {N / took:.0f} images/s ({bl.load_average()})", flush=True)
    rows = []
    for phase in PHASES:
        rows.append((phase, *(statistics.fmean(phases[name][phase]) for name in names)))
    rows.append(("sum", *(sum(r[i + 1] for r in rows) for i in range(len(names)))))
    rows.append(("push time / 300 (median run)", *(1000 * bl.median(seconds[name]) / N for name in names)))
    bl.print_table(["phase of one C-STORE, ms (mean over all instances)", *names], rows,
                   title=f"Per-instance timeline, {args.reps} runs each, interleaved")
    bl.print_table(["phase, ms (median over all instances)", *names],
                   [(phase, *(bl.median(phases[name][phase]) for name in names)) for phase in PHASES])
    total = N * args.reps
    for name in names:
        got = steps[name]
        if not got:
            continue
        split = [
            ("header parse", got["header"]),
            ("_disk_guard (statvfs)", got["disk guard"]),
            ("Spool.adopt/store without fsyncs", got["adopt"] - got["fsync (file + folder)"]),
            ("os.fsync of the file", got["fsync (file + folder)"] - got["folder fsync"]),
            ("fsync_dir of the series folder", got["folder fsync"]),
            ("JobStore.record_instance (SQLite), before the answer", got["job store"]),
        ]
        known = sum(sec for _, sec in split) * 1000 / total
        bl.print_table([f"{name}: handler step, ms / instance (mean)", "ms"],
                       [(label, 1000 * sec / total) for label, sec in split]
                       + [("rest of on_store (mean handler - steps)", statistics.fmean(phases[name]["handler"]) - known),
                          ("(receive phase) _IncomingFile.write, DUL thread", 1000 * got["receive writes"] / total),
                          ("(after the answer) JobStore.record_instances, recorder thread",
                           1000 * got["job store, later"] / total)])
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
