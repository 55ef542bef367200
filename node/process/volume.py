"""A series as volumes: which slices make each volume, and where every voxel lies in patient space.

A series becomes one volume per *stack*: the slices (single-frame files, or frames of an enhanced
multi-frame file) that share rows, columns, orientation, pixel spacing, and the stack, echo,
diffusion, temporal position and frame type they belong to.  Within a stack the slices are ordered
along the slice normal (``row cosine x column cosine``) by their Image Position (Patient), or the
Plane Position of each frame, never by Instance Number or file name.

The promise kept (:data:`PLACEMENT_MM`): every slice's Image Position (Patient) equals the affine
applied to its first voxel, ``affine @ (0, 0, k, 1)``, within 0.01 mm.  The affine's third column
is the step from slice to slice, so a gantry-tilted series gets a sheared affine that places each
slice where it is; :attr:`Placement.rigid` is the closest rigid one (for the NIfTI qform), and how
far it misplaces slices is said.  A stack whose slices do not lie on one straight line at equal
steps (a gap, a change of spacing) is split into volumes that do, each listed with the reason; two
slices at the same position are refused with a message naming them: never silently placed wrong.

The volume's values are read by :mod:`node.process.voxels`, its sidecar said by
:mod:`node.process.volume_facts`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.imaging.modality import _functional_group_item
from node.imaging.source import ImageFile, UnsupportedImage
from node.process.series import InputSeries

__all__ = [
    "LPS_TO_RAS", "MAX_PARTS", "PLACEMENT_MM", "SPLIT_MM", "Placement", "Plane", "SliceSource", "VolumePlan",
    "VolumeRefused", "plan_volumes", "slice_geometry",
]

log = logging.getLogger(__name__)

#: The promise: every slice's Image Position (Patient) is within this of ``affine @ (0, 0, k, 1)`` (mm).
PLACEMENT_MM = 0.01
#: Slices further than this (mm) from the straight line at equal steps through their volume's
#: first and last slice start a new volume: half the promise, the rest is headroom for the
#: float32 the NIfTI header stores the affine in.
SPLIT_MM = 0.005
#: A stack that would need more volumes than this is refused (positions without a regular grid,
#: e.g. rounded to 0.1 mm, would otherwise make a volume of every two slices).
MAX_PARTS = 10

#: DICOM patient coordinates are LPS (x to the patient's left, y posterior, z head); NIfTI's are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Orientation cosines and pixel spacings closer than these are the same stack's.
_COSINE_TOLERANCE = 1e-4
_SPACING_TOLERANCE = 1e-4

# Per-frame functional groups whose Frame Type (value 3: M, P, R, I...) tells image kinds apart.
_FRAME_TYPE_SEQUENCES = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence",
                         "XAXRFFrameCharacteristicsSequence")


class VolumeRefused(UnsupportedImage):
    """Slices that cannot be one correctly placed volume; the message names their positions and files."""


@dataclass(frozen=True)
class SliceSource:
    """One slice of a volume: a frame of a file, and where its first pixel is (LPS mm), if known."""

    image: ImageFile
    frame: int  # 0-based frame index in the file
    position: tuple[float, float, float] | None

    @property
    def label(self) -> str:
        """The file's name, and the frame (1-based) of a multi-frame file: for messages."""
        name = self.image.path.name
        return f"{name} frame {self.frame + 1}" if self.image.number_of_frames > 1 else name

    @property
    def sop_instance_uid(self) -> str:
        """The source's SOP Instance UID ("" if it has none)."""
        return str(self.image.header.get("SOPInstanceUID") or "")


