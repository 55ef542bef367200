"""A volume's values: its frames decoded one at a time into one array.

Voxels are held as ``(slices, rows, columns)``, filled one decoded frame at a time, so that the
NIfTI/NumPy voxel order ``(columns, rows, slices)`` (``i`` along the row direction, ``j`` along the
column direction, ``k`` along the slice normal) is the same memory seen in Fortran order, without a
copy.  Without a display step the values are the modality values (Hounsfield units for CT): the
stored integers with the slope and intercept to apply where that is exact, ``float32`` otherwise;
with a window, equalisation or channels, the output pixels the same pipeline writes as PNG
(:class:`~node.process.render.FrameRenderer`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from node.config.pipeline import Pipeline
from node.imaging.modality import modality_lut_dataset
from node.imaging.source import UnsupportedImage
from node.process.render import FrameRenderer, modality_values
from node.process.volume import SliceSource, VolumePlan

__all__ = ["Voxels", "read_voxels"]

log = logging.getLogger(__name__)


@dataclass
class Voxels:
    """A volume's values, ``(slices, rows, columns)`` (``(..., 3)`` RGB) in C order.

    The value of a voxel is ``array * slope + intercept``; :attr:`values` says what that value is.
    """

    array: np.ndarray
    slope: float = 1.0
    intercept: float = 0.0
    values: str = ""

    @property
    def rgb(self) -> bool:
        """Whether each voxel is an RGB triple."""
        return self.array.ndim == 4

    def voxel_order(self) -> np.ndarray:
        """The array as ``(columns, rows, slices[, 3])``: NIfTI/NumPy voxel order, a view (no copy)."""
        if self.rgb:
            return self.array.transpose(2, 1, 0, 3)
        return self.array.T


def read_voxels(plan: VolumePlan, pipeline: Pipeline, series_bins: np.ndarray | None = None, *,
                scaled_integers: bool = True) -> Voxels:
    """Decode *plan*'s frames, one at a time, into one array of the volume's values.

    Parameters
    ----------
    plan : VolumePlan
        The slices.
    pipeline : Pipeline
        Without a display step (window, equalise, channels) the values are modality values (the
        clip step applied); with one, the output pixels :class:`~node.process.render.FrameRenderer` makes.
    series_bins : numpy.ndarray, optional
        Equalisation edges for the whole series (``per = "series"``).
    scaled_integers : bool
        Whether the caller stores a slope and intercept with the values (NIfTI): then the stored
        integers are kept whenever one slope and intercept, exact in float32, apply to every slice.
        Without (NumPy) integers are kept only when the slope is 1 and the intercept a whole number
        (Hounsfield units of CT), with the intercept added.  Otherwise ``float32`` modality values.

    Raises
    ------
    UnsupportedImage
        A frame that cannot be decoded or rendered: the volume is not made (never with a slice missing).
    """
    first = plan.slices[0].image
    if pipeline.display is not None or (not first.is_grey and not pipeline.grey):
        return _rendered(plan, pipeline, series_bins)
    if first.is_grey and pipeline.clip is None:
        rescale = _shared_rescale(plan, pipeline)
        if rescale is not None:
            voxels = _stored(plan, rescale, scaled_integers, rescaled=pipeline.rescale)
            if voxels is not None:
                return voxels
    return _modality(plan, pipeline)


def _frames(plan: VolumePlan) -> Iterator[tuple[int, SliceSource, np.ndarray]]:
    """``(k, slice, decoded frame)`` for every slice, each file's frames in one pass over it."""
    by_image: dict[int, list[tuple[int, SliceSource]]] = {}
    for k, source in enumerate(plan.slices):
        by_image.setdefault(id(source.image), []).append((k, source))
    for entries in by_image.values():
        entries.sort(key=lambda entry: entry[1].frame)
        image = entries[0][1].image
        frames = image.iter_frames([source.frame for _, source in entries])
        for (k, source), arr in zip(entries, frames):
            if arr.shape[:2] != (plan.plane.rows, plan.plane.columns):
                raise UnsupportedImage(image.path, f"{source.label} decodes to {arr.shape}, not Rows x Columns "
                                       f"{plan.plane.rows} x {plan.plane.columns}")
            yield k, source, arr


def _shared_rescale(plan: VolumePlan, pipeline: Pipeline) -> tuple[float, float] | None:
    """The one (slope, intercept) of every slice, or None (a Modality LUT Sequence, or they differ)."""
    if not pipeline.rescale:
        return 1.0, 0.0
    found = set()
    for source in plan.slices:
        ds = modality_lut_dataset(source.image.header, source.frame)
        if ds.get("ModalityLUTSequence"):
            return None
        try:
            rescale = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        except (TypeError, ValueError):
            return None
        if not all(math.isfinite(v) for v in rescale):
            return None
        found.add(rescale)
        if len(found) > 1:
            return None
    return found.pop()


