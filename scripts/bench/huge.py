"""Peak memory of ``dicom-node serve`` receiving and processing one 1 GB multi-frame object.

Run from the checkout (not part of the test suite)::

    .venv/bin/python scripts/bench/huge.py [--frames 3500] [--keep]

Input (made once, kept in the cache folder ``$DICOM_NODE_BENCH_CACHE``): an 8-bit MONOCHROME2
Ultrasound Multi-frame Image of 640x480 frames (3,500 frames: 1.07 GB of pixel data, Explicit VR
Little Endian), written frame by frame by ``tests.support.write_cine``.

The node runs as a child process on 127.0.0.1 (pipeline to PNG frames, folder destination); one
dcmtk ``storescu`` association pushes the file.  The node's ``VmHWM`` (peak resident set size,
``/proc/<pid>/status``) is read after start-up, right after the C-STORE is answered (before the
series settles: the receive peak) and after the PNG frames are delivered (the overall peak).
Target: under 400 MB overall (the suite's ``tests/test_huge.py`` checks the same at 250 MB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from tests.support import (  # noqa: E402
    COLUMNS, ROWS, NodeProcess, folder_route, node_config, peak_rss, pixel_data_span, same_bytes, store_responses,
    storescu, wait_for, write_cine,
)

TARGET = 400 * 2**20
MB = 2**20


def cine(frames: int) -> Path:
    """The generated file of *frames* frames (built once into the cache, atomically)."""
    path = bl.CACHE / f"huge{frames}.dcm"
    if not path.exists():
        bl.CACHE.mkdir(parents=True, exist_ok=True)
        building = path.with_name(f".{path.name}.tmp")
        write_cine(building, frames)
        building.rename(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3500, help="frames of 640x480 8-bit (default 3500: 1.07 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (spool, outputs, node.log)")
    args = parser.parse_args()
    print(f"# huge multi-frame benchmark\n{bl.machine_info()}")
    source = cine(args.frames)
    size = source.stat().st_size
    print(f"input: {source} {size / 1e9:.2f} GB ({args.frames} x {COLUMNS}x{ROWS} 8-bit)")
    with bl.tempdir("huge-") as work:
        port = bl.free_port()
        out = work / "out"
        route = folder_route(out, None, name="frames", output="png", match={"Modality": "US"})  # as tests/test_huge.py
        node = NodeProcess(node_config(work / "var", port, settle=2.0, extra=route),
                           work, port=port)
        rows = []
        try:
            node.start()
            rows.append(("started", peak_rss(node.proc.pid), "-"))
            bl.sync_disks()
            started = time.monotonic()
            pushed = storescu(bl.LOCALHOST, port, [source], called_aet=node.ae_title, timeout=1800)
            received = time.monotonic() - started
            rows.append(("received (C-STORE answered)", peak_rss(node.proc.pid), f"{received:.1f}"))
            if store_responses(pushed) != ["Success"]:
                raise RuntimeError(f"storescu: {store_responses(pushed)}\n{pushed.stderr[-2000:]}")
            wait_for(lambda: "delivered to out" in node.log(), 3600, "the PNG frames delivered", node.log)
            rows.append(("processed and delivered", peak_rss(node.proc.pid), f"{time.monotonic() - started:.1f}"))
        finally:
            node.stop()
        frames = bl.count_files(out, "*.png")
        (spooled,) = sorted((work / "var" / "spool").rglob("*.dcm"))
        identical = same_bytes(source, pixel_data_span(source), spooled, pixel_data_span(spooled))
        bl.print_table(["node phase", "peak RSS MB (VmHWM)", "seconds since push"],
                       [(name, f"{rss / MB:.0f}", seconds) for name, rss, seconds in rows],
                       title=f"dicom-node serve, one {size / 1e9:.2f} GB object")
        peak = rows[-1][1]
        print(f"\n{frames} PNG frames; spooled Pixel Data identical to the sent: {identical}")
        print(f"overall peak {peak / MB:.0f} MB = {100 * peak / size:.0f}% of the file; target < {TARGET // MB} MB: "
              f"{'PASS' if peak < TARGET else 'FAIL'}")
        if args.keep:
            kept = bl.CACHE / f"huge-run-{time.strftime('%Y%m%d-%H%M%S')}"
            work.rename(kept)
            work.mkdir()
            print(f"run folder kept: {kept}")
        return 0 if peak < TARGET and frames == args.frames and identical else 1


if __name__ == "__main__":
    sys.exit(main())
