"""Histograms (issue 17, part 3): counted while processing, checked against the pixels read back.

Before: the modality values (HU for the CT) of every source pixel, read independently with pydicom;
after: the levels of the written outputs, read back from the files; the equalisation edges: fastai's
``freqhist_bins`` of the values the pipeline equalised.  The pictures: SVG parsed as XML and PNG drawn by
matplotlib; the status page's rendering by Chromium is in test_http.py.
"""

from __future__ import annotations

import datetime
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import numpy as np
import pydicom
import pytest
from PIL import Image

from node.app.process_series import process_series
from node.config.pipeline import parse_steps
from node.imaging import freqhist_bins, to_hu
from node.imaging.histogram import ImageHistograms, SeriesHistograms, ValueHistogram
from node.imaging.source import DecodeLimits, ImageFile
from node.outputs.histogram import (
    DATA_FILE,
    HistogramDataError,
    histogram_data,
    histogram_figure,
    histogram_png,
    histogram_svg,
    read_histogram_data,
    write_histogram_data,
)
from node.process.render import FrameRenderer
from node.process.series import InputSeries, find_files, group_series, open_images
from tests.support import bundled, run_cli

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
SVG = "{http://www.w3.org/2000/svg}"


def outputs(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if not p.name.startswith("."))


def ct_series(ct_series_dir: Path) -> InputSeries:
    images, failures = open_images(list(find_files([ct_series_dir])), DecodeLimits.from_mb(2048, 512))
    assert not [f for f in failures if f.path.suffix == ".dcm"]
    (series,) = group_series(images)
    return series


def all_hu(ct_series_dir: Path) -> np.ndarray:
    return np.concatenate([to_hu(pydicom.dcmread(p)).reshape(-1) for p in sorted(ct_series_dir.glob("*.dcm"))])


def counts_on(histogram: ValueHistogram, values: np.ndarray) -> np.ndarray:
    """numpy's own histogram of *values* on *histogram*'s bins."""
    counts, _ = np.histogram(values.astype(np.float64), bins=histogram.edges())
    return counts


# --------------------------------------------------------------------------- the counting


@pytest.mark.parametrize("max_bins", [2, 7, 512, 4096])
def test_value_histogram_is_numpys_on_its_bins(max_bins: int) -> None:
    rng = np.random.default_rng(17)
    parts = [rng.integers(-1024, 3071, (64, 64)), rng.integers(-3000, 10, 500).astype(np.float32),
             rng.normal(0, 3, 700) * 0.37, np.array([5e6])]
    whole = ValueHistogram(max_bins)
    for part in parts:
        whole.add(part)
    values = np.concatenate([p.reshape(-1).astype(np.float64) for p in parts])
    assert whole.counts.size <= max_bins and whole.total == values.size
    assert np.array_equal(whole.counts, counts_on(whole, values))
    merged = ValueHistogram(max_bins)
    for part in reversed(parts):
        one = ValueHistogram(max_bins)
        one.add(part)
        merged.merge(one)
    assert merged.width == whole.width
    trimmed = merged.trimmed()
    assert np.array_equal(trimmed.counts, counts_on(trimmed, values))
    small = whole.coarsened(3)
    assert small.counts.size <= 3 and np.array_equal(small.counts, counts_on(small, values))


def test_value_histogram_weights_and_what_it_leaves_out() -> None:
    values = np.array([-1000, 0, 40, 40, 3000], dtype=np.int16)
    table, counts = np.unique(values, return_counts=True)
    weighted, plain = ValueHistogram(), ValueHistogram()
    weighted.add(table, counts)
    plain.add(np.array([np.nan, np.inf, *values.tolist(), -np.inf]))
    assert weighted.total == plain.total == 5 and weighted.width == 1.0
    assert np.array_equal(weighted.trimmed().counts, plain.trimmed().counts)
    assert weighted.trimmed().edges()[0] == -1000 and weighted.trimmed().edges()[-1] == 3001


