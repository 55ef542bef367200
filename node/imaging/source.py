"""Opening a DICOM image file: header checks before any decoding, then frames one at a time.

Every problem a file can have ends in :class:`UnsupportedImage`, whose message names the file and
the tag or setting at fault, so a caller can log one line and go on with the next file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["GREY", "MAX_DECODED_BYTES", "ImageFile", "NotDicom", "UnsupportedImage"]

log = logging.getLogger(__name__)

GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")

#: Decoded size above which an image is refused before decoding (a corrupt Rows/Columns/Number of
#: Frames would otherwise ask for terabytes).  Frames are decoded one at a time, so this bounds
#: what one frame-by-frame pass may produce, not what is held in memory.
MAX_DECODED_BYTES = 64 * 2**30


class UnsupportedImage(Exception):
    """A file that cannot be processed; the message says which file and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NotDicom(UnsupportedImage):
    """A file that is not DICOM at all (a README beside the images): skipped, not failed."""


@dataclass
class ImageFile:
    """A checked DICOM image file: its header (no pixel data) and how to read its frames.

    Use :meth:`open`; the constructor does no checking.
    """

    path: Path
    header: Dataset
    number_of_frames: int
    photometric: str

    @property
    def is_grey(self) -> bool:
        """MONOCHROME1 or MONOCHROME2."""
        return self.photometric in GREY

    @property
    def is_monochrome1(self) -> bool:
        """Minimum value displayed white (PS3.3 C.7.6.3.1.2)."""
        return self.photometric == "MONOCHROME1"

    @classmethod
    def open(cls, path: str | os.PathLike) -> ImageFile:
        """Read and check the header of *path*.

        Raises
        ------
        UnsupportedImage
            Unreadable file, no pixel data, an unsupported pixel module, or pixel data shorter
            than Rows x Columns x Frames x Samples x Bits Allocated say.
        """
        path = Path(path)
        header = _read_header(path)
        photometric = _check_pixel_module(path, header)
        frames = _int_attr(path, header, "NumberOfFrames", 1)
        return cls(path=path, header=header, number_of_frames=frames, photometric=photometric)

    def iter_frames(self) -> Iterator[np.ndarray]:
        """Yield the decoded frames one at a time.

        Grey frames are (rows, columns) stored values; colour frames are (rows, columns, 3) RGB
        (YBR converted by pydicom, PALETTE COLOR expanded through its lookup table).

        Raises
        ------
        UnsupportedImage
            If the pixel data cannot be decoded (missing decoder, truncated or corrupt data).
        """
        try:
            for arr in self._decoded_frames():
                if self.photometric == "PALETTE COLOR":
                    arr = apply_color_lut(arr, self.header)
                yield arr
        except UnsupportedImage:
            raise
        except Exception as exc:  # pydicom raises many types for bad pixel data
            ts = self.header.file_meta.get("TransferSyntaxUID", "unknown")
            raise UnsupportedImage(
                self.path, f"cannot decode pixel data ({ts.name if hasattr(ts, 'name') else ts}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _decoded_frames(self) -> Iterator[np.ndarray]:
        if self.header.get("_node_no_file_meta"):
            ds = pydicom.dcmread(self.path, force=True)
            ds.file_meta = self.header.file_meta
            yield from iter_pixels(ds)
        else:
            yield from iter_pixels(self.path)


def _read_header(path: Path) -> Dataset:
    """The dataset with Pixel Data deferred (its length known, its bytes not read)."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        return _read_without_preamble(path)
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise UnsupportedImage(path, f"not readable as DICOM: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        # pydicom gives up on the whole dataset when encapsulated Pixel Data ends early
        try:
            partial = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the partial read is only for a better message
            partial = ds
        if len(partial):
            raise UnsupportedImage(
                path, "Pixel Data (7FE0,0010) is cut short: the file ends inside it (truncated transfer?)"
            )
        raise UnsupportedImage(path, "no data elements after the file meta: empty or corrupt dataset")
    return ds


def _read_without_preamble(path: Path) -> Dataset:
    """Old archives hold datasets without the Part 10 preamble and file meta; read them anyway."""
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=1024)
    except Exception as exc:
        raise UnsupportedImage(path, f"not readable as DICOM: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0 or "SOPClassUID" not in ds:
        raise NotDicom(path, "not a DICOM file (no preamble, no SOP Class UID (0008,0016))")
    implicit = ds.original_encoding[0] is False if ds.original_encoding else True
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds._node_no_file_meta = True  # noqa: SLF001 - marker kept on the object, never written
    log.warning("%s: no DICOM file meta information; read as %s", path, ts.name)
    return ds


def _check_pixel_module(path: Path, ds: Dataset) -> str:
    """Check the Image Pixel module against the pixel data, before decoding anything."""
    if "PixelData" not in ds:
        other = [kw for kw in ("FloatPixelData", "DoubleFloatPixelData") if kw in ds]
        if other:
            raise UnsupportedImage(path, f"{other[0]} is not supported, only integer Pixel Data")
        if "Rows" in ds or "Columns" in ds:
            raise UnsupportedImage(
                path, "no Pixel Data (7FE0,0010) although Rows/Columns are present: file cut short?"
            )
        sop = ds.get("SOPClassUID")
        what = f"{sop.name} ({sop})" if sop is not None else "object without SOP Class UID"
        raise UnsupportedImage(path, f"no Pixel Data (7FE0,0010): {what} is not an image")
    missing = [kw for kw in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
               if ds.get(kw) in (None, "")]
    if missing:
        raise UnsupportedImage(path, f"Image Pixel module incomplete: {', '.join(missing)} missing")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in GREY + _COLOUR:
        raise UnsupportedImage(path, f"Photometric Interpretation (0028,0004) {photometric!r} is not supported")
    bits = _int_attr(path, ds, "BitsAllocated", 0)
    if bits not in (1, 8, 16, 32):
        raise UnsupportedImage(path, f"Bits Allocated (0028,0100) {bits} is not supported (1, 8, 16 or 32)")
    rows, columns = _int_attr(path, ds, "Rows", 0), _int_attr(path, ds, "Columns", 0)
    frames = _int_attr(path, ds, "NumberOfFrames", 1)
    samples = _int_attr(path, ds, "SamplesPerPixel", 1)
    if min(rows, columns, frames, samples) < 1:
        raise UnsupportedImage(path, f"empty image: Rows {rows}, Columns {columns}, Number of Frames {frames}")
    decoded = rows * columns * frames * samples * max(bits, 8) // 8
    if decoded > MAX_DECODED_BYTES:
        raise UnsupportedImage(
            path, f"Rows {rows} x Columns {columns} x Number of Frames {frames} x {samples} samples "
            f"x {bits} bits is {decoded / 2**30:.0f} GiB decoded, above the {MAX_DECODED_BYTES // 2**30} GiB limit"
        )
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and not ts.is_compressed:
        expected = (rows * columns * frames * samples * bits + 7) // 8
        if photometric == "YBR_FULL_422":
            expected = expected * 2 // 3
        have = _pixel_data_length(path, ds)
        if have is not None and have < expected:
            raise UnsupportedImage(
                path, f"Pixel Data (7FE0,0010) holds {have} bytes, Rows {rows} x Columns {columns} x "
                f"Frames {frames} x Samples {samples} x Bits Allocated {bits} need {expected}: truncated"
            )
    return photometric


def _int_attr(path: Path, ds: Dataset, keyword: str, default: int) -> int:
    """An integer attribute, or UnsupportedImage naming the tag when its value is not a number."""
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError) as exc:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        raise UnsupportedImage(
            path, f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a number: {ds[keyword].value!r}"
        ) from exc


def _pixel_data_length(path: Path, ds: Dataset) -> int | None:
    """Bytes of Pixel Data really in the file, without reading them (deferred element), if known.

    The declared length is not enough: a file cut short still declares the full length, so the
    bytes left in the file after the value's offset bound it.
    """
    elem = ds.get_item("PixelData", keep_deferred=True)  # without keep_deferred pydicom reads it all
    value = getattr(elem, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    length = getattr(elem, "length", None)
    if length is None or length == 0xFFFFFFFF:
        return None
    offset = getattr(elem, "value_tell", None)
    if offset is None:
        return int(length)
    return max(0, min(int(length), path.stat().st_size - int(offset)))
