"""Concurrent ingest: 10 associations pushing at once (10 x dcmtk storescu, 30 slices each).

Run from the checkout::

    scripts/bench/run scale             # or: .venv/bin/python scripts/bench/scale.py [--reps 3]

Scenarios, each with a fresh receiver, 300 CT slices in all (the real GE head slice, new UIDs):

* ``node 1x300``               one association, one series (the single-stream reference)
* ``node 10x30, 1 series``      one 300-slice series split over 10 parallel associations
* ``node 10x30, 10 series``     10 series of 30, one per association (10 scanners at once)
* ``bare 10x30, 10 series``     the bare pynetdicom SCP (bare_scp.py), same push: the ratio's base
* ``node 10x30, 10 series, processing on``: settle 1 s and a folder route, so workers, the job
  store and delivery run while instances still arrive; timed until all 300 outputs are delivered

The node runs with settle 3600 s (no processing) except in the last scenario. Every run checks
that all storescu exited 0, that 300 instances are spooled and in the job store, and that the
node's log has no "database is locked" and no "Traceback".
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from tests.support import NodeProcess, node_config  # noqa: E402

N, ASSOCIATIONS = 300, 10



def parallel_push(port: int, groups: list[list[Path]], called_aet: str) -> float:
    """All groups at once, one storescu (one association) each; seconds until the last exits."""
    started = time.perf_counter()
    procs = [bl.push_started(port, group, called_aet=called_aet, calling_aet=f"SCU{index:02d}")
             for index, group in enumerate(groups)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            outputs.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    seconds = time.perf_counter() - started
    failed = [(rc, out) for rc, out in outputs if rc != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} storescu failed, first ({failed[0][0]}): {failed[0][1][-2000:]}")
    return seconds


def check_node(node: NodeProcess, data: Path) -> dict:
    log = node.log()
    problems = [word for word in ("database is locked", "Traceback") if word in log]
    spooled = bl.count_files(data / "spool", "*.dcm")
    with sqlite3.connect(f"file:{data / 'jobs.sqlite'}?mode=ro", uri=True) as db:
        recorded = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        series = db.execute("SELECT COUNT(*), COALESCE(SUM(instances), 0) FROM series").fetchone()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    if spooled != N or recorded != N or series[1] != N or problems or errors:
        raise RuntimeError(f"node: {spooled} spooled, {recorded} recorded, series {series}, log problems {problems}, "
                           f"errors {errors[:3]}\n{log[-3000:]}")
    return {"series": series[0]}


def run_node(groups: list[list[Path]], work: Path, *, processing: bool = False) -> tuple[float, str]:
    port = bl.free_port()
    data = work / "var"
    out = work / "out"
    config = node_config(data, port, settle=1.0 if processing else 3600, extra=bl.ct_folder_route(out))
    node = NodeProcess(config, work, port=port)
    try:
        node.start()
        bl.sync_disks()
        if len(groups) == 1:
            seconds = bl.push(port, groups[0], called_aet=node.ae_title)
        else:
            seconds = parallel_push(port, groups, node.ae_title)
        note = ""
        if processing:
            started = time.perf_counter() - seconds
            deadline = time.monotonic() + 300
            while bl.count_files(out, "*.dcm") < N:
                if time.monotonic() > deadline or not node.alive():
                    raise RuntimeError(f"{bl.count_files(out, '*.dcm')} of {N} outputs\n{node.log()[-3000:]}")
                time.sleep(0.1)
            total = time.perf_counter() - started
            note = f"all {N} outputs delivered {total:.1f} s after the first push started"
        info = check_node(node, data)
        return seconds, f"{info['series']} series in the job store; no lock errors, no tracebacks" + (
            f"; {note}" if note else "")
    finally:
        node.stop()


def run_bare(groups: list[list[Path]], work: Path) -> tuple[float, str]:
    port = bl.free_port()
    out = work / "bare"
    with bl.Background([sys.executable, str(Path(__file__).with_name("bare_scp.py")), str(port), str(out), "BARE"],
                       port=port, aet="BARE", log_path=work / "bare.log"):
        bl.sync_disks()
        seconds = parallel_push(port, groups, "BARE")
        stored = bl.count_files(out, "*.dcm")
    if stored != N:
        raise RuntimeError(f"bare SCP stored {stored} of {N}")
    return seconds, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"# concurrent ingest benchmark\n{bl.machine_info()}")
    one_series = bl.ct_series(N)
    ten_series = bl.ct_series(N // ASSOCIATIONS, series=ASSOCIATIONS)
    bl.warm_cache(one_series)
    bl.warm_cache(ten_series)
    size = N // ASSOCIATIONS
    split = [one_series[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)]
    by_series = [ten_series[i * size:(i + 1) * size] for i in range(ASSOCIATIONS)]
    scenarios = {
        "node 1x300": lambda w: run_node([one_series], w),
        "node 10x30, 1 series": lambda w: run_node(split, w),
        "node 10x30, 10 series": lambda w: run_node(by_series, w),
        "bare 10x30, 10 series": lambda w: run_bare(by_series, w),
        "node 10x30, 10 series, processing on": lambda w: run_node(by_series, w, processing=True),
    }
    times: dict[str, list[float]] = {name: [] for name in scenarios}
    notes: dict[str, str] = {}
    for rep in range(args.reps):
        for name, run in scenarios.items():
            with bl.tempdir("scale-") as work:
                seconds, note = run(work)
            times[name].append(seconds)
            notes[name] = note
            print(f"  rep {rep + 1} {name:<40} {seconds:6.2f} s  {N / seconds:6.1f} images/s  {note}", flush=True)
    base = bl.median(times["bare 10x30, 10 series"])
    single = bl.median(times["node 1x300"])
    bl.print_table(
        ["scenario (300 slices in all)", "best images/s", "median images/s", "time / bare 10x30",
         "time / node 1x300"],
        [(name, N / min(t), N / bl.median(t), bl.median(t) / base, bl.median(t) / single) for name, t in times.items()],
        title=f"Concurrent ingest, {ASSOCIATIONS} associations at once ({args.reps} runs each; time = first push "
              "started to last storescu exited)",
    )
    print("\nnode log checks: no 'database is locked', no 'Traceback', no ERROR line, 300 spooled and recorded "
          "in every node run: PASS")
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