@pytest.mark.parametrize("steps", [
    [{"op": "rescale"}, {"op": "window", "preset": "brain"}],
    [{"op": "rescale"}, {"op": "clip", "min": -200, "max": 300}, {"op": "equalise"}],
    [{"op": "rescale"}, {"op": "channels", "windows": ["brain", "subdural"], "equalise": True}],
    [{"op": "rescale"}, {"op": "window", "preset": "lungs"}, {"op": "colormap", "name": "bone"}],
], ids=["window", "clip+equalise", "channels", "colormap"])
def test_same_counts_with_and_without_the_lookup_table(steps: list) -> None:
    image = ImageFile.open(bundled("CT_small.dcm"))
    arr = next(image.iter_frames())
    pipeline = parse_steps("p", steps)
    counted = []
    for table in (True, False):
        histograms = ImageHistograms(256, 3 if steps[1]["op"] == "channels" else 1)
        FrameRenderer(pipeline, image, lookup_table=table, histograms=histograms).render(arr, 0)
        counted.append(histograms)
    assert np.array_equal(counted[0].after, counted[1].after) and counted[0].after.sum() == arr.size * (
        counted[0].after.shape[0])
    assert np.array_equal(counted[0].before.counts, counted[1].before.counts)
    assert counted[0].before.first == counted[1].before.first
    hu = to_hu(pydicom.dcmread(bundled("CT_small.dcm")))
    assert np.array_equal(counted[0].before.counts, counts_on(counted[0].before, hu))  # before the clip


def test_ct_series_before_after_and_series_edges(ct_series_dir: Path, tmp_path: Path) -> None:
    pipeline = parse_steps("eq", [{"op": "rescale"}, {"op": "equalise", "per": "series"}], "png")
    result = process_series(ct_series(ct_series_dir), pipeline, tmp_path, now=NOW, histograms=True)
    histograms = result.histograms
    assert histograms is not None and histograms.unit == "HU" and histograms.images == 28
    hu = all_hu(ct_series_dir)
    assert histograms.before.total == hu.size == 28 * 512 * 512
    assert np.array_equal(histograms.before.counts, counts_on(histograms.before, hu))
    assert histograms.before.width == 1.0  # whole HU: one bin each
    written = np.concatenate([np.array(Image.open(p)).reshape(-1) for p in outputs(tmp_path, ".png")])
    assert np.array_equal(histograms.after[0], np.bincount(written, minlength=256))
    assert histograms.edges_of == "series"
    assert np.array_equal(histograms.edges, freqhist_bins(hu, 100).astype(np.float64))
    assert histograms.edge_count == len(histograms.edges) < 102  # duplicates dropped, as fastai does


def test_ct_series_per_image_edges_are_the_middle_images(ct_series_dir: Path, tmp_path: Path) -> None:
    series = ct_series(ct_series_dir)
    pipeline = parse_steps("eq", [{"op": "rescale"}, {"op": "clip", "min": -1100}, {"op": "equalise", "bins": 50}])
    result = process_series(series, pipeline, tmp_path, now=NOW, histograms=True)
    histograms = result.histograms
    middle = series.images[14]
    hu = to_hu(pydicom.dcmread(middle.path))
    assert histograms.edges_of == "image 15 of 28" and histograms.clip == (-1100.0, None)
    assert np.array_equal(histograms.edges, freqhist_bins(np.clip(hu, -1100, None), 50).astype(np.float64))
    assert histograms.before.counts.sum() == 28 * 512 * 512
    assert histograms.before.edges()[0] <= hu.min() < -1100  # before is unclipped
    written = np.concatenate([pydicom.dcmread(p).pixel_array.reshape(-1) for p in outputs(tmp_path, ".dcm")])
    assert np.array_equal(histograms.after[0], np.bincount(written, minlength=256))


