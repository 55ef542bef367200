"""Histogram equalisation: the node's exact streaming algorithm vs fastai's sort, on a 300-slice CT.

Run from the checkout::

    scripts/bench/run equalise          # or: .venv/bin/python scripts/bench/equalise.py [--torch-python PY]

fastai's side needs torch, which the node's venv does not have. The script runs it in a second
venv: ``--torch-python`` (or ``$BENCH_TORCH_PYTHON``), else ``scripts/bench/.venv/bin/python``,
which it creates on first use with ``python3 -m venv scripts/bench/.venv`` and
``pip install torch==2.13.0 numpy`` (a CPU wheel; ~200 MB, once). Nothing else is installed.

Compared on the same float32 HU volume (300 x 512 x 512 = 78.6 M values, ~315 MB):

* ours:   ``node.imaging.equalise.freqhist_bins`` + ``hist_scaled`` (counts per integer value)
* fastai: ``t.view(-1).sort()``, float32 fractions, ``.unique()`` in torch, ``np.interp`` on CPU
          (fastai_equalise.py, fastai's lines re-typed)
* numpy:  ``np.sort`` of the flattened volume, the same order statistics, ``np.unique``

All three must give identical bin edges (checked). Each time is the best of ``--reps`` runs.
Target: fastai / ours >= 15x. Per-series equalisation as the node does it (FrequencyHistogram fed
one slice at a time, then ``hist_scaled`` per slice) is timed separately, in memory and from files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

N = 300
TARGET = 15.0
BENCH_VENV = Path(__file__).resolve().parent / ".venv"
TORCH_REQUIREMENT = "torch==2.13.0"


def torch_python(given: str | None) -> str:
    """A Python with torch: the given one, or scripts/bench/.venv (created when missing)."""
    if given:
        return given
    python = BENCH_VENV / "bin" / "python"
    probe = [str(python), "-c", "import torch, numpy"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    print(f"creating {BENCH_VENV} with {TORCH_REQUIREMENT} numpy (once)...", flush=True)
    subprocess.run([sys.executable if not os.environ.get("BENCH_BASE_PYTHON") else os.environ["BENCH_BASE_PYTHON"],
                    "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", TORCH_REQUIREMENT, "numpy"], check=True)
    return str(python)


def best(func, reps: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(reps):
        started = time.perf_counter()
        value = func()
        times.append(time.perf_counter() - started)
    return min(times), value


def numpy_sort_bins(volume: np.ndarray, n_bins: int = 100) -> np.ndarray:
    """fastai's algorithm with numpy: sort everything, pick the order statistics, unique."""
    from node.imaging.equalise import order_statistic_indices

    ordered = np.sort(volume.reshape(-1))
    return np.unique(ordered[order_statistic_indices(ordered.size, n_bins)])


