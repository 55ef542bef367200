"""Peak memory (RSS) of ``dicom-node process`` on a big multi-frame file and on a 300-slice series.

Run from the checkout::

    scripts/bench/run memory            # or: .venv/bin/python scripts/bench/memory.py

Input (made once, kept in the cache folder): a 1,000-frame 640x480 8-bit MONOCHROME2 Ultrasound
Multi-frame Image (pydicom's bundled CT_small.dcm header made into US; 307.2 MB of pixel data,
Explicit VR Little Endian), and the 300-slice CT series of the other benchmarks.

Each run is the CLI as a child process (``python -m node process ...``) under
``/usr/bin/time -v`` (its "Maximum resident set size"); without /usr/bin/time the child's
``ru_maxrss`` from ``getrusage(RUSAGE_CHILDREN)`` is used instead. Targets:

* (i)   1,000 frames -> PNG frames: peak RSS under 200 MB
* (ii)  1,000 frames -> one multi-frame Secondary Capture: under 2.5 x the output pixel data (768 MB)
* (iii) 300-slice CT, ``--equalise --per series``: reported (no target)
* (iv)  the SC of (ii) (307 MB) sent to a fresh Orthanc with ``node.deliver.dicom.DicomSender``: reported
        (no target; the file goes as its bytes in chunks, so it should stay near the baseline)

For context: the RSS of ``python -c "import node.app.cli"`` and of importing the processing modules.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

FRAMES, ROWS, COLUMNS = 1000, 480, 640
PIXEL_BYTES = FRAMES * ROWS * COLUMNS
TIME = "/usr/bin/time"
MB = 1e6


def gradient_frame(index: int, rows: int, columns: int) -> np.ndarray:
    """A moving gradient with a little noise: compressible like real images, not a constant."""
    y, x = np.mgrid[0:rows, 0:columns]
    base = ((x + y) * 255 // (rows + columns)).astype(np.uint8)
    noise = np.random.default_rng(index).integers(0, 8, (rows, columns), dtype=np.uint8)
    return base + np.uint8(index % 64) + noise


def multiframe_file() -> Path:
    """The 1,000-frame 8-bit US file (built once into the cache, a frame at a time, by
    ``tests.support.write_cine``)."""
    from tests.support import write_cine

    path = bl.CACHE / "us1000.dcm"
    if path.exists():
        return path
    bl.CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=bl.CACHE, prefix=".us1000.", suffix=".tmp")[1])
    try:
        write_cine(tmp, FRAMES, rows=ROWS, columns=COLUMNS, make_frame=gradient_frame)
        tmp.rename(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def peak_rss(args: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, output) of *args* run as a child process."""
    env = dict(os.environ, PYTHONPATH=str(bl.ROOT))
    if Path(TIME).exists():
        started = time.perf_counter()
        result = subprocess.run([TIME, "-v", *args], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - started
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
        if result.returncode != 0 or not match:
            raise RuntimeError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return int(match[1]) * 1024 / MB, seconds, result.stderr
    # Fallback: one child at a time, so the children's max RSS is this child's (unless an
    # earlier child was bigger: then this reading is only an upper bound).
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB, seconds, result.stderr


# A what-if, never used for the verdicts: the CLI with node.imaging.source._pixel_data_length reading
# the Pixel Data length with keep_deferred=True (as shipped, Dataset.get_item loads the deferred
# value: the whole pixel data of every opened file is read into its header and kept).



_SEND = """
import sys
from pathlib import Path
from node.deliver.dicom import DicomSender
from node.net.pynetdicom_setup import configure_pynetdicom
configure_pynetdicom()  # as dicom-node serve does at start-up
port, aet, path = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
DicomSender(host="127.0.0.1", port=port, called_ae=aet, calling_ae="DICOMNODE").send([path], study_uid="", series_uid="")
"""


def send_case(python: str, sc_file: Path, work: Path) -> tuple:
    """(iv): peak RSS of a child process sending *sc_file* to a fresh Orthanc with DicomSender."""
    from tests.support import OrthancServer

    with OrthancServer(aet="ORTHANC", workdir=work / "orthanc") as orthanc:
        bl.sync_disks()
        rss, seconds, _ = peak_rss([python, "-c", _SEND, str(orthanc.dicom_port), orthanc.aet, str(sc_file)])
        stored = orthanc.get("/statistics")["CountInstances"]
        orthanc.stop(grace=0)
    if stored != 1:
        raise RuntimeError(f"(iv): Orthanc holds {stored} instances, expected 1")
    size = sc_file.stat().st_size / MB
    return ("(iv) that SC sent to Orthanc (DicomSender)", rss, seconds, f"1 file, {size:.0f} MB", "-", "-")


def main() -> int:
    print(f"# memory benchmark\n{bl.machine_info()}")
    print(f"peak RSS from: {TIME + ' -v' if Path(TIME).exists() else 'getrusage(RUSAGE_CHILDREN).ru_maxrss'}")
    big = multiframe_file()
    series = bl.ct_series(300)
    print(f"inputs: {big.name} {big.stat().st_size / MB:.0f} MB ({FRAMES} x {COLUMNS}x{ROWS} 8-bit); "
          f"CT series {len(series)} files in {series[0].parent}")
    python = sys.executable
    cli = [python, "-m", "node"]
    rows = []
    failures = []
    for name, args in (
        ("baseline: python -c 'import node.app.cli'", [python, "-c", "import node.app.cli"]),
        ("baseline: import node.app.process_series (numpy, pydicom, writers)", [python, "-c", "import node.app.process_series"]),
    ):
        rss, seconds, _ = peak_rss(args)
        rows.append((name, rss, seconds, "-", "-", "-"))

    limit_sc = 2.5 * PIXEL_BYTES / MB
    with bl.tempdir("memory-") as work:
        cases = (
            ("(i) 1,000 frames -> PNG frames", [*cli, "process", str(big), "--out", str(work / "png"), "--format", "png"],
             work / "png", "*.png", FRAMES, 200.0),
            ("(ii) 1,000 frames -> one multi-frame SC", [*cli, "process", str(big), "--out", str(work / "sc")],
             work / "sc", "*.dcm", 1, limit_sc),
            ("(iii) 300-slice CT, --equalise --per series", [*cli, "process", str(series[0].parent), "--out",
             str(work / "eq"), "--equalise", "--per", "series"], work / "eq", "*.dcm", 300, None),
        )
        for name, args, out, pattern, expected, limit in cases:
            bl.sync_disks()
            rss, seconds, _ = peak_rss(args)
            produced = bl.count_files(out, pattern)
            size = sum(p.stat().st_size for p in out.rglob(pattern)) / MB
            if produced != expected:
                raise RuntimeError(f"{name}: {produced} outputs, expected {expected}")
            verdict = "-" if limit is None else ("PASS" if rss < limit else f"FAIL (+{100 * (rss / limit - 1):.0f}%)")
            if limit is not None and rss >= limit:
                failures.append(name)
            rows.append((name, rss, seconds, f"{produced} files, {size:.0f} MB",
                         "-" if limit is None else f"< {limit:.0f} MB", verdict))
            if out.name == "sc":
                rows.append(send_case(python, next(out.rglob(pattern)), work))
            shutil.rmtree(out, ignore_errors=True)
    bl.print_table(["dicom-node process run", "peak RSS MB", "wall s", "output", "target", "verdict"], rows,
                   title="Peak resident memory")
    print(f"\n(ii): output pixel data {PIXEL_BYTES / MB:.1f} MB; 2.5x = {limit_sc:.0f} MB")
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
