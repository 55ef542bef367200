"""VOI LUT stage: modality values -> display values in [0, 1].

Windows by level/width with the three VOI LUT functions of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT,
SIGMOID), named presets, the file's own window, or a VOI LUT Sequence.

We do not call pydicom's ``apply_windowing`` for explicit windows: it scales into the stored
value range taken from the dataset (BitsStored, PixelRepresentation) and needs a dataset, while a
pipeline step needs ``[0, 1]`` from any array and any centre/width.  The VOI LUT Sequence does use
pydicom's ``apply_voi``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_voi

from node.imaging.modality import _functional_group_item

__all__ = [
    "WINDOWS",
    "VOIFunction",
    "VOITable",
    "VOIWindow",
    "Window",
    "apply_voi_lut_sequence",
    "as_voi_function",
    "file_window",
    "has_voi_lut_sequence",
    "window",
    "window_scaled",
]


class VOIFunction(str, Enum):
    """VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


@dataclass(frozen=True)
class Window:
    """A window: centre (level) and width in modality units, and the VOI LUT function."""

    center: float
    width: float
    function: VOIFunction = VOIFunction.LINEAR

    def describe(self) -> str:
        """Short text for DerivationDescription and logs, e.g. ``window C=40 W=80 LINEAR``."""
        return f"window C={self.center:g} W={self.width:g} {self.function.value}"


@dataclass(frozen=True)
class VOIWindow:
    """A VOI LUT stage given as a window, with what it is (a Window Center & Width Explanation)."""

    window: Window
    explanation: str = ""


@dataclass(frozen=True)
class VOITable:
    """A VOI LUT stage given as a table (PS3.3 C.11.2.1.1): input value ``first + i`` shows as entry
    ``i``; inputs below ``first`` as the first entry, above the last as the last.

    Attributes
    ----------
    first : int
        The input value mapped to the first entry (may be negative: CT values in HU).
    data : bytes
        The entries, 16-bit unsigned little endian (0..65535: black..white).
    explanation : str
        What the table does (LUT Explanation).
    """

    first: int
    data: bytes
    explanation: str = ""

    BITS = 16

    @property
    def entries(self) -> np.ndarray:
        """The entries as ``uint16``."""
        return np.frombuffer(self.data, dtype="<u2").astype(np.uint16)


# fastai's ``dicom_windows`` (fastai.medical.imaging, from radiopaedia's "windowing (CT)"): fastai
# stores (width, level); these are stored as centre/width, in HU.
WINDOWS: dict[str, Window] = {
    "brain": Window(40, 80),
    "subdural": Window(100, 254),
    "stroke": Window(32, 8),
    "brain_bone": Window(600, 2800),
    "brain_soft": Window(40, 375),
    "lungs": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "abdomen_soft": Window(50, 400),
    "liver": Window(30, 150),
    "spine_soft": Window(50, 250),
    "spine_bone": Window(400, 1800),
}


def as_voi_function(value: VOIFunction | str) -> VOIFunction:
    """A VOI LUT function from its enum or its DICOM text (any case).

    Raises
    ------
    ValueError
        Naming the unknown value.
    """
    if isinstance(value, VOIFunction):
        return value
    text = str(value).strip().upper()
    if text not in VOIFunction.__members__:
        raise ValueError(f"unknown VOI LUT Function {value!r}; known: LINEAR, LINEAR_EXACT, SIGMOID")
    return VOIFunction(text)


def window(
    x: np.ndarray, center: float, width: float, function: VOIFunction | str = "LINEAR"
) -> np.ndarray:
    """Apply a VOI window to modality values, giving display values in ``[0, 1]``.

    Parameters
    ----------
    x : numpy.ndarray
        Modality values (e.g. HU), any shape.
    center, width : float
        Window Center (0028,1050) and Window Width (0028,1051).
    function : VOIFunction or str
        ``LINEAR`` (width >= 1), ``LINEAR_EXACT`` or ``SIGMOID`` (width > 0).

    Returns
    -------
    numpy.ndarray
        ``float32``, same shape as *x*.  For integer output use :func:`window_scaled` with the
        output maximum and floor it: that equals dcmtk's ``dcm2pnm +Ww C W`` bit for bit.

    Raises
    ------
    ValueError
        If the width is out of range for the function, or the function is unknown.

    References
    ----------
    PS3.3 C.11.2.1.2 Window Center and Window Width.
    """
    return window_scaled(x, center, width, function, out_max=1.0).astype(np.float32)


