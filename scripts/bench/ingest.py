"""Ingest throughput: ``dicom-node serve`` against three other C-STORE receivers, in one run.

Run from the checkout (any venv with the project's test dependencies; dcmtk and Orthanc
installed)::

    scripts/bench/run ingest            # or: .venv/bin/python scripts/bench/ingest.py [--reps 7] [--profile]

One 300-slice 512x512 CT series (copies of the real GE head CT slice with new UIDs; 158 MB) is
pushed with dcmtk ``storescu`` (``/usr/bin/storescu``) over one association (``TCP_NODELAY=1``
for every dcmtk tool and Orthanc) into, each started fresh for every repetition, with the disks
synced before each push:

* ``node``      ``dicom-node serve`` (settle 3600 s so no processing runs): spool fsync'd + SQLite;
  every run checks 300 spooled, 300 recorded in the job store, no ERROR and no Traceback
* ``bare``      the fair floor: a bare pynetdicom SCP writing ``event.encoded_dataset()`` to a file
  (bare_scp.py), with the node's maximum PDU, TCP_NODELAY and logging
* ``storescp``  dcmtk ``storescp -od DIR +B --max-pdu 131072`` (bit-preserving, as received)
* ``orthanc``   Orthanc 1.10 (tests.support.peers.OrthancServer, TCP_NODELAY=1, MaximumPduLength 131072)

Before each push the receiver's start-up work is let to finish (the node's worker processes
import numpy and pydicom: :func:`benchlib.wait_quiet`) and one ``echoscu -d`` reads the maximum
PDU it negotiates (printed per receiver). The order of the receivers rotates between
repetitions. Reported per receiver: median images/s and the spread, and the ratio of each run's
time to the bare SCP's time in the same repetition (median over the repetitions: the target is
node <= 1.15; the moonshot is the node's images/s at or above Orthanc's).

With ``--profile``, an in-process harness then runs ``node.receive.scp.StoreHandler`` as ``dicom-node
serve`` does (streamed receive, max PDU unlimited, disk guard) against a bare handler (also
with the fsyncs made no-ops, and receiving in memory; 5 runs each, interleaved), times each step
and runs cProfile over ``on_store``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from tests.support import NodeProcess, OrthancServer, node_config  # noqa: E402

TARGET = 1.15
N = 300



# --------------------------------------------------------------------------- one push per receiver
# Each returns (seconds of the storescu push, what the receiver negotiated: bl.negotiated_pdu).


def run_node(files: list[Path], work: Path, code_root: Path = bl.ROOT) -> tuple[float, str]:
    port = bl.free_port()
    data = work / "var"
    node = NodeProcess(node_config(data, port, settle=3600, extra=bl.ct_folder_route(work / "out")),
                       work, port=port, code_root=code_root)
    try:
        node.start()
        bl.wait_quiet(node.proc.pid)  # its worker processes import numpy & co. once, at start-up
        pdu = bl.negotiated_pdu(port, node.ae_title)
        bl.sync_disks()
        seconds = bl.push(port, files, called_aet=node.ae_title)
        stored = bl.count_files(data / "spool", "*.dcm")
        if stored != len(files):
            raise RuntimeError(f"node spooled {stored} of {len(files)}")
        recorded = _recorded(node, data / "jobs.sqlite", len(files))
        if recorded != len(files):
            raise RuntimeError(f"node recorded {recorded} of {len(files)} in its job store")
        log = node.log()
        if "Traceback" in log or " ERROR " in log:
            raise RuntimeError(f"node logged errors:\n{log[-3000:]}")
        return seconds, pdu
    finally:
        node.stop()


def _recorded(node: NodeProcess, database: Path, expected: int, timeout: float = 30) -> int:
    """Instances in the node's job store, once it has *expected* of them (or after *timeout* s)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
            count = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        if count >= expected or time.monotonic() > deadline or not node.alive():
            return count
        time.sleep(0.1)


def run_bare(files: list[Path], work: Path) -> tuple[float, str]:
    port = bl.free_port()
    out = work / "bare"
    with bl.Background([sys.executable, str(Path(__file__).with_name("bare_scp.py")), str(port), str(out), "BARE"],
                       port=port, aet="BARE", log_path=work / "bare.log") as bare:
        bl.wait_quiet(bare.proc.pid)
        pdu = bl.negotiated_pdu(port, "BARE")
        bl.sync_disks()
        seconds = bl.push(port, files, called_aet="BARE")
        stored = bl.count_files(out, "*.dcm")
    if stored != len(files):
        raise RuntimeError(f"bare SCP stored {stored} of {len(files)}")
    return seconds, pdu