def test_16_bit_multiframe_and_colour_sources(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "multiframe" / "siemens_xa10_enhanced_mr_6frames.dcm"
    images, _ = open_images([source])
    series = InputSeries(images[0].header.StudyInstanceUID, images[0].header.SeriesInstanceUID, images)
    result = process_series(series, parse_steps("mr", [{"op": "rescale"}], "sc16"), tmp_path / "mr", now=NOW,
                            histograms=True)
    histograms = result.histograms
    assert histograms.bits == 16 and histograms.after.shape == (1, 65536) and histograms.unit == "modality value"
    (sc,) = outputs(tmp_path / "mr", ".dcm")
    assert np.array_equal(histograms.after[0], np.bincount(pydicom.dcmread(sc).pixel_array.reshape(-1),
                                                           minlength=65536))
    assert histograms.before.total == 6 * 64 * 64
    colour, _ = open_images([data_dir / "color" / "US1_UNCR.dcm"])
    series = InputSeries("1.2", "1.2.3", colour)
    passed = process_series(series, parse_steps("c", [], "png"), tmp_path / "c", now=NOW, histograms=True)
    assert passed.histograms is None and len(passed.outputs) == 1  # colour passed through: nothing to count
    grey = process_series(series, parse_steps("g", [{"op": "grey"}], "png"), tmp_path / "g", now=NOW, histograms=True)
    assert grey.histograms.unit == "luma" and grey.histograms.before.total == 480 * 640


# --------------------------------------------------------------------------- the data file and pictures


@pytest.fixture(scope="module")
def equalised(tmp_path_factory: pytest.TempPathFactory) -> SeriesHistograms:
    """CT_small through clip + per-image equalisation + bone: every part of the picture."""
    images, _ = open_images([bundled("CT_small.dcm")])
    series = InputSeries("1.2", "1.2.3", images)
    pipeline = parse_steps("p", [{"op": "rescale"}, {"op": "clip", "min": -100, "max": 800},
                                 {"op": "equalise", "bins": 20}, {"op": "colormap", "name": "bone"}], "png")
    result = process_series(series, pipeline, tmp_path_factory.mktemp("eq"), now=NOW, histograms=True)
    assert result.histograms is not None
    return result.histograms


def test_data_file_round_trip_draws_the_same_picture(equalised: SeriesHistograms, tmp_path: Path) -> None:
    path = write_histogram_data(tmp_path, equalised)
    assert path == tmp_path / DATA_FILE and path.stat().st_size < 16_000
    back = read_histogram_data(tmp_path)
    assert back is not None and back.edges_of == "image 1 of 1" and back.colormap == "bone"
    assert histogram_svg(back) == histogram_svg(equalised)
    assert read_histogram_data(tmp_path / "nothing here") is None


@pytest.mark.parametrize("change", [
    lambda d: d.update(format="other"),
    lambda d: d.update(unit="<script>"),
    lambda d: d["before"].update(width=3.0),
    lambda d: d["before"].update(counts=[1, -2]),
    lambda d: d["before"].update(counts=[0] * 513),
    lambda d: d.update(after=[[1.5]]),
    lambda d: d.update(channels=["a", "b"]),
    lambda d: d.update(edges=[3.0, 2.0]),
    lambda d: d.update(edges=["1"]),
    lambda d: d.update(clip=[1]),
    lambda d: d.update(colormap="x" * 65),
    lambda d: d.update(bits=12),
], ids=["format", "unit", "width", "negative", "too-many", "fraction", "channels", "edges-order", "edge-text",
        "clip", "long-text", "bits"])
def test_a_data_file_not_as_written_is_refused(equalised: SeriesHistograms, tmp_path: Path, change) -> None:
    data = json.loads(json.dumps(histogram_data(equalised)))
    change(data)
    (tmp_path / DATA_FILE).write_text(json.dumps(data))
    with pytest.raises(HistogramDataError, match="not a histogram data file"):
        read_histogram_data(tmp_path)


def test_a_huge_or_broken_data_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / DATA_FILE).write_bytes(b" " * (1 << 20) + b"{}")
    with pytest.raises(HistogramDataError, match="larger than"):
        read_histogram_data(tmp_path)
    (tmp_path / DATA_FILE).write_text("{not json")
    with pytest.raises(HistogramDataError):
        read_histogram_data(tmp_path)