@dataclass(frozen=True)
class Plane:
    """The in-plane geometry a stack's slices share.

    Attributes
    ----------
    rows, columns : int
        Rows and Columns of each slice.
    row_cosine, column_cosine : tuple of float, or None
        Unit vectors (LPS) along a row (increasing column index) and down a column (increasing row
        index): Image Orientation (Patient); None when the source has no orientation.
    row_spacing, column_spacing : float or None
        Pixel Spacing (0028,0030): mm between rows (value 1), between columns (value 2).
    slice_spacing : float or None
        Spacing Between Slices, else Slice Thickness: the third voxel size of a one-slice volume.
    """

    rows: int
    columns: int
    row_cosine: tuple[float, float, float] | None
    column_cosine: tuple[float, float, float] | None
    row_spacing: float | None
    column_spacing: float | None
    slice_spacing: float | None

    @property
    def oriented(self) -> bool:
        """Whether the orientation is known."""
        return self.row_cosine is not None and self.column_cosine is not None

    @property
    def normal(self) -> np.ndarray:
        """The unit slice normal, ``row cosine x column cosine`` (LPS)."""
        assert self.row_cosine is not None and self.column_cosine is not None
        normal = np.cross(self.row_cosine, self.column_cosine)
        return normal / np.linalg.norm(normal)

    def same_stack(self, other: Plane) -> bool:
        """Whether *other* has the same size, orientation and pixel spacing (within tolerances)."""
        if (self.rows, self.columns, self.oriented) != (other.rows, other.columns, other.oriented):
            return False
        if self.oriented and not (
            np.allclose(self.row_cosine, other.row_cosine, atol=_COSINE_TOLERANCE, rtol=0)
            and np.allclose(self.column_cosine, other.column_cosine, atol=_COSINE_TOLERANCE, rtol=0)
        ):
            return False
        spacings = ((self.row_spacing, other.row_spacing), (self.column_spacing, other.column_spacing))
        return all((a is None) == (b is None) and (a is None or abs(a - b) <= _SPACING_TOLERANCE * max(a, b))
                   for a, b in spacings)


@dataclass(frozen=True)
class Placement:
    """Where a volume's voxels are: the affines (RAS mm) and what they promise.

    Attributes
    ----------
    affine : numpy.ndarray
        4x4, voxel index ``(i, j, k, 1)`` to RAS mm; its third column is the step between slices,
        so it is sheared for a gantry-tilted series (the NIfTI sform).
    rigid : numpy.ndarray
        4x4, the closest affine without shear: the third column is the slice normal times the
        spacing along it (the NIfTI qform).
    spacing : tuple of float
        Voxel size in mm: between columns, between rows, between slices along the normal.
    placed : bool
        False when the source has no position or orientation: the affines are then the voxel sizes
        only, and say nothing of where the patient is.
    error_mm : float
        Largest distance of a slice's Image Position (Patient) from ``affine @ (0, 0, k, 1)``.
    rigid_error_mm : float
        The same for :attr:`rigid` (how far the qform misplaces the furthest slice).
    tilt_degrees : float
        Angle between the step from slice to slice and the slice normal (the gantry tilt).
    """

    affine: np.ndarray
    rigid: np.ndarray
    spacing: tuple[float, float, float]
    placed: bool
    error_mm: float = 0.0
    rigid_error_mm: float = 0.0
    tilt_degrees: float = 0.0

    @property
    def sheared(self) -> bool:
        """Whether the rigid affine would misplace a slice by more than :data:`SPLIT_MM`."""
        return self.rigid_error_mm > SPLIT_MM


@dataclass
class VolumePlan:
    """The slices of one volume, in voxel order ``k``, and where they are.

    Attributes
    ----------
    study_uid, series_uid : str
        The source series.
    stack : str
        What tells this stack from the series' others (``""`` for a series of one stack), e.g.
        ``te30``; part of the file name (:func:`node.outputs.naming.volume_file_stem`).
    part, parts : int
        This volume's number (1-based) among the volumes its stack was split into, and how many.
    slices : list of SliceSource
        In voxel order.
    plane : Plane
        Their shared in-plane geometry.
    placement : Placement
        The affines.
    split : list of str
        Why the stack was split (one line per boundary), empty when it was not.
    order : str
        How the slices were ordered.
    """

    study_uid: str
    series_uid: str
    stack: str
    part: int
    parts: int
    slices: list[SliceSource]
    plane: Plane
    placement: Placement
    split: list[str] = field(default_factory=list)
    order: str = ""

    @property
    def source_files(self) -> int:
        """How many distinct files the slices come from."""
        return len({id(s.image) for s in self.slices})

    @property
    def first_header(self) -> Dataset:
        """The header of the first slice's file."""
        return self.slices[0].image.header


