"""``dicom-node export`` of a CT series into NIfTI / NumPy, against dcm2niix in the same run.

Run from the checkout::

    scripts/bench/run export            # or: .venv/bin/python scripts/bench/export.py [--reps 3] [--big 1000]

Input (made once, kept in the cache folder by ``benchlib.ct_series``): the 300-slice 512x512 CT series
built from the real GE head CT slice (its gantry tilt of 18.5 degrees included: the slices step 1 mm
in z, so both tools see a tilted series; dcm2niix then also writes a tilt-corrected copy).

Each rep runs, interleaved, each a child process under ``/usr/bin/time -v`` (wall time and "Maximum
resident set size"), the disks synced before each, every output into a fresh folder:

* ``dicom-node export SERIES --out DIR`` (NIfTI ``.nii.gz``, zlib level 1), and ``--format npz``;
* ``dcm2niix -z y`` (gzip: pigz when installed, else its internal zlib) and ``dcm2niix -z n``.

Then once, the memory bound of issue 18: ``dicom-node export`` of a ``--big``-slice series (default
1,000: a 500 MiB int16 volume) must peak under 2x its volume size.  Each output is checked (shape of
the node's volume) before a time is reported.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

TIME = "/usr/bin/time"
MB = 2**20
DCM2NIIX = shutil.which("dcm2niix") or "dcm2niix"


def timed(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of *args* as a child process under ``/usr/bin/time -v``."""
    env = dict(os.environ, PYTHONPATH=str(bl.ROOT))
    bl.sync_disks()
    started = time.perf_counter()
    result = subprocess.run([TIME, "-v", *args], capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, int(match[1]) * 1024 / MB


def node_shape(out: Path, suffix: str) -> tuple[int, ...]:
    """The shape of the one volume the node wrote under *out*."""
    import nibabel as nib
    import numpy as np

    (volume,) = [p for p in out.rglob(f"volume*{suffix}")]
    if suffix == ".npz":
        with np.load(volume) as arrays:
            return arrays["volume"].shape
    return nib.load(str(volume)).shape


def size_mb(out: Path) -> float:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.endswith(".json")) / MB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--big", type=int, default=1000, help="slices of the memory-bound series (0: skip)")
    args = parser.parse_args()
    print(f"# export benchmark\n{bl.machine_info()}")
    series = bl.ct_series(args.slices)
    folder = series[0].parent
    version = subprocess.run([DCM2NIIX, "-v"], capture_output=True, text=True).stdout.splitlines()
    print(f"input: {len(series)} files in {folder} ({sum(p.stat().st_size for p in series) / MB:.0f} MiB); "
          f"{version[0] if version else 'dcm2niix'}; pigz: {shutil.which('pigz') or 'not installed'}")
    bl.warm_cache(series)
    python = [sys.executable, "-m", "node"]
    cases = {
        "dicom-node export (nifti .nii.gz)": lambda out: [*python, "export", str(folder), "--out", str(out)],
        "dicom-node export --format npz": lambda out: [*python, "export", str(folder), "--out", str(out),
                                                       "--format", "npz"],
        "dcm2niix -z y (.nii.gz)": lambda out: [DCM2NIIX, "-1", "-z", "y", "-o", str(out), str(folder)],
        "dcm2niix -z n (.nii)": lambda out: [DCM2NIIX, "-z", "n", "-o", str(out), str(folder)],
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    with bl.tempdir("export-") as work:
        for rep in range(args.reps):
            for index, (name, command) in enumerate(cases.items()):
                out = work / f"{rep}-{index}"
                out.mkdir()
                seconds, rss = timed(command(out))
                if name.startswith("dicom-node"):
                    shape = node_shape(out, ".npz" if "npz" in name else ".nii.gz")
                    if shape != (512, 512, args.slices):
                        raise RuntimeError(f"{name}: volume {shape}, expected (512, 512, {args.slices})")
                results[name].append((seconds, rss, size_mb(out)))
                shutil.rmtree(out)
            print(f"rep {rep + 1}/{args.reps} done; {bl.load_average()}", flush=True)
        rows = []
        reference = bl.median([r[0] for r in results["dcm2niix -z y (.nii.gz)"]])
        for name, runs in results.items():
            wall = bl.median([r[0] for r in runs])
            rows.append((name, wall, min(r[0] for r in runs), bl.median([r[1] for r in runs]), runs[0][2],
                         f"{wall / reference:.2f}"))
        bl.print_table(["run", "wall s (median)", "wall s (best)", "peak RSS MiB", "output MiB",
                        "x dcm2niix -z y"], rows, title=f"{args.slices}-slice CT, {args.reps} reps interleaved")
        volume_mb = 512 * 512 * args.slices * 2 / MB
        print(f"\nvolume: {volume_mb:.0f} MiB int16; dcm2niix's output includes its tilt-corrected copy")

        if args.big:
            big = bl.ct_series(args.big)
            bl.warm_cache(big)
            volume_mb = 512 * 512 * args.big * 2 / MB
            rows = []
            for name, command in (
                ("dicom-node export (nifti)", [*python, "export", str(big[0].parent), "--out", str(work / "big")]),
                ("dcm2niix -z y", [DCM2NIIX, "-1", "-z", "y", "-o", str(work / "big-d2n"), str(big[0].parent)]),
            ):
                (work / "big-d2n").mkdir(exist_ok=True)
                seconds, rss = timed(command)
                verdict = "-"
                if name.startswith("dicom-node"):
                    if node_shape(work / "big", ".nii.gz") != (512, 512, args.big):
                        raise RuntimeError(f"{name}: wrong volume shape")
                    verdict = "PASS" if rss < 2 * volume_mb else f"FAIL ({rss / volume_mb:.2f}x)"
                rows.append((name, seconds, rss, f"{rss / volume_mb:.2f}", verdict))
            bl.print_table(["run", "wall s", "peak RSS MiB", "x volume", "target < 2x"], rows,
                           title=f"{args.big}-slice CT: volume {volume_mb:.0f} MiB int16")
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
