"""Value histograms that are added to frame by frame, merged, and kept small.

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

import numpy as np

__all__ = ["DEFAULT_MAX_BINS", "ValueHistogram"]

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