# --------------------------------------------------------------------------- geometry of each slice


def _number(value: Any, path: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UnsupportedImage(path, f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise UnsupportedImage(path, f"{what} is not a finite number: {value!r}")
    return number


def _numbers(ds: Dataset | None, keyword: str, count: int, path: Any) -> tuple[float, ...] | None:
    """*count* numbers of *keyword* in *ds*, None when absent; UnsupportedImage naming the tag when malformed."""
    if ds is None or ds.get(keyword) in (None, ""):
        return None
    value = ds[keyword].value
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    tag = tag_for_keyword(keyword) or 0
    what = f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    if len(items) != count:
        raise UnsupportedImage(path, f"{what} has {len(items)} values, not {count}: {value!r}")
    return tuple(_number(item, path, what) for item in items)


def _item(header: Dataset, sequence: str, frame: int) -> Dataset | None:
    """The functional group item of *frame* (per-frame, else shared), or the header itself for a
    file without functional groups."""
    if "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header:
        return _functional_group_item(header, sequence, frame)
    return None


def _geometry_value(header: Dataset, sequence: str, keyword: str, count: int, frame: int,
                    path: Any) -> tuple[float, ...] | None:
    """*keyword* from the frame's functional group *sequence*, else from the top level of the header."""
    found = _numbers(_item(header, sequence, frame), keyword, count, path)
    return found if found is not None else _numbers(header, keyword, count, path)


def _unit(vector: tuple[float, ...], path: Any) -> tuple[float, float, float]:
    norm = math.sqrt(sum(v * v for v in vector))
    if norm < 0.5:
        raise UnsupportedImage(path, f"Image Orientation (Patient) (0020,0037) has a cosine of length {norm:.3g}")
    return tuple(v / norm for v in vector)  # type: ignore[return-value]


def slice_geometry(image: ImageFile, frame: int) -> tuple[tuple[float, float, float] | None, Plane]:
    """Image Position (Patient) of *frame* and its in-plane geometry.

    Enhanced multi-frame objects keep them in the Plane Position, Plane Orientation and Pixel
    Measures functional groups (PS3.3 C.7.6.16.2), per frame or shared; other objects at the top
    level.

    Raises
    ------
    UnsupportedImage
        A position, orientation or spacing that is present but malformed (the tag is named).
    """
    header, path = image.header, image.path
    position = _geometry_value(header, "PlanePositionSequence", "ImagePositionPatient", 3, frame, path)
    orientation = _geometry_value(header, "PlaneOrientationSequence", "ImageOrientationPatient", 6, frame, path)
    spacing = _geometry_value(header, "PixelMeasuresSequence", "PixelSpacing", 2, frame, path)
    between = (_geometry_value(header, "PixelMeasuresSequence", "SpacingBetweenSlices", 1, frame, path)
               or _geometry_value(header, "PixelMeasuresSequence", "SliceThickness", 1, frame, path))
    row_cosine = column_cosine = None
    if orientation is not None:
        row_cosine, column_cosine = _unit(orientation[:3], path), _unit(orientation[3:], path)
        if abs(float(np.dot(row_cosine, column_cosine))) > 1e-3:
            raise UnsupportedImage(path, f"Image Orientation (Patient) (0020,0037) {list(orientation)}: the row "
                                   "and column cosines are not perpendicular")
    if spacing is not None and min(spacing) <= 0:
        raise UnsupportedImage(path, f"Pixel Spacing (0028,0030) {list(spacing)} must be above 0")
    plane = Plane(
        rows=int(header.Rows), columns=int(header.Columns), row_cosine=row_cosine, column_cosine=column_cosine,
        row_spacing=spacing[0] if spacing else None, column_spacing=spacing[1] if spacing else None,
        slice_spacing=between[0] if between and between[0] > 0 else None,
    )
    return position, plane  # type: ignore[return-value]


def _frame_kind(image: ImageFile, frame: int) -> tuple[tuple[str, str], ...]:
    """What besides geometry tells stacks apart: (name, value) pairs, a name per kind of difference."""
    header = image.header
    kind: list[tuple[str, str]] = [("colour", "grey" if image.is_grey else "rgb")]
    if "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header:
        content = _functional_group_item(header, "FrameContentSequence", frame)
        if content is not None:
            kind.append(("stack", str(content.get("StackID") or "")))
            kind.append(("t", str(content.get("TemporalPositionIndex") or "")))
        echo = _functional_group_item(header, "MREchoSequence", frame)
        if echo is not None:
            kind.append(("te", _short(echo.get("EffectiveEchoTime"))))
        diffusion = _functional_group_item(header, "MRDiffusionSequence", frame)
        if diffusion is not None:
            direction = diffusion.get("DiffusionGradientDirectionSequence")
            orientation = direction[0].get("DiffusionGradientOrientation") if direction else None
            kind.append(("b", _short(diffusion.get("DiffusionBValue")) + _short(orientation, prefix="dir")))
        for sequence in _FRAME_TYPE_SEQUENCES:
            item = _functional_group_item(header, sequence, frame)
            if item is not None and len(item.get("FrameType") or ()) > 2:
                kind.append(("type", str(item.FrameType[2])))
                break
    else:
        kind.append(("echo", _short(header.get("EchoNumbers"))))
        kind.append(("b", _short(header.get("DiffusionBValue"))
                     + _short(header.get("DiffusionGradientOrientation"), prefix="dir")))
        kind.append(("t", _short(header.get("TemporalPositionIdentifier"))))
        image_type = header.get("ImageType") or ()
        kind.append(("type", str(image_type[2]) if len(image_type) > 2 else ""))
    return tuple(kind)


def _short(value: Any, prefix: str = "") -> str:
    """A header value as a short name part: ``30``, ``0.5-0-1``; "" for none."""
    if value in (None, ""):
        return ""
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    parts = []
    for item in items:
        try:
            parts.append(f"{float(item):g}")
        except (TypeError, ValueError):
            parts.append(str(item))
    return prefix + "-".join(parts)


# --------------------------------------------------------------------------- stacks and volumes


@dataclass
class _Stack:
    kind: tuple[tuple[str, str], ...]
    plane: Plane
    slices: list[SliceSource] = field(default_factory=list)


def _stacks(series: InputSeries) -> tuple[list[_Stack], list[UnsupportedImage]]:
    """Every frame of the series, in the stack it belongs to (stacks in order of first appearance)."""
    stacks: list[_Stack] = []
    failures: list[UnsupportedImage] = []
    for image in series.images:
        try:
            entries = [(slice_geometry(image, f), _frame_kind(image, f), f) for f in range(image.number_of_frames)]
        except UnsupportedImage as exc:
            failures.append(exc)
            continue
        for (position, plane), kind, frame in entries:
            stack = next((s for s in stacks if s.kind == kind and s.plane.same_stack(plane)), None)
            if stack is None:
                stack = _Stack(kind, plane)
                stacks.append(stack)
            stack.slices.append(SliceSource(image, frame, position))
    return stacks, failures


def _stack_names(stacks: Sequence[_Stack]) -> list[str]:
    """A short distinct name per stack from what differs between them ("" for a series of one)."""
    if len(stacks) < 2:
        return [""] * len(stacks)
    names = []
    for stack in stacks:
        parts = []
        for index, (name, value) in enumerate(stack.kind):
            if len({s.kind[index][1] if len(s.kind) > index else "" for s in stacks}) > 1 and value:
                parts.append(f"{name}{value}")
        names.append(_safe_name("_".join(parts)))
    if len(set(names)) < len(names):  # same kind, another orientation or size: number them
        names = [f"{name}_{index}" if name else f"stack{index}" for index, name in enumerate(names, start=1)]
    return names


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-.")[:60]


def _point(position: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in position) + ")"


def plan_volumes(series: InputSeries) -> tuple[list[VolumePlan], list[UnsupportedImage]]:
    """The volumes *series* makes, and what cannot be made into one (with the reason).

    Returns
    -------
    (list of VolumePlan, list of UnsupportedImage)
        The volumes, stack by stack, each stack's parts in order along the normal; and the files
        with malformed geometry and the stacks refused (:class:`VolumeRefused`), each naming the
        positions and files at fault.
    """
    stacks, failures = _stacks(series)
    plans: list[VolumePlan] = []
    for stack, name in zip(stacks, _stack_names(stacks)):
        try:
            plans.extend(_stack_volumes(series, stack, name))
        except VolumeRefused as exc:
            log.error("series %s%s: %s", series.series_uid, f" stack {name}" if name else "", exc.reason)
            failures.append(exc)
    return plans, failures


def _stack_volumes(series: InputSeries, stack: _Stack, name: str) -> list[VolumePlan]:
    slices = stack.slices
    located = [s for s in slices if s.position is not None]
    if not stack.plane.oriented or not located:
        if located or stack.plane.oriented:
            missing = "Image Position (Patient)" if stack.plane.oriented else "Image Orientation (Patient)"
            raise VolumeRefused(slices[0].image.path, f"{missing} missing: cannot place the stack in space")
        return [_plan(series, stack, name, slices, _unplaced(stack.plane), 1, 1,
                      order="no position in the source: instance and frame order")]
    if stack.plane.row_spacing is None:
        raise VolumeRefused(slices[0].image.path, "Pixel Spacing (0028,0030) missing (the slices have a position "
                            "and orientation): cannot place the voxels in space")
    if len(located) < len(slices):
        lacking = next(s for s in slices if s.position is None)
        raise VolumeRefused(lacking.image.path, f"{lacking.label} has no Image Position (Patient) (0020,0032) while "
                            f"{len(located)} other slices of the stack have one: cannot place it")
    normal = stack.plane.normal
    ordered = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))  # stable: ties keep file order
    positions = np.array([s.position for s in ordered], dtype=np.float64)
    _refuse_duplicates(ordered, positions @ normal)
    runs = _uniform_runs(positions)
    if len(runs) > MAX_PARTS:
        steps = np.diff(positions @ normal)
        raise VolumeRefused(
            ordered[0].image.path, f"the {len(ordered)} slice positions do not lie on a regular grid (within "
            f"{SPLIT_MM} mm): {len(runs)} volumes would be needed; steps along the normal range from "
            f"{steps.min():.3f} to {steps.max():.3f} mm")
    reasons = _split_reasons(ordered, positions, runs, normal)
    if reasons:
        log.warning("series %s%s: split into %d volumes: %s", series.series_uid, f" stack {name}" if name else "",
                    len(runs), "; ".join(reasons))
    return [
        _plan(series, stack, name, ordered[start:end], _placement(stack.plane, positions[start:end]), part, len(runs),
              split=reasons, order="along the slice normal by Image Position (Patient)")
        for part, (start, end) in enumerate(runs, start=1)
    ]


