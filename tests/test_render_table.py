"""The render lookup table: rendering each stored value once gives the same pixels as every pixel.

``FrameRenderer(..., lookup_table=False)`` renders every pixel (the path that is compared with
dcm2pnm elsewhere); the default renders each value of the frame's range once and looks the
pixels up where that is exact.  Every pipeline here must give identical arrays both ways.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.imaging.source import ImageFile, UnsupportedImage
from node.imaging.voi import window_scaled
from node.config.pipeline import Pipeline
from node.process.render import FrameRenderer, series_bins
from tests.support import TEST_DATA_ENV, bundled
from tests.support.render_cases import (  # noqa: F401 - made_files is a fixture
    BUNDLED, MADE, PIPELINES, made_files, modality_value_shapes,
)

# pydicom warns about applying a VOI LUT to float values (as the node always has)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _render(renderer: FrameRenderer, arr: np.ndarray, index: int) -> np.ndarray | str:
    """The rendered frame, or the error it raised (both paths must fail alike)."""
    try:
        return renderer.render(arr, index)
    except (UnsupportedImage, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def assert_same_both_ways(path: Path, pipeline: Pipeline) -> None:
    """Every frame of *path* renders to identical arrays with and without the lookup table."""
    image = ImageFile.open(path)
    bins, failures = series_bins(pipeline, [image])
    assert not failures
    with_table = FrameRenderer(pipeline, image, bins)
    every_pixel = FrameRenderer(pipeline, image, bins, lookup_table=False)
    for index, arr in enumerate(image.iter_frames()):
        fast, slow = _render(with_table, arr, index), _render(every_pixel, arr, index)
        if isinstance(slow, str) or isinstance(fast, str):
            assert fast == slow, f"frame {index}"
            continue
        assert fast.dtype == slow.dtype and fast.shape == slow.shape, f"frame {index}"
        assert np.array_equal(fast, slow), (
            f"frame {index}: {np.count_nonzero(fast != slow)} pixels differ"
        )


@pytest.mark.parametrize("pipeline", PIPELINES, ids=str)
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files_same_with_and_without_table(name: str, pipeline: str) -> None:
    assert_same_both_ways(bundled(name), PIPELINES[pipeline])


@pytest.mark.parametrize("pipeline", PIPELINES, ids=str)
@pytest.mark.parametrize("made", MADE)
def test_made_files_same_with_and_without_table(made_files: dict[str, Path], made: str, pipeline: str) -> None:
    assert_same_both_ways(made_files[made], PIPELINES[pipeline])


def _is_grey_image(path: Path) -> bool:
    try:
        return ImageFile.open(path).is_grey
    except UnsupportedImage:  # not an image this node reads: nothing to render
        return False


def _real_files() -> list[Path]:
    """The shared real files this comparison applies to: grey images the node reads."""
    import os

    root = os.environ.get(TEST_DATA_ENV)
    if not root:
        return []
    found = []
    for folder in ("mono1", "lut", "multiframe", "compressed", "transfer_syntaxes"):
        found += sorted((Path(root) / folder).glob("*.dcm"))
    found += sorted((Path(root) / "ct_series" / "ge_head_tilt").glob("*"))[:2]
    return [path for path in found if _is_grey_image(path)]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=str)
@pytest.mark.parametrize("path", _real_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_data_same_with_and_without_table(path: Path, pipeline: str) -> None:
    assert_same_both_ways(path, PIPELINES[pipeline])


def _table_calls(monkeypatch: pytest.MonkeyPatch, path: Path, pipeline: Pipeline) -> list[tuple[int, ...]]:
    """Shapes that ``modality_values`` was given while rendering the first frame of *path*."""
    image = ImageFile.open(path)
    arr = next(image.iter_frames())
    bins, _ = series_bins(pipeline, [image])
    shapes = modality_value_shapes(monkeypatch)
    FrameRenderer(pipeline, image, bins).render(arr, 0)
    return shapes


@pytest.mark.parametrize(
    "pipeline", ["brain", "sigmoid png16", "channels", "equalise series", "clip, default display"]
)
def test_ct_takes_the_table(monkeypatch: pytest.MonkeyPatch, pipeline: str) -> None:
    path = bundled("CT_small.dcm")
    arr = next(ImageFile.open(path).iter_frames())
    entries = int(arr.max()) - int(arr.min()) + 1
    assert 1 < entries < arr.size // 4
    assert _table_calls(monkeypatch, path, PIPELINES[pipeline]) == [(entries,)]


def test_big_endian_frame_through_the_table() -> None:
    image = ImageFile.open(bundled("CT_small.dcm"))
    arr = next(image.iter_frames())
    swapped = arr.astype(arr.dtype.newbyteorder(">"))
    expected = FrameRenderer(PIPELINES["brain"], image, lookup_table=False).render(arr, 0)
    assert np.array_equal(FrameRenderer(PIPELINES["brain"], image).render(swapped, 0), expected)


@pytest.mark.parametrize("pipeline", ["file window", "default display"])
def test_file_window_takes_the_table(
    monkeypatch: pytest.MonkeyPatch, made_files: dict[str, Path], pipeline: str
) -> None:
    assert _table_calls(monkeypatch, made_files["monochrome1"], PIPELINES[pipeline]) == [(2064,)]


@pytest.mark.parametrize("pipeline", ["equalise image", "channels + image equalise"])
def test_per_image_equalisation_renders_every_pixel(monkeypatch: pytest.MonkeyPatch, pipeline: str) -> None:
    assert _table_calls(monkeypatch, bundled("CT_small.dcm"), PIPELINES[pipeline]) == [(128, 128)]


def test_default_display_without_a_window_renders_every_pixel(
    monkeypatch: pytest.MonkeyPatch, made_files: dict[str, Path]
) -> None:
    assert _table_calls(monkeypatch, made_files["no window"], PIPELINES["default display"]) == [(128, 128)]


def test_range_too_wide_for_the_pixels_renders_every_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _table_calls(monkeypatch, bundled("MR_small.dcm"), PIPELINES["brain"]) == [(64, 64)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("width", [1.0, 37.0, 500.0, 4000.0])
def test_sigmoid_does_not_depend_on_the_array_around_a_value(width: float) -> None:
    """numpy's vectorised exp gives each value the same result alone, offset or in a long array."""
    x = np.arange(-3000, 3001, dtype=np.float64)
    whole = window_scaled(x, 40.0, width, "SIGMOID", out_max=255.0)
    alone = np.array([window_scaled(x[i : i + 1], 40.0, width, "SIGMOID", out_max=255.0)[0] for i in range(x.size)])
    shifted = window_scaled(x[3:].copy(), 40.0, width, "SIGMOID", out_max=255.0)
    assert np.array_equal(whole, alone)
    assert np.array_equal(whole[3:], shifted)
