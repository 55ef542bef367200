"""What the disk costs one spooled instance: the receive writes, the file's fsync, the rename and the
folder's fsync, with and without the writeback head start (``node.store.fsutil.start_writeback``).

Run from the checkout::

    .venv/bin/python scripts/bench/spool_writes.py [--count 300]

No DICOM and no network: the node's own write pattern for a 512 KB instance received as four
128 KiB PDUs (``os.write`` of each, 0.2 ms apart, into ``.incoming``), then what
``Spool.adopt`` does (fsync, rename into the series folder, fsync of the folder). The two ways
alternate instance by instance on the cache folder's disk (``$DICOM_NODE_BENCH_CACHE``). The
ingest benchmarks' node/bare ratios move with these numbers: the bare SCP pays none of them, and
on a disk other programs keep busy each fsync waits for their data too (ext4's ordered journal).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from node.store.fsutil import fsync_dir, start_writeback  # noqa: E402

PDU = 131060  # what storescu sends a receiver that accepts unlimited PDUs


def one(folder: Path, data: bytes, writeback: bool, index: int) -> tuple[float, float, float, float]:
    """Milliseconds: writes (with the pauses between PDUs), fsync of the file, rename + folder fsync, all."""
    started = time.perf_counter()
    fd, name = tempfile.mkstemp(dir=folder / ".incoming", prefix=".recv-", suffix=".tmp")
    offset = 0
    for _ in range(4):
        os.write(fd, data)
        if writeback:
            start_writeback(fd, offset, len(data))
        offset += len(data)
        time.sleep(0.0002)
    written = time.perf_counter()
    os.fsync(fd)
    synced = time.perf_counter()
    os.close(fd)
    os.replace(name, folder / "series" / f"{writeback}-{index}.dcm")
    fsync_dir(folder / "series")
    done = time.perf_counter()
    return tuple(1000 * t for t in (written - started, synced - written, done - synced, done - started))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="instances each way (default 300)")
    args = parser.parse_args()
    print(f"# spool writes\n{bl.machine_info()}")
    data = os.urandom(PDU)
    results: dict[bool, list[tuple[float, ...]]] = {True: [], False: []}
    with bl.tempdir("spool-writes-") as folder:
        (folder / ".incoming").mkdir()
        (folder / "series").mkdir()
        for index in range(args.count):
            for writeback in ((True, False) if index % 2 else (False, True)):
                results[writeback].append(one(folder, data, writeback, index))
        shutil.rmtree(folder / "series")
    rows = []
    for writeback, runs in results.items():
        columns = list(zip(*runs))
        rows.append(("with start_writeback" if writeback else "without",
                     *(f"{statistics.median(c):.2f} / {statistics.fmean(c):.2f}" for c in columns)))
    bl.print_table(["4 x 128 KiB, ms: median / mean", "writes (+0.8 ms of pauses)", "fsync of the file",
                    "rename + fsync of the folder", "all"], rows,
                   title=f"One 512 KB instance to disk, {args.count} each way, alternating")
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