def window_scaled(
    x: np.ndarray,
    center: float,
    width: float,
    function: VOIFunction | str = "LINEAR",
    *,
    out_max: float = 1.0,
) -> np.ndarray:
    """:func:`window` onto ``[0, out_max]`` in float64, for quantising with ``floor``.

    LINEAR is evaluated in dcmtk's order (``offset + x * gradient`` with the output range folded
    in), so ``floor(window_scaled(x, c, w, out_max=255))`` is identical to ``dcm2pnm +Ww c w``,
    including the values that lie exactly on an integer, where evaluating ``floor(y * 255)`` from
    a ``[0, 1]`` value would round the other way.
    """
    function = as_voi_function(function)
    x = np.asarray(x, dtype=np.float64)
    if function is VOIFunction.LINEAR:
        if width < 1:
            raise ValueError(f"Window Width must be >= 1 for LINEAR, got {width}")
        left = center - 0.5 - (width - 1) / 2
        right = center - 0.5 + (width - 1) / 2
        if width == 1:
            return np.where(x > right, out_max, 0.0)
        gradient = out_max / (width - 1)
        offset = out_max - ((center - 0.5) / (width - 1) + 0.5) * out_max
        y = offset + x * gradient
        y[x <= left] = 0.0
        y[x > right] = out_max
    else:
        if width <= 0:
            raise ValueError(f"Window Width must be > 0 for {function.value}, got {width}")
        if function is VOIFunction.LINEAR_EXACT:
            y = ((x - center) / width + 0.5) * out_max
        else:
            y = out_max / (1.0 + np.exp(-4.0 * (x - center) / width))
    return np.clip(y, 0.0, out_max, out=y)


def _voi_item(ds: Dataset, frame: int) -> Dataset:
    """The dataset that holds the VOI LUT module for *frame* (enhanced: Frame VOI LUT group)."""
    if "WindowCenter" in ds or ds.get("VOILUTSequence"):
        return ds
    item = _functional_group_item(ds, "FrameVOILUTSequence", frame)
    return item if item is not None else ds


def _nth(value: object, index: int) -> float:
    """Element *index* of a possibly multi-valued DS."""
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    if index >= len(values):
        raise ValueError(f"the file has {len(values)} window(s); index {index} asked for")
    return float(values[index])


def file_window(ds: Dataset, index: int = 0, frame: int = 0) -> Window:
    """The file's own window: Window Center/Width (and VOI LUT Function) value *index*.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Source dataset (enhanced multi-frame: the Frame VOI LUT functional group of *frame*).
    index : int
        Which of several windows (0-based; the first is the one the modality suggests).
    frame : int
        0-based frame, for enhanced multi-frame objects.

    Raises
    ------
    ValueError
        If the file has no Window Center/Width (0028,1050)/(0028,1051) or fewer than *index* + 1.
    """
    item = _voi_item(ds, frame)
    if "WindowCenter" not in item or "WindowWidth" not in item:
        raise ValueError("the file has no Window Center (0028,1050) / Window Width (0028,1051)")
    center = _nth(item.WindowCenter, index)
    width = _nth(item.WindowWidth, index)
    function = as_voi_function(item.get("VOILUTFunction") or "LINEAR")
    if not math.isfinite(center) or not math.isfinite(width):
        raise ValueError(f"Window Center/Width not finite: {center}, {width}")
    return Window(center, width, function)


def has_voi_lut_sequence(ds: Dataset, frame: int = 0) -> bool:
    """Whether a usable VOI LUT Sequence (0028,3010) applies to *frame*."""
    seq = _voi_item(ds, frame).get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def apply_voi_lut_sequence(arr: np.ndarray, ds: Dataset, index: int = 0, frame: int = 0) -> np.ndarray:
    """Apply the VOI LUT Sequence item *index* (pydicom's ``apply_voi``), scaled to ``[0, 1]``.

    Parameters
    ----------
    arr : numpy.ndarray
        Modality values of one frame; the LUT is indexed by them, so they must be integral.
    ds : pydicom.dataset.Dataset
        Source dataset.
    index : int
        Which LUT of the sequence.
    frame : int
        0-based frame (enhanced multi-frame).

    Returns
    -------
    numpy.ndarray
        ``float32`` in ``[0, 1]``: the LUT output divided by its maximum (``2**bits - 1``, the
        LUT Descriptor's third value).
    """
    item_ds = _voi_item(ds, frame)
    lut = item_ds.VOILUTSequence[index]
    bits = int(lut.LUTDescriptor[2])
    out = apply_voi(np.rint(arr).astype(np.int32), item_ds, index)
    return (out.astype(np.float32) / float(2**bits - 1)).clip(0.0, 1.0)
