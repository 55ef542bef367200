"""Modality LUT stage: stored values -> modality values (Hounsfield units for CT).

PS3.3 C.11.1: *Rescale Slope*/*Rescale Intercept* or a *Modality LUT Sequence*; in enhanced
multi-frame objects the rescale sits in the Pixel Value Transformation functional group, per
frame or shared (PS3.3 C.7.6.16.2.9).  The arithmetic is pydicom's ``apply_modality_lut``; this
module only finds the right attributes for a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array

__all__ = ["IDENTITY", "Rescale", "frame_rescale", "modality_lut_dataset", "rescale_frame", "to_hu"]


@dataclass(frozen=True)
class Rescale:
    """A linear Modality LUT: Rescale Slope, Intercept and Type (PS3.3 C.11.1.1.2)."""

    slope: float
    intercept: float
    type: str = "US"

    @property
    def integral(self) -> bool:
        """Whether integral stored values give integral modality values (a table can index them)."""
        return float(self.slope).is_integer() and float(self.intercept).is_integer()

    def range_of(self, low: int, high: int) -> tuple[int, int]:
        """The (lowest, highest) modality value the stored values ``low..high`` become, rounded."""
        ends = (self.slope * low + self.intercept, self.slope * high + self.intercept)
        return int(round(min(ends))), int(round(max(ends)))


#: The identity Modality LUT (stored values are the modality values).
IDENTITY = Rescale(1.0, 0.0, "US")


def _functional_group_item(ds: Dataset, sequence: str, frame: int) -> Dataset | None:
    """The first item of functional group *sequence* for *frame*: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        group = per_frame[frame].get(sequence)
        if group:
            return group[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        group = shared[0].get(sequence)
        if group:
            return group[0]
    return None


def modality_lut_dataset(ds: Dataset, frame: int = 0) -> Dataset:
    """The dataset holding the Modality LUT module that applies to *frame*.

    For an enhanced multi-frame object this is the Pixel Value Transformation item of the frame
    (per-frame, else shared); otherwise *ds* itself.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The source dataset (pixel data need not be loaded).
    frame : int
        0-based frame index.

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset suitable for :func:`pydicom.pixels.apply_modality_lut`.
    """
    if "RescaleSlope" in ds or ds.get("ModalityLUTSequence"):
        return ds
    item = _functional_group_item(ds, "PixelValueTransformationSequence", frame)
    return item if item is not None else ds


def frame_rescale(ds: Dataset, frame: int = 0) -> Rescale | None:
    """The linear Modality LUT that applies to *frame*, as :func:`rescale_frame` applies it.

    Returns
    -------
    Rescale or None
        :data:`IDENTITY` without Rescale Slope/Intercept; None for a Modality LUT Sequence (a
        table, not a line).  Rescale Type is the file's, else ``HU`` for CT, else ``US``.
    """
    item = modality_lut_dataset(ds, frame)
    if item.get("ModalityLUTSequence"):
        return None
    slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        return IDENTITY
    kind = str(item.get("RescaleType") or ("HU" if ds.get("Modality") == "CT" else "US"))
    return Rescale(float(slope), float(intercept), kind)


def rescale_frame(arr: np.ndarray, ds: Dataset, frame: int = 0) -> np.ndarray:
    """Apply the Modality LUT stage to one decoded frame.

    Parameters
    ----------
    arr : numpy.ndarray
        The stored values of frame *frame*, shape (rows, columns).
    ds : pydicom.dataset.Dataset
        The source dataset; not modified.
    frame : int
        0-based index of the frame, used to find per-frame rescale values.

    Returns
    -------
    numpy.ndarray
        ``float32`` modality values (HU for CT).  Without a Modality LUT module the stored values,
        as ``float32``.
    """
    return np.asarray(apply_modality_lut(arr, modality_lut_dataset(ds, frame)), dtype=np.float32)


def to_hu(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Modality values (Hounsfield units for CT) of a dataset with its pixel data.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset read with its pixel data.
    frame : int, optional
        0-based frame index; ``None`` for every frame (shape (frames, rows, columns) for
        multi-frame objects, (rows, columns) otherwise).

    Returns
    -------
    numpy.ndarray
        ``float32`` array.  For whole multi-frame volumes prefer iterating frames with
        :func:`node.imaging.frames.iter_frames` and :func:`rescale_frame`, which keeps one frame in
        memory at a time.
    """
    if frame is not None:
        return rescale_frame(pixel_array(ds, index=frame), ds, frame)
    arr = pixel_array(ds)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames == 1:
        return rescale_frame(arr, ds, 0)
    out = np.empty(arr.shape, dtype=np.float32)
    for index in range(frames):
        out[index] = rescale_frame(arr[index], ds, index)
    return out
