"""Colour maps: 8-bit grey to RGB through one of matplotlib's named colour maps.

fastai's ``show()`` renders CT with a colour map (``bone`` by default, ``ocean_r`` for the
tutorial's title picture).  Here a colour map is a 256 x 3 ``uint8`` table built once from
matplotlib and indexed by the 8-bit grey value the pipeline would otherwise write::

    table = colormap_table("ocean_r")
    rgb = apply_colormap(grey, table)      # grey: uint8 (rows, cols) -> (rows, cols, 3)

Entry ``v`` of the table is ``matplotlib.colormaps[name](v / 255, bytes=True)[:3]``.  For the
colour maps whose own table has 256 entries (all but 30 of matplotlib 3.11's 182 names) this is
exactly ``matplotlib.colormaps[name](v, bytes=True)[:3]``, matplotlib's integer indexing.  The
others (the qualitative ``tab10``, ``Set1``, ``Paired`` ... with 8 to 20 colours, ``twilight``
with 510) would show only their first 256 entries when indexed by integers (a ``tab10`` image
would be its last colour almost everywhere); ``v / 255`` spreads the whole map over the grey
range instead, as matplotlib does for values scaled to ``[0, 1]``.  Alpha is dropped.

matplotlib is imported only when a colour map is asked for: it costs about 0.15-0.25 s of
start-up, which the commands that never colour (``status``, ``route``) should not pay.
"""

from __future__ import annotations

import difflib

import numpy as np

__all__ = [
    "UnknownColormap", "apply_colormap", "check_colormap", "close_colormap_names", "colormap_names", "colormap_table",
]


class UnknownColormap(ValueError):
    """A colour map name matplotlib does not know; the message lists the closest names."""

    def __init__(self, name: str, close: list[str]) -> None:
        self.name = name
        self.close = close
        hint = f"; did you mean {', '.join(repr(n) for n in close)}?" if close else ""
        super().__init__(f"unknown colour map {name!r}{hint} (any name of matplotlib.colormaps, "
                         "with _r for the reversed map)")


def colormap_names() -> list[str]:
    """Every colour map name matplotlib knows (``_r`` reversed variants included), sorted."""
    import matplotlib

    return sorted(matplotlib.colormaps)


def close_colormap_names(name: str, count: int = 3) -> list[str]:
    """Up to *count* known names close to *name* (a different case first, then by similarity)."""
    names = colormap_names()
    same_case = [n for n in names if n.lower() == name.lower()]
    similar = difflib.get_close_matches(name, names, n=count, cutoff=0.7)
    return list(dict.fromkeys(same_case + similar))[:count]


def check_colormap(name: object) -> str:
    """*name* when matplotlib knows it as a colour map.

    Raises
    ------
    UnknownColormap
        When it does not (also for a name that is not a string); the message names the closest.
    """
    if not isinstance(name, str) or name not in colormap_names():
        text = name if isinstance(name, str) else repr(name)
        raise UnknownColormap(text, close_colormap_names(text) if isinstance(name, str) else [])
    return name


def colormap_table(name: str) -> np.ndarray:
    """The colour map *name* as a (256, 3) ``uint8`` table: row ``v`` is the colour of grey ``v``.

    Parameters
    ----------
    name : str
        A name of ``matplotlib.colormaps`` (``bone``, ``ocean_r``, ``viridis`` ...).

    Returns
    -------
    numpy.ndarray
        ``uint8`` (256, 3), read-only.

    Raises
    ------
    UnknownColormap
        When matplotlib has no colour map of that name.
    """
    import matplotlib

    check_colormap(name)
    rgba = matplotlib.colormaps[name](np.arange(256) / 255, bytes=True)
    table = np.ascontiguousarray(rgba[:, :3], dtype=np.uint8)
    table.setflags(write=False)
    return table


def apply_colormap(grey: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Colour 8-bit grey pixels through *table*.

    Parameters
    ----------
    grey : numpy.ndarray
        ``uint8`` of any shape (a frame: rows, columns).
    table : numpy.ndarray
        (256, 3) ``uint8``, from :func:`colormap_table`.

    Returns
    -------
    numpy.ndarray
        ``uint8`` of shape ``grey.shape + (3,)``.

    Raises
    ------
    ValueError
        When *grey* is not ``uint8`` or *table* not (256, 3) ``uint8``.
    """
    if grey.dtype != np.uint8:
        raise ValueError(f"a colour map takes 8-bit grey, got {grey.dtype}")
    if table.shape != (256, 3) or table.dtype != np.uint8:
        raise ValueError(f"a colour map table is (256, 3) uint8, got {table.dtype} {table.shape}")
    return np.take(table, grey, axis=0)  # table[grey], twice as fast
