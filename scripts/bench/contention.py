"""Ingest while the node processes: does processing slow receiving down?

Run from the checkout::

    scripts/bench/run contention                     # this checkout's node
    scripts/bench/run contention --before REV        # and the node at git revision REV, same run

Each repetition starts a fresh node (rescale + equalise per image -> Secondary Capture, to a folder,
settle 1 s) and pushes two 300-slice CT series (the real GE head slice, new UIDs) with dcmtk
``storescu`` over one association each:

* **idle**: series A into the idle node;
* **busy**: series B as soon as the node has claimed A for processing (it polls ``/api/jobs``).

The ratio busy / idle is the cost of processing to ingest (target <= 1.3; 2.1 on 47fe34e, when
processing ran as threads in the receiving process).  The script also reports how much of B's push
overlapped A's processing (a ratio from a push that ran after processing ended would say nothing),
and checks every instance was spooled and both series delivered.  ``--before REV`` runs the same
with the node of another revision (a ``git worktree`` in the cache folder), interleaved run by run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pydicom
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from tests.support import NodeProcess, folder_route, node_config  # noqa: E402

N = 300

def series_states(http: int) -> dict[str, dict]:
    """The node's series by Series Instance UID (from ``/api/jobs``)."""
    rows = requests.get(f"http://127.0.0.1:{http}/api/jobs", timeout=10).json()
    return {row["series_uid"]: row for row in rows}


def wait(condition, timeout: float, what: str, node: NodeProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not node.alive():
            break
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}\n{node.log()[-3000:]}")


def processing_span(record: dict) -> tuple[float, float]:
    """(claimed, processed) epoch times of a series, from its events."""
    events = record["events"]
    start = max(e["at"] for e in events if e["state"] == "processing")
    end = max(e["at"] for e in events if e["state"] in ("delivering", "failed"))
    return start, end


def one_run(a: list[Path], b: list[Path], work: Path, code_root: Path, warmup: float) -> dict[str, float]:
    port, http = bl.free_port(), bl.free_port()
    config = node_config(work / "var", port, http_port=http, settle=1.0,
                         extra=folder_route(work / "out", steps=bl.RESCALE_EQUALISE))
    config = config.replace("workers = 2\n", "")  # the default: the number of CPUs, at most 4
    uid_a, uid_b = (pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID for files in (a, b))
    with NodeProcess(config, work, port=port, code_root=code_root) as node:
        time.sleep(warmup)  # worker processes import numpy & co. after the SCP answers: not part of a push
        bl.sync_disks()
        idle = bl.push(port, a, called_aet=node.ae_title)
        wait(lambda: series_states(http).get(uid_a, {}).get("state") in ("processing", "delivering", "delivered"),
             60, "series A claimed", node)
        started = time.time()
        busy = bl.push(port, b, called_aet=node.ae_title)
        ended = time.time()
        wait(lambda: all(series_states(http).get(u, {}).get("state") == "delivered" for u in (uid_a, uid_b)),
             300, "both series delivered", node)
        record = requests.get(f"http://127.0.0.1:{http}/api/jobs/{series_states(http)[uid_a]['id']}",
                              timeout=10).json()
        spooled = bl.count_files(work / "var" / "spool", "*.dcm")
    if spooled != 2 * N:
        raise RuntimeError(f"{spooled} of {2 * N} instances spooled")
    claimed, processed = processing_span(record)
    overlap = max(0.0, min(ended, processed) - max(started, claimed)) / (ended - started)
    return {"idle": idle, "busy": busy, "overlap": overlap, "process": processed - claimed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--before", metavar="REV", help="also run the node of this git revision, same run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds between start and first push (both nodes)")
    args = parser.parse_args()
    print(f"# ingest under processing\n{bl.machine_info()}")
    files = bl.ct_series(N, series=2)
    a, b = files[:N], files[N:]
    bl.warm_cache(files)
    roots = {"this checkout": bl.ROOT}
    if args.before:
        roots[f"before ({args.before})"] = bl.checkout(args.before)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in roots}
    for rep in range(args.reps):
        for name, root in roots.items():
            with bl.tempdir("contention-") as work:
                run = one_run(a, b, work, root, args.warmup)
            results[name].append(run)
            print(f"  rep {rep + 1} {name:<24} idle {run['idle']:5.2f} s  busy {run['busy']:5.2f} s  "
                  f"ratio {run['busy'] / run['idle']:4.2f}  push overlapped processing {run['overlap']:4.0%}  "
                  f"(A processed in {run['process']:.1f} s)", flush=True)
    bl.print_table(
        ["node", "idle push (median s)", "busy push (median s)", "busy / idle (median of runs)",
         "overlap (median)"],
        [(name, bl.median([r["idle"] for r in runs]), bl.median([r["busy"] for r in runs]),
          bl.median([r["busy"] / r["idle"] for r in runs]), f"{bl.median([r['overlap'] for r in runs]):.0%}")
         for name, runs in results.items()],
        title=f"300-slice push into an idle node and while it processes the previous 300-slice series "
              f"({args.reps} runs each, interleaved)",
    )
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
