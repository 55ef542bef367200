"""What a presentation state must say to show a series as a pipeline does (``output = "gsps"``).

No pixels are made: for each frame of each source image this finds the VOI LUT stage that shows
it as the node's own rendering would, and the Modality LUT the presentation state carries
(PS3.4 N.2: stored value -> Modality LUT -> VOI LUT -> Presentation LUT).
:mod:`node.outputs.gsps` writes the object.

* ``rescale``: the sources' Rescale Slope/Intercept/Type as the presentation state's Modality
  LUT; without the step the identity, so windows apply to stored values as the node's did.
* a LINEAR window (preset, centre/width, the file's own): a :class:`~node.imaging.voi.VOIWindow`
  (Window Center/Width); file windows may differ per image and per frame.
* everything else the display does: a :class:`~node.imaging.voi.VOITable` holding the node's own
  16-bit display values (its png16/sc16 output), computed by
  :meth:`node.process.render.FrameRenderer.display_values` over every value the frame holds:
  equalisation (one table per frame for ``per = "image"``, one for the series for ``per =
  "series"``), a clip (which no window can express), SIGMOID and LINEAR_EXACT windows, the
  default display (the clip range, else the file's window, else the frame's own range).

SIGMOID and LINEAR_EXACT windows are tables, not Window Center/Width with a VOI LUT Function:
dcmtk's presentation state reader (dcmpstat ``DVPSSoftcopyVOI::read``, in 3.6.7 installed here
and in its current sources) reads Window Center, Width, Explanation and the VOI LUT Sequence but
never VOI LUT Function, so ``dcmp2pgm`` - and a viewer built on dcmpstat - shows such a window as
LINEAR: measured on a CT slice with SIGMOID 40/80, a third of the pixels up to 32 grey levels off.
A table is shown the same everywhere.

The Modality LUT is "folded" into tables over stored values (the presentation state then carries
the identity) when it cannot be carried once for all: the frames have different rescales, a
Modality LUT Sequence, or a non-integral slope/intercept where a table is needed (a table is
indexed by integral values), or a table over modality values would not fit a VOI LUT (65,536
entries from -32768).

A presentation state is grey only: a colour image is left out (with why); images of different
sizes, or MONOCHROME1 beside MONOCHROME2 (which need different Presentation LUTs), go into
separate presentation states (:class:`PresentationPlan`, one each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom

from node.config.pipeline import Equalise, OutputFormat, Pipeline, WindowSpec
from node.imaging.display import clip, floor_levels
from node.imaging.equalise import FrequencyHistogram
from node.imaging.modality import IDENTITY, Rescale, frame_rescale
from node.imaging.source import ImageFile, UnsupportedImage
from node.imaging.voi import VOIFunction, VOITable, VOIWindow, Window, file_window, has_voi_lut_sequence
from node.process.render import BLOCK_PIXELS, FrameRenderer, modality_values, row_blocks
from node.process.series import InputSeries

__all__ = ["MAX_LUT_ENTRIES", "PresentationPlan", "PresentationPlans", "plan_presentation_states"]

#: Entries of a VOI LUT at most (the LUT Descriptor's first value is 16-bit, 0 meaning 65,536).
MAX_LUT_ENTRIES = 1 << 16
_LO_MAX = 64


@dataclass
class PresentationPlan:
    """What one presentation state says: the images it shows and how.

    Attributes
    ----------
    key : str
        What its images share: ``ROWSxCOLUMNS PHOTOMETRIC`` (part of its derived UID).
    images : list of ImageFile
        The source images it references, in instance order.
    voi : dict
        ``(image index, 0-based frame) -> VOIWindow | VOITable``: every frame of every image.
    rescale : Rescale
        Its Modality LUT (the identity when folded into the tables).
    """

    key: str
    images: list[ImageFile]
    voi: dict[tuple[int, int], VOIWindow | VOITable]
    rescale: Rescale


@dataclass
class PresentationPlans:
    """The plans of one series, and the images no presentation state can show, each with why."""

    plans: list[PresentationPlan] = field(default_factory=list)
    failures: list[UnsupportedImage] = field(default_factory=list)


@dataclass
class _Statistics:
    """What a table of one frame needs, from decoding it once."""

    stored_low: int
    stored_high: int
    low: float  # smallest clipped modality value (the default display's range)
    high: float
    bins: np.ndarray | None  # per-image equalisation edges


Unit = tuple[int, int]  # (image index, 0-based frame)


def plan_presentation_states(series: InputSeries, pipeline: Pipeline) -> PresentationPlans:
    """How presentation states show *series* as *pipeline* does: one plan per size and polarity.

    Frames are decoded only where a table needs their values (every frame for per-series
    equalisation); a plain LINEAR window needs no pixel at all.
    """
    result = PresentationPlans()
    groups: dict[str, list[ImageFile]] = {}
    for image in series.images:
        problem = _unreferenceable(image)
        if problem is not None:
            result.failures.append(UnsupportedImage(image.path, problem))
            continue
        key = f"{int(image.header.Rows)}x{int(image.header.Columns)} {image.photometric}"
        groups.setdefault(key, []).append(image)
    for key, images in groups.items():
        plan, failures = _plan(key, pipeline, images)
        result.failures.extend(failures)
        if plan is not None:
            result.plans.append(plan)
    return result


def _unreferenceable(image: ImageFile) -> str | None:
    """Why a presentation state cannot show *image*, or None."""
    if not image.is_grey:
        return (f"colour image ({image.photometric}): a Grayscale Softcopy Presentation State applies to grey "
                "images only; use output sc or png for this series")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not image.header.get(keyword):
            tag = pydicom.datadict.tag_for_keyword(keyword)
            return f"no {keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}): a presentation state cannot reference it"
    return None


def _plan(
    key: str, pipeline: Pipeline, images: Sequence[ImageFile]
) -> tuple[PresentationPlan | None, list[UnsupportedImage]]:
    """The plan of images of one size and polarity (None when none can be shown), and the failures."""
    failures: dict[int, UnsupportedImage] = {}
    windows: dict[Unit, VOIWindow | None] = {}
    for index, image in enumerate(images):
        try:
            for frame in range(image.number_of_frames):
                windows[(index, frame)] = _window(pipeline, image, frame)
        except UnsupportedImage as exc:
            failures[index] = exc
    windows = {u: w for u, w in windows.items() if u[0] not in failures}
    rescale = _carried_rescale(pipeline, images, windows)
    tabled = {u for u, w in windows.items() if w is None or rescale is None}
    statistics, series_bins = _statistics(pipeline, images, windows, tabled, failures)
    if rescale is not None and tabled and not _tables_fit(rescale, statistics):
        rescale = None  # fold the rescale into tables over stored values (decoding again: rare)
        tabled = set(windows)
        statistics, series_bins = _statistics(pipeline, images, windows, tabled, failures)
    tables = _Tables(pipeline, images, statistics, series_bins, rescale) if tabled else None
    voi: dict[Unit, VOIWindow | VOITable] = {}
    for unit, window in windows.items():
        if unit[0] in failures:
            continue
        if unit in tabled:
            assert tables is not None
            try:
                voi[unit] = tables.table(unit)
            except UnsupportedImage as exc:
                failures[unit[0]] = exc
        else:
            assert window is not None
            voi[unit] = window
    kept = [index for index in range(len(images)) if index not in failures]
    if not kept:
        return None, list(failures.values())
    position = {index: number for number, index in enumerate(kept)}
    voi = {(position[i], frame): v for (i, frame), v in voi.items() if i in position}
    plan = PresentationPlan(key, [images[i] for i in kept], voi, rescale or IDENTITY)
    return plan, list(failures.values())


def _window(pipeline: Pipeline, image: ImageFile, frame: int) -> VOIWindow | None:
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


def _linear(win: Window, name: str) -> VOIWindow | None:
    if win.function is not VOIFunction.LINEAR:
        return None  # dcmtk's presentation states ignore VOI LUT Function: a table (module docstring)
    return VOIWindow(win, _lo(f"{name} {win.describe()}".strip()))


def _carried_rescale(
    pipeline: Pipeline, images: Sequence[ImageFile], windows: dict[Unit, VOIWindow | None]
) -> Rescale | None:
    """The Modality LUT the presentation state carries for all its images, or None to fold it."""
    if not pipeline.rescale:
        return IDENTITY
    found = {frame_rescale(images[index].header, frame) for index, frame in windows}
    if len(found) != 1 or None in found:
        return None
    rescale = found.pop()
    assert rescale is not None
    if not rescale.integral and any(w is None for w in windows.values()):
        return None
    return rescale


def _tables_fit(rescale: Rescale, statistics: dict[Unit, _Statistics]) -> bool:
    """Whether tables indexed by modality values fit a VOI LUT (else they index stored values)."""
    for stats in statistics.values():
        low, high = rescale.range_of(stats.stored_low, stats.stored_high)
        if high - low + 1 > MAX_LUT_ENTRIES or not -(1 << 15) <= low < (1 << 16):
            return False
    return True


def _statistics(
    pipeline: Pipeline,
    images: Sequence[ImageFile],
    windows: dict[Unit, VOIWindow | None],
    tabled: set[Unit],
    failures: dict[int, UnsupportedImage],
) -> tuple[dict[Unit, _Statistics], np.ndarray | None]:
    """Decode the frames that need a table once: their value ranges and equalisation edges.

    Per-series equalisation reads every frame (one histogram for the series, as
    :func:`node.process.render.series_bins`).  An image that fails to decode is added to
    *failures* (by its index) and left out.
    """
    equalise = pipeline.equalise
    per_series = equalise is not None and equalise.per == "series"
    series_histogram = FrequencyHistogram() if per_series else None
    wanted = {index for index, _ in (windows if per_series else tabled)}
    statistics: dict[Unit, _Statistics] = {}
    for index in sorted(wanted - set(failures)):
        image = images[index]
        try:
            for frame, arr in enumerate(image.iter_frames()):
                stats = _frame_statistics(pipeline, image, frame, arr, series_histogram)
                if (index, frame) in tabled:
                    statistics[(index, frame)] = stats
        except UnsupportedImage as exc:
            failures[index] = exc
            statistics = {u: s for u, s in statistics.items() if u[0] != index}
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
    """VOI LUT tables of the node's own display, one per frame (equal ones are shared when written)."""

    def __init__(
        self,
        pipeline: Pipeline,
        images: Sequence[ImageFile],
        statistics: dict[Unit, _Statistics],
        series_bins: np.ndarray | None,
        rescale: Rescale | None,
    ) -> None:
        self.pipeline = pipeline
        self.images = images
        self.statistics = statistics
        self.rescale = rescale  # None: tables over stored values, the rescale folded in
        self.explanation = _lo(_table_explanation(pipeline))
        sixteen_bit = dataclasses.replace(pipeline, output=OutputFormat.PNG16)
        self.renderers = [FrameRenderer(sixteen_bit, image, series_bins) for image in images]
        # A display that is the same function on every frame gets one table over all their values.
        self.shared_range = self._shared_range() if rescale is not None and _same_for_every_frame(pipeline) else None

    def _shared_range(self) -> tuple[int, int] | None:
        assert self.rescale is not None
        ranges = [self.rescale.range_of(s.stored_low, s.stored_high) for s in self.statistics.values()]
        if not ranges:
            return None
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        return (low, high) if high - low + 1 <= MAX_LUT_ENTRIES else None

    def table(self, unit: Unit) -> VOITable:
        """The table of one frame.

        Raises
        ------
        UnsupportedImage
            Its values do not fit a VOI LUT (65,536 entries from -32768).
        """
        index, frame = unit
        image, stats = self.images[index], self.statistics[unit]
        if self.rescale is not None:
            low, high = self.shared_range or self.rescale.range_of(stats.stored_low, stats.stored_high)
        else:
            low, high = stats.stored_low, stats.stored_high
        if high - low + 1 > MAX_LUT_ENTRIES or not -(1 << 15) <= low < (1 << 16):
            raise UnsupportedImage(
                image.path, f"values {low}..{high} do not fit a VOI LUT table (at most {MAX_LUT_ENTRIES:,} "
                "entries from -32768): no presentation state can show this image as the pipeline does"
            )
        if self.rescale is not None:  # the inputs are modality values: clip them as the pipeline does
            values = np.arange(low, high + 1, dtype=np.float64).astype(np.float32)
            if self.pipeline.clip is not None:
                values = clip(values, self.pipeline.clip.min, self.pipeline.clip.max)
        else:  # the inputs are stored values: rescale and clip them as the pipeline does
            values = modality_values(np.arange(low, high + 1, dtype=np.int64), image, self.pipeline, frame)
        display = self.renderers[index].display_values(values, frame, low=stats.low, high=stats.high, bins=stats.bins)
        data = floor_levels(display, VOITable.BITS).astype("<u2")
        return VOITable(low, data.tobytes(), self.explanation)


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


def _lo(text: str) -> str:
    """*text* as LO: one line, no backslash, at most 64 characters."""
    return " ".join(text.replace("\\", "/").split())[:_LO_MAX].rstrip()