def run_storescp(files: list[Path], work: Path) -> tuple[float, str]:
    port = bl.free_port()
    out = work / "storescp"
    out.mkdir()
    # --max-pdu 131072: dcmtk's largest (its default is 16384)
    args = [bl.STORESCP, "-aet", "STORESCP", "-od", str(out), "+B", "-dhl", "+xa", "--max-pdu", "131072", str(port)]
    with bl.Background(args, port=port, aet="STORESCP", log_path=work / "storescp.log"):
        pdu = bl.negotiated_pdu(port, "STORESCP")
        bl.sync_disks()
        seconds = bl.push(port, files, called_aet="STORESCP")
        stored = bl.count_files(out)
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)}")
    return seconds, pdu


#: Orthanc's largest maximum PDU (its allowed range is 4096-131072; default 16384): with its default,
#: storescu would send it eight times as many PDUs as the node, which accepts unlimited PDUs.
ORTHANC_MAX_PDU = 131072


def run_orthanc(files: list[Path], work: Path) -> tuple[float, str]:
    with OrthancServer(aet="ORTHANC", workdir=work / "orthanc",  # started with TCP_NODELAY=1
                       extra_config={"MaximumPduLength": ORTHANC_MAX_PDU}) as orthanc:
        pdu = bl.negotiated_pdu(orthanc.dicom_port, "ORTHANC")
        bl.sync_disks()
        seconds = bl.push(orthanc.dicom_port, files, called_aet="ORTHANC")
        stored = orthanc.get("/statistics")["CountInstances"]
        orthanc.stop(grace=0)
    if stored != len(files):
        raise RuntimeError(f"Orthanc stored {stored} of {len(files)}")
    return seconds, pdu


RECEIVERS = {"node": run_node, "bare": run_bare, "storescp": run_storescp, "orthanc": run_orthanc}


# --------------------------------------------------------------------------- in-process profile


class _Timers:
    """Accumulated wall time per named step (thread-safe enough: one association at a time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, func):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1
        return timed


def _profiled(profiler: cProfile.Profile, func):
    def profiled(*args, **kwargs):
        profiler.enable()  # this thread only: the association's
        try:
            return func(*args, **kwargs)
        finally:
            profiler.disable()
    return profiled


def _serve_in_process(files: list[Path], handlers: list[tuple], ae) -> tuple[float, float]:
    """Serve one storescu push in this process; returns (storescu s, association-thread s)."""
    from pynetdicom import evt

    span: dict[str, float] = {}

    def established(event) -> None:
        span["start"] = time.perf_counter()

    def released(event) -> None:
        span["end"] = time.perf_counter()

    port = bl.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[*handlers, (evt.EVT_ESTABLISHED, established), (evt.EVT_RELEASED, released)])
    try:
        bl.sync_disks()
        seconds = bl.push(port, files, called_aet=ae.ae_title)
        deadline = time.monotonic() + 10
        while "end" not in span and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.shutdown()
    return seconds, span["end"] - span["start"]


def _bare_ae():
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE
    from pynetdicom.presentation import AllStoragePresentationContexts

    from node.receive.scp import build_application_entity

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = build_application_entity("BARE").maximum_pdu_size  # as bare_scp.py: the node's
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
    return ae


class _Patches:
    """Replace module attributes for one run and put them back afterwards."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def set(self, owner: object, name: str, value: object) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def wrap(self, owner: object, name: str, timers: _Timers, label: str) -> None:
        self.set(owner, name, timers.wrap(label, getattr(owner, name)))

    def restore(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)