def _plan(series: InputSeries, stack: _Stack, name: str, slices: list[SliceSource], placement: Placement,
          part: int, parts: int, *, split: list[str] | None = None, order: str) -> VolumePlan:
    return VolumePlan(study_uid=series.study_uid, series_uid=series.series_uid, stack=name, part=part, parts=parts,
                      slices=slices, plane=stack.plane, placement=placement, split=split or [], order=order)


def _refuse_duplicates(ordered: Sequence[SliceSource], along: np.ndarray) -> None:
    """VolumeRefused naming every pair of slices at the same place along the normal."""
    same = [i for i in range(len(ordered) - 1) if abs(along[i + 1] - along[i]) <= SPLIT_MM]
    if not same:
        return
    shown = "; ".join(f"{_point(ordered[i].position)} in {ordered[i].label} and {ordered[i + 1].label}"
                      for i in same[:5])
    more = f" and {len(same) - 5} more" if len(same) > 5 else ""
    raise VolumeRefused(
        ordered[same[0]].image.path,
        f"{len(same)} slice(s) share a position along the slice normal with another: Image Position (Patient) "
        f"{shown}{more}; one volume cannot hold both (several acquisitions or time points in one series?)")


def _fits_line(points: np.ndarray) -> bool:
    """Whether every point lies within SPLIT_MM of the line at equal steps from the first to the last."""
    if len(points) <= 2:
        return True
    step = (points[-1] - points[0]) / (len(points) - 1)
    predicted = points[0] + np.arange(len(points))[:, None] * step
    return float(np.max(np.linalg.norm(points - predicted, axis=1))) <= SPLIT_MM


