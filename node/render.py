"""Turn decoded frames into output pixels, as a :class:`~node.pipeline.Pipeline` says.

One frame at a time: stored values -> modality values -> clip -> display values on the output
scale (0..255 or 0..65535) -> MONOCHROME1 inverted -> ``uint8``/``uint16``.  Nothing here reads
files or keeps state between frames except the series-wide equalisation bins handed in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np

from node.imaging.display import clip, floor_levels, invert, output_levels, to_grey
from node.imaging.equalise import FrequencyHistogram, freqhist_bins, hist_scaled
from node.imaging.modality import rescale_frame
from node.imaging.source import ImageFile, UnsupportedImage
from node.imaging.voi import apply_voi_lut_sequence, file_window, has_voi_lut_sequence, window_scaled
from node.pipeline import Channels, Equalise, Pipeline, WindowSpec

__all__ = ["FrameRenderer", "series_bins"]

log = logging.getLogger(__name__)


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
    """

    def __init__(self, pipeline: Pipeline, image: ImageFile, series_bins: np.ndarray | None = None) -> None:
        self.pipeline = pipeline
        self.image = image
        self.series_bins = series_bins
        self.colour_out = not image.is_grey and not pipeline.grey or isinstance(pipeline.display, Channels)
        self.bits = 8 if self.colour_out else pipeline.output.bits
        if not image.is_grey and not pipeline.grey and (pipeline.display is not None or pipeline.clip):
            raise UnsupportedImage(
                image.path, f"colour image ({image.photometric}): pipeline {pipeline.name!r} windows or "
                "equalises, which needs greyscale; add the grey step (--grey) first"
            )

    def render_all(self) -> Iterator[np.ndarray]:
        """Yield every rendered frame of the file, decoding one at a time."""
        for index, arr in enumerate(self.image.iter_frames()):
            yield self.render(arr, index)

    def render(self, arr: np.ndarray, frame: int = 0) -> np.ndarray:
        """One decoded frame to output pixels: (rows, cols) ``uint8``/``uint16`` or (rows, cols, 3) ``uint8``."""
        if not self.image.is_grey and not self.pipeline.grey:
            return _colour_to_8bit(arr)
        values = modality_values(arr, self.image, self.pipeline, frame)
        levels = output_levels(self.bits)
        y = self._display(values, frame, levels)
        if self.image.is_monochrome1:
            y = invert(y, levels)
        return floor_levels(y, self.bits)

    def _display(self, values: np.ndarray, frame: int, levels: int) -> np.ndarray:
        display = self.pipeline.display
        if isinstance(display, WindowSpec):
            return self._window(values, display, frame, levels)
        if isinstance(display, Equalise):
            return self._equalise(values, display) * levels
        if isinstance(display, Channels):
            channels = [self._window(values, spec, frame, levels) for spec in display.windows]
            if display.equalise:
                channels.append(self._equalise(values, display.equalise) * levels)
            out = np.zeros((*values.shape, 3), dtype=np.float64)
            for index, channel in enumerate(channels):
                out[..., index] = channel
            return out
        return self._default_display(values, frame, levels)

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

    def _equalise(self, values: np.ndarray, equalise: Equalise) -> np.ndarray:
        if equalise.per == "series":
            if self.series_bins is None:
                raise ValueError("per-series equalisation needs the series bins (series_bins())")
            return hist_scaled(values, self.series_bins)
        return hist_scaled(values, freqhist_bins(values, equalise.bins))

    def _default_display(self, values: np.ndarray, frame: int, levels: int) -> np.ndarray:
        """No display step: the clip range, else the file's window, else the frame's own range."""
        clip_step = self.pipeline.clip
        if clip_step and clip_step.min is not None and clip_step.max is not None:
            low, high = clip_step.min, clip_step.max
        else:
            try:
                win = file_window(self.image.header, 0, frame)
                return window_scaled(values, win.center, win.width, win.function, out_max=levels)
            except ValueError:
                low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.float64)
        return (values.astype(np.float64) - low) * (levels / (high - low))


def modality_values(arr: np.ndarray, image: ImageFile, pipeline: Pipeline, frame: int) -> np.ndarray:
    """Grey conversion, Modality LUT and clipping of one frame: ``float32`` values."""
    if not image.is_grey:
        values = to_grey(arr)
    elif pipeline.rescale:
        values = rescale_frame(arr, image.header, frame)
    else:
        values = arr.astype(np.float32)
    if pipeline.clip:
        values = clip(values, pipeline.clip.min, pipeline.clip.max)
    return values


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
                histogram.add(modality_values(arr, image, pipeline, index))
        except UnsupportedImage as exc:
            failures.append(exc)
    if histogram.count == 0:
        return None, failures
    log.info("series equalisation: %d values, %d bins", histogram.count, equalise.bins)
    return histogram.bins(equalise.bins), failures


def _colour_to_8bit(arr: np.ndarray) -> np.ndarray:
    """Colour passed through as 8-bit RGB (16-bit palette output is scaled down)."""
    if arr.dtype == np.uint8:
        return arr
    top = 65535 if arr.dtype.itemsize == 2 else float(arr.max() or 1)
    return np.floor(arr.astype(np.float64) * (255 / top)).astype(np.uint8)
