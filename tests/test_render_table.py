"""The render lookup table: rendering each stored value once gives the same pixels as every pixel.

``FrameRenderer(..., lookup_table=False)`` renders every pixel (the path that is compared with
dcm2pnm elsewhere); the default renders each value of the frame's range once and looks the
pixels up where that is exact.  Every pipeline here must give identical arrays both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import node.process.render
from node.imaging.source import ImageFile, UnsupportedImage
from node.imaging.voi import WINDOWS, VOIFunction, Window, window_scaled
from node.config.pipeline import Channels, Clip, Equalise, OutputFormat, Pipeline, WindowSpec
from node.process.render import FrameRenderer, series_bins
from tests.support import TEST_DATA_ENV, bundled

# pydicom warns about applying a VOI LUT to float values (as the node always has)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BRAIN = WindowSpec(window=WINDOWS["brain"], name="brain")
SUBDURAL = WindowSpec(window=WINDOWS["subdural"], name="subdural")
BONE = WindowSpec(window=WINDOWS["brain_bone"], name="brain_bone")
LUNGS = WindowSpec(window=WINDOWS["lungs"], name="lungs")

PIPELINES: dict[str, Pipeline] = {
    "brain": Pipeline(name="t", display=BRAIN),
    "brain sc16": Pipeline(name="t", output=OutputFormat.SC16, display=BRAIN),
    "lungs png16": Pipeline(name="t", output=OutputFormat.PNG16, display=LUNGS),
    "linear explicit": Pipeline(name="t", display=WindowSpec(window=Window(1000.5, 700.0))),
    "linear width 1": Pipeline(name="t", display=WindowSpec(window=Window(1100.0, 1.0))),
    "linear exact": Pipeline(name="t", display=WindowSpec(window=Window(1050.0, 333.0, VOIFunction.LINEAR_EXACT))),
    "sigmoid": Pipeline(name="t", display=WindowSpec(window=Window(1000.0, 500.0, VOIFunction.SIGMOID))),
    "sigmoid png16": Pipeline(
        name="t", output=OutputFormat.PNG16, display=WindowSpec(window=Window(40.0, 400.0, VOIFunction.SIGMOID))
    ),
    "file window": Pipeline(name="t", display=WindowSpec(from_file=True)),
    "no rescale": Pipeline(name="t", rescale=False, display=WindowSpec(window=Window(1100.0, 2000.0))),
    "clip + window": Pipeline(name="t", clip=Clip(-200.0, 150.0), display=BRAIN),
    "clip min only + window": Pipeline(name="t", clip=Clip(0.0, None), display=BONE),
    "clip, default display": Pipeline(name="t", clip=Clip(-100.0, 1300.0)),
    "clip, default display sc16": Pipeline(name="t", output=OutputFormat.SC16, clip=Clip(-100.0, 1300.0)),
    "default display": Pipeline(name="t"),
    "channels": Pipeline(name="t", display=Channels(windows=(BRAIN, SUBDURAL, BONE))),
    "channels + series equalise": Pipeline(
        name="t", display=Channels(windows=(BRAIN, LUNGS), equalise=Equalise(per="series"))
    ),
    "channels + image equalise": Pipeline(
        name="t", display=Channels(windows=(BRAIN,), equalise=Equalise(per="image"))
    ),
    "equalise series": Pipeline(name="t", display=Equalise(bins=100, per="series")),
    "equalise series png16": Pipeline(name="t", output=OutputFormat.PNG16, display=Equalise(per="series")),
    "equalise image": Pipeline(name="t", display=Equalise(bins=100, per="image")),
    "equalise image sc16": Pipeline(name="t", output=OutputFormat.SC16, display=Equalise(bins=50, per="image")),
}

# decodable bundled grey files: int16 CT (table), int16 MR (64 x 64: range too wide for a
# table), big endian, uint16 12-bit, JPEG 2000 int16, JPEG-LS 8- and 16-bit, 1-bit enhanced
# (per-frame groups), uint32 15-frame dose
BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "examples_overlay.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "JPGExtended.dcm",
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "liver_1frame.dcm",
    "rtdose.dcm",
]


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


# --- files made from bundled ones: MONOCHROME1, 8-bit, VOI LUT / Modality LUT sequences,
# fractional slope, enhanced multi-frame with per-frame rescale and windows


def _ct() -> Dataset:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 1000, 600
    return ds


def _save(ds: Dataset, folder: Path, name: str) -> Path:
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _monochrome1(ds: Dataset) -> None:
    ds.PhotometricInterpretation = "MONOCHROME1"


def _eight_bit(ds: Dataset) -> None:
    arr = ds.pixel_array
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = ((arr.astype(np.int32) - arr.min()) // 9).astype(np.uint8).tobytes()
    ds.WindowCenter, ds.WindowWidth = 100, 120


def _fractional_slope(ds: Dataset) -> None:
    ds.RescaleSlope, ds.RescaleIntercept = "0.37", "-12.25"
    ds.WindowCenter, ds.WindowWidth = 300, 400


def _lut(entries: int, first: int, bits: int, data: list[int]) -> Dataset:
    """A LUT item with LUT Descriptor and LUT Data as US (ambiguous VRs made explicit)."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [entries, first, bits])
    item.add_new("LUTData", "US", data)
    return item


