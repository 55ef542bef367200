"""Display stage helpers: clipping, channel stacking, MONOCHROME1, colour to grey, quantising."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "clip",
    "floor_levels",
    "invert",
    "output_levels",
    "quantise",
    "stack_channels",
    "to_grey",
]


def clip(x: np.ndarray, min_px: float | None = None, max_px: float | None = None) -> np.ndarray:
    """Clamp values to ``[min_px, max_px]`` (fastai's ``min_px``/``max_px``); ``None`` is open.

    Returns a new ``float32`` array; *x* is not modified.
    """
    if min_px is not None and max_px is not None and min_px > max_px:
        raise ValueError(f"clip minimum {min_px} is above maximum {max_px}")
    return np.clip(np.asarray(x, dtype=np.float32), min_px, max_px)


def stack_channels(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Stack display images in ``[0, 1]`` as colour channels (fastai's ``to_nchan``).

    Parameters
    ----------
    channels : sequence of numpy.ndarray
        1 to 3 images of equal shape (rows, columns); fewer than 3 are padded with zeros so the
        result is always RGB.

    Returns
    -------
    numpy.ndarray
        ``float32`` (rows, columns, 3).
    """
    if not 1 <= len(channels) <= 3:
        raise ValueError(f"stack 1 to 3 channels (RGB), got {len(channels)}")
    shape = channels[0].shape
    out = np.zeros((*shape, 3), dtype=np.float32)
    for index, channel in enumerate(channels):
        if channel.shape != shape:
            raise ValueError(f"channel {index} has shape {channel.shape}, channel 0 {shape}")
        out[..., index] = channel
    return out


def invert(y: np.ndarray, top: float = 1.0) -> np.ndarray:
    """``top - y``: MONOCHROME1 display values (minimum is white) as MONOCHROME2.

    *top* is the top of the display scale: 1 for ``[0, 1]`` values, 255 or 65535 for values
    already on the output scale.
    """
    return np.subtract(top, y, dtype=np.result_type(y, np.float32))


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """Luma of an RGB image (ITU-R BT.601 weights, as PIL's ``convert("L")``), ``float32``."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def quantise(y: np.ndarray, bits: int) -> np.ndarray:
    """Display values in ``[0, 1]`` to ``uint8`` (bits 8) or ``uint16`` (bits 16): ``floor(y * max)``.

    The truncation is dcmtk's.  For output bit-identical to ``dcm2pnm`` compute the window
    directly on the output scale (:func:`node.imaging.voi.window_scaled`) and use
    :func:`floor_levels`.
    """
    return floor_levels(np.multiply(y, float(output_levels(bits)), dtype=np.float64), bits)


def output_levels(bits: int) -> int:
    """The largest output value for *bits* (255 or 65535)."""
    if bits not in (8, 16):
        raise ValueError(f"output bits must be 8 or 16, got {bits}")
    return 2**bits - 1


def floor_levels(y: np.ndarray, bits: int) -> np.ndarray:
    """Display values already on ``[0, 2**bits - 1]`` to ``uint8``/``uint16`` by truncation."""
    levels = output_levels(bits)
    dtype = np.uint8 if bits == 8 else np.uint16
    # after clipping to [0, levels] the cast truncates toward zero, which is floor here
    return np.clip(y, 0, levels).astype(dtype)
