"""Make the README's pictures of colour maps and histograms from the shared real CT (issue 17).

    python scripts/docs_images.py            # $DICOM_NODE_TEST_DATA, else ../shared/data/dicom

Writes, each through ``dicom-node process`` as a user runs it:

- ``docs/images/colormaps.png``: one slice in the brain window, grey | ``--cmap bone`` | ``--cmap ocean_r``;
- ``docs/images/histogram.png``: ``--equalise --per series --cmap bone --histogram FILE.png`` of the series;

and ``docs/images/series-histogram.png``, the status page's series view with its histogram as Chromium
draws it: the screenshot ``tests/test_histogram_page.py`` keeps in ``test-artifacts/`` (run here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
SLICE = "14.dcm"
TILE = 256  # pixels of each slice in the strip


def _data() -> Path:
    data = Path(os.environ.get("DICOM_NODE_TEST_DATA") or ROOT.parent / "shared" / "data" / "dicom")
    series = data / "ct_series" / "ge_head_tilt"
    if not series.is_dir():
        raise SystemExit(f"{series}: not there (set DICOM_NODE_TEST_DATA to the shared data folder)")
    return series


def _process(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "node", "process", *args], env=env, capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"dicom-node process {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def _one_png(folder: Path) -> Image.Image:
    (path,) = [p for p in folder.rglob("*.png") if not p.name.startswith(".")]
    return Image.open(path)


def colormaps(series: Path, work: Path) -> Path:
    """Grey, bone and ocean_r side by side: one slice, brain window, three runs of the command."""
    tiles = []
    for name in ("grey", "bone", "ocean_r"):
        out = work / name
        _process(str(series / SLICE), "--out", str(out), "--window", "brain", "--format", "png",
                 *(() if name == "grey" else ("--cmap", name)))
        tiles.append(_one_png(out).convert("RGB").resize((TILE, TILE), Image.Resampling.LANCZOS))
    strip = Image.new("RGB", (TILE * len(tiles), TILE))
    for index, tile in enumerate(tiles):
        strip.paste(tile, (index * TILE, 0))
    path = IMAGES / "colormaps.png"
    strip.save(path, optimize=True)
    return path


def histogram(series: Path, work: Path) -> Path:
    path = IMAGES / "histogram.png"
    _process(str(series), "--out", str(work / "eq"), "--equalise", "--per", "series", "--cmap", "bone",
             "--format", "png", "--histogram", str(path))
    return path


def series_view() -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_histogram_page.py", "-k", "browser"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"the series view test failed:\n{result.stdout[-3000:]}")
    path = IMAGES / "series-histogram.png"
    shutil.copyfile(ROOT / "test-artifacts" / "series-histogram.png", path)
    return path


def main() -> None:
    series = _data()
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for made in (colormaps(series, Path(work)), histogram(series, Path(work)), series_view()):
            print(made.relative_to(ROOT))


if __name__ == "__main__":
    main()
