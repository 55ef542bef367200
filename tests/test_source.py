"""Opening files: every bad input ends in one clear error naming the file and the tag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement

from node.imaging import ImageFile, UnsupportedImage
from node.imaging.source import DecodeLimits, NotDicom, TooLarge
from tests.support import bundled, write_rle_ct


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
    assert f"Rows 65535 x Columns 65535 x 100000 frames x 1 sample x 16 bits is {65535 * 65535 * 100000 * 2 / 2**20:,.1f} MB decoded" in text
    assert "above the 2,048 MB limit ([node] max_decoded_mb)" in text


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


# -- decode limits: Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated ------------

MB = 2**20


def _ct_with(tmp_path: Path, name: str = "ct.dcm", **values: object) -> Path:
    """CT_small.dcm with header values changed (its small Pixel Data kept: nothing is decoded)."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        elif isinstance(value, bytes):  # a value as it is in the file, even one pydicom would refuse to set
            tag = pydicom.datadict.tag_for_keyword(keyword)
            vr = pydicom.datadict.dictionary_VR(tag)
            ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


def test_limits_at_and_just_above_the_frame_limit() -> None:
    limits = DecodeLimits.from_mb(2048, 256)
    assert limits.check(rows=8192, columns=16384, bits=16) is None  # exactly 256 MB
    over = limits.check(rows=8192, columns=16385, bits=16)
    assert over is not None and over.part == "one frame" and over.size == 8192 * 16385 * 2
    assert over.limit == 256 * MB and over.setting == "[node] max_frame_mb"
    assert str(over) == ("decoded size too large: one frame of Rows 8192 x Columns 16385 x 1 frame x 1 sample x 16 bits "
                         "is 256.0 MB decoded, above the 256 MB limit ([node] max_frame_mb)")
    assert over.comment == "frame 256 MB decoded > max_frame_mb 256" and len(over.comment) <= 64


def test_limits_for_all_frames() -> None:
    limits = DecodeLimits()  # the defaults: 2048 MB in all, 256 MB a frame
    assert limits == DecodeLimits.from_mb(2048, 256)
    # a 1,000-frame 640x480 RGB cine (879 MB) is accepted; 2,500 frames (2,197 MB) are not
    assert limits.check(rows=480, columns=640, frames=1000, samples=3, bits=8) is None
    over = limits.check(rows=480, columns=640, frames=2500, samples=3, bits=8)
    assert over is not None and over.part == "all frames" and over.size == 480 * 640 * 3 * 2500
    assert "Rows 480 x Columns 640 x 2500 frames x 3 samples x 8 bits is 2,197.3 MB decoded" in str(over)
    assert "above the 2,048 MB limit ([node] max_decoded_mb)" in str(over)
    assert over.comment == "image 2,197 MB decoded > max_decoded_mb 2048"
    # a frame over both limits is reported against the whole-image one (the larger)
    both = DecodeLimits.from_mb(100, 200).check(rows=16384, columns=16384, bits=16)
    assert both is not None and both.part == "all frames" and both.limit == 100 * MB


@pytest.mark.parametrize(("bits", "photometric", "samples", "frame_bytes"), [
    (1, "MONOCHROME2", 1, 1000 * 1000),  # 1-bit decodes to a byte a pixel
    (8, "MONOCHROME2", 1, 1000 * 1000),
    (12, "MONOCHROME2", 1, 2 * 1000 * 1000),  # rounded up to whole bytes
    (32, "MONOCHROME1", 1, 4 * 1000 * 1000),
    (8, "RGB", 3, 3 * 1000 * 1000),
    (8, "PALETTE COLOR", 1, 6 * 1000 * 1000),  # the 16-bit RGB it becomes
])
def test_frame_size_by_pixel_kind(bits: int, photometric: str, samples: int, frame_bytes: int) -> None:
    limits = DecodeLimits(max_decoded_bytes=10**12, max_frame_bytes=frame_bytes)
    assert limits.check(rows=1000, columns=1000, samples=samples, bits=bits, photometric=photometric) is None
    over = limits.check(rows=1001, columns=1000, samples=samples, bits=bits, photometric=photometric)
    assert over is not None and over.size == frame_bytes * 1001 // 1000


def test_setting_names_for_the_command_line() -> None:
    limits = DecodeLimits.from_mb(10, 5, decoded_setting="--max-decoded-mb", frame_setting="--max-frame-mb")
    frame = limits.check(rows=2048, columns=2048, bits=16)  # 8 MB
    assert frame is not None and str(frame).endswith("above the 5 MB limit (--max-frame-mb)")
    assert frame.comment == "frame 8 MB decoded > --max-frame-mb 5"


