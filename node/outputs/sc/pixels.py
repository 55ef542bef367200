"""Pixel Data streamed into a file: one frame at a time, after a header that describes them.

The element (7FE0,0010) is written by hand in Explicit VR Little Endian: OB for 8-bit, OW for
16-bit, a 4-byte length, padded to even length; then each frame's bytes as it comes, so memory
stays one frame whatever the number of frames.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["MAX_PIXEL_DATA_LENGTH", "PixelLayout", "check_header_for_pixels", "pixel_layout_of", "write_pixel_data"]

#: Pixel Data must fit a 32-bit explicit length (0xFFFFFFFF means "undefined").
MAX_PIXEL_DATA_LENGTH = 0xFFFFFFFE

_PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)


@dataclass(frozen=True)
class PixelLayout:
    """How the frames of one instance are stored in its Pixel Data (native, little endian)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    number_of_frames: int

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """The shape of one frame's array: ``(rows, columns)`` or ``(rows, columns, samples)``."""
        if self.samples_per_pixel == 1:
            return (self.rows, self.columns)
        return (self.rows, self.columns, self.samples_per_pixel)

    @property
    def length(self) -> int:
        """Bytes of all frames, before the padding to even length."""
        frame = self.rows * self.columns * self.samples_per_pixel * (self.bits_allocated // 8)
        return frame * self.number_of_frames

    def check_length(self) -> None:
        """Raise ValueError if the Pixel Data would not fit a native encoding's 32-bit length."""
        length = self.length
        if length + length % 2 > MAX_PIXEL_DATA_LENGTH:
            raise ValueError(
                f"Pixel Data of {self.number_of_frames} frames of {self.rows}x{self.columns}x"
                f"{self.samples_per_pixel} {self.bits_allocated}-bit pixels is {length} bytes, "
                f"more than the {MAX_PIXEL_DATA_LENGTH} a native encoding can hold"
            )


def _header_int(header: Dataset, keyword: str, default: int | None = None) -> int:
    value = header.get(keyword, default)
    if value is None or value == "":
        raise ValueError(f"header has no {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"header {keyword} is not an integer: {value!r}") from None


def pixel_layout_of(header: Dataset) -> PixelLayout:
    """The header's pixel description, checked.

    Raises
    ------
    ValueError
        If Rows, Columns, Samples per Pixel, Bits Allocated, Bits Stored or Number of Frames
        is missing, not an integer or out of range.
    """
    rows = _header_int(header, "Rows")
    columns = _header_int(header, "Columns")
    samples = _header_int(header, "SamplesPerPixel")
    bits_allocated = _header_int(header, "BitsAllocated")
    bits_stored = _header_int(header, "BitsStored", bits_allocated)
    number_of_frames = _header_int(header, "NumberOfFrames", 1)
    if samples not in (1, 3):
        raise ValueError(f"header SamplesPerPixel must be 1 or 3, got {samples}")
    if bits_allocated not in (8, 16):
        raise ValueError(f"header BitsAllocated must be 8 or 16, got {bits_allocated}")
    if not 1 <= bits_stored <= bits_allocated:
        raise ValueError(
            f"header BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}"
        )
    if rows < 1 or columns < 1 or number_of_frames < 1:
        raise ValueError(
            f"header Rows/Columns/NumberOfFrames must be positive, got "
            f"{rows}/{columns}/{number_of_frames}"
        )
    return PixelLayout(rows, columns, samples, bits_allocated, bits_stored, number_of_frames)


def check_header_for_pixels(header: Dataset) -> None:
    """Raise ValueError unless Pixel Data can be appended to *header* as written here.

    That is: File Meta with Explicit VR Little Endian, and nothing at or after Pixel Data.
    """
    file_meta = getattr(header, "file_meta", None)
    if file_meta is None or "TransferSyntaxUID" not in file_meta:
        raise ValueError("header has no file_meta with a Transfer Syntax UID")
    if file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise ValueError(
            "header Transfer Syntax must be Explicit VR Little Endian, got "
            f"{file_meta.TransferSyntaxUID}"
        )
    late = [tag for tag in header.keys() if tag >= _PIXEL_DATA_TAG]
    if late:
        raise ValueError(
            "header must not hold Pixel Data or elements after it, has "
            + ", ".join(str(Tag(tag)) for tag in late)
        )


def write_pixel_data(out: BinaryIO, layout: PixelLayout, frames: Iterable[np.ndarray]) -> None:
    """Append the Pixel Data element to ``out``: its tag and length, then one frame at a time.

    Each frame is checked (shape, dtype, values above Bits Stored) before it is written, and
    the number of frames must be the layout's (its length is checked beforehand:
    :meth:`PixelLayout.check_length`); the caller removes the file on any error.

    Raises
    ------
    TypeError
        If a frame is not a numpy array.
    ValueError
        If a frame has the wrong shape or dtype or values above Bits Stored (the message names
        the frame index), or there are more or fewer frames than the layout's.
    """
    length = layout.length
    padding = length % 2
    bits_allocated, number_of_frames = layout.bits_allocated, layout.number_of_frames
    vr = b"OB" if bits_allocated == 8 else b"OW"
    out_dtype = np.dtype("u1") if bits_allocated == 8 else np.dtype("<u2")
    max_value = (1 << layout.bits_stored) - 1
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length + padding))
    written = 0
    for index, frame in enumerate(frames):
        if index >= number_of_frames:
            raise ValueError(
                f"frame {index}: more frames than NumberOfFrames ({number_of_frames})"
            )
        _check_frame(index, frame, layout.frame_shape, bits_allocated)
        data = np.ascontiguousarray(frame, dtype=out_dtype)
        if layout.bits_stored < bits_allocated and data.size and int(data.max()) > max_value:
            raise ValueError(
                f"frame {index} has values above {max_value} (BitsStored {layout.bits_stored})"
            )
        out.write(memoryview(data).cast("B"))
        written += 1
    if written != number_of_frames:
        raise ValueError(
            f"got {written} frames, header NumberOfFrames is {number_of_frames}"
        )
    if padding:
        out.write(b"\x00")


def _check_frame(index: int, frame: object, shape: tuple[int, ...], bits_allocated: int) -> None:
    if not isinstance(frame, np.ndarray):
        raise TypeError(
            f"frame {index} must be a numpy array, not {type(frame).__name__}"
        )
    if frame.shape != shape:
        raise ValueError(f"frame {index} has shape {frame.shape}, expected {shape}")
    if frame.dtype.kind != "u" or frame.dtype.itemsize * 8 != bits_allocated:
        raise ValueError(
            f"frame {index} has dtype {frame.dtype}, expected uint{bits_allocated}"
        )

