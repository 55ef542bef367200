"""Equalisation: exactly fastai's freqhist_bins / hist_scaled, streamed per image or series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from node.imaging import FrequencyHistogram, freqhist_bins, hist_scaled, to_hu
from node.imaging.equalise import order_statistic_indices
from tests.support import bundled


def fastai_freqhist_bins(x: np.ndarray, n_bins: int = 100) -> np.ndarray:
    """fastai's algorithm as written there (torch sort of the flattened float32 tensor), in numpy."""
    imsd = np.sort(np.asarray(x, dtype=np.float32).reshape(-1))
    t = np.concatenate([
        np.array([0.001], dtype=np.float32),
        np.arange(n_bins, dtype=np.float32) / np.float32(n_bins) + np.float32(1 / 2 / n_bins),
        np.array([0.999], dtype=np.float32),
    ])
    t = (np.float32(len(imsd)) * t).astype(np.int64)
    return np.unique(imsd[t])


def fastai_hist_scaled(x: np.ndarray, brks: np.ndarray) -> np.ndarray:
    ys = np.linspace(0.0, 1.0, len(brks))
    return np.clip(np.interp(x.reshape(-1), brks, ys).reshape(x.shape), 0.0, 1.0)


@pytest.mark.parametrize("n_bins", [1, 2, 7, 100, 256])
def test_bins_equal_fastai_on_integers(n_bins: int) -> None:
    rng = np.random.default_rng(n_bins)
    x = rng.normal(0, 400, (5, 64, 64)).round().astype(np.int16)
    assert np.array_equal(freqhist_bins(x, n_bins), fastai_freqhist_bins(x, n_bins))


def test_bins_equal_fastai_on_fractional_values() -> None:
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 4096, (3, 50, 70)) * 3.774114 + 0.000061).astype(np.float32)
    assert np.array_equal(freqhist_bins(x), fastai_freqhist_bins(x))


def test_bins_equal_fastai_on_real_ct_hu() -> None:
    hu = to_hu(pydicom.dcmread(bundled("CT_small.dcm")))
    assert hu.dtype == np.float32
    assert np.array_equal(freqhist_bins(hu), fastai_freqhist_bins(hu))
    assert np.array_equal(hist_scaled(hu), fastai_hist_scaled(hu, fastai_freqhist_bins(hu)).astype(np.float32))


def test_series_bins_from_slices_equal_bins_of_the_volume() -> None:
    rng = np.random.default_rng(2)
    volume = rng.normal(40, 300, (12, 40, 40)).round().astype(np.float32)
    volume[3] += 5000  # a slice far outside the others: the counts must grow to the left and right
    volume[7] -= 9000
    histogram = FrequencyHistogram()
    for slice_ in volume:
        histogram.add(slice_)
    assert histogram.count == volume.size
    assert np.array_equal(histogram.bins(50), fastai_freqhist_bins(volume, 50))


def test_switch_from_counts_to_values_mid_series_stays_exact() -> None:
    rng = np.random.default_rng(3)
    first = rng.integers(-100, 100, (30, 30)).astype(np.float32)
    second = (rng.normal(0, 50, (30, 30)) + 0.25).astype(np.float32)
    histogram = FrequencyHistogram()
    histogram.add(first)
    histogram.add(second)
    assert np.array_equal(histogram.bins(), fastai_freqhist_bins(np.stack([first, second])))


def test_indices_are_fastai_float32_truncation() -> None:
    # 300 slices of 512x512: the length itself is exact in float32, the products are rounded.
    n = 300 * 512 * 512
    expected = (np.float32(n) * np.float32(0.999)).astype(np.int64)
    assert order_statistic_indices(n)[-1] == expected
    assert order_statistic_indices(n)[0] == (np.float32(n) * np.float32(0.001)).astype(np.int64)


def test_equalised_values_spread_uniformly() -> None:
    rng = np.random.default_rng(4)
    x = rng.exponential(100, 200_000).round()  # skewed: most values small
    y = hist_scaled(x, freqhist_bins(x))
    counts, _ = np.histogram(y, bins=10, range=(0, 1))
    assert counts.min() > 0.08 * x.size, counts  # roughly 10% in each tenth
    assert y.min() >= 0.0 and y.max() <= 1.0 and y.dtype == np.float32


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="NaN"):
        freqhist_bins(np.array([1.5, np.nan]))
    with pytest.raises(ValueError, match="no values"):
        FrequencyHistogram().bins()
    with pytest.raises(ValueError, match="n_bins"):
        freqhist_bins(np.arange(10), 0)


def test_values_beyond_int32_stay_exact() -> None:
    x = np.array([3e9, 3e9 + 1, -5e9, 7.0, 7.0, 1e12] * 50, dtype=np.float64)
    assert np.array_equal(freqhist_bins(x, 5), fastai_freqhist_bins(x, 5))
    y = np.arange(-70000, 70000, 7, dtype=np.int64)  # integer input wider than 16 bits
    assert np.array_equal(freqhist_bins(y), fastai_freqhist_bins(y))


def test_integer_table_path_equals_interpolating_every_value() -> None:
    rng = np.random.default_rng(7)
    hu = rng.normal(0, 400, (4, 64, 64)).round().astype(np.float32)
    edges = freqhist_bins(hu)
    expected = fastai_hist_scaled(hu.astype(np.float64), edges.astype(np.float64)).astype(np.float32)
    assert np.array_equal(hist_scaled(hu, edges), expected)
    assert np.array_equal(hist_scaled(hu.astype(np.int16), edges), expected)
    fractional = hu + 0.5  # not integral: the interpolation path
    assert np.array_equal(hist_scaled(fractional, edges),
                          fastai_hist_scaled(fractional.astype(np.float64), edges).astype(np.float32))
