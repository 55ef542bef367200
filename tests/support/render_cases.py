"""The cases every rendering path must render alike: pipelines, bundled files and files made from them.

:data:`PIPELINES` (by name) covers each display (windows, sigmoid, clip, channels, equalisation)
and output depth; :data:`BUNDLED` names decodable grey files of pydicom's own test data;
:data:`MADE` edits CT_small into the cases pydicom has no file of (MONOCHROME1, 8-bit, VOI LUT and
Modality LUT sequences, a fractional slope, an enhanced multi-frame with per-frame functional
groups), written by the fixture ``made_files`` (import it into the test module).
:func:`modality_value_shapes` records what the renderer hands to ``modality_values``.
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
from node.config.pipeline import Channels, Clip, Equalise, OutputFormat, Pipeline, WindowSpec
from node.imaging.voi import WINDOWS, VOIFunction, Window
from tests.support.tools import bundled

__all__ = ["BUNDLED", "MADE", "PIPELINES", "made_files", "modality_value_shapes"]

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
    """Each :data:`MADE` case as a file, by name (one folder per test module)."""
    folder = tmp_path_factory.mktemp("made")
    paths = {}
    for name, edits in MADE.items():
        ds = _ct()
        for edit in edits:
            edit(ds)
        paths[name] = _save(ds, folder, name.replace(" ", "_"))
    return paths


def modality_value_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the arrays the renderer hands to ``modality_values`` from now on (the list grows)."""
    shapes: list[tuple[int, ...]] = []
    real = node.process.render.modality_values

    def spy(values: np.ndarray, *args: object) -> np.ndarray:
        shapes.append(values.shape)
        return real(values, *args)

    monkeypatch.setattr(node.process.render, "modality_values", spy)
    return shapes