def test_file_over_the_frame_limit_is_refused_from_its_header_alone(tmp_path: Path) -> None:
    # 20000 x 20000 16-bit is 763 MB a frame; the file holds 32 KB of Pixel Data and is never read further
    path = _ct_with(tmp_path, Rows=20000, Columns=20000)
    with pytest.raises(TooLarge) as info:
        ImageFile.open(path)
    assert isinstance(info.value, UnsupportedImage) and info.value.path == path
    assert info.value.over.part == "one frame" and info.value.over.size == 20000 * 20000 * 2
    assert str(info.value) == (f"{path}: decoded size too large: one frame of Rows 20000 x Columns 20000 x 1 frame x "
                               "1 sample x 16 bits is 762.9 MB decoded, above the 256 MB limit ([node] max_frame_mb)")
    # the same file is within a higher limit: then its short Pixel Data is what is wrong
    text = reason_with(path, DecodeLimits.from_mb(4096, 1024))
    assert "holds 32768 bytes" in text and "truncated" in text


def reason_with(path: Path, limits: DecodeLimits) -> str:
    with pytest.raises(UnsupportedImage) as info:
        list(ImageFile.open(path, limits).iter_frames())
    return info.value.reason


def test_number_of_frames_counts_against_the_whole_image_limit(tmp_path: Path) -> None:
    path = _ct_with(tmp_path, NumberOfFrames=70000)  # 128 x 128 x 2 bytes x 70000: 2,187.5 MB
    with pytest.raises(TooLarge) as info:
        ImageFile.open(path)
    assert info.value.over.part == "all frames"
    assert "Rows 128 x Columns 128 x 70000 frames x 1 sample x 16 bits is 2,187.5 MB decoded" in str(info.value)
    assert "above the 2,048 MB limit ([node] max_decoded_mb)" in str(info.value)


@pytest.mark.parametrize(("values", "expected"), [
    ({"Rows": None}, "Image Pixel module incomplete: Rows missing"),
    ({"Columns": None, "BitsAllocated": None}, "Image Pixel module incomplete: Columns, BitsAllocated missing"),
    ({"Rows": 0}, "empty image: Rows 0, Columns 128, Number of Frames 1"),
    ({"NumberOfFrames": "0"}, "empty image: Rows 128, Columns 128, Number of Frames 0"),
    ({"NumberOfFrames": "-3"}, "empty image: Rows 128, Columns 128, Number of Frames -3"),
    ({"NumberOfFrames": b"many"}, "NumberOfFrames (0028,0008) is not a number: 'many'"),
    ({"SamplesPerPixel": 0}, "empty image: Rows 128, Columns 128, Number of Frames 1"),
    ({"BitsAllocated": 64}, "Bits Allocated (0028,0100) 64 is not supported (1, 8, 16 or 32)"),
])
def test_missing_or_corrupt_dimensions_are_named_before_any_limit(
    tmp_path: Path, values: dict[str, object], expected: str
) -> None:
    path = _ct_with(tmp_path, **values)
    with pytest.raises(UnsupportedImage) as info:
        ImageFile.open(path, DecodeLimits.from_mb(1, 1))  # limits a CT slice fits: the values are at fault
    assert not isinstance(info.value, TooLarge) and info.value.reason == expected


def test_header_of_the_hostile_rle_file(tmp_path: Path) -> None:
    """The 8 MB file: 512 MB in one frame, refused by the default frame limit, accepted by a higher one."""
    path = write_rle_ct(tmp_path / "hostile.dcm")
    assert path.stat().st_size < 9 * MB
    with pytest.raises(TooLarge) as info:
        ImageFile.open(path)
    assert info.value.over.size == 512 * MB and info.value.over.setting == "[node] max_frame_mb"
    image = ImageFile.open(path, DecodeLimits.from_mb(2048, 512))  # at the limit: opened, not decoded
    assert image.frame_bytes == 512 * MB


def test_small_rle_file_made_by_hand_decodes_to_its_value(tmp_path: Path) -> None:
    """The RLE writer of the hostile file makes real RLE Lossless (checked where decoding is cheap)."""
    for rows, columns in ((64, 64), (100, 131), (3, 257)):
        image = ImageFile.open(write_rle_ct(tmp_path / f"{rows}x{columns}.dcm", rows, columns, value=1234))
        (frame,) = list(image.iter_frames())
        assert frame.shape == (rows, columns) and frame.dtype == np.uint16 and set(np.unique(frame)) == {1234}


def test_rle_data_longer_than_its_header_says_fails_the_file_only(tmp_path: Path) -> None:
    """pylibjpeg-rle panics (a BaseException, PanicException) on segments longer than Rows x Columns:
    that must fail the file like any decoding error, not escape to the worker."""
    ds = pydicom.dcmread(write_rle_ct(tmp_path / "big.dcm", 256, 256))
    ds.Rows = ds.Columns = 16
    ds.save_as(tmp_path / "lying.dcm")
    text = reason(tmp_path / "lying.dcm")
    assert text.startswith("cannot decode pixel data (RLE Lossless): PanicException: "), text


def test_only_the_frames_asked_for_are_decoded(data_dir: Path) -> None:
    image = ImageFile.open(data_dir / "multiframe" / "emri_small.dcm")
    whole = pydicom.dcmread(data_dir / "multiframe" / "emri_small.dcm").pixel_array
    (seventh,) = list(image.iter_frames([6]))
    assert np.array_equal(seventh, whole[6])
