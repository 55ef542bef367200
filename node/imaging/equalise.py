"""Histogram equalisation with fastai's semantics (``freqhist_bins`` / ``hist_scaled``).

fastai (``fastai.medical.imaging``) sorts the whole flattened tensor and picks the values at the
fractions ``0.001, (i + 0.5) / n_bins for i < n_bins, 0.999`` of its length (indices computed in
float32 and truncated), drops duplicates, then maps values piecewise-linearly from those edges onto
``[0, 1]`` and clamps.  The result is bins that hold equal pixel counts.

We give exactly the same edges without sorting: modality values are almost always integers (CT
HU, stored values), so a running count per integer value (``np.bincount`` on cache-sized chunks)
plus a cumulative sum finds every order statistic at once, in one streaming pass that never holds
the volume.  Non-integral values (a fractional rescale slope) fall back to keeping the values and
selecting with ``np.partition``: exact too, just slower.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FrequencyHistogram", "freqhist_bins", "hist_scaled", "order_statistic_indices"]

_CHUNK = 1 << 18  # values per bincount call: stays in cache, and the intp temporary stays small
_MAX_SPAN = 1 << 22  # widest integer range counted before switching to keeping values


def order_statistic_indices(count: int, n_bins: int = 100) -> np.ndarray:
    """The sorted-array indices fastai's ``freqhist_bins`` takes, for *count* values.

    Computed like fastai's torch code: fractions in float32, multiplied by the length in float32,
    truncated to integers.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    middle = np.arange(n_bins, dtype=np.float32) / np.float32(n_bins) + np.float32(1 / 2 / n_bins)
    fractions = np.concatenate(
        [np.array([0.001], dtype=np.float32), middle, np.array([0.999], dtype=np.float32)]
    )
    return (np.float32(count) * fractions).astype(np.int64)


class FrequencyHistogram:
    """Counts values image by image; gives fastai's equal-frequency bin edges for all of them.

    Add every image of a series to get one set of edges for the whole series (the same value
    then gives the same grey on every slice), or one image for per-image equalisation.  Memory is
    one count per integer value in the range seen, not the values themselves.

    Examples
    --------
    >>> hist = FrequencyHistogram()
    >>> for frame in frames:
    ...     hist.add(frame)
    >>> edges = hist.bins(100)
    """

    def __init__(self) -> None:
        self._low = 0
        self._counts: np.ndarray | None = None  # counts[v - low] for integral values
        self._values: list[np.ndarray] = []  # kept values once any were not integral
        self._total = 0

    @property
    def count(self) -> int:
        """How many values were added."""
        return self._total

    def add(self, x: np.ndarray) -> None:
        """Add the values of *x* (any shape, any real dtype).

        Raises
        ------
        ValueError
            If *x* holds NaN.
        """
        flat = np.asarray(x).reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            self._add_chunk(flat[start : start + _CHUNK])
        self._total += flat.size

    def _add_chunk(self, chunk: np.ndarray) -> None:
        if self._values:
            self._keep(chunk)
            return
        if chunk.dtype.kind == "f":
            with np.errstate(invalid="ignore"):  # NaN, inf or huge values fail the round trip below
                ints = chunk.astype(np.int32)
            if not np.array_equal(ints.astype(chunk.dtype), chunk):
                if np.isnan(chunk).any():
                    raise ValueError("cannot equalise values that include NaN")
                self._switch_to_values()
                self._keep(chunk)
                return
        else:
            ints = chunk.astype(np.int64)
        low, high = int(ints.min()), int(ints.max())
        new_low = low if self._counts is None else min(low, self._low)
        new_high = high if self._counts is None else max(high, self._low + self._counts.size - 1)
        if new_high - new_low >= _MAX_SPAN:
            self._switch_to_values()
            self._keep(chunk)
            return
        self._grow(new_low, new_high)
        ints -= low
        self._counts[low - self._low : high - self._low + 1] += np.bincount(ints)

    def _grow(self, low: int, high: int) -> None:
        """Make the counts cover ``[low, high]``."""
        if self._counts is not None and low == self._low and high < self._low + self._counts.size:
            return
        counts = np.zeros(high - low + 1, dtype=np.int64)
        if self._counts is not None:
            counts[self._low - low : self._low - low + self._counts.size] = self._counts
        self._low, self._counts = low, counts

    def _switch_to_values(self) -> None:
        """Turn the counts back into values (exactly) and keep values from now on."""
        if self._counts is not None:
            values = np.repeat(np.arange(self._low, self._low + self._counts.size), self._counts)
            self._values.append(values.astype(np.float32))
            self._counts = None
        else:
            self._values.append(np.empty(0, dtype=np.float32))

    def _keep(self, chunk: np.ndarray) -> None:
        self._values.append(chunk.astype(np.float32))

    def bins(self, n_bins: int = 100) -> np.ndarray:
        """Equal-frequency bin edges, exactly fastai's ``freqhist_bins(n_bins)``.

        Returns
        -------
        numpy.ndarray
            ``float32``, sorted, without duplicates.

        Raises
        ------
        ValueError
            If nothing was added or *n_bins* < 1.
        """
        if self._total == 0:
            raise ValueError("no values to equalise")
        indices = order_statistic_indices(self._total, n_bins)
        if self._values:
            values = np.concatenate(self._values)
            picked = np.partition(values, np.unique(indices))[indices]
        else:
            cumulative = np.cumsum(self._counts)
            picked = self._low + np.searchsorted(cumulative, indices, side="right")
        return np.unique(picked.astype(np.float32))


