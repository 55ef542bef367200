"""Images whose decoded size is out of all proportion to their file size, for the decode limits.

:func:`write_rle_ct` writes a real RLE Lossless CT (Part 10, a CT Image Storage header from
pydicom's bundled ``CT_small.dcm``) whose single 16-bit frame is one constant value: each row of
each byte plane is PackBits replicate runs of 128 bytes (2 bytes per run), so a 16384 x 16384
frame (512 MiB decoded) is an 8 MB file.  The RLE segments are written here, a row at a time,
because encoding 512 MiB with pydicom's Python RLE encoder would take minutes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from tests.support.tools import bundled

__all__ = ["write_rle_ct"]

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
