"""Opening files: every bad input ends in one clear error naming the file and the tag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.imaging import ImageFile, UnsupportedImage
from node.imaging.source import MAX_DECODED_BYTES, NotDicom
from tests.conftest import bundled


def reason(path: Path) -> str:
    with pytest.raises(UnsupportedImage) as info:
        image = ImageFile.open(path)
        list(image.iter_frames())
    assert str(path) in str(info.value)
    return info.value.reason


def test_truncated_jpeg2000(data_dir: Path) -> None:
    assert "cut short" in reason(data_dir / "broken" / "emri_small_jpeg_2k_lossless_too_short.dcm")


def test_native_pixel_data_shorter_than_its_dimensions() -> None:
    text = reason(bundled("MR_truncated.dcm"))
    assert "Pixel Data (7FE0,0010) holds 8130 bytes" in text and "need 8192" in text


def test_bad_number_value() -> None:
    assert reason(bundled("badVR.dcm")) == "NumberOfFrames (0028,0008) is not a number: '1A'"


def test_not_an_image() -> None:
    assert "RT Plan Storage" in reason(bundled("rtplan.dcm")) and "is not an image" in reason(bundled("rtplan.dcm"))


def test_not_dicom_at_all(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(NotDicom):
        ImageFile.open(path)
    missing = tmp_path / "missing.dcm"
    assert "No such file" in reason(missing)


def test_dimensions_that_would_need_terabytes(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 100000
    path = tmp_path / "huge.dcm"
    ds.save_as(path)
    text = reason(path)
    assert "GiB decoded" in text and str(MAX_DECODED_BYTES // 2**30) in text


def test_unsupported_bits_and_photometric(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.BitsAllocated = 12
    ds.save_as(tmp_path / "bits.dcm")
    assert "Bits Allocated (0028,0100) 12" in reason(tmp_path / "bits.dcm")
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.PhotometricInterpretation = "CMYK"
    ds.save_as(tmp_path / "cmyk.dcm")
    assert "'CMYK' is not supported" in reason(tmp_path / "cmyk.dcm")


def test_file_without_preamble_is_read_anyway(data_dir: Path) -> None:
    # Old archives hold bare datasets; this one is a palette colour image.
    image = ImageFile.open(data_dir / "broken" / "OT-PAL-8-face.dcm")
    (frame,) = list(image.iter_frames())
    assert image.photometric == "PALETTE COLOR" and frame.shape == (480, 640, 3)
    assert frame.std() > 0


def test_frames_stream_one_at_a_time(data_dir: Path) -> None:
    image = ImageFile.open(data_dir / "multiframe" / "emri_small.dcm")
    frames = image.iter_frames()
    first = next(frames)
    assert first.shape == (64, 64) and image.number_of_frames == 10
    assert len(list(frames)) == 9
    whole = pydicom.dcmread(data_dir / "multiframe" / "emri_small.dcm").pixel_array
    assert np.array_equal(first, whole[0])
