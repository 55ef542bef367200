"""Images whose decoded size is out of all proportion to their file size, for the decode limits.

:func:`write_rle_ct` writes a real RLE Lossless CT (Part 10, a CT Image Storage header from
pydicom's bundled ``CT_small.dcm``) whose single 16-bit frame is one constant value: each row of
each byte plane is PackBits replicate runs of 128 bytes (2 bytes per run), so a 16384 x 16384
frame (512 MiB decoded) is an 8 MB file.  The RLE segments are written here, a row at a time,
because encoding 512 MiB with pydicom's Python RLE encoder would take minutes.

:func:`write_cine` writes an 8-bit Ultrasound Multi-frame Image of any number of frames, a frame at
a time (a 1 GB file costs a frame of memory to make); :func:`pixel_data_span` and
:func:`same_bytes` compare the Pixel Data of two such files without reading either whole.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from tests.support.tools import bundled

__all__ = ["COLUMNS", "ROWS", "frame", "pixel_data_span", "same_bytes", "write_cine", "write_rle_ct"]

_RUN = 128  # the longest PackBits replicate run (header byte 0x81 = -127: 128 copies)


def _constant_row(byte: int, columns: int) -> bytes:
    """One row of one byte plane, every byte *byte*, as PackBits runs (PS3.5 G.3.1)."""
    full, rest = divmod(columns, _RUN)
    row = bytes((0x81, byte)) * full
    if rest == 1:
        row += bytes((0x00, byte))  # a literal run of one byte
    elif rest:
        row += bytes((257 - rest, byte))
    return row


def _rle_frame(rows: int, columns: int, value: int) -> bytes:
    """An RLE Lossless frame of 16-bit *value* everywhere: header, then the high and low byte planes."""
    planes = [_constant_row((value >> 8) & 0xFF, columns) * rows, _constant_row(value & 0xFF, columns) * rows]
    offsets = [64, 64 + len(planes[0])]
    header = struct.pack("<16L", len(planes), *offsets, *([0] * (15 - len(offsets))))
    frame = header + b"".join(planes)
    return frame + b"\x00" * (len(frame) % 2)


def write_rle_ct(path: Path, rows: int = 16384, columns: int = 16384, *, value: int = 24,
                 study_uid: str | None = None, series_uid: str | None = None) -> Path:
    """Write a one-frame 16-bit RLE Lossless CT of *rows* x *columns*, every pixel *value* (unsigned).

    Returns *path*.  New SOP (and, unless given, Study and Series) Instance UIDs each time.
    """
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesDescription = f"hostile {rows}x{columns} RLE"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = encapsulate([_rle_frame(rows, columns, value)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- a cine of any length, frame by frame

#: The frame size of :func:`write_cine` unless told.
ROWS, COLUMNS = 480, 640

_DROP = ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
         "SmallestImagePixelValue", "LargestImagePixelValue", "KVP", "SliceThickness",
         "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation")


def frame(index: int, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """Frame *index* of the generated cine: a diagonal ramp moving with the frame number."""
    y, x = np.ogrid[0:rows, 0:columns]
    return ((x + y + 3 * index) % 256).astype(np.uint8)


def write_cine(path: Path, frames: int, *, rows: int = ROWS, columns: int = COLUMNS,
               make_frame: Callable[[int, int, int], np.ndarray] = frame) -> Path:
    """Write an 8-bit MONOCHROME2 US Multi-frame Image of *frames* frames, one frame at a time.

    The header is pydicom's bundled CT_small.dcm made into ultrasound (new UIDs); Pixel Data is
    appended frame by frame after it (Explicit VR Little Endian, OB, defined length), so a 1 GB
    file costs a frame of memory to make.  ``make_frame(index, rows, columns)`` gives each frame
    (``uint8``; default :func:`frame`).
    """
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    for keyword in ("PixelData", *_DROP):
        if keyword in ds:
            delattr(ds, keyword)
    for tag in [t for t in ds.keys() if t >= 0x7FE00010]:
        del ds[tag]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.SeriesDescription = f"huge {frames} frames"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 33.3
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    length = frames * rows * columns
    length += length % 2
    with path.open("wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length))
        for index in range(frames):
            handle.write(np.ascontiguousarray(make_frame(index, rows, columns), dtype=np.uint8).tobytes())
        if (frames * rows * columns) % 2:
            handle.write(b"\x00")
    return path


def pixel_data_span(path: Path) -> tuple[int, int]:
    """(file offset, length) of the Pixel Data value, read from the header only."""
    ds = pydicom.dcmread(path, defer_size=1024)
    elem = ds.get_item("PixelData", keep_deferred=True)
    return int(elem.value_tell), int(elem.length)


def same_bytes(a: Path, a_span: tuple[int, int], b: Path, b_span: tuple[int, int], chunk: int = 1 << 22) -> bool:
    """Whether two byte ranges of two files are equal, compared a chunk at a time."""
    if a_span[1] != b_span[1]:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        fa.seek(a_span[0])
        fb.seek(b_span[0])
        left = a_span[1]
        while left:
            size = min(chunk, left)
            if fa.read(size) != fb.read(size):
                return False
            left -= size
    return True