def _stored_range(header: Dataset) -> tuple[int, int] | None:
    """The range of the stored values from Bits Stored and Pixel Representation (None above 16 bits)."""
    allocated = int(header.BitsAllocated)
    stored = int(header.get("BitsStored") or allocated)
    if allocated > 16 or not 1 <= stored <= allocated:
        return None
    if int(header.get("PixelRepresentation") or 0):
        return -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    return 0, (1 << stored) - 1


def _integer_type(low: float, high: float) -> np.dtype | None:
    """The smallest of uint8, int16, uint16 holding ``[low, high]``, or None."""
    for candidate in (np.uint8, np.int16, np.uint16):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    return None


def _stored(plan: VolumePlan, rescale: tuple[float, float], scaled_integers: bool, *,
            rescaled: bool) -> Voxels | None:
    """Integers and the (slope, intercept) giving the modality values, or None when that is not exact."""
    slope, intercept = rescale
    ranges = {_stored_range(source.image.header) for source in plan.slices}
    if None in ranges:
        return None
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)  # type: ignore[index]
    if scaled_integers:
        if float(np.float32(slope)) != slope or float(np.float32(intercept)) != intercept or slope == 0:
            return None
        add = 0
    else:
        if slope != 1 or intercept != int(intercept):
            return None
        add, slope, intercept = int(intercept), 1.0, 0.0
    # the header's range may be wider than int16 (a 16-bit signed CT with an intercept): try int16,
    # checked frame by frame; a value beyond it falls back to float32
    dtype = _integer_type(low + add, high + add) or np.dtype(np.int16)
    info = np.iinfo(dtype)
    array = np.empty((len(plan.slices), plan.plane.rows, plan.plane.columns), dtype=dtype)
    for k, _, arr in _frames(plan):
        if arr.ndim != 2 or arr.dtype.kind not in "iu":
            return None
        low_value, high_value = int(arr.min()) + add, int(arr.max()) + add
        if low_value < info.min or high_value > info.max:  # keep every value, as float32
            log.info("%s: values %d..%d do not fit %s: float32 volume", plan.slices[k].label, low_value,
                     high_value, dtype)
            return None
        array[k] = arr.astype(np.int32) + add if add else arr
    return Voxels(array, slope, intercept, _modality_meaning(plan, rescaled))


def _modality(plan: VolumePlan, pipeline: Pipeline) -> Voxels:
    array = np.empty((len(plan.slices), plan.plane.rows, plan.plane.columns), dtype=np.float32)
    for k, source, arr in _frames(plan):
        array[k] = modality_values(arr, source.image, pipeline, source.frame)
    meaning = _modality_meaning(plan, pipeline.rescale)
    if pipeline.grey and not plan.slices[0].image.is_grey:
        meaning = "grey values of the colour source"
    if pipeline.clip is not None:
        meaning += f", {pipeline.clip.describe()}"
    return Voxels(array, values=meaning)


def _modality_meaning(plan: VolumePlan, rescaled: bool) -> str:
    modality = str(plan.first_header.get("Modality") or "")
    if not rescaled:
        return "stored values" if modality != "CT" else "stored values (Hounsfield units: no rescale in the source)"
    return "modality values (Hounsfield units)" if modality == "CT" else "modality values"


def _rendered(plan: VolumePlan, pipeline: Pipeline, series_bins: np.ndarray | None) -> Voxels:
    renderers: dict[int, FrameRenderer] = {}
    array: np.ndarray | None = None
    for k, source, arr in _frames(plan):
        renderer = renderers.get(id(source.image))
        if renderer is None:
            renderer = renderers[id(source.image)] = FrameRenderer(pipeline, source.image, series_bins)
        out = renderer.render(arr, source.frame)
        if array is None:
            array = np.empty((len(plan.slices), *out.shape), dtype=out.dtype)
        if out.shape != array.shape[1:] or out.dtype != array.dtype:
            raise UnsupportedImage(source.image.path, f"{source.label} renders to {out.dtype} {out.shape}, the "
                                   f"volume's other slices to {array.dtype} {array.shape[1:]}")
        array[k] = out
    assert array is not None
    return Voxels(array, values=f"output pixels of pipeline {pipeline.name!r}: {pipeline.describe()}")