def freqhist_bins(x: np.ndarray, n_bins: int = 100) -> np.ndarray:
    """fastai's ``freqhist_bins``: edges that split the values of *x* into equally full bins.

    Parameters
    ----------
    x : numpy.ndarray
        Values, any shape (one image, or a whole series for one set of edges).
    n_bins : int
        Number of bins (fastai's default 100); the edges are at most ``n_bins + 2`` values.

    Returns
    -------
    numpy.ndarray
        ``float32`` sorted unique edges.
    """
    histogram = FrequencyHistogram()
    histogram.add(x)
    return histogram.bins(n_bins)


def hist_scaled(x: np.ndarray, bins: np.ndarray | None = None) -> np.ndarray:
    """fastai's ``hist_scaled``: map *x* piecewise-linearly from *bins* onto ``[0, 1]``.

    Parameters
    ----------
    x : numpy.ndarray
        Values, any shape.
    bins : numpy.ndarray, optional
        Edges from :func:`freqhist_bins` or :meth:`FrequencyHistogram.bins`; computed from *x*
        with 100 bins when omitted.

    Returns
    -------
    numpy.ndarray
        ``float32`` in ``[0, 1]``, same shape as *x*.

    Notes
    -----
    Integral values (the usual case: HU, stored values) are mapped through a table with one entry
    per value in their range, computed with the same ``np.interp``, so the result is identical to
    interpolating every value, at the cost of an index instead of a search per value.
    """
    x = np.asarray(x)
    if bins is None:
        bins = freqhist_bins(x)
    edges = np.asarray(bins, dtype=np.float64)
    ys = np.linspace(0.0, 1.0, len(edges))
    table = _integer_table(x, edges, ys)
    if table is not None:
        lut, offsets = table
        return lut[offsets]
    y = np.interp(x.reshape(-1), edges, ys).reshape(x.shape)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def _integer_table(
    x: np.ndarray, edges: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """For integral *x* in a modest range: (lookup table, indices into it); else None."""
    if x.size == 0:
        return None
    if x.dtype.kind in "iu":
        ints = x.astype(np.int64, copy=False)
    elif x.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            ints = x.astype(np.int32)
        if not np.array_equal(ints.astype(x.dtype), x):
            return None
    else:
        return None
    low, high = int(ints.min()), int(ints.max())
    if high - low >= _MAX_SPAN or high - low >= 4 * x.size:
        return None  # a table larger than the data gains nothing
    lut = np.clip(np.interp(np.arange(low, high + 1, dtype=np.float64), edges, ys), 0.0, 1.0).astype(np.float32)
    return lut, ints - low
