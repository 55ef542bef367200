"""Turn decoded frames into output pixels, as a :class:`~node.config.pipeline.Pipeline` says.

One frame at a time: stored values -> modality values -> clip -> display values on the output
scale (0..255 or 0..65535) -> MONOCHROME1 inverted -> ``uint8``/``uint16`` -> colour map (8-bit
grey to RGB through a 256-entry table) when the pipeline has one.  Nothing here reads
files or keeps state between frames except the series-wide equalisation bins handed in, and the
histograms it is asked to count into (:class:`~node.imaging.histogram.ImageHistograms`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from node.imaging.colormap import apply_colormap, colormap_table
from node.imaging.display import clip, floor_levels, invert, output_levels, to_grey
from node.imaging.equalise import FrequencyHistogram, freqhist_bins, hist_scaled
from node.imaging.modality import rescale_frame
from node.imaging.source import ImageFile, UnsupportedImage
from node.imaging.voi import apply_voi_lut_sequence, file_window, has_voi_lut_sequence, window_scaled
from node.config.pipeline import Channels, Equalise, Pipeline, WindowSpec
from node.imaging.histogram import ImageHistograms

__all__ = ["BLOCK_PIXELS", "FrameRenderer", "row_blocks", "series_bins"]

log = logging.getLogger(__name__)

# Rendering every pixel costs about 4 ms for a 512 x 512 CT slice (float conversions and
# arithmetic over 262,144 values, a third of process_series), while a slice holds only a few
# thousand distinct stored values.  When the output is a function of the stored value alone, each
# value of the frame's range is rendered once, by the same code with that frame's parameters
# (per-frame rescale and windows of enhanced multi-frame objects), and the pixels are looked up:
# the same numbers, bit for bit.  Not used for colour or float input, for a range of more than
# _TABLE_MAX_ENTRIES values or more than one entry per _TABLE_PIXELS_PER_ENTRY pixels (the table
# would cost about as much as the pixels), nor for displays that read the frame's own statistics
# (per-image equalisation, the default display's min/max fallback).
_TABLE_MAX_ENTRIES = 1 << 16
_TABLE_PIXELS_PER_ENTRY = 4

# A frame is rendered a block of rows at a time into its output array, so the float temporaries
# of the arithmetic (4 to 8 bytes a pixel, several at once) cover one block, not the frame: a
# 256 MB 16-bit frame would otherwise need over 1.5 GB of them.  Every step is per pixel, and the
# two displays that read the whole frame (per-image equalisation, the default display's min/max)
# get those statistics from a first pass over the blocks, so the output is the same bit for bit.
# Frames of up to one block (a 1024 x 1024 slice) are rendered whole, as before.
BLOCK_PIXELS = 1 << 20


class FrameRenderer:
    """Renders the frames of one image file through one pipeline.

    Parameters
    ----------
    pipeline : Pipeline
        What to do.
    image : ImageFile
        The source (its header decides rescale, file windows, MONOCHROME1).
    series_bins : numpy.ndarray, optional
        Equalisation edges for the whole series (``per = "series"``), from :func:`series_bins`.
    lookup_table : bool
        Render each stored value of a frame's range once and look the pixels up, where that gives
        the same output (the default); False renders every pixel (for tests comparing the two).
    block_pixels : int
        Pixels rendered at once (whole rows); a larger frame is rendered block by block, with
        the same output (see :data:`BLOCK_PIXELS`).
    colormap : numpy.ndarray, optional
        The pipeline's colour map as a (256, 3) ``uint8`` table
        (:func:`node.imaging.colormap.colormap_table`), built once per series by the caller; built
        here when the pipeline has a colour map and none is given.
    histograms : ImageHistograms, optional
        Where to count the modality values (before clipping) and output levels (before a colour
        map) of every rendered frame, and the per-image equalisation edges; nothing is counted
        when None (the default), nor for colour passed through.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        image: ImageFile,
        series_bins: np.ndarray | None = None,
        *,
        lookup_table: bool = True,
        block_pixels: int = BLOCK_PIXELS,
        colormap: np.ndarray | None = None,
        histograms: ImageHistograms | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.image = image
        self.series_bins = series_bins
        self.lookup_table = lookup_table
        self.block_pixels = max(1, int(block_pixels))
        self.colour_out = (not image.is_grey and not pipeline.grey or isinstance(pipeline.display, Channels)
                           or pipeline.colormap is not None)
        self.bits = 8 if self.colour_out else pipeline.output.bits
        if colormap is None and pipeline.colormap is not None:
            colormap = colormap_table(pipeline.colormap)
        self.colormap = colormap
        self.histograms = histograms
        if not image.is_grey and not pipeline.grey and (
            pipeline.display is not None or pipeline.clip or pipeline.colormap is not None
        ):
            raise UnsupportedImage(
                image.path, f"colour image ({image.photometric}): pipeline {pipeline.name!r} windows, "
                "equalises or colours, which needs greyscale; add the grey step (--grey) first"
            )

    def render_all(self) -> Iterator[np.ndarray]:
        """Yield every rendered frame of the file, decoding one at a time."""
        for index, arr in enumerate(self.image.iter_frames()):
            yield self.render(arr, index)

    def render(self, arr: np.ndarray, frame: int = 0) -> np.ndarray:
        """One decoded frame to output pixels: (rows, cols) ``uint8``/``uint16`` or (rows, cols, 3) ``uint8``.

        Temporaries cover at most :attr:`block_pixels` pixels at a time, whatever the frame's size.
        """
        if not self.image.is_grey and not self.pipeline.grey:
            if arr.dtype == np.uint8:
                return arr  # colour passed through as 8-bit RGB
            top = _colour_top(arr)
            return self._by_blocks(arr, lambda block: _colour_to_8bit(block, top))
        span = self._table_span(arr, frame)
        if span is None:
            statistics = self._frame_statistics(arr, frame)
            return self._by_blocks(arr, lambda block: self._render_pixels(block, frame, statistics))
        low, high = span
        entries = np.arange(low, high + 1).astype(arr.dtype)
        values = modality_values(entries, self.image, self.pipeline, frame)
        grey = self._grey(values, frame)
        table = self._coloured(grey)
        histograms = self.histograms
        before = values if not self.pipeline.clip else rescaled_values(entries, self.image, self.pipeline, frame)

        def lookup(block: np.ndarray) -> np.ndarray:
            index = np.subtract(block, low, dtype=np.intp)
            if histograms is not None:
                histograms.add_table(before, grey, np.bincount(index.reshape(-1), minlength=entries.size))
            # np.take: the same as table[index], 4x faster for an RGB table's rows (a colour map)
            return np.take(table, index, axis=0)

        return self._by_blocks(arr, lookup)

    def _by_blocks(self, arr: np.ndarray, render: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``render`` applied to blocks of rows of *arr*, gathered into one output array."""
        if _fits_one_block(arr, self.block_pixels):
            return render(arr)
        out: np.ndarray | None = None
        start = 0
        for block in row_blocks(arr, self.block_pixels):
            rendered = render(block)
            if out is None:
                out = np.empty((arr.shape[0], *rendered.shape[1:]), dtype=rendered.dtype)
            out[start : start + len(block)] = rendered
            start += len(block)
        assert out is not None
        return out

    def _frame_statistics(self, arr: np.ndarray, frame: int) -> _FrameStatistics | None:
        """What a display reading the whole frame needs, gathered a block at a time (None: not needed).

        Only for frames larger than a block: a smaller frame is rendered whole, and its display
        reads its own values as before.
        """
        if _fits_one_block(arr, self.block_pixels) or not self._uses_frame_statistics(frame):
            return None
        equalise = self.pipeline.equalise
        per_image = equalise is not None and equalise.per == "image"
        histogram = FrequencyHistogram() if per_image else None
        low, high = math.inf, -math.inf
        for block in row_blocks(arr, self.block_pixels):
            values = modality_values(block, self.image, self.pipeline, frame)
            if histogram is not None:
                histogram.add(values)
            if values.size:
                low, high = min(low, float(values.min())), max(high, float(values.max()))
        bins = histogram.bins(equalise.bins) if histogram is not None and histogram.count else None
        return _FrameStatistics(low=low, high=high, bins=bins)

    def _table_span(self, arr: np.ndarray, frame: int) -> tuple[int, int] | None:
        """The frame's (lowest, highest) stored value when a lookup table gives the same output."""
        if not self.lookup_table or not self.image.is_grey or arr.dtype.kind not in "iu" or arr.size == 0:
            return None
        if self._uses_frame_statistics(frame):
            return None
        low, high = int(arr.min()), int(arr.max())
        entries = high - low + 1
        if entries > _TABLE_MAX_ENTRIES or entries * _TABLE_PIXELS_PER_ENTRY > arr.size:
            return None
        return low, high

    def _uses_frame_statistics(self, frame: int) -> bool:
        """Whether the display reads the values of the whole frame (then no lookup table)."""
        equalise = self.pipeline.equalise
        if equalise is not None and equalise.per == "image":
            return True
        if self.pipeline.display is not None or self._clip_range() is not None:
            return False
        # the default display uses the frame's min/max when the file's window is missing or unusable
        try:
            win = file_window(self.image.header, 0, frame)
            window_scaled(np.zeros(1), win.center, win.width, win.function)  # raises as the display would
        except ValueError:
            return True
        return False

    def _render_pixels(
        self, arr: np.ndarray, frame: int, statistics: _FrameStatistics | None = None
    ) -> np.ndarray:
        """Stored values (a frame or a block of its rows) to output pixels, counted when asked.

        *statistics* stand in for the frame's own values where the display reads them (a block).
        """
        unclipped, values = self._modality_values(arr, frame)
        grey = self._grey(values, frame, statistics)
        if self.histograms is not None:
            self.histograms.add_pixels(unclipped, grey)
        return self._coloured(grey)

    def _modality_values(self, arr: np.ndarray, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """The modality values of a block of pixels before and after the pipeline's clip (the Modality LUT once).

        The table path rescales its few entries twice instead (:meth:`render`): cheaper than a pixel's.
        """
        clipping = self.pipeline.clip
        if not clipping:
            values = modality_values(arr, self.image, self.pipeline, frame)
            return values, values
        unclipped = rescaled_values(arr, self.image, self.pipeline, frame)
        return unclipped, clip(unclipped, clipping.min, clipping.max)  # as modality_values, without rescaling again

    def _grey(self, values: np.ndarray, frame: int, statistics: _FrameStatistics | None = None) -> np.ndarray:
        """Modality values (clipped) to output levels: ``uint8``/``uint16``, or RGB for channels."""
        levels = output_levels(self.bits)
        y = self._display(values, frame, levels, statistics)
        if self.image.is_monochrome1:
            y = invert(y, levels)
        return floor_levels(y, self.bits)

    def _coloured(self, grey: np.ndarray) -> np.ndarray:
        """*grey* through the pipeline's colour map, if it has one."""
        return grey if self.colormap is None else apply_colormap(grey, self.colormap)

    def display_values(
        self, values: np.ndarray, frame: int = 0, *, low: float, high: float, bins: np.ndarray | None = None
    ) -> np.ndarray:
        """The display step alone, without the MONOCHROME1 inversion: for a table of the display.

        Parameters
        ----------
        values : numpy.ndarray
            Modality values, already clipped as the pipeline says (any values: a table's inputs).
        frame : int
            0-based frame the values belong to (per-frame file windows of enhanced objects).
        low, high : float
            The smallest and largest (clipped) modality value of the frame itself, which the
            default display reads when the file has no usable window.
        bins : numpy.ndarray, optional
            The frame's own equalisation edges, for per-image equalisation.

        Returns
        -------
        numpy.ndarray
            Display values on the output scale (0..255 or 0..65535), float64, not yet floored:
            what :meth:`render` floors (and inverts for MONOCHROME1) into output pixels.
        """
        statistics = _FrameStatistics(low=low, high=high, bins=bins)
        return self._display(values, frame, output_levels(self.bits), statistics)

    def _display(
        self, values: np.ndarray, frame: int, levels: int, statistics: _FrameStatistics | None = None
    ) -> np.ndarray:
        display = self.pipeline.display
        if isinstance(display, WindowSpec):
            return self._window(values, display, frame, levels)
        if isinstance(display, Equalise):
            return self._equalise(values, display, frame, statistics) * levels
        if isinstance(display, Channels):
            channels = [self._window(values, spec, frame, levels) for spec in display.windows]
            if display.equalise:
                channels.append(self._equalise(values, display.equalise, frame, statistics) * levels)
            out = np.zeros((*values.shape, 3), dtype=np.float64)
            for index, channel in enumerate(channels):
                out[..., index] = channel
            return out
        return self._default_display(values, frame, levels, statistics)

    def _window(self, values: np.ndarray, spec: WindowSpec, frame: int, levels: int) -> np.ndarray:
        header = self.image.header
        if spec.from_file:
            if has_voi_lut_sequence(header, frame):
                return apply_voi_lut_sequence(values, header, spec.index, frame).astype(np.float64) * levels
            try:
                win = file_window(header, spec.index, frame)
            except ValueError as exc:
                raise UnsupportedImage(self.image.path, f"window from file: {exc}") from exc
        else:
            win = spec.window
        return window_scaled(values, win.center, win.width, win.function, out_max=levels)

    def _equalise(
        self, values: np.ndarray, equalise: Equalise, frame: int, statistics: _FrameStatistics | None = None
    ) -> np.ndarray:
        if equalise.per == "series":
            if self.series_bins is None:
                raise ValueError("per-series equalisation needs the series bins (series_bins())")
            return hist_scaled(values, self.series_bins)
        if statistics is not None and statistics.bins is not None:
            bins = statistics.bins
        else:
            bins = freqhist_bins(values, equalise.bins)
        if self.histograms is not None:
            self.histograms.note_edges(frame, bins)
        return hist_scaled(values, bins)

    def _default_display(
        self, values: np.ndarray, frame: int, levels: int, statistics: _FrameStatistics | None = None
    ) -> np.ndarray:
        """No display step: the clip range, else the file's window, else the frame's own range."""
        clip_range = self._clip_range()
        if clip_range is not None:
            low, high = clip_range
        else:
            try:
                win = file_window(self.image.header, 0, frame)
                return window_scaled(values, win.center, win.width, win.function, out_max=levels)
            except ValueError:
                if statistics is not None:
                    low, high = statistics.low, statistics.high
                else:
                    low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.float64)
        return (values.astype(np.float64) - low) * (levels / (high - low))

    def _clip_range(self) -> tuple[float, float] | None:
        """The clip step's (min, max) when it has both."""
        clip_step = self.pipeline.clip
        if clip_step and clip_step.min is not None and clip_step.max is not None:
            return clip_step.min, clip_step.max
        return None


def modality_values(arr: np.ndarray, image: ImageFile, pipeline: Pipeline, frame: int) -> np.ndarray:
    """Grey conversion, Modality LUT and clipping of one frame: ``float32`` values."""
    values = rescaled_values(arr, image, pipeline, frame)
    if pipeline.clip:
        values = clip(values, pipeline.clip.min, pipeline.clip.max)
    return values


def rescaled_values(arr: np.ndarray, image: ImageFile, pipeline: Pipeline, frame: int) -> np.ndarray:
    """Grey conversion and Modality LUT of one frame, before clipping: ``float32`` values (HU for CT)."""
    if not image.is_grey:
        return to_grey(arr)
    if pipeline.rescale:
        return rescale_frame(arr, image.header, frame)
    return arr.astype(np.float32)


def series_bins(
    pipeline: Pipeline, images: Iterable[ImageFile]
) -> tuple[np.ndarray | None, list[UnsupportedImage]]:
    """One set of equalisation edges over every frame of a series (``per = "series"``).

    Decodes every frame once, keeping one count per value, not the frames.  Images that fail to
    decode are left out and returned as errors.

    Returns
    -------
    (numpy.ndarray or None, list of UnsupportedImage)
        The edges (None when the pipeline does not equalise per series), and the failures.
    """
    equalise = pipeline.equalise
    if equalise is None or equalise.per != "series":
        return None, []
    histogram = FrequencyHistogram()
    failures: list[UnsupportedImage] = []
    for image in images:
        try:
            for index, arr in enumerate(image.iter_frames()):
                for block in row_blocks(arr, BLOCK_PIXELS):  # float temporaries of a block, not the frame
                    histogram.add(modality_values(block, image, pipeline, index))
        except UnsupportedImage as exc:
            failures.append(exc)
    if histogram.count == 0:
        return None, failures
    log.info("series equalisation: %d values, %d bins", histogram.count, equalise.bins)
    return histogram.bins(equalise.bins), failures


def row_blocks(arr: np.ndarray, block_pixels: int = BLOCK_PIXELS) -> Iterator[np.ndarray]:
    """Views of *arr* (a frame: rows, columns[, samples]) of whole rows, each of at most
    *block_pixels* pixels (but at least one row); *arr* itself when it fits in one block."""
    if _fits_one_block(arr, block_pixels):
        yield arr
        return
    step = max(1, block_pixels // arr.shape[1])
    for start in range(0, arr.shape[0], step):
        yield arr[start : start + step]


def _fits_one_block(arr: np.ndarray, block_pixels: int) -> bool:
    """Whether *arr* has no more than *block_pixels* pixels (rows x columns), or no rows to split."""
    return arr.ndim < 2 or arr.shape[0] * arr.shape[1] <= block_pixels


@dataclass(frozen=True)
class _FrameStatistics:
    """What displays reading the whole frame need, when the frame is rendered a block at a time."""

    low: float  # smallest modality value of the frame
    high: float  # largest
    bins: np.ndarray | None  # per-image equalisation edges, when the pipeline equalises per image


def _colour_top(arr: np.ndarray) -> float:
    """The value of 16- or 32-bit colour (palette output) that becomes 255 in 8-bit."""
    return 65535.0 if arr.dtype.itemsize == 2 else float(arr.max() or 1)


def _colour_to_8bit(arr: np.ndarray, top: float) -> np.ndarray:
    """16- or 32-bit colour scaled down to 8-bit RGB (*top* becomes 255)."""
    return np.floor(arr.astype(np.float64) * (255 / top)).astype(np.uint8)
