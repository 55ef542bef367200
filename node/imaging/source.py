"""Opening a DICOM image file: header checks before any decoding, then frames one at a time.

Every problem a file can have ends in :class:`UnsupportedImage`, whose message names the file and
the tag or setting at fault, so a caller can log one line and go on with the next file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
    "DEFAULT_MAX_DECODED_MB", "DEFAULT_MAX_FRAME_MB", "GREY", "DecodeLimits", "ImageFile", "NotDicom", "OverLimit",
    "TooLarge", "UnsupportedImage", "decoded_frame_bytes",
]

log = logging.getLogger(__name__)

GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")

MB = 2**20

#: Default of ``[node] max_decoded_mb``: decoded size of a whole file (all its frames), in MB.
#: A 1,000-frame 640x480 RGB cine is 879 MB; a 16-bit CT volume of 1,000 512x512 slices 500 MB.
DEFAULT_MAX_DECODED_MB = 2048
#: Default of ``[node] max_frame_mb``: decoded size of one frame, in MB (the largest real frames,
#: digital mammography or scanned film, are 30-100 MB).  Decoding and rendering one frame of this
#: size peaked at 570-790 MB resident for the whole ``dicom-node process`` (see config/node.toml).
DEFAULT_MAX_FRAME_MB = 256


def decoded_frame_bytes(*, rows: int, columns: int, samples: int = 1, bits: int, photometric: str = "") -> int:
    """Bytes of one decoded frame: Rows x Columns x Samples per Pixel x Bits Allocated rounded up to
    whole bytes (1-bit data decodes to a byte a pixel); PALETTE COLOR as the RGB that
    ``apply_color_lut`` makes of it, counted at 16 bits (its LUTs' 8 or 16, the larger)."""
    if _is_palette(photometric):
        samples, bits = 3, 16
    return rows * columns * samples * ((max(bits, 8) + 7) // 8)


def _is_palette(photometric: str) -> bool:
    return photometric.strip().upper() == "PALETTE COLOR"


@dataclass(frozen=True)
class OverLimit:
    """Why a file is refused before decoding: its decoded size (whole, or of one frame) and the limit.

    Attributes
    ----------
    part : str
        ``"one frame"`` or ``"all frames"``.
    dimensions : str
        How the size was computed, e.g. ``Rows 16384 x Columns 16384 x 1 frame x 1 sample x 16 bits``.
    size, limit : int
        Decoded bytes, and the limit they are above.
    setting : str
        The setting that holds the limit (``[node] max_frame_mb``, or a command-line flag).
    """

    part: str
    dimensions: str
    size: int
    limit: int
    setting: str

    def __str__(self) -> str:
        return (f"decoded size too large: {self.part} of {self.dimensions} is {self.size / MB:,.1f} MB decoded, "
                f"above the {self.limit / MB:,.0f} MB limit ({self.setting})")

    @property
    def comment(self) -> str:
        """At most 64 characters, for a C-STORE reply's Error Comment (0000,0902)."""
        what = "frame" if self.part == "one frame" else "image"
        name = self.setting.rsplit(" ", 1)[-1]
        return f"{what} {self.size / MB:,.0f} MB decoded > {name} {self.limit // MB}"[:64]


@dataclass(frozen=True)
class DecodeLimits:
    """How much decoded pixel data a file may ask for; a file above is refused before decoding.

    Decoded size is Rows x Columns x Samples per Pixel x bytes per sample (Bits Allocated rounded
    up to whole bytes; PALETTE COLOR as the 16-bit RGB it becomes), times Number of Frames for the
    whole file.  A corrupt or hostile header (an 8 MB RLE file can hold a 512 MB frame) is
    refused from these numbers alone.

    Attributes
    ----------
    max_decoded_bytes : int
        Limit for all frames of one file: what one frame-by-frame pass produces.
    max_frame_bytes : int
        Limit for one frame: decoding and rendering hold a small multiple of it at once.
    decoded_setting, frame_setting : str
        How messages name the two limits (the config keys, or the command-line flags).
    """

    max_decoded_bytes: int = DEFAULT_MAX_DECODED_MB * MB
    max_frame_bytes: int = DEFAULT_MAX_FRAME_MB * MB
    decoded_setting: str = "[node] max_decoded_mb"
    frame_setting: str = "[node] max_frame_mb"

    @classmethod
    def from_mb(cls, max_decoded_mb: int, max_frame_mb: int, **settings: str) -> DecodeLimits:
        """Limits given in MB (2**20 bytes), as in the config file; *settings* name them for messages."""
        return cls(int(max_decoded_mb) * MB, int(max_frame_mb) * MB, **settings)

    def check(
        self, *, rows: int, columns: int, frames: int = 1, samples: int = 1, bits: int, photometric: str = "",
    ) -> OverLimit | None:
        """What is over the limits for an image of these dimensions, or None when it fits.

        Parameters
        ----------
        rows, columns, frames, samples, bits : int
            Rows, Columns, Number of Frames, Samples per Pixel and Bits Allocated (all >= 1).
        photometric : str
            Photometric Interpretation: PALETTE COLOR is counted as the RGB it decodes to.
        """
        frame = decoded_frame_bytes(rows=rows, columns=columns, samples=samples, bits=bits, photometric=photometric)
        palette = _is_palette(photometric)
        if palette:
            samples, bits = 3, 16
        frames_text = f"{frames} frame{'s' if frames != 1 else ''}"
        dimensions = (f"Rows {rows} x Columns {columns} x {frames_text} x {samples} sample{'s' if samples != 1 else ''}"
                      f" x {(max(bits, 8) + 7) // 8 * 8} bits")
        if palette:
            dimensions += " (PALETTE COLOR as the RGB it becomes)"
        if frame * frames > self.max_decoded_bytes:
            return OverLimit("all frames", dimensions, frame * frames, self.max_decoded_bytes, self.decoded_setting)
        if frame > self.max_frame_bytes:
            return OverLimit("one frame", dimensions, frame, self.max_frame_bytes, self.frame_setting)
        return None


class UnsupportedImage(Exception):
    """A file that cannot be processed; the message says which file and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NotDicom(UnsupportedImage):
    """A file that is not DICOM at all (a README beside the images): skipped, not failed."""


class TooLarge(UnsupportedImage):
    """A file whose header asks for more decoded pixel data than the limits allow (never decoded)."""

    def __init__(self, path: str | os.PathLike, over: OverLimit) -> None:
        super().__init__(path, str(over))
        self.over = over


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
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame (:func:`decoded_frame_bytes` of the checked header)."""
        header = self.header
        return decoded_frame_bytes(rows=int(header.Rows), columns=int(header.Columns),
                                   samples=int(header.get("SamplesPerPixel") or 1), bits=int(header.BitsAllocated),
                                   photometric=self.photometric)

    @property
    def is_grey(self) -> bool:
        """MONOCHROME1 or MONOCHROME2."""
        return self.photometric in GREY

    @property
    def is_monochrome1(self) -> bool:
        """Minimum value displayed white (PS3.3 C.7.6.3.1.2)."""
        return self.photometric == "MONOCHROME1"

    @classmethod
    def open(cls, path: str | os.PathLike, limits: DecodeLimits | None = None) -> ImageFile:
        """Read and check the header of *path* (Pixel Data is not read).

        Parameters
        ----------
        path : str or os.PathLike
            The file.
        limits : DecodeLimits, optional
            Decoded sizes allowed (default: :class:`DecodeLimits` defaults).

        Raises
        ------
        TooLarge
            The header asks for more decoded pixel data than *limits* allow.
        UnsupportedImage
            Unreadable file, no pixel data, an unsupported pixel module, or pixel data shorter
            than Rows x Columns x Frames x Samples x Bits Allocated say.
        """
        path = Path(path)
        limits = limits or DecodeLimits()
        header = _read_header(path)
        photometric = _check_pixel_module(path, header, limits)
        frames = _int_attr(path, header, "NumberOfFrames", 1)
        return cls(path=path, header=header, number_of_frames=frames, photometric=photometric)

    def iter_frames(self, indices: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Yield the decoded frames one at a time (only those of *indices*, 0-based, if given).

        Grey frames are (rows, columns) stored values; colour frames are (rows, columns, 3) RGB
        (YBR converted by pydicom, PALETTE COLOR expanded through its lookup table).  Each frame
        is decoded when it is asked for and only it is held (uncompressed Pixel Data is read
        from the file a frame at a time, encapsulated Pixel Data a fragment at a time).

        Raises
        ------
        UnsupportedImage
            If the pixel data cannot be decoded (missing decoder, truncated or corrupt data).
        """
        try:
            for arr in self._decoded_frames(indices):
                if self.photometric == "PALETTE COLOR":
                    arr = apply_color_lut(arr, self.header)
                yield arr
        except UnsupportedImage:
            raise
        except BaseException as exc:  # pydicom raises many types for bad pixel data
            if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                raise  # KeyboardInterrupt, SystemExit, GeneratorExit
            # PanicException: a Rust decoder (pylibjpeg-rle) that panics on data longer than
            # the header says raises this BaseException; it must fail the file, not the worker.
            ts = self.header.file_meta.get("TransferSyntaxUID", "unknown")
            raise UnsupportedImage(
                self.path, f"cannot decode pixel data ({ts.name if hasattr(ts, 'name') else ts}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _decoded_frames(self, indices: Sequence[int] | None) -> Iterator[np.ndarray]:
        if self.header.get("_node_no_file_meta"):
            # old archives' bare data sets (single frames in practice) are read whole: pydicom's
            # frame-by-frame file reading assumes the Part 10 layout
            ds = pydicom.dcmread(self.path, force=True)
            ds.file_meta = self.header.file_meta
            yield from iter_pixels(ds, indices=indices)
        else:
            yield from iter_pixels(self.path, indices=indices)


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


def _check_pixel_module(path: Path, ds: Dataset, limits: DecodeLimits) -> str:
    """Check the Image Pixel module against the pixel data and *limits*, before decoding anything."""
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
    over = limits.check(rows=rows, columns=columns, frames=frames, samples=samples, bits=bits,
                        photometric=photometric)
    if over is not None:
        raise TooLarge(path, over)
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