def _uniform_runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of slices that each lie at equal steps on a line, greedily from the first."""
    runs = []
    start = 0
    while start < len(positions):
        end = start + 1
        while end < len(positions) and _fits_line(positions[start : end + 1]):
            end += 1
        runs.append((start, end))
        start = end
    return runs


def _split_reasons(ordered: Sequence[SliceSource], positions: np.ndarray, runs: Sequence[tuple[int, int]],
                   normal: np.ndarray) -> list[str]:
    """One line per boundary between two volumes: the positions on either side, and the steps."""
    reasons = []
    for (start, end), (next_start, next_end) in zip(runs, runs[1:]):
        before, after = ordered[end - 1], ordered[next_start]
        gap = float(np.dot(positions[next_start] - positions[end - 1], normal))
        spacing = (float(np.dot(positions[end - 1] - positions[start], normal)) / (end - start - 1)
                   if end - start > 1 else None)
        then = (float(np.dot(positions[next_end - 1] - positions[next_start], normal)) / (next_end - next_start - 1)
                if next_end - next_start > 1 else None)
        text = (f"slices 1-{end - start} of part at {_point(positions[start])}" if spacing is None else
                f"spacing {spacing:.3f} mm up to {_point(before.position)} ({before.label})")
        text += f", then a step of {gap:.3f} mm to {_point(after.position)} ({after.label})"
        if then is not None:
            text += f", then spacing {then:.3f} mm"
        reasons.append(text)
    return reasons


def _axes(plane: Plane) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Row and column cosines (LPS) and the column and row spacings (PixelSpacing values 2 and 1)."""
    row = np.asarray(plane.row_cosine if plane.row_cosine is not None else (1.0, 0.0, 0.0))
    column = np.asarray(plane.column_cosine if plane.column_cosine is not None else (0.0, 1.0, 0.0))
    return row, column, plane.column_spacing or 1.0, plane.row_spacing or 1.0