def test_svg_is_numbers_and_escaped_words(equalised: SeriesHistograms) -> None:
    svg = histogram_svg(equalised)
    root = ET.fromstring(svg)  # well formed
    tags = {element.tag.removeprefix(SVG) for element in root.iter()}
    assert tags <= {"svg", "rect", "text", "line", "g", "polyline"}
    attributes = {name for element in root.iter() for name in element.attrib}
    assert not {a for a in attributes if a.lower().startswith("on") or "href" in a.lower()}
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert "Before processing" in texts and "After processing" in texts and "HU" in texts
    assert f"{len(equalised.edges)} equalisation bin edges of image 1 of 1" in texts
    assert "clip -100 .. 800" in texts and "grey level (8-bit) coloured by bone" in texts
    edge_lines = [e for e in root.iter(f"{SVG}line") if e.get("stroke") == "#d9822b"]
    assert len(edge_lines) == len(equalised.edges)
    # each after bar (two levels) takes the colour matplotlib gives its upper level
    bone = matplotlib.colormaps["bone"]
    expected = {"#{:02x}{:02x}{:02x}".format(*bone(2 * i + 1, bytes=True)[:3])
                for i in np.flatnonzero(equalised.after[0].reshape(128, 2).sum(axis=1))}
    fills = {e.get("fill") for e in root.iter(f"{SVG}rect")}
    assert len(expected) > 10 and expected <= fills
    hostile = SeriesHistograms(before=equalised.before, after=equalised.after, bits=8, unit="HU",
                               colormap='<script>alert("x")</script>', channels=("grey",), images=1)
    svg = histogram_svg(hostile)
    assert "<script" not in svg and "&lt;script&gt;" in svg
    ET.fromstring(svg)


def test_png_is_drawn_by_matplotlib(equalised: SeriesHistograms, tmp_path: Path) -> None:
    path = tmp_path / "h.png"
    path.write_bytes(histogram_png(equalised))
    picture = np.array(Image.open(path).convert("RGB"))
    svg = ET.fromstring(histogram_svg(equalised))
    assert picture.shape == (int(svg.get("height")), int(svg.get("width")), 3) == (558, 720, 3)  # the SVG's size
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # bars, lines, text: not blank
    figure = histogram_figure(equalised)
    assert [p.title for p in figure.panels] == ["Before processing", "After processing"]
    assert figure.panels[1].fills is not None and len(figure.panels[1].fills) == 128


# --------------------------------------------------------------------------- the command


def test_cli_histogram_svg_and_png(ct_series_dir: Path, tmp_path: Path) -> None:
    svg, png = tmp_path / "eq.svg", tmp_path / "eq.png"
    result = run_cli("process", str(ct_series_dir), "--out", str(tmp_path / "a"), "--equalise", "--per", "series",
                     "--cmap", "ocean_r", "--format", "png", "--histogram", str(svg))
    assert result.returncode == 0, result.stderr
    assert f"histogram written to {svg}" in result.stderr
    root = ET.parse(svg).getroot()
    texts = [e.text for e in root.iter(f"{SVG}text")]
    assert "Value histograms: 28 images, 7,340,032 pixels" in texts
    assert any(t.endswith("equalisation bin edges of series") for t in texts)
    assert not list((tmp_path / "a").rglob(DATA_FILE))  # the command writes only the picture asked for
    result = run_cli("process", str(ct_series_dir), "--out", str(tmp_path / "b"), "--window", "brain",
                     "--histogram", str(png))
    assert result.returncode == 0, result.stderr
    assert Image.open(png).size == (720, 558)


def test_cli_histogram_several_series_and_errors(data_dir: Path, tmp_path: Path) -> None:
    mr = data_dir / "multiframe"
    result = run_cli("process", str(mr), "--out", str(tmp_path / "a"), "--histogram", str(tmp_path / "h.svg"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("h*.svg")) == ["h-1.svg", "h-2.svg"]
    result = run_cli("process", str(mr), "--out", str(tmp_path / "b"), "--histogram", str(tmp_path / "h.jpg"))
    assert result.returncode == 2 and "write FILE.svg or FILE.png" in result.stderr
    colour = data_dir / "color" / "US1_UNCR.dcm"
    result = run_cli("process", str(colour), "--out", str(tmp_path / "c"), "--format", "png",
                     "--histogram", str(tmp_path / "c.svg"))
    assert result.returncode == 0 and "no histogram written" in result.stderr and not (tmp_path / "c.svg").exists()
    (tmp_path / "a file").write_text("not a folder")
    result = run_cli("process", str(bundled("CT_small.dcm")), "--out", str(tmp_path / "d"),
                     "--histogram", str(tmp_path / "a file" / "d.svg"))
    assert result.returncode == 1 and "cannot write the histogram" in result.stderr
