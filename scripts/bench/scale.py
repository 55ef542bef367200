"""Concurrent ingest: 10 associations pushing at once (10 x dcmtk storescu, 30 slices each).

Run from the checkout::

    scripts/bench/run scale             # or: .venv/bin/python scripts/bench/scale.py [--reps 5] [--skip-processing]

Scenarios, each with a fresh receiver, 300 CT slices in all (the real GE head slice, new UIDs):

* ``node 1x300``               one association, one series (the single-stream reference)
* ``node 10x30, 1 series``      one 300-slice series split over 10 parallel associations
* ``node 10x30, 10 series``     10 series of 30, one per association (10 scanners at once)
* ``bare 10x30, 10 series``     the fair bare pynetdicom SCP (bare_scp.py), same push
* ``node 10x30, 10 series, processing on``: settle 1 s and a folder route, so workers, the job
  store and delivery run while instances still arrive; timed until all 300 outputs are delivered
* ``node receivers=N: ...``    the node with ``[node] receivers = N`` (``--receivers``, default 2):
  N processes on the port (node/app/receivers.py), 1x300 and 10x30

The node runs with settle 3600 s (no processing) except in the last scenario, and is given the
time its worker processes take to start before the push. Every run checks that all storescu
exited 0, that 300 instances are spooled, that the job store has 300 instance rows whose series
count 300 (each instance recorded exactly once), and that the node's log has no "database is
locked", no "Traceback" and no ERROR. The target (issue 14): the 10 associations' total images/s at
least the one association's (median of the per-repetition ratios).
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
    # rows are written just after each C-STORE is answered (node.recording): give the recorder a moment
    deadline = time.monotonic() + 30
    while _recorded(data) < N and time.monotonic() < deadline and node.alive():
        time.sleep(0.1)
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


def _recorded(data: Path) -> int:
    with sqlite3.connect(f"file:{data / 'jobs.sqlite'}?mode=ro", uri=True, timeout=10) as db:
        return db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]


def run_node(groups: list[list[Path]], work: Path, *, processing: bool = False, code_root: Path = bl.ROOT,
             receivers: int = 1) -> tuple[float, str]:
    port = bl.free_port()
    data = work / "var"
    out = work / "out"
    config = node_config(data, port, settle=1.0 if processing else 3600, extra=bl.ct_folder_route(out),
                         **({"receivers": receivers} if receivers > 1 else {}))
    node = NodeProcess(config, work, port=port, code_root=code_root)
    try:
        node.start()
        bl.wait_quiet(node.proc.pid)  # its worker processes import numpy & co. once, at start-up
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
                       port=port, aet="BARE", log_path=work / "bare.log") as bare:
        bl.wait_quiet(bare.proc.pid)  # the same warm-up as the node's
        bl.sync_disks()
        seconds = parallel_push(port, groups, "BARE")
        stored = bl.count_files(out, "*.dcm")
    if stored != N:
        raise RuntimeError(f"bare SCP stored {stored} of {N}")
    return seconds, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--before", metavar="REV", help="also run the node of this git revision (a worktree), same run")
    parser.add_argument("--receivers", type=int, default=2,
                        help="also run the node with [node] receivers = N (default 2; 1: not)")
    parser.add_argument("--skip-processing", action="store_true", help="leave out the scenario with processing on")
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
    if args.skip_processing:
        del scenarios["node 10x30, 10 series, processing on"]
    if args.receivers > 1:
        more = args.receivers
        scenarios[f"node receivers={more}: 1x300"] = lambda w: run_node([one_series], w, receivers=more)
        scenarios[f"node receivers={more}: 10x30, 10 series"] = lambda w: run_node(by_series, w, receivers=more)
    if args.before:
        root = bl.checkout(args.before)
        scenarios[f"before {args.before}: 1x300"] = lambda w: run_node([one_series], w, code_root=root)
        scenarios[f"before {args.before}: 10x30, 10 series"] = lambda w: run_node(by_series, w, code_root=root)
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
    paired = [one / ten for one, ten in zip(times["node 1x300"], times["node 10x30, 10 series"])]
    print(f"\nnode 10x30 (10 series) images/s / node 1x300 images/s, median of {len(paired)} runs: "
          f"{bl.median(paired):.2f} (runs {', '.join(f'{r:.2f}' for r in paired)}); target >= 1.0")
    paired = [one / ten for one, ten in zip(times["node 1x300"], times["node 10x30, 1 series"])]
    print(f"node 10x30 (1 series) images/s / node 1x300 images/s, median of {len(paired)} runs: "
          f"{bl.median(paired):.2f} (runs {', '.join(f'{r:.2f}' for r in paired)})")
    if args.receivers > 1:
        one = times[f"node receivers={args.receivers}: 1x300"]
        ten = times[f"node receivers={args.receivers}: 10x30, 10 series"]
        for label, base in (("its own 1x300", one), ("the default node's 1x300", times["node 1x300"])):
            paired = [a / b for a, b in zip(base, ten)]
            print(f"node receivers={args.receivers}: 10x30 (10 series) images/s / {label}, median of {len(paired)} "
                  f"runs: {bl.median(paired):.2f} (runs {', '.join(f'{r:.2f}' for r in paired)}); target >= 1.0")
    if args.before:
        one, ten = times[f"before {args.before}: 1x300"], times[f"before {args.before}: 10x30, 10 series"]
        paired = [a / b for a, b in zip(one, ten)]
        print(f"before {args.before}: 10x30 (10 series) / 1x300 images/s, median of {len(paired)} runs: "
              f"{bl.median(paired):.2f} (runs {', '.join(f'{r:.2f}' for r in paired)})")
    print("\nnode log checks: no 'database is locked', no 'Traceback', no ERROR line, 300 spooled, 300 rows in the "
          "job store's instances table and the series' counts summing to 300 in every node run: PASS")
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
