"""Value histograms that are added to frame by frame, merged, and kept small.

:class:`ImageHistograms` counts one image's frames before (modality values) and after (output
levels) while they are rendered; :class:`SeriesHistograms` is what a processed series' picture
shows (merged by :func:`node.process.histograms.merge_image_histograms`).

A series' histogram is counted while its frames are rendered, so the values are never held: a
:class:`ValueHistogram` keeps counts in equal bins whose width is a power of two (1 for the
integers of CT HU, stored values; a fraction of one for values on a finer grid).  When new values
fall outside its range and more than ``max_bins`` bins would be needed, neighbouring bins are
merged pairwise and the width doubles, so the counts stay exact for the coarser bins, memory
stays bounded, and two histograms are merged by bringing them to the same width.

Examples
--------
>>> hist = ValueHistogram()
>>> for frame in frames:
...     hist.add(frame)
>>> edges, counts = hist.edges(), hist.counts
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_MAX_BINS", "ImageHistograms", "SeriesHistograms", "ValueHistogram"]

#: Bins a histogram keeps at most: CT's -1024..3071 HU in bins of 1 HU.
DEFAULT_MAX_BINS = 4096


class ValueHistogram:
    """Counts of values in bins ``[k * width, (k + 1) * width)``, ``width`` a power of two.

    Parameters
    ----------
    max_bins : int
        The most bins kept (at least 2); the width doubles when more would be needed.
    """

    def __init__(self, max_bins: int = DEFAULT_MAX_BINS) -> None:
        if max_bins < 2:
            raise ValueError(f"max_bins must be at least 2, got {max_bins}")
        self.max_bins = max_bins
        self.width = 1.0
        self.first = 0  # index k of the first bin
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def total(self) -> int:
        """How many values were counted."""
        return int(self.counts.sum())

    def edges(self) -> np.ndarray:
        """The ``len(counts) + 1`` bin edges (``float64``)."""
        return (self.first + np.arange(self.counts.size + 1)) * self.width

    def add(self, values: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Count *values* (any shape; NaN and infinities are left out).

        Parameters
        ----------
        values : numpy.ndarray
            Real values.
        weights : numpy.ndarray, optional
            Whole-number counts, one per value (a table of values with how often each occurs).
        """
        flat = np.asarray(values).reshape(-1)
        if flat.dtype.kind != "f":
            flat = flat.astype(np.float64)
        counts = None if weights is None else np.asarray(weights).reshape(-1)
        if counts is not None and counts.size != flat.size:
            raise ValueError(f"{counts.size} weights for {flat.size} values")
        finite = np.isfinite(flat)
        if not finite.all():
            flat = flat[finite]
            counts = None if counts is None else counts[finite]
        if flat.size == 0:
            return
        low, high = float(flat.min()), float(flat.max())
        if self.counts.size == 0:
            self.width = _width_for(low, high, self.max_bins)
        self._cover(low, high)
        # values times 1 / width (a power of two: exact, in the values' own float type), floored
        scaled = np.multiply(flat, flat.dtype.type(1 / self.width))
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.intp)
        index -= self.first
        added = np.bincount(index, weights=counts, minlength=self.counts.size)
        self.counts += added if counts is None else added.astype(np.int64)

    def merge(self, other: ValueHistogram) -> None:
        """Add the counts of *other* (its bins are brought to this histogram's width, or this to its)."""
        if other.counts.size == 0:
            return
        if self.counts.size == 0:
            self.width, self.first, self.counts = other.width, other.first, other.counts.copy()
            self._fit()
            return
        theirs = other.copy()
        while theirs.width < self.width:
            theirs._coarsen()
        while self.width < theirs.width:
            self._coarsen()
        self._cover(theirs.first * theirs.width, (theirs.first + theirs.counts.size - 1) * theirs.width)
        while theirs.width < self.width:  # covering may have coarsened this one
            theirs._coarsen()
        start = theirs.first - self.first
        self.counts[start : start + theirs.counts.size] += theirs.counts

    def coarsened(self, max_bins: int) -> ValueHistogram:
        """A copy with at most *max_bins* bins (pairs merged until it fits), e.g. for drawing."""
        out = self.copy()
        out.max_bins = max(2, max_bins)
        out._fit()
        return out

    def copy(self) -> ValueHistogram:
        """An independent copy."""
        out = ValueHistogram(self.max_bins)
        out.width, out.first, out.counts = self.width, self.first, self.counts.copy()
        return out

    def trimmed(self) -> ValueHistogram:
        """A copy without the empty bins at either end."""
        out = self.copy()
        filled = np.flatnonzero(out.counts)
        if filled.size == 0:
            out.counts = np.zeros(0, dtype=np.int64)
            return out
        out.first += int(filled[0])
        out.counts = out.counts[filled[0] : filled[-1] + 1].copy()
        return out

    # ------------------------------------------------------------------------------------------

    def _cover(self, low: float, high: float) -> None:
        """Grow (and coarsen as needed) so values in ``[low, high]`` have bins."""
        while True:
            k_low, k_high = math.floor(low / self.width), math.floor(high / self.width)
            if self.counts.size:
                k_low, k_high = min(k_low, self.first), max(k_high, self.first + self.counts.size - 1)
            if k_high - k_low + 1 <= self.max_bins and max(abs(k_low), abs(k_high)) < 2**52:
                break
            self._coarsen()
        if self.counts.size == 0:
            self.first, self.counts = k_low, np.zeros(k_high - k_low + 1, dtype=np.int64)
            return
        grown = np.zeros(k_high - k_low + 1, dtype=np.int64)
        grown[self.first - k_low : self.first - k_low + self.counts.size] = self.counts
        self.first, self.counts = k_low, grown

    def _coarsen(self) -> None:
        """Double the width: bins ``2j`` and ``2j + 1`` become bin ``j``."""
        if self.counts.size == 0:
            self.width *= 2
            return
        index = (self.first + np.arange(self.counts.size)) // 2
        first = int(index[0])
        self.counts = np.bincount(index - first, weights=self.counts).astype(np.int64)
        self.first, self.width = first, self.width * 2

    def _fit(self) -> None:
        while self.counts.size > self.max_bins:
            self._coarsen()


def _width_for(low: float, high: float, max_bins: int) -> float:
    """The smallest power of two whose bins cover ``[low, high]`` in *max_bins* (1 for one value)."""
    span = high - low
    if span <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(span / (max_bins - 1)))


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