def _voi_lut(ds: Dataset) -> None:
    item = _lut(1024, 700, 12, list(range(4095, -1, -4)))  # falling
    ds.VOILUTSequence = Sequence([item])
    del ds.WindowCenter, ds.WindowWidth


def _modality_lut(ds: Dataset) -> None:
    item = _lut(2048, 200, 16, [int(v) for v in np.sin(np.arange(2048) / 90.0) * 20000 + 30000])  # not monotonic
    item.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = Sequence([item])
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.WindowCenter, ds.WindowWidth = 30000, 30000


def _no_window(ds: Dataset) -> None:
    del ds.WindowCenter, ds.WindowWidth  # the default display falls back to the frame's range


def _enhanced(ds: Dataset) -> None:
    """Three frames, each with its own rescale and window (per-frame functional groups)."""
    arr = ds.pixel_array.astype(np.int32)
    frames = [arr, arr + 37, arr // 2 - 300]
    ds.PixelData = np.stack(frames).astype(np.int16).tobytes()
    ds.NumberOfFrames = len(frames)
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    per_frame = []
    for index, (slope, intercept, center, width) in enumerate(
        [(1, -1024, 40, 80), (2, 0, 2000, 1500), (0.5, 100, 400, 300)]
    ):
        transform, voi, group = Dataset(), Dataset(), Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "US"
        voi.WindowCenter, voi.WindowWidth = center, width
        if index == 2:
            voi.VOILUTFunction = "SIGMOID"
        group.PixelValueTransformationSequence = Sequence([transform])
        group.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)


MADE: dict[str, list[Callable[[Dataset], None]]] = {
    "monochrome1": [_monochrome1],
    "8-bit": [_eight_bit],
    "8-bit monochrome1": [_eight_bit, _monochrome1],
    "fractional slope": [_fractional_slope],
    "voi lut sequence": [_voi_lut],
    "voi lut sequence monochrome1": [_voi_lut, _monochrome1],
    "modality lut sequence": [_modality_lut],
    "no window": [_no_window],
    "modality lut sequence, no window": [_modality_lut, _no_window],
    "enhanced multi-frame": [_enhanced],
    "enhanced multi-frame monochrome1": [_enhanced, _monochrome1],
}


@pytest.fixture(scope="module")
def made_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("made")
    paths = {}
    for name, edits in MADE.items():
        ds = _ct()
        for edit in edits:
            edit(ds)
        paths[name] = _save(ds, folder, name.replace(" ", "_"))
    return paths


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
    shapes: list[tuple[int, ...]] = []
    real = node.process.render.modality_values

    def spy(arr: np.ndarray, *args: object) -> np.ndarray:
        shapes.append(arr.shape)
        return real(arr, *args)

    monkeypatch.setattr(node.process.render, "modality_values", spy)
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