def profile_ingest(files: list[Path], work: Path, reps: int) -> None:
    """Where the node's ingest time goes, measured in-process against the bare handler.

    The node's handler runs as ``dicom-node serve`` runs it: streamed receive into
    ``<spool>/.incoming``, AE max PDU unlimited, the disk guard on.
    """
    import logging

    import node.receive.scp
    import node.store.fsutil
    import node.store.spool
    from node.net.sockets import no_delay
    from node.receive.scp import StoreHandler, build_application_entity, disable_streamed_receive, enable_streamed_receive
    from node.store.jobstore import JobStore
    from node.store.spool import Spool
    from pynetdicom import evt

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    bare_timers = _Timers()
    runs = iter(range(1_000_000))
    guard = 16 << 20

    def bare_run() -> tuple[float, float]:
        disable_streamed_receive()
        folder = work / f"bare-{next(runs)}"
        folder.mkdir()

        def on_store(event):
            with open(folder / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as handle:
                handle.write(event.encoded_dataset())
            return 0
        handlers = [(evt.EVT_C_STORE, bare_timers.wrap("on_store", on_store)),
                    (evt.EVT_CONN_OPEN, lambda event: no_delay(event.assoc))]
        return _serve_in_process(files, handlers, _bare_ae())

    def node_run(*, streamed: bool = True, fsync: bool = True, timers: _Timers | None = None,
                 profiler: cProfile.Profile | None = None) -> tuple[float, float]:
        sub = work / f"node-{next(runs)}"
        spool, jobs = Spool(sub / "spool"), JobStore(sub / "jobs.sqlite")
        patches = _Patches()
        if streamed:
            enable_streamed_receive(spool.root, min_free_bytes=guard)
        else:
            disable_streamed_receive()
        handler = StoreHandler(spool, jobs, min_free_bytes=guard)
        if profiler:
            handler.on_store = _profiled(profiler, handler.on_store)
        if not fsync:
            patches.set(node.store.spool.os, "fsync", lambda fd: None)
            patches.set(node.store.fsutil, "fsync_dir", lambda folder: None)
        if timers:
            handler.on_store = timers.wrap("on_store", handler.on_store)
            jobs.record_instance = timers.wrap("record_instance", jobs.record_instance)
            spool.adopt = timers.wrap("adopt", spool.adopt)
            patches.wrap(node.receive.scp, "_read_file_header", timers, "read_header")
            patches.wrap(node.receive.scp.StoreHandler, "_disk_guard", timers, "disk_guard")
            patches.wrap(node.store.spool.os, "fsync", timers, "fsync")
            patches.wrap(node.store.fsutil, "fsync_dir", timers, "fsync_dir")
            patches.wrap(node.receive.scp._IncomingFile, "_write", timers, "receive_write")
        try:
            return _serve_in_process(files, handler.handlers(), build_application_entity("DICOMNODE"))
        finally:
            patches.restore()
            disable_streamed_receive()
            jobs.close()

    variants = {
        "bare handler (in memory, max PDU as the node's, TCP_NODELAY)": bare_run,
        "node StoreHandler as dicom-node serve runs it": node_run,
        "node StoreHandler, fsync of file and folder made no-ops": lambda: node_run(fsync=False),
        "node StoreHandler, received in memory (not streamed)": lambda: node_run(streamed=False),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            results[name].append(run())
    bare_median = bl.median([s for s, _ in results[next(iter(variants))]])
    bl.print_table(
        ["in-process SCP (same 300 files, storescu, one association)", "median storescu s",
         "median association s", "median images/s", "time / bare"],
        [(name, bl.median([s for s, _ in r]), bl.median([t for _, t in r]), N / bl.median([s for s, _ in r]),
          bl.median([s for s, _ in r]) / bare_median) for name, r in results.items()],
        title=f"In-process harness: node.receive.scp.StoreHandler vs a bare handler ({reps} runs each, interleaved)",
    )

    timers = _Timers()
    _, node_thread = node_run(timers=timers)
    per = timers.seconds
    steps = [
        ("receive: PDUs written to .incoming (reader thread, outside on_store; GIL waits included)",
         per["receive_write"]),
        ("_read_file_header (parse up to 0020,000E from the first 64 KiB)", per["read_header"]),
        ("_disk_guard (statvfs)", per["disk_guard"]),
        # the os.fsync timer counts both calls, the file's and the one inside fsync_dir
        ("Spool.adopt without the fsyncs (open, fchmod, rename)", per["adopt"] - per["fsync"]),
        ("os.fsync of the file", per["fsync"] - per["fsync_dir"]),
        ("fsync_dir of the series folder", per["fsync_dir"]),
        ("jobs.record_instance (SQLite, WAL)", per["record_instance"]),
    ]
    inside = sum(sec for _, sec in steps[1:])
    steps.append(("rest of on_store (UID checks, resend check, bookkeeping)", per["on_store"] - inside))
    steps.append(("= on_store total", per["on_store"]))
    steps.append(("bare handler total, for comparison (mean of its runs)",
                  bare_timers.seconds["on_store"] / bare_timers.calls["on_store"] * N))
    steps.append(("pynetdicom outside on_store (node run)", node_thread - per["on_store"]))
    bl.print_table(
        ["step (one timed run, streamed receive)", "total s", "ms / instance", "share of association"],
        [(name, sec, 1000 * sec / N, f"{100 * sec / node_thread:.0f}%") for name, sec in steps],
        title="Where the node's C-STORE time goes (300 instances, one association, step timers on)",
    )

    profiler = cProfile.Profile()
    node_run(profiler=profiler)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    lines = out.getvalue().splitlines()
    begin = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    print("\ncProfile of StoreHandler.on_store over 300 instances (top 15 by own time; profiling inflates "
          "Python-heavy code):")
    print("\n".join(line for line in lines[begin:] if line.strip()))


# --------------------------------------------------------------------------- main


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if max(values) < 10 else f"{min(values):.0f}-{max(values):.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="interleaved runs of each receiver (default 7)")
    parser.add_argument("--profile", action="store_true", help="always run the in-process profile")
    parser.add_argument("--profile-reps", type=int, default=5, help="runs of each in-process variant (default 5)")
    parser.add_argument("--only", nargs="+", choices=list(RECEIVERS), default=list(RECEIVERS))
    parser.add_argument("--before", metavar="REV", help="also run the node of this git revision (a worktree), same run")
    args = parser.parse_args()
    if args.before:
        root = bl.checkout(args.before)
        RECEIVERS["before"] = lambda files, work: run_node(files, work, root)
        args.only.append("before")

    print(f"# ingest benchmark\n{bl.machine_info()}" + (f"; before = the node at {args.before}" if args.before else ""))
    files = bl.ct_series(N)
    size = bl.warm_cache(files)
    print(f"input: {len(files)} files, {size / 1e6:.0f} MB, one storescu association per push (TCP_NODELAY=1), "
          "fresh receiver per push")
    times: dict[str, list[float]] = {name: [] for name in args.only}
    pdus: dict[str, set[str]] = {name: set() for name in args.only}
    names = list(args.only)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            with bl.tempdir(f"ingest-{name}-") as work:
                seconds, pdu = RECEIVERS[name](files, work)
            times[name].append(seconds)
            pdus[name].add(pdu)
            print(f"  rep {rep + 1} {name:<9} {seconds:6.2f} s  {N / seconds:6.1f} images/s  ({bl.load_average()})",
                  flush=True)

    bl.print_table(["receiver", "max PDU negotiated (echoscu -d, every run)"],
                   [(name, "; ".join(sorted(pdus[name]))) for name in names],
                   title="What each receiver negotiated with dcmtk")
    base = "bare" if "bare" in times else names[0]
    rows = []
    for name in names:
        rates = [N / t for t in times[name]]
        paired = [t / b for t, b in zip(times[name], times[base])]
        rows.append((name, bl.median(rates), _spread(rates), size / 1e6 / bl.median(times[name]),
                     bl.median(paired), _spread(paired)))
    bl.print_table(["receiver", "median images/s", "images/s min-max", "median MB/s",
                    f"time / {base}, median of the runs", "min-max"], rows,
                   title=f"Ingest of {N} CT slices ({args.reps} interleaved runs each; ratios within each run)")
    ratio = None
    if "node" in times and "bare" in times:
        paired = [node / bare for node, bare in zip(times["node"], times["bare"])]
        ratio = bl.median(paired)
        verdict = "PASS" if ratio <= TARGET else f"FAIL (over by {100 * (ratio / TARGET - 1):.0f}%)"
        print(f"\nnode / bare pynetdicom, time, median of {len(paired)} runs: {ratio:.2f} "
              f"(runs {', '.join(f'{r:.2f}' for r in paired)}), target <= {TARGET}: {verdict}")
        print(f"node / bare, ratio of the median times: {bl.median(times['node']) / bl.median(times['bare']):.2f}")
    if "node" in times and "orthanc" in times:
        paired = [orthanc / node for node, orthanc in zip(times["node"], times["orthanc"])]
        print(f"node images/s / Orthanc images/s, median of {len(paired)} runs: {bl.median(paired):.2f} "
              f"(min {min(paired):.2f}, max {max(paired):.2f}); moonshot >= 1.00")
    if args.profile:
        with bl.tempdir("ingest-profile-") as work:
            profile_ingest(files, work, args.profile_reps)
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
