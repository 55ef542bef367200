"""The series view shows the histograms a running node kept when it processed the series (issue 17, part 3).

A real node (``dicom-node serve``) receives the shared real CT series by dcmtk's storescu, processes it
through per-series equalisation and the bone colour map, and delivers it to a folder.  The histograms
are counted while processing and kept beside the outputs (``.histogram.json``, never delivered); the
page ``/series/{id}`` draws them as inline SVG under the same Content-Security-Policy, without script,
and headless Chromium renders it: the screenshot is kept as ``test-artifacts/series-histogram.png``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from node.outputs.histogram import DATA_FILE, histogram_svg, read_histogram_data
from tests.support import (
    ROOT, NodeProcess, chromium_screenshot, copy_as_series, folder_route, free_port, node_config, require_test_data,
    storescu, wait_for,
)

ARTIFACTS = ROOT / "test-artifacts"
STEPS = [{"op": "rescale"}, {"op": "equalise", "per": "series"}, {"op": "colormap", "name": "bone"}]
BAR = (0x5B, 0x7A, 0xA5)  # the before bars
EDGE = (0xD9, 0x82, 0x2B)  # the equalisation edges


@dataclass
class Served:
    base: str
    ct: dict  # the CT series' job row (JSON)
    colour: dict  # the colour series' job row: failed (a colour map needs grey)
    out: Path  # the folder destination


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = require_test_data()
    root = tmp_path_factory.mktemp("node")
    port, http_port = free_port(), free_port()
    out = root / "out"
    config = node_config(root / "var", port, settle=0.5, http_port=http_port,
                         extra=folder_route(out, steps=STEPS, output="sc"))
    base = f"http://127.0.0.1:{http_port}"
    ct = sorted((data_dir / "ct_series" / "ge_head_tilt").glob("*.dcm"))
    colour = copy_as_series([data_dir / "color" / "US1_UNCR.dcm"], root / "colour")
    with NodeProcess(config, root, port=port) as running:
        for files in (ct, colour):
            sent = storescu("127.0.0.1", port, files, called_aet="DICOMNODE", calling_aet="MODALITY1")
            assert sent.returncode == 0, sent.stderr[-3000:]

        def settled() -> list[dict] | None:
            rows = requests.get(f"{base}/api/jobs", timeout=10).json()
            done = sorted(rows, key=lambda r: r["modality"]) if len(rows) == 2 else []
            return done if [r["state"] for r in done] == ["delivered", "failed"] else None

        rows = wait_for(settled, 180, "the CT delivered and the colour series failed", running.log)
        yield Served(base=base, ct=rows[0], colour=rows[1], out=out)


def page(served: Served, series_id: int) -> requests.Response:
    response = requests.get(f"{served.base}/series/{series_id}", timeout=30)
    assert response.status_code == 200
    return response


def test_histograms_are_kept_beside_the_outputs_and_not_delivered(served: Served) -> None:
    row = requests.get(f"{served.base}/api/jobs/{served.ct['id']}", timeout=10).json()
    folder = Path(row["output_dir"])
    assert (folder / DATA_FILE).is_file() and (folder / DATA_FILE).stat().st_size < 16_000
    histograms = read_histogram_data(folder)
    assert histograms.unit == "HU" and histograms.images == 28 and histograms.edges_of == "series"
    assert histograms.before.total == 28 * 512 * 512 and histograms.colormap == "bone"
    delivered = [p for p in served.out.rglob("*") if p.is_file()]
    assert len([p for p in delivered if p.suffix == ".dcm"]) == 28
    assert not [p for p in delivered if p.name == DATA_FILE]  # the folder's own .complete marker aside


def test_series_page_shows_the_histograms_inline(served: Served) -> None:
    response = page(served, served.ct["id"])
    status = requests.get(f"{served.base}/", timeout=10)
    policy = response.headers["Content-Security-Policy"]
    assert policy == status.headers["Content-Security-Policy"] and "script-src" not in policy
    assert "default-src 'none'" in policy
    body = response.text
    folder = Path(requests.get(f"{served.base}/api/jobs/{served.ct['id']}", timeout=10).json()["output_dir"])
    assert histogram_svg(read_histogram_data(folder)) in body  # the kept data, drawn as it is
    assert body.count("<svg") == 1 and "<script" not in body.lower() and "href=\"http" not in body


def test_series_without_histograms_says_why(served: Served) -> None:
    body = page(served, served.colour["id"]).text
    assert "<svg" not in body and "No histogram: the series has no outputs." in body


def test_an_altered_data_file_is_not_drawn(served: Served, tmp_path: Path) -> None:
    folder = Path(requests.get(f"{served.base}/api/jobs/{served.ct['id']}", timeout=10).json()["output_dir"])
    kept = tmp_path / "kept.json"
    shutil.copyfile(folder / DATA_FILE, kept)
    try:
        (folder / DATA_FILE).write_text('{"format": "dicom-node histograms 1", "unit": "<b>"}')
        body = page(served, served.ct["id"]).text
        assert "<svg" not in body and "<b>" not in body and "unreadable or not as the node wrote it" in body
    finally:
        shutil.copyfile(kept, folder / DATA_FILE)
    assert "<svg" in page(served, served.ct["id"]).text


def test_series_histogram_in_a_browser(served: Served, tmp_path: Path) -> None:
    """Headless Chromium draws the page with its histogram (no JavaScript); the screenshot is kept."""
    shot = tmp_path / "series-histogram.png"
    result = chromium_screenshot(f"{served.base}/series/{served.ct['id']}", shot, (1100, 1250), tmp_path)
    assert shot.is_file(), f"no screenshot (exit {result.returncode}):\n{result.stderr[-3000:]}"
    picture = Image.open(shot)
    picture.load()
    assert picture.size == (1100, 1250)
    rgb = np.asarray(picture.convert("RGB")).astype(int)

    def near(colour: tuple[int, int, int]) -> np.ndarray:
        return (np.abs(rgb - np.array(colour)).max(axis=2) <= 12)

    bars, edges = near(BAR), near(EDGE)
    assert bars.sum() > 800, "the before bars are drawn"
    assert edges.sum() > 300, "the equalisation edges are drawn"
    columns = np.flatnonzero(bars.any(axis=0))
    assert columns.max() - columns.min() > 300, "the bars spread from the padding (-1500 HU) past 0 HU"
    # the after bars in the colour map's colours: bone's light blue-greys
    bone_light = (rgb[..., 2] > rgb[..., 0] + 8) & (rgb[..., 1] > rgb[..., 0]) & (rgb[..., 0] > 120)
    assert bone_light.sum() > 500
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "series-histogram.png")
