"""The value histograms of a processed series: before (modality values: HU for CT) and after (output levels).

Counted while the frames are rendered (:class:`ImageHistograms`, one per image, filled by its
:class:`~node.process.render.FrameRenderer`), then merged in instance order into one
:class:`SeriesHistograms` with what the picture needs to say: the unit of the values, the
equalisation bin edges (of the series, or of the middle image for ``per = "image"``), the clip
bounds, the colour map and the output channels.  The counts are exact; they are kept in at most
4,096 bins before and one bin per output level after (:mod:`node.imaging.histogram`).

Nothing is counted for colour images that pass through uncoloured (no grey values to count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from node.config.pipeline import Channels, Pipeline
from node.imaging.histogram import ValueHistogram

__all__ = ["ImageHistograms", "SeriesHistograms", "merge_image_histograms", "value_unit"]


class ImageHistograms:
    """Counts of one image's frames, filled while they are rendered (one thread per image).

    Parameters
    ----------
    levels : int
        Output levels (256 for 8-bit output, 65536 for 16-bit).
    channels : int
        Output channels counted: 1 (grey; the grey a colour map colours), 3 (``channels``).
    edges_frame : int
        The frame (0-based) whose per-image equalisation edges are kept.
    """

    def __init__(self, levels: int, channels: int = 1, edges_frame: int = 0) -> None:
        self.before = ValueHistogram()
        self.after = np.zeros((channels, levels), dtype=np.int64)
        self.edges_frame = edges_frame
        self.edges: np.ndarray | None = None

    def add_pixels(self, values: np.ndarray, grey: np.ndarray) -> None:
        """Count one frame (or block of rows): its modality values and its output levels."""
        self.before.add(values)
        channels = grey.reshape(-1, self.after.shape[0])
        for channel in range(self.after.shape[0]):
            self.after[channel] += np.bincount(channels[:, channel], minlength=self.after.shape[1])

    def add_table(self, values: np.ndarray, grey: np.ndarray, counts: np.ndarray) -> None:
        """Count a frame rendered through a table: entry *i* (modality value ``values[i]``,
        output ``grey[i]``) occurs ``counts[i]`` times."""
        self.before.add(values, counts)
        channels = grey.reshape(-1, self.after.shape[0])
        for channel in range(self.after.shape[0]):
            self.after[channel] += np.bincount(
                channels[:, channel], weights=counts, minlength=self.after.shape[1]
            ).astype(np.int64)

    def note_edges(self, frame: int, edges: np.ndarray) -> None:
        """Per-image equalisation edges of *frame*: kept when it is :attr:`edges_frame`."""
        if frame == self.edges_frame and self.edges is None:
            self.edges = np.asarray(edges, dtype=np.float64).copy()


@dataclass(frozen=True)
class SeriesHistograms:
    """What the histogram picture of one processed series shows.

    Attributes
    ----------
    before : ValueHistogram
        Modality values before clipping (after the Modality LUT when the pipeline rescales).
    after : numpy.ndarray
        (channels, levels) counts of the output levels (the grey a colour map colours).
    bits : int
        Output bits per sample (8 or 16).
    unit : str
        What the before values are: ``HU``, ``modality value``, ``stored value`` or ``luma``.
    edges : numpy.ndarray or None
        The equalisation bin edges (in the before values' unit), when the pipeline equalises.
    edge_count : int
        How many edges there are (also when too many to keep: ``edges`` is then None).
    edges_of : str
        Whose edges: ``series``, or ``image N of M`` (the middle one, for ``per = "image"``).
    clip : tuple of (float or None, float or None), or None
        The clip step's bounds.
    colormap : str or None
        The colour map that colours the after levels.
    channels : tuple of str
        The name of each after channel (``grey``, or the ``channels`` windows).
    images : int
        How many images were counted.
    """

    before: ValueHistogram
    after: np.ndarray
    bits: int
    unit: str
    edges: np.ndarray | None = None
    edge_count: int = 0
    edges_of: str = ""
    clip: tuple[float | None, float | None] | None = None
    colormap: str | None = None
    channels: tuple[str, ...] = ("grey",)
    images: int = 0


def value_unit(pipeline: Pipeline, header: Dataset, is_grey: bool) -> str:
    """The unit of the before values of an image: ``HU`` (CT rescaled), ``modality value``,
    ``stored value`` or ``luma`` (colour made grey)."""
    if not is_grey:
        return "luma"
    if not pipeline.rescale:
        return "stored value"
    return "HU" if str(header.get("Modality") or "").upper() == "CT" else "modality value"


def channel_names(pipeline: Pipeline) -> tuple[str, ...]:
    """The output channels counted: ``grey``, or one name per ``channels`` window (R, G, B)."""
    display = pipeline.display
    if not isinstance(display, Channels):
        return ("grey",)
    names = [spec.name or spec.describe() for spec in display.windows]
    if display.equalise is not None:
        names.append("equalised")
    return tuple(names + ["(empty)"] * (3 - len(names)))


def merge_image_histograms(
    pipeline: Pipeline,
    counted: Sequence[ImageHistograms],
    *,
    unit: str,
    series_edges: np.ndarray | None,
) -> SeriesHistograms | None:
    """One series' histograms from its images' counts (in instance order); None when nothing was counted.

    Parameters
    ----------
    pipeline : Pipeline
        The pipeline the series went through.
    counted : sequence of ImageHistograms
        One per processed image, in instance order.
    unit : str
        The unit of the before values (:func:`value_unit` of the first image).
    series_edges : numpy.ndarray or None
        The series' equalisation edges (``per = "series"``).
    """
    counted = [c for c in counted if c.before.counts.size]
    if not counted:
        return None
    before = ValueHistogram()
    after = np.zeros_like(counted[0].after)
    for image in counted:
        before.merge(image.before)
        after += image.after
    edges, edges_of = None, ""
    equalise = pipeline.equalise
    if equalise is not None and equalise.per == "series" and series_edges is not None:
        edges, edges_of = np.asarray(series_edges, dtype=np.float64), "series"
    elif equalise is not None:
        middle = len(counted) // 2
        edges = counted[middle].edges
        edges_of = f"image {middle + 1} of {len(counted)}" if edges is not None else ""
    clip = None if pipeline.clip is None else (pipeline.clip.min, pipeline.clip.max)
    return SeriesHistograms(
        before=before.trimmed(),
        after=after,
        bits=16 if after.shape[1] > 256 else 8,
        unit=unit,
        edges=edges,
        edge_count=0 if edges is None else len(edges),
        edges_of=edges_of,
        clip=clip,
        colormap=pipeline.colormap,
        channels=channel_names(pipeline),
        images=len(counted),
    )
