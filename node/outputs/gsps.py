"""Grayscale Softcopy Presentation State output (``output = "gsps"``): how to show the sources.

Instead of new pixels, one Grayscale Softcopy Presentation State (GSPS, PS3.3 A.33.1) per source
series, in a new series of the source study, tells any viewer or PACS how to display the source
images as the pipeline would: it references every source image and copies no pixel data.  What
each step becomes (PS3.4 N.2: stored value -> Modality LUT -> VOI LUT -> Presentation LUT):

* ``rescale``: the Modality LUT module carries the sources' Rescale Slope/Intercept/Type (Rescale
  Type ``HU`` for CT when the source does not say).  Without the step it is the identity, so the
  presentation state's windows apply to stored values as the node's did.
* ``window`` (a LINEAR window, preset or centre/width, or the file's own): Window Center/Width in
  the Softcopy VOI LUT module, one item per distinct window (file windows differ per image/frame).
* everything else the display does, as a VOI LUT table (LUT Descriptor, 16-bit LUT Data) holding
  the node's own 16-bit display values, computed by :class:`node.process.render.FrameRenderer`
  over every value the images hold: equalisation (one table per image - per frame of a
  multi-frame image - for ``per = "image"``, one for the series for ``per = "series"``), a clip
  (which a window alone cannot express), SIGMOID and LINEAR_EXACT windows (see below), the
  default display (the clip range, else the file's window, else each frame's own range).
  The table's LUT Explanation says what it is.
* MONOCHROME1 sources: Presentation LUT Shape ``INVERSE`` (in a presentation state the
  Presentation LUT, not the image's Photometric Interpretation, decides polarity: dcmtk shows a
  MONOCHROME1 image under ``IDENTITY`` with its grey scale reversed).

What a GSPS cannot express is refused by the config check and the CLI
(:data:`node.config.pipeline.GSPS_CANNOT`: ``grey``, ``channels``, ``colormap``); a colour
source image is refused here (a GSPS applies to grey images only), the rest of its series kept.

SIGMOID and LINEAR_EXACT windows are written as tables, not as Window Center/Width with a VOI LUT
Function: dcmtk's presentation state reader (dcmpstat ``DVPSSoftcopyVOI::read``, 3.6.7 installed
here and current sources) reads Window Center, Width and Explanation and the VOI LUT Sequence
but never VOI LUT Function, so ``dcmp2pgm`` - and any viewer built on dcmpstat - shows such a
window as LINEAR: measured on a CT slice with SIGMOID 40/80, a third of the pixels up to 32 grey
levels off.  A table is shown the same everywhere; its explanation names the function, centre
and width.

When the Modality LUT cannot be carried once for the whole presentation state - the images or
frames of the series have different rescales, a Modality LUT Sequence, or a non-integral
slope/intercept where a table is needed (a table is indexed by integral values), or a table
would not fit 65,536 entries - the presentation state carries the identity and every image (or
frame) gets a table over its stored values that includes its own rescale ("folded").

highdicom 0.28's :class:`highdicom.pr.GrayscaleSoftcopyPresentationState` and
:class:`highdicom.pr.SoftcopyVOILUTTransformation` build the object; what they cannot do, and
what is done about it:

* it reads Type 2 patient/study attributes (Patient's Birth Date, Sex, Accession Number, Study
  ID, Study Date/Time, Referring Physician) from the first image and raises AttributeError when a
  real source lacks one: it is given copies of the headers with the missing ones empty (PS3.5:
  an empty Type 2 value means unknown);
* copying the Modality LUT from the images fails for multi-frame images without shared
  functional groups (AttributeError) or with a per-frame Pixel Value Transformation (ValueError)
  and copies only slope/intercept: the node always passes the transformation itself;
* :class:`highdicom.VOILUT` refuses a negative first mapped value, but a CT table starts at
  negative HU: the LUT Descriptor is written as SS then (PS3.3 C.11.2.1.1 allows US or SS);
* all referenced images must have the same Rows/Columns (one Displayed Area Selection for all):
  a series of several sizes (or mixing MONOCHROME1 and MONOCHROME2, which need different
  Presentation LUTs) gets one presentation state per size and polarity, in the same new series;
* ``check_person_name`` warns with the patient's name in the message: its warnings are silenced,
  so no name reaches the logs;
* dciodvfy reported two errors on its object from the shared CT: Laterality missing (General
  Series, Type 2C) and an empty De-identification Method copied from a source that says Patient
  Identity Removed: both are set as for the node's Secondary Captures
  (:func:`~node.outputs.secondary_capture.derived_series_laterality`,
  :func:`~node.outputs.secondary_capture.complete_deidentification`);
* it stamps creation dates with the clock: they are set from the processing time given;
* it turns a Window Center & Width Explanation given as one string into a list of its letters
  (VM 29 for ``brain window C=40 W=80 LINEAR``): the explanation is set afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node import __version__
from node.config.pipeline import Equalise, OutputFormat, Pipeline, WindowSpec
from node.imaging.display import clip, floor_levels
from node.imaging.equalise import FrequencyHistogram
from node.imaging.modality import modality_lut_dataset
from node.imaging.source import ImageFile, UnsupportedImage
from node.imaging.voi import VOIFunction, Window, file_window, has_voi_lut_sequence
from node.outputs.secondary_capture import (
    MANUFACTURER,
    DerivedSeries,
    complete_deidentification,
    derived_series_laterality,
)
from node.outputs.uids import derived_uid
from node.process.render import BLOCK_PIXELS, FrameRenderer, modality_values, row_blocks
from node.process.series import InputSeries
from node.store.fsutil import atomic_output

__all__ = ["GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE", "PresentationStates", "content_label",
           "write_presentation_states"]

log = logging.getLogger(__name__)

GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.11.1")

#: Entries of a VOI LUT at most (the LUT Descriptor's first value is 16-bit, 0 meaning 65,536).
_MAX_LUT_ENTRIES = 1 << 16
#: Table entries are 16-bit: the node's display at 0..65535 (what png16/sc16 output holds).
_TABLE_BITS = 16
#: Type 2 attributes highdicom reads from the first referenced image (empty when absent).
_TYPE2_READ_BY_HIGHDICOM = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                            "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_LO_MAX = 64


@dataclass
class PresentationStates:
    """What writing the presentation states of one series produced."""

    outputs: list[Path] = field(default_factory=list)
    failures: list[UnsupportedImage] = field(default_factory=list)
    instances: int = 0  # source images referenced
    frames: int = 0  # source frames referenced


@dataclass(frozen=True)
class _Rescale:
    """A linear Modality LUT (Rescale Slope/Intercept/Type)."""

    slope: float
    intercept: float
    type: str = "US"

    @property
    def integral(self) -> bool:
        """Whether integral stored values give integral modality values (a table can index them)."""
        return float(self.slope).is_integer() and float(self.intercept).is_integer()

    def range_of(self, low: int, high: int) -> tuple[int, int]:
        """The modality values stored values ``low..high`` become (integral rescale)."""
        ends = (self.slope * low + self.intercept, self.slope * high + self.intercept)
        return int(round(min(ends))), int(round(max(ends)))


_IDENTITY = _Rescale(1.0, 0.0, "US")


@dataclass(frozen=True)
class _Unit:
    """One frame (0-based) of one source image: what a VOI LUT item applies to."""

    image: int  # index into the group's images
    frame: int


@dataclass(frozen=True)
class _WindowVOI:
    center: float
    width: float
    explanation: str


@dataclass(frozen=True)
class _TableVOI:
    first: int  # the value mapped to the first entry
    data: bytes  # uint16 entries, little endian
    explanation: str


@dataclass
class _Statistics:
    """What a table of one frame needs, from decoding it once."""

    stored_low: int
    stored_high: int
    low: float  # smallest clipped modality value (the default display's range)
    high: float
    bins: np.ndarray | None  # per-image equalisation edges


def write_presentation_states(
    series: InputSeries,
    pipeline: Pipeline,
    folder: Path,
    derived: DerivedSeries,
    *,
    now: datetime.datetime,
) -> PresentationStates:
    """Write the presentation state(s) showing *series* as *pipeline* says, under *folder*.

    Parameters
    ----------
    series : InputSeries
        The source images of one series.
    pipeline : Pipeline
        What to show (``output = "gsps"``).
    folder : pathlib.Path
        Where the files go (``<out>/<StudyUID>/<derived series UID>``), as ``<SOP UID>.dcm``.
    derived : DerivedSeries
        The new series (UID, number, description) the presentation states go into.
    now : datetime.datetime
        Presentation creation date and time (injected so output is reproducible).

    Returns
    -------
    PresentationStates
        The files written (one per series, more when it mixes image sizes or polarities) and
        the images left out, each with why (a colour image, undecodable pixels, ...).
    """
    result = PresentationStates()
    usable = []
    for image in series.images:
        problem = _unreferenceable(image)
        if problem is None:
            usable.append(image)
        else:
            result.failures.append(UnsupportedImage(image.path, problem))
    fingerprint = pipeline.fingerprint()
    groups = _groups(usable)
    for number, (key, group) in enumerate(groups.items(), start=1):
        images, voi, rescale, failures = _plan(pipeline, group)
        result.failures.extend(failures)
        if not images:
            continue
        sop_uid = derived_uid(series.series_uid, "presentation state", fingerprint, key)
        path = folder / f"{sop_uid}.dcm"
        try:
            state = _presentation_state(
                images, pipeline, derived, voi, rescale, sop_uid=sop_uid, instance_number=number, now=now
            )
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom refusing what it was given
            reason = f"no presentation state could be built for {len(images)} images ({key}): {exc}"
            result.failures.extend(UnsupportedImage(image.path, reason) for image in images)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as handle:
            pydicom.dcmwrite(handle, state, enforce_file_format=True)
        result.outputs.append(path)
        result.instances += len(images)
        result.frames += sum(image.number_of_frames for image in images)
        log.info("series %s: presentation state %s shows %d images", series.series_uid, sop_uid, len(images))
    return result


def _unreferenceable(image: ImageFile) -> str | None:
    """Why a presentation state cannot show *image*, or None."""
    if not image.is_grey:
        return (f"colour image ({image.photometric}): a Grayscale Softcopy Presentation State applies to grey "
                "images only; use output sc or png for this series")
    header = image.header
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not header.get(keyword):
            tag = pydicom.datadict.tag_for_keyword(keyword)
            return f"no {keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}): a presentation state cannot reference it"
    return None


def _groups(images: Iterable[ImageFile]) -> dict[str, list[ImageFile]]:
    """The images by size and polarity (one presentation state each), in instance order."""
    groups: dict[str, list[ImageFile]] = {}
    for image in images:
        key = f"{int(image.header.Rows)}x{int(image.header.Columns)} {image.photometric}"
        groups.setdefault(key, []).append(image)
    return groups


# --- what each frame's VOI LUT is -------------------------------------------------------------


def _plan(
    pipeline: Pipeline, images: Sequence[ImageFile]
) -> tuple[list[ImageFile], dict[_Unit, _WindowVOI | _TableVOI], _Rescale, list[UnsupportedImage]]:
    """The images a presentation state can show, each frame's VOI LUT (keyed by the position of its
    image in that list), the Modality LUT, and the images left out with why."""
    failures: dict[int, UnsupportedImage] = {}
    windows: dict[_Unit, _WindowVOI | None] = {}
    for index, image in enumerate(images):
        try:
            for frame in range(image.number_of_frames):
                windows[_Unit(index, frame)] = _window_voi(pipeline, image, frame)
        except UnsupportedImage as exc:
            failures[index] = exc
    windows = {u: w for u, w in windows.items() if u.image not in failures}
    rescale = _carried_rescale(pipeline, images, windows)
    tabled = {u for u, w in windows.items() if w is None or rescale is None}
    statistics, series_bins = _statistics(pipeline, images, windows, tabled, failures)
    if rescale is not None and tabled and not _tables_fit(rescale, statistics):
        rescale = None  # fold the rescale into tables over stored values (decoding again: rare)
        tabled = {u for u in windows if u.image not in failures}
        statistics, series_bins = _statistics(pipeline, images, windows, tabled, failures)
    tables = _Tables(pipeline, images, statistics, series_bins, rescale) if tabled else None
    voi: dict[_Unit, _WindowVOI | _TableVOI] = {}
    for unit, window in windows.items():
        if unit.image in failures:
            continue
        if unit in tabled:
            assert tables is not None
            try:
                voi[unit] = tables.table(unit)
            except UnsupportedImage as exc:
                failures[unit.image] = exc
        else:
            assert window is not None
            voi[unit] = window
    kept = [index for index in range(len(images)) if index not in failures]
    position = {index: number for number, index in enumerate(kept)}
    voi = {_Unit(position[u.image], u.frame): v for u, v in voi.items() if u.image in position}
    return [images[i] for i in kept], voi, rescale or _IDENTITY, list(failures.values())


def _window_voi(pipeline: Pipeline, image: ImageFile, frame: int) -> _WindowVOI | None:
    """The frame's LINEAR window when the display is one (None: a table is needed).

    Raises
    ------
    UnsupportedImage
        ``from = "file"`` and the file has no usable window (as the node's own rendering).
    """
    if pipeline.clip is not None:
        return None
    display = pipeline.display
    if isinstance(display, WindowSpec) and not display.from_file:
        assert display.window is not None
        return _linear(display.window, display.name or "")
    header = image.header
    if isinstance(display, WindowSpec):
        if has_voi_lut_sequence(header, frame):
            return None
        try:
            win = file_window(header, display.index, frame)
        except ValueError as exc:
            raise UnsupportedImage(image.path, f"window from file: {exc}") from exc
        if win.width < 1 if win.function is VOIFunction.LINEAR else win.width <= 0:
            raise UnsupportedImage(image.path, f"window from file: Window Width {win.width:g} is too small "
                                   f"for {win.function.value}")
        return _linear(win, f"file {display.index + 1}" if display.index else "file")
    if display is None:
        try:
            win = file_window(header, 0, frame)
        except ValueError:
            return None  # the frame's own range: a table
        return _linear(win, "file") if win.width >= 1 else None
    return None


def _linear(win: Window, name: str) -> _WindowVOI | None:
    if win.function is not VOIFunction.LINEAR:
        return None  # dcmtk's presentation states ignore VOI LUT Function: a table (module docstring)
    return _WindowVOI(win.center, win.width, _lo(f"{name} {win.describe()}".strip()))


def _frame_rescale(image: ImageFile, frame: int) -> _Rescale | None:
    """The Modality LUT of one frame as the node applies it; None for a Modality LUT Sequence."""
    ds = modality_lut_dataset(image.header, frame)
    if ds.get("ModalityLUTSequence"):
        return None
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        return _IDENTITY
    kind = str(ds.get("RescaleType") or ("HU" if image.header.get("Modality") == "CT" else "US"))
    return _Rescale(float(slope), float(intercept), kind)


def _carried_rescale(
    pipeline: Pipeline, images: Sequence[ImageFile], windows: dict[_Unit, _WindowVOI | None]
) -> _Rescale | None:
    """The Modality LUT the presentation state carries for all its images, or None to fold it."""
    if not pipeline.rescale:
        return _IDENTITY
    found = {_frame_rescale(images[unit.image], unit.frame) for unit in windows}
    if len(found) != 1 or None in found:
        return None
    rescale = found.pop()
    if not rescale.integral and any(w is None for w in windows.values()):
        return None
    return rescale


def _tables_fit(rescale: _Rescale, statistics: dict[_Unit, _Statistics]) -> bool:
    """Whether tables indexed by modality values fit a VOI LUT (else they index stored values)."""
    for stats in statistics.values():
        low, high = rescale.range_of(stats.stored_low, stats.stored_high)
        if high - low + 1 > _MAX_LUT_ENTRIES or not -(1 << 15) <= low < (1 << 16):
            return False
    return True


def _statistics(
    pipeline: Pipeline,
    images: Sequence[ImageFile],
    windows: dict[_Unit, _WindowVOI | None],
    tabled: set[_Unit],
    failures: dict[int, UnsupportedImage],
) -> tuple[dict[_Unit, _Statistics], np.ndarray | None]:
    """Decode the frames that need a table once: their value ranges and equalisation edges.

    Per-series equalisation reads every frame (one histogram for the series, as
    :func:`node.process.render.series_bins`).  An image that fails to decode is added to
    *failures* (by its index) and left out.
    """
    equalise = pipeline.equalise
    per_series = equalise is not None and equalise.per == "series"
    series_histogram = FrequencyHistogram() if per_series else None
    wanted = {u.image for u in (windows if per_series else tabled)}
    statistics: dict[_Unit, _Statistics] = {}
    for index in sorted(wanted - set(failures)):
        image = images[index]
        try:
            for frame, arr in enumerate(image.iter_frames()):
                stats = _frame_statistics(pipeline, image, frame, arr, series_histogram)
                if _Unit(index, frame) in tabled:
                    statistics[_Unit(index, frame)] = stats
        except UnsupportedImage as exc:
            failures[index] = exc
            statistics = {u: s for u, s in statistics.items() if u.image != index}
    bins = None
    if series_histogram is not None and series_histogram.count:
        assert equalise is not None
        bins = series_histogram.bins(equalise.bins)
    return statistics, bins


def _frame_statistics(
    pipeline: Pipeline, image: ImageFile, frame: int, arr: np.ndarray, series_histogram: FrequencyHistogram | None
) -> _Statistics:
    """One decoded frame's ranges (and per-image edges), a block of rows at a time as the renderer."""
    if arr.dtype.kind not in "iu":
        raise UnsupportedImage(image.path, f"stored values of type {arr.dtype} cannot index a VOI LUT table")
    equalise = pipeline.equalise
    histogram = FrequencyHistogram() if equalise is not None and equalise.per == "image" else None
    low, high = np.inf, -np.inf
    for block in row_blocks(arr, BLOCK_PIXELS):
        values = modality_values(block, image, pipeline, frame)
        if histogram is not None:
            histogram.add(values)
        if series_histogram is not None:
            series_histogram.add(values)
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    bins = histogram.bins(equalise.bins) if histogram is not None and histogram.count else None
    return _Statistics(int(arr.min()), int(arr.max()), low, high, bins)


class _Tables:
    """VOI LUT tables of the node's own display, one per frame (equal ones are shared later)."""

    def __init__(
        self,
        pipeline: Pipeline,
        images: Sequence[ImageFile],
        statistics: dict[_Unit, _Statistics],
        series_bins: np.ndarray | None,
        rescale: _Rescale | None,
    ) -> None:
        self.pipeline = pipeline
        self.images = images
        self.statistics = statistics
        self.rescale = rescale  # None: tables over stored values, the rescale folded in
        self.explanation = _lo(_table_explanation(pipeline))
        sixteen_bit = dataclasses.replace(pipeline, output=OutputFormat.PNG16)
        self.renderers = [FrameRenderer(sixteen_bit, image, series_bins) for image in images]
        # A display that is the same function for every frame gets one table over all their values.
        self.shared_range = self._shared_range() if _same_for_every_frame(pipeline) and rescale else None

    def _shared_range(self) -> tuple[int, int] | None:
        ranges = [self.rescale.range_of(s.stored_low, s.stored_high) for s in self.statistics.values()]
        if not ranges:
            return None
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        return (low, high) if high - low + 1 <= _MAX_LUT_ENTRIES else None

    def table(self, unit: _Unit) -> _TableVOI:
        """The table of one frame.

        Raises
        ------
        UnsupportedImage
            Its values span more than a VOI LUT's 65,536 entries.
        """
        image, stats = self.images[unit.image], self.statistics[unit]
        if self.rescale is not None:
            low, high = self.shared_range or self.rescale.range_of(stats.stored_low, stats.stored_high)
            inputs = np.arange(low, high + 1, dtype=np.float64).astype(np.float32)
            values = clip(inputs, self.pipeline.clip.min, self.pipeline.clip.max) if self.pipeline.clip else inputs
        else:
            low, high = stats.stored_low, stats.stored_high
            values = None
        if high - low + 1 > _MAX_LUT_ENTRIES or not -(1 << 15) <= low < (1 << 16):
            raise UnsupportedImage(
                image.path, f"values {low}..{high} do not fit a VOI LUT table (at most {_MAX_LUT_ENTRIES:,} "
                "entries from -32768 or above): no presentation state can show this image as the pipeline does"
            )
        if values is None:
            stored = np.arange(low, high + 1).astype(np.int64)
            values = modality_values(stored, image, self.pipeline, unit.frame)
        display = self.renderers[unit.image].display_values(
            values, unit.frame, low=stats.low, high=stats.high, bins=stats.bins
        )
        data = floor_levels(display, _TABLE_BITS).astype("<u2")
        return _TableVOI(low, data.tobytes(), self.explanation)


def _same_for_every_frame(pipeline: Pipeline) -> bool:
    """Whether the display maps a modality value to the same grey on every frame."""
    display = pipeline.display
    if isinstance(display, WindowSpec):
        return not display.from_file
    if isinstance(display, Equalise):
        return display.per == "series"
    clip_step = pipeline.clip
    return display is None and clip_step is not None and clip_step.min is not None and clip_step.max is not None


def _table_explanation(pipeline: Pipeline) -> str:
    """LUT Explanation of a table: what the display does, e.g. ``equalise 100 bins per image``."""
    parts = []
    if pipeline.clip is not None:
        parts.append(pipeline.clip.describe())
    display = pipeline.display
    parts.append(display.describe() if display is not None else "default display")
    return "; ".join(parts)


# --- the object ---------------------------------------------------------------------------------


def _presentation_state(
    images: Sequence[ImageFile],
    pipeline: Pipeline,
    derived: DerivedSeries,
    voi: dict[_Unit, _WindowVOI | _TableVOI],
    rescale: _Rescale,
    *,
    sop_uid: str,
    instance_number: int,
    now: datetime.datetime,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Build the presentation state of *images* (one size and polarity) with highdicom."""
    references = [_reference(image.header) for image in images]
    shape = (hd.PresentationLUTShapeValues.INVERSE if images[0].is_monochrome1
             else hd.PresentationLUTShapeValues.IDENTITY)
    with warnings.catch_warnings():
        # highdicom's check_person_name warns with the patient's name in the message
        warnings.simplefilter("ignore")
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=references,
            series_instance_uid=derived.series_instance_uid,
            series_number=derived.series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=__version__,
            device_serial_number="",
            content_label=content_label(pipeline.name),
            content_description=_lo(derived.derivation_description) or None,
            modality_lut_transformation=hd.ModalityLUTTransformation(
                rescale_intercept=rescale.intercept, rescale_slope=rescale.slope, rescale_type=rescale.type
            ),
            voi_lut_transformations=_voi_items(references, images, voi),
            presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
            series_description=derived.series_description or None,
            series_date=now.date(),
            series_time=now.time(),
        )
    _finish(state, images[0].header, now)
    return state


def _reference(header: Dataset) -> Dataset:
    """A copy of a source header for highdicom: public attributes before Pixel Data, the Type 2
    ones it reads present (empty when the source lacks them).  Deep: highdicom puts the copied
    elements themselves into the presentation state, which is changed afterwards."""
    ref = Dataset()
    for tag in header.keys():
        if tag.is_private or tag.group >= 0x7FE0 or 0x6000 <= tag.group <= 0x60FF:
            continue  # pixel data, overlays (large, never read), private attributes
        ref.add(copy.deepcopy(header[tag]))
    for keyword in _TYPE2_READ_BY_HIGHDICOM:
        if keyword not in ref or ref[keyword].value is None:
            setattr(ref, keyword, "")
    return ref


def _voi_items(
    references: Sequence[Dataset], images: Sequence[ImageFile], voi: dict[_Unit, _WindowVOI | _TableVOI]
) -> list[hd.pr.SoftcopyVOILUTTransformation]:
    """One Softcopy VOI LUT item per distinct VOI LUT, referencing the images/frames it applies to."""
    by_voi: dict[_WindowVOI | _TableVOI, list[_Unit]] = {}
    for unit, item in voi.items():
        by_voi.setdefault(item, []).append(unit)
    if len(by_voi) == 1:
        return [_voi_item(next(iter(by_voi)), None)]
    items = []
    for item, units in by_voi.items():
        frames: dict[int, list[int]] = {}
        for unit in units:
            frames.setdefault(unit.image, []).append(unit.frame + 1)
        whole = [i for i, numbers in frames.items() if len(numbers) == images[i].number_of_frames]
        if whole:
            items.append(_voi_item(item, hd.ReferencedImageSequence(referenced_images=[references[i] for i in whole])))
        for index, numbers in frames.items():
            if index not in whole:
                items.append(_voi_item(item, hd.ReferencedImageSequence(
                    referenced_images=[references[index]], referenced_frame_number=numbers)))
    return items


def _voi_item(
    item: _WindowVOI | _TableVOI, referenced: hd.ReferencedImageSequence | None
) -> hd.pr.SoftcopyVOILUTTransformation:
    if isinstance(item, _WindowVOI):
        transformation = hd.pr.SoftcopyVOILUTTransformation(
            window_center=item.center, window_width=item.width, referenced_images=referenced
        )
        if item.explanation:  # not through highdicom: it makes a one-string explanation a list of its letters
            transformation.WindowCenterWidthExplanation = item.explanation
        return transformation
    data = np.frombuffer(item.data, dtype="<u2").astype(np.uint16)
    lut = hd.VOILUT(first_mapped_value=max(item.first, 0), lut_data=data, lut_explanation=item.explanation or None)
    if item.first < 0:  # highdicom refuses a negative first value; the standard allows SS
        entries = 0 if len(data) == _MAX_LUT_ENTRIES else len(data)
        lut["LUTDescriptor"] = DataElement(0x00283002, "SS", [entries, item.first, _TABLE_BITS])
    return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[lut], referenced_images=referenced)


def _finish(state: Dataset, first: Dataset, now: datetime.datetime) -> None:
    """What highdicom leaves out or stamps with the clock (see the module docstring)."""
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    state.InstanceCreationDate, state.InstanceCreationTime = date, time
    state.PresentationCreationDate, state.PresentationCreationTime = date, time
    for item in state.get("ContributingEquipmentSequence") or []:
        item.ContributionDateTime = f"{date}{time}"
    if first.get("BodyPartExamined"):
        state.BodyPartExamined = first.BodyPartExamined
    laterality = derived_series_laterality(first)
    if laterality is not None:
        state.Laterality = laterality
    complete_deidentification(state)


def content_label(name: str) -> str:
    """Content Label (CS) from a pipeline's name: at most 16 of A-Z 0-9 _, starting with a letter
    and not ending with ``_`` (what highdicom accepts), e.g. ``ct-brain view`` -> ``CT_BRAIN_VIEW``."""
    label = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
    if not label:
        return "DICOM_NODE"
    if not label[0].isalpha():
        label = f"P_{label}"
    return label[:16].rstrip("_")


def _lo(text: str) -> str:
    """*text* as LO: one line, no backslash, at most 64 characters."""
    return " ".join(text.replace("\\", "/").split())[:_LO_MAX].rstrip()