def _placement(plane: Plane, positions: np.ndarray) -> Placement:
    """The affines of slices at *positions* (LPS, in voxel order), from the first and last slice."""
    row, column, dx, dy = _axes(plane)
    normal = plane.normal
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = normal * (plane.slice_spacing or 1.0)
    dz = float(np.dot(step, normal))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, column * dy, step, positions[0]
    rigid = lps.copy()
    rigid[:3, 2] = normal * dz
    k = np.arange(len(positions))[:, None]
    error = np.linalg.norm(positions - (positions[0] + k * step), axis=1).max()
    rigid_error = np.linalg.norm(positions - (positions[0] + k * normal * dz), axis=1).max()
    across = float(np.linalg.norm(step - normal * dz))
    return Placement(affine=LPS_TO_RAS @ lps, rigid=LPS_TO_RAS @ rigid, spacing=(dx, dy, dz), placed=True,
                     error_mm=float(error), rigid_error_mm=float(rigid_error),
                     tilt_degrees=math.degrees(math.atan2(across, dz)))


def _unplaced(plane: Plane) -> Placement:
    """Voxel sizes only, for a source without position or orientation."""
    _, _, dx, dy = _axes(plane)
    affine = np.diag([dx, dy, plane.slice_spacing or 1.0, 1.0])
    return Placement(affine=affine, rigid=affine.copy(), spacing=(dx, dy, plane.slice_spacing or 1.0), placed=False)
