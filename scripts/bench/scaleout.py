"""Scale-out: series per minute with 1, 2 and 3 worker processes; ingest with PostgreSQL against SQLite.

Run from the checkout::

    scripts/bench/run scaleout            # or: .venv/bin/python scripts/bench/scaleout.py [--reps 3]

Throughput: 10 series of 30 CT slices (the real GE head slice, new UIDs) are pushed (one storescu
association each) into a fresh node with ``workers = N`` (rescale + equalise per image -> Secondary
Capture, to a folder); the time is from the first series claimed to the last delivered, read from
the node's own events (``/api/jobs``).  Ingest: 300 slices over one association into a receiver
(``--role receiver``, nothing processed) with the embedded SQLite job store, then with a PostgreSQL
one (Debian's, started here on 127.0.0.1), interleaved run by run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from tests.support import NodeProcess, folder_route, node_config, running_postgres  # noqa: E402

SERIES, SLICES, INGEST = 10, 30, 300

def records(http: int) -> list[dict]:
    rows = requests.get(f"http://127.0.0.1:{http}/api/jobs?limit=1000", timeout=10).json()
    return [requests.get(f"http://127.0.0.1:{http}/api/jobs/{row['id']}", timeout=10).json() for row in rows]


def throughput(groups: list[list[Path]], work: Path, workers: int) -> float:
    """Series per minute with *workers* worker processes."""
    port, http = bl.free_port(), bl.free_port()
    config = node_config(work / "var", port, http_port=http, settle=1.0,
                         extra=folder_route(work / "out", steps=bl.RESCALE_EQUALISE))
    config = config.replace("workers = 2", f"workers = {workers}")
    with NodeProcess(config, work, port=port) as node:
        for group in groups:
            bl.push(port, group, called_aet=node.ae_title)
        deadline = time.monotonic() + 600
        while bl.count_files(work / "out", "*.dcm") < SERIES * SLICES:
            if time.monotonic() > deadline or not node.alive():
                raise RuntimeError(f"{bl.count_files(work / 'out', '*.dcm')} outputs\n{node.log()[-3000:]}")
            time.sleep(0.2)
        time.sleep(0.5)
        rows = records(http)
    starts = [min(e["at"] for e in r["events"] if e["state"] == "processing") for r in rows]
    ends = [max(e["at"] for e in r["events"] if e["state"] == "delivered") for r in rows]
    if len(rows) != SERIES:
        raise RuntimeError(f"{len(rows)} series recorded, not {SERIES}")
    return SERIES / (max(ends) - min(starts)) * 60


def ingest(files: list[Path], work: Path, store: str | None) -> float:
    """Images/s of one storescu association into a receiver with the given store (None: SQLite)."""
    port = bl.free_port()
    extra = f'[store]\nurl = "{store}"\n' if store else ""
    config = node_config(work / "var", port, settle=3600, extra=extra)
    node = NodeProcess(config, work, port=port, args=("--role", "receiver"))
    with node:
        bl.sync_disks()
        seconds = bl.push(port, files, called_aet=node.ae_title)
    return len(files) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"# scale-out benchmark\n{bl.machine_info()}")
    series_files = bl.ct_series(SLICES, series=SERIES)
    groups = [series_files[i * SLICES:(i + 1) * SLICES] for i in range(SERIES)]
    ingest_files = bl.ct_series(INGEST)
    bl.warm_cache(series_files)
    bl.warm_cache(ingest_files)
    per_minute: dict[int, list[float]] = {1: [], 2: [], 3: []}
    rates: dict[str, list[float]] = {"SQLite": [], "PostgreSQL": []}
    with running_postgres() as postgres:
        for rep in range(args.reps):
            for workers in per_minute:
                with bl.tempdir("scaleout-") as work:
                    per_minute[workers].append(throughput(groups, work, workers))
                print(f"  rep {rep + 1} workers {workers}: {per_minute[workers][-1]:6.1f} series/min", flush=True)
            for name in rates:
                with bl.tempdir("ingest-") as work:
                    rates[name].append(ingest(ingest_files, work, postgres.new_database() if name == "PostgreSQL"
                                              else None))
                print(f"  rep {rep + 1} ingest, {name} job store: {rates[name][-1]:6.1f} images/s", flush=True)
    bl.print_table(
        ["worker processes", "series/min (median)", "best", "vs 1 worker"],
        [(n, bl.median(v), max(v), bl.median(v) / bl.median(per_minute[1])) for n, v in per_minute.items()],
        title=f"Throughput: {SERIES} series of {SLICES} CT slices, rescale + equalise per image -> SC "
              f"({args.reps} runs each)",
    )
    bl.print_table(
        ["job store", "images/s (median)", "best", "vs SQLite"],
        [(n, bl.median(v), max(v), bl.median(v) / bl.median(rates["SQLite"])) for n, v in rates.items()],
        title=f"Ingest: {INGEST} slices over one association into a receiver ({args.reps} runs each, interleaved)",
    )
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
