"""Modality LUT stage: Hounsfield units and other modality values, against pydicom."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from node.imaging import ImageFile, rescale_frame, to_hu
from tests.support import bundled


def test_ct_small_hu_equal_pydicom() -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    hu = to_hu(ds)
    assert hu.dtype == np.float32
    assert np.array_equal(hu, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


def test_real_ct_series_hu(ct_series_dir: Path) -> None:
    # The data README: pixels signed and already HU (slope 1, intercept 0), -1500..1712 on the first slice.
    for path in sorted(ct_series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = to_hu(ds)
        assert np.array_equal(hu, apply_modality_lut(ds.pixel_array, ds)), path.name
    first = to_hu(pydicom.dcmread(ct_series_dir / "01.dcm"))
    assert (first.min(), first.max()) == (-1500.0, 1712.0)
    air = first[5:20, 5:20]  # a corner outside the head: air or the scanner's padding
    assert air.max() <= -900


def test_fractional_slope_mr(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "compressed" / "MR2_J2KI.dcm")
    hu = to_hu(ds)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(hu, expected, rtol=1e-6)


def test_modality_lut_sequence(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "lut" / "mlut_18.dcm")
    assert "ModalityLUTSequence" in ds
    values = to_hu(ds)
    assert np.array_equal(values, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert not np.array_equal(values, ds.pixel_array.astype(np.float32))  # the LUT really maps


def test_enhanced_per_frame_rescale(data_dir: Path, tmp_path: Path) -> None:
    # A real enhanced MR given a different rescale on frame 2 in its per-frame functional groups.
    ds = pydicom.dcmread(data_dir / "multiframe" / "siemens_xa10_enhanced_mr_6frames.dcm")
    item = ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence[0]
    item.RescaleSlope, item.RescaleIntercept = 2, -100
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    assert np.array_equal(to_hu(ds, frame=2), raw[2] * 2.0 - 100)
    assert np.array_equal(to_hu(ds, frame=1), raw[1].astype(np.float32))
    volume = to_hu(ds)
    assert volume.shape == raw.shape and np.array_equal(volume[2], raw[2] * 2.0 - 100)
    # the streaming path gives the same frames
    image = ImageFile.open(path)
    for index, frame in enumerate(image.iter_frames()):
        assert np.array_equal(rescale_frame(frame, image.header, index), volume[index])


def test_transfer_syntaxes_decode_identically(data_dir: Path) -> None:
    # One MR image in 9 transfer syntaxes (explicit/implicit/big endian, RLE, JPEG lossless,
    # JPEG-LS, JPEG 2000 lossless): the pylibjpeg plugins must decode them all, identically.
    reference = to_hu(pydicom.dcmread(data_dir / "transfer_syntaxes" / "1.dcm"))
    for number in range(2, 10):
        path = data_dir / "transfer_syntaxes" / f"{number}.dcm"
        frames = list(ImageFile.open(path).iter_frames())
        assert len(frames) == 1
        assert np.array_equal(frames[0].astype(np.float32), reference), path.name


def test_dataset_is_not_modified() -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    before = copy.deepcopy(ds)
    to_hu(ds)
    assert ds == before


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_bundled_mr_in_many_syntaxes(name: str) -> None:
    reference = to_hu(pydicom.dcmread(bundled("MR_small.dcm")))
    frames = list(ImageFile.open(bundled(name)).iter_frames())
    assert np.array_equal(frames[0].astype(np.float32), reference)
