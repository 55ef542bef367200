"""The value histograms of a processed series: before (modality values: HU for CT) and after (output levels).

Counted while the frames are rendered (:class:`~node.imaging.histogram.ImageHistograms`, one per
image, filled by its :class:`~node.process.render.FrameRenderer`), then merged in instance order
into one :class:`~node.imaging.histogram.SeriesHistograms` with what the picture needs to say: the unit of the values, the
equalisation bin edges (of the series, or of the middle image for ``per = "image"``), the clip
bounds, the colour map and the output channels.  The counts are exact; they are kept in at most
4,096 bins before and one bin per output level after (:mod:`node.imaging.histogram`).

Nothing is counted for colour images that pass through uncoloured (no grey values to count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from node.config.pipeline import Channels, Pipeline
from node.imaging.histogram import ImageHistograms, SeriesHistograms, ValueHistogram

__all__ = ["ImageHistograms", "SeriesHistograms", "channel_names", "merge_image_histograms", "value_unit"]


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