def lut_scaled_volume(volume: np.ndarray, edges: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """A sketch for comparison: hist_scaled through a table of one value per integer in range.

    Only valid for integral values (CT HU): np.interp runs on the ~3,000 table entries instead of
    on every voxel, then each cache-sized chunk is one int32 conversion and one gather.
    """
    low, high = int(volume.min()), int(volume.max())
    ys = np.linspace(0.0, 1.0, len(edges))
    table = np.clip(np.interp(np.arange(low, high + 1, dtype=np.float64), edges.astype(np.float64), ys),
                    0.0, 1.0).astype(np.float32)
    out = np.empty(volume.shape, dtype=np.float32)
    flat, flat_out = volume.reshape(-1), out.reshape(-1)
    index = np.empty(chunk, dtype=np.int32)
    for start in range(0, flat.size, chunk):
        values = flat[start:start + chunk]
        part = index[:values.size]
        part[...] = values
        part -= low
        np.take(table, part, out=flat_out[start:start + values.size])
    return out


def load_volume(files: list[Path]) -> np.ndarray:
    """The series as float32 HU (Modality LUT applied by the node's own to_hu)."""
    import pydicom

    from node.imaging import to_hu

    return np.stack([to_hu(pydicom.dcmread(path)).astype(np.float32) for path in files])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=os.environ.get("BENCH_TORCH_PYTHON"),
                        help="a python with torch (default: scripts/bench/.venv, created when missing)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from node.imaging.equalise import FrequencyHistogram, freqhist_bins, hist_scaled

    print(f"# equalisation benchmark\n{bl.machine_info()}")
    python = torch_python(args.torch_python)
    files = bl.ct_series(N)
    volume = load_volume(files)
    print(f"volume: {volume.shape} {volume.dtype}, {volume.nbytes / 1e6:.0f} MB, HU {volume.min():.0f}..{volume.max():.0f}")
    volume_path = bl.CACHE / "ct300-hu-float32.npy"
    np.save(volume_path, volume)
    bins_path = bl.CACHE / "fastai-bins.npy"

    started = time.perf_counter()
    result = subprocess.run([python, str(Path(__file__).with_name("fastai_equalise.py")), str(volume_path),
                             str(bins_path), str(args.reps)], capture_output=True, text=True)
    fastai_wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"fastai run failed:\n{result.stderr[-3000:]}")
    fastai = json.loads(result.stdout.strip().splitlines()[-1])
    fastai_bins = np.load(bins_path)

    ours_bins_s, ours_bins = best(lambda: freqhist_bins(volume), args.reps)
    ours_scaled_s, _ = best(lambda: hist_scaled(volume, ours_bins), args.reps)
    numpy_bins_s, numpy_bins = best(lambda: numpy_sort_bins(volume), args.reps)

    lut_s, lut_scaled = best(lambda: lut_scaled_volume(volume, ours_bins), args.reps)
    lut_same = np.array_equal(lut_scaled, hist_scaled(volume, ours_bins))
    del lut_scaled

    same = (np.array_equal(ours_bins, fastai_bins) and np.array_equal(ours_bins, numpy_bins)
            and ours_bins.dtype == fastai_bins.dtype == np.float32)
    print(f"bin edges: ours {len(ours_bins)}, fastai {len(fastai_bins)}, numpy sort {len(numpy_bins)}; "
          f"identical (values and float32 dtype): {'yes' if same else 'NO'}")
    if not same:
        print(f"  ours   {ours_bins[:8]} ... {ours_bins[-4:]}\n  fastai {fastai_bins[:8]} ... {fastai_bins[-4:]}")

    fastai_total = fastai["freqhist_bins"] + fastai["hist_scaled"]
    ours_total = ours_bins_s + ours_scaled_s
    rows = [
        ("freqhist_bins", ours_bins_s, fastai["freqhist_bins"], numpy_bins_s, fastai["freqhist_bins"] / ours_bins_s,
         numpy_bins_s / ours_bins_s),
        ("hist_scaled (given the bins)", ours_scaled_s, fastai["hist_scaled"], "-",
         fastai["hist_scaled"] / ours_scaled_s, "-"),
        ("freqhist_bins + hist_scaled", ours_total, fastai_total, "-", fastai_total / ours_total, "-"),
        (f"reference, not in node/: hist_scaled as a per-integer LUT (same output: {'yes' if lut_same else 'NO'})",
         lut_s, "-", "-", fastai["hist_scaled"] / lut_s, "-"),
    ]
    bl.print_table(["300 x 512 x 512 float32 HU", "ours s", f"fastai (torch {fastai['torch']}, "
                    f"{fastai['threads']} threads) s", "numpy sort s", "fastai / ours", "numpy / ours"], rows,
                   title=f"Whole-volume equalisation, best of {args.reps}")
    ratio_bins = fastai["freqhist_bins"] / ours_bins_s
    ratio_total = fastai_total / ours_total
    for name, ratio in (("freqhist_bins", ratio_bins), ("freqhist_bins + hist_scaled", ratio_total)):
        verdict = "PASS" if ratio >= TARGET else f"FAIL (short by {100 * (1 - ratio / TARGET):.0f}%)"
        print(f"fastai / ours, {name}: {ratio:.1f}x, target >= {TARGET:.0f}x: {verdict}")

    # Per-series equalisation as the node runs it: one slice at a time.
    def per_series_bins() -> np.ndarray:
        histogram = FrequencyHistogram()
        for slab in volume:
            histogram.add(slab)
        return histogram.bins(100)

    series_bins_s, series_edges = best(per_series_bins, args.reps)
    scale_s, _ = best(lambda: [hist_scaled(slab, series_edges) for slab in volume], args.reps)
    from_files_s, from_files_edges = best(lambda: _series_bins_from_files(files), 1)
    ok = np.array_equal(series_edges, ours_bins) and np.array_equal(from_files_edges, ours_bins)
    bl.print_table(
        ["per-series equalisation (the node's way)", "seconds", "slices/s"],
        [("FrequencyHistogram.add x 300 slices + bins(100), in memory", series_bins_s, N / series_bins_s),
         ("hist_scaled x 300 slices with the series bins", scale_s, N / scale_s),
         ("node.process.render.series_bins from the 300 files (decode + rescale + count)", from_files_s, N / from_files_s)],
        title=f"Per-series equalisation (edges equal to the whole-volume edges: {'yes' if ok else 'NO'})",
    )
    print(f"\n(fastai subprocess wall time incl. torch import and loading the volume: {fastai_wall:.1f} s)")
    print(f"\nat the end: {bl.load_average()}")
    return 0 if same and ok else 1


def _series_bins_from_files(files: list[Path]) -> np.ndarray:
    from node.config.pipeline import Equalise, OutputFormat, Pipeline
    from node.process.render import series_bins
    from node.process.series import open_images

    images, failures = open_images(files)
    assert not failures, failures[:3]
    pipeline = Pipeline(name="bench", output=OutputFormat("sc"), grey=False, rescale=True, clip=None,
                        display=Equalise(bins=100, per="series"))
    edges, failed = series_bins(pipeline, images)
    assert not failed and edges is not None
    return edges


if __name__ == "__main__":
    sys.exit(main())
