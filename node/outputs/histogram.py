"""The histogram picture of a processed series: SVG (written here) or PNG (matplotlib, Agg), and its small data file.

Two panels, as fastai's medical imaging tutorial tells equalisation: the values before processing
(HU for CT; :class:`~node.process.histograms.SeriesHistograms`), with the equalisation bin edges
and clip bounds drawn over them, and the output levels after (coloured by the colour map when
the pipeline has one; one line per channel for ``channels``).  Both formats draw the same bars
from one :class:`HistogramFigure`.

The SVG is made from numbers only: every number is formatted here, the few words (unit, colour
map, channel names) are escaped, and there is no script, link, style sheet or font reference, so
it can be shown inline in the status page under its Content-Security-Policy.

The service keeps each processed series' histograms beside its outputs, in the hidden file
``.histogram.json`` (:func:`write_histogram_data`; a few KB: 512 bins before, 256 after; hidden
files are never delivered): the status page draws it without decoding any image again.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.imaging.histogram import SeriesHistograms, ValueHistogram
from node.store.fsutil import atomic_output

__all__ = [
    "DATA_FILE",
    "HistogramDataError",
    "HistogramFigure",
    "HistogramView",
    "histogram_figure",
    "histogram_png",
    "histogram_svg",
    "read_histogram_data",
    "series_histogram_view",
    "write_histogram",
    "write_histogram_data",
]

log = logging.getLogger(__name__)

#: The file beside a derived series' outputs that holds its histograms (hidden: never delivered).
DATA_FILE = ".histogram.json"
_FORMAT = "dicom-node histograms 1"
_STORED_BEFORE_BINS = 512
_STORED_AFTER_LEVELS = 256
_STORED_EDGES = 1024  # more equalisation edges than this are counted, not kept (nor drawn)
_MAX_DATA_BYTES = 1 << 20
_UNITS = ("HU", "modality value", "stored value", "luma")
_BARS = 128  # bars a panel draws at most

# Colours: bars, equalisation edges, clip bounds, channels R G B.
_BAR = "#5b7aa5"
_EDGE = "#d9822b"
_CLIP = "#c0392b"
_CHANNEL_COLOURS = ("#d62728", "#2ca02c", "#1f77b4")


class HistogramDataError(ValueError):
    """A histogram data file that cannot be read or is not what :func:`write_histogram_data` writes."""


# --------------------------------------------------------------------------- the data file


def histogram_data(histograms: SeriesHistograms) -> dict[str, Any]:
    """The histograms as JSON-ready data, reduced to what is kept (512 bins before, 256 levels after)."""
    before = histograms.before.coarsened(_STORED_BEFORE_BINS)
    edges = histograms.edges
    return {
        "format": _FORMAT,
        "unit": histograms.unit,
        "images": histograms.images,
        "bits": histograms.bits,
        "before": {"width": before.width, "first": before.first, "counts": before.counts.tolist()},
        "after": _reduce_levels(histograms.after, _STORED_AFTER_LEVELS).tolist(),
        "channels": list(histograms.channels),
        "edges": None if edges is None or len(edges) > _STORED_EDGES else [float(e) for e in edges],
        "edge_count": histograms.edge_count,
        "edges_of": histograms.edges_of,
        "clip": None if histograms.clip is None else list(histograms.clip),
        "colormap": histograms.colormap,
    }


def write_histogram_data(folder: str | os.PathLike, histograms: SeriesHistograms) -> Path:
    """Write *histograms* to ``folder/.histogram.json`` (atomically); return its path."""
    path = Path(folder) / DATA_FILE
    with atomic_output(path) as handle:
        handle.write(json.dumps(histogram_data(histograms), separators=(",", ":")).encode())
    return path


def read_histogram_data(folder: str | os.PathLike) -> SeriesHistograms | None:
    """The histograms kept in *folder* (None when it has none).

    Raises
    ------
    HistogramDataError
        The file is too large, not JSON, or not in the form written (every value is checked).
    """
    path = Path(folder) / DATA_FILE
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_DATA_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HistogramDataError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(raw) > _MAX_DATA_BYTES:
        raise HistogramDataError(f"{path}: larger than {_MAX_DATA_BYTES} bytes")
    try:
        return _from_data(json.loads(raw))
    except (ValueError, TypeError, KeyError) as exc:
        raise HistogramDataError(f"{path}: not a histogram data file: {exc}") from None


def _from_data(data: Any) -> SeriesHistograms:
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"format is not {_FORMAT!r}")
    unit = data["unit"]
    if unit not in _UNITS:
        raise ValueError(f"unit {unit!r}")
    before_data = data["before"]
    width, first = float(before_data["width"]), _whole(before_data["first"], "first")
    if not (math.isfinite(width) and width > 0 and math.frexp(width)[0] == 0.5):
        raise ValueError("before width is not a power of two")
    before = ValueHistogram()
    before.width, before.first = width, first
    before.counts = _counts(before_data["counts"], _STORED_BEFORE_BINS)
    after = np.array([_counts(row, _STORED_AFTER_LEVELS) for row in _list(data["after"], 3)], dtype=np.int64)
    if after.ndim != 2 or after.shape[1] == 0:
        raise ValueError("after counts are not one list per channel")
    channels = tuple(_text(name) for name in _list(data["channels"], 3))
    if len(channels) != after.shape[0]:
        raise ValueError("one channel name per after channel")
    edges = data["edges"]
    if edges is not None:
        edges = np.array([_finite(e) for e in _list(edges, _STORED_EDGES)], dtype=np.float64)
        if np.any(np.diff(edges) <= 0):
            raise ValueError("edges are not increasing")
    clip = data["clip"]
    if clip is not None:
        clip = tuple(None if v is None else _finite(v) for v in _list(clip, 2))
        if len(clip) != 2:
            raise ValueError("clip is [min, max]")
    colormap = data["colormap"]
    bits = data["bits"]
    if bits not in (8, 16):
        raise ValueError(f"bits {bits!r}")
    return SeriesHistograms(
        before=before, after=after, bits=bits, unit=unit, edges=edges,
        edge_count=_whole(data["edge_count"], "edge_count"), edges_of=_text(data["edges_of"]), clip=clip,
        colormap=None if colormap is None else _text(colormap),
        channels=channels, images=_whole(data["images"], "images"),
    )


def _list(value: Any, most: int) -> list:
    if not isinstance(value, list) or len(value) > most:
        raise ValueError(f"a list of at most {most} items expected")
    return value


def _whole(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 2**53:
        raise ValueError(f"{what} is not a whole number")
    return value


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def _counts(value: Any, most: int) -> np.ndarray:
    items = _list(value, most)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53 for v in items):
        raise ValueError("counts are whole numbers >= 0")
    return np.array(items, dtype=np.int64)


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("a text of at most 64 characters expected")
    return value


def _reduce_levels(after: np.ndarray, most: int) -> np.ndarray:
    """(channels, levels) counts summed in equal groups to at most *most* levels."""
    levels = after.shape[1]
    group = max(1, levels // most)
    return after.reshape(after.shape[0], levels // group, group).sum(axis=2)


@dataclass(frozen=True)
class HistogramView:
    """What a page shows for a series' histograms: the picture (inline SVG), or a note saying why not."""

    svg: str | None
    note: str = ""


def series_histogram_view(folder: Path | None) -> HistogramView:
    """The histogram picture kept in a derived series' *folder* (None: the series has no outputs).

    Never raises for what is in the folder: a missing, unreadable or altered data file gives a
    note (and a WARNING naming the file and what is wrong with it).
    """
    if folder is None:
        return HistogramView(None, "No histogram: the series has no outputs.")
    try:
        histograms = read_histogram_data(folder)
    except HistogramDataError as exc:
        log.warning("%s", exc)
        return HistogramView(None, "No histogram: its data file is unreadable or not as the node wrote it.")
    if histograms is None:
        return HistogramView(None, "No histogram: none was kept for this series (a presentation state, "
                                   "colour images passed through, or processed by an older version).")
    return HistogramView(histogram_svg(histograms))


# --------------------------------------------------------------------------- the picture


@dataclass(frozen=True)
class Panel:
    """One histogram panel: bars over ``edges``, marker lines, and what they mean.

    ``counts`` is (series, bars): one series is drawn as bars (each filled with ``fills[i]`` when
    given, else ``colours[0]``), several as one step line each in ``colours``.  The count axis
    goes up to :attr:`y_max`: a bar far taller than all others (CT's air or padding, the level
    it becomes) would flatten them, so it is cut at the top and its count written beside it.
    """

    title: str
    x_label: str
    edges: np.ndarray
    counts: np.ndarray
    colours: tuple[str, ...]
    names: tuple[str, ...] = ()
    fills: tuple[str, ...] | None = None
    lines: tuple[tuple[float, str, bool], ...] = ()  # (x, colour, dashed)
    notes: tuple[tuple[str, str], ...] = ()  # (colour, text) under the panel

    @property
    def y_max(self) -> float:
        """The top of the count axis: the tallest bar, or 1.25 x the second tallest when the tallest
        is over 4 times that."""
        heights = np.sort(self.counts.max(axis=0)) if self.counts.size else np.zeros(1)
        top = float(heights[-1])
        second = float(heights[-2]) if heights.size > 1 else 0.0
        return second * 1.25 if second > 0 and top > 4 * second else max(top, 1.0)


@dataclass(frozen=True)
class HistogramFigure:
    """What the picture shows, in numbers: a title, then the before and after panels."""

    title: str
    panels: tuple[Panel, ...] = field(default=())


def histogram_figure(histograms: SeriesHistograms) -> HistogramFigure:
    """The picture of *histograms*: at most 128 bars a panel."""
    before = _before_panel(histograms)
    after = _after_panel(histograms)
    total = int(histograms.before.total)
    images = f"{histograms.images} image{'s' if histograms.images != 1 else ''}"
    return HistogramFigure(title=f"Value histograms: {images}, {total:,} pixels", panels=(before, after))


def _before_panel(histograms: SeriesHistograms) -> Panel:
    bars = histograms.before.coarsened(_BARS).trimmed()
    edges = bars.edges()
    low, high = float(edges[0]), float(edges[-1])
    lines: list[tuple[float, str, bool]] = []
    notes: list[tuple[str, str]] = []
    if histograms.edges is not None:
        lines += [(float(e), _EDGE, False) for e in histograms.edges if low <= e <= high]
    if histograms.edge_count:
        drawn = "" if histograms.edges is not None else " (too many to draw)"
        of = f" of {histograms.edges_of}" if histograms.edges_of else ""
        notes.append((_EDGE, f"{histograms.edge_count} equalisation bin edges{of}{drawn}"))
    if histograms.clip is not None:
        for bound in histograms.clip:
            if bound is not None and low <= bound <= high:
                lines.append((bound, _CLIP, True))
        notes.append((_CLIP, f"clip {_bound(histograms.clip[0], '-inf')} .. {_bound(histograms.clip[1], 'inf')}"))
    return Panel(title="Before processing", x_label=histograms.unit, edges=edges,
                 counts=bars.counts[None, :], colours=(_BAR,), lines=tuple(lines), notes=tuple(notes))


def _after_panel(histograms: SeriesHistograms) -> Panel:
    levels = 2**histograms.bits
    counts = _reduce_levels(histograms.after, _BARS) if histograms.after.shape[1] > _BARS else histograms.after
    group = levels // counts.shape[1]
    edges = np.arange(counts.shape[1] + 1, dtype=np.float64) * group
    fills = None
    what = f"output level ({histograms.bits}-bit)"
    notes: list[tuple[str, str]] = []
    if histograms.colormap is not None:
        fills = _colormap_fills(histograms.colormap, counts.shape[1])
        what = f"grey level (8-bit) coloured by {histograms.colormap}"
    if counts.shape[0] > 1:
        colours = _CHANNEL_COLOURS[: counts.shape[0]]
        notes = [(c, f"{'RGB'[i]}: {name}") for i, (c, name) in enumerate(zip(colours, histograms.channels))]
    else:
        colours = ("#4a4f59",)
    return Panel(title="After processing", x_label=what, edges=edges, counts=counts,
                 colours=colours, names=histograms.channels, fills=fills, notes=tuple(notes))


def _colormap_fills(name: str, bars: int) -> tuple[str, ...] | None:
    """The colour of each after bar (its middle grey level through the colour map); None for an unknown map."""
    from node.imaging.colormap import UnknownColormap, colormap_table

    try:
        table = colormap_table(name)
    except UnknownColormap:
        return None
    group = 256 // bars
    return tuple("#{:02x}{:02x}{:02x}".format(*table[i * group + group // 2]) for i in range(bars))


def _bound(value: float | None, none: str) -> str:
    return none if value is None else _number(value)


def _number(value: float) -> str:
    """A tick or bound as text: whole numbers without a point, others with up to 4 significant digits."""
    if value == 0:
        return "0"
    if float(value).is_integer() and abs(value) < 1e9:
        return f"{int(value)}"
    return f"{value:.4g}"


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round numbers (1, 2 or 5 times a power of ten apart) between *low* and *high*."""
    span = high - low
    if not span > 0 or not math.isfinite(span):
        return [low]
    raw = span / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step)
    return [round(k * step, 10) for k in range(first, math.floor(high / step) + 1)]


# -- SVG ---------------------------------------------------------------------

_WIDTH = 720
_LEFT, _RIGHT = 88, 16
_TOP = 34  # the title
_PANEL = 262  # height of one panel with its labels
_PLOT_TOP, _PLOT_HEIGHT = 26, 150  # within a panel


def histogram_svg(histograms: SeriesHistograms | HistogramFigure) -> str:
    """The picture as one ``<svg>`` element (no script, no external reference), for a file or inline HTML."""
    figure = histograms if isinstance(histograms, HistogramFigure) else histogram_figure(histograms)
    height = _TOP + _PANEL * len(figure.panels)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="histogram" viewBox="0 0 {_WIDTH} {height}" '
        f'width="{_WIDTH}" height="{height}" font-family="sans-serif" font-size="11" role="img" '
        f'aria-label="{_esc(figure.title)}">',
        f'<rect width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="{_LEFT}" y="20" font-size="13" font-weight="bold" fill="#1d2330">{_esc(figure.title)}</text>',
    ]
    for index, panel in enumerate(figure.panels):
        out += _svg_panel(panel, _TOP + index * _PANEL)
    out.append("</svg>")
    return "\n".join(out)


def _svg_panel(panel: Panel, top: float) -> list[str]:
    x0, x1 = _LEFT, _WIDTH - _RIGHT
    y_base, y_top = top + _PLOT_TOP + _PLOT_HEIGHT, top + _PLOT_TOP
    low, high = float(panel.edges[0]), float(panel.edges[-1])
    peak = panel.y_max

    def sx(value: float) -> float:
        return x0 + (value - low) / (high - low) * (x1 - x0) if high > low else x0

    def sy(count: float) -> float:
        return y_base - min(count, peak) / peak * _PLOT_HEIGHT

    out = [f'<g class="panel">',
           f'<text x="{x0}" y="{_f(top + 16)}" font-size="12" fill="#1d2330">{_esc(panel.title)}</text>',
           f'<rect x="{x0}" y="{_f(y_top)}" width="{x1 - x0}" height="{_PLOT_HEIGHT}" fill="#f7f8fa" stroke="#d5d9e0"/>']
    if panel.counts.shape[0] == 1:
        for i, count in enumerate(panel.counts[0]):
            if count <= 0:
                continue
            left, right = sx(panel.edges[i]), sx(panel.edges[i + 1])
            fill = panel.fills[i] if panel.fills is not None else panel.colours[0]
            out.append(f'<rect x="{_f(left)}" y="{_f(sy(count))}" width="{_f(max(right - left, 0.6))}" '
                       f'height="{_f(y_base - sy(count))}" fill="{fill}"/>')
    else:
        for series, colour in zip(panel.counts, panel.colours):
            points = [(sx(panel.edges[0]), y_base)]
            for i, count in enumerate(series):
                points += [(sx(panel.edges[i]), sy(count)), (sx(panel.edges[i + 1]), sy(count))]
            points.append((sx(panel.edges[-1]), y_base))
            text = " ".join(f"{_f(x)},{_f(y)}" for x, y in points)
            out.append(f'<polyline points="{text}" fill="none" stroke="{colour}" stroke-width="1.2"/>')
    for x, colour, dashed in panel.lines:
        dash = ' stroke-dasharray="4 3"' if dashed else ' stroke-opacity="0.7"'
        out.append(f'<line x1="{_f(sx(x))}" y1="{_f(y_top)}" x2="{_f(sx(x))}" y2="{_f(y_base)}" stroke="{colour}" '
                   f'stroke-width="{1.4 if dashed else 0.7}"{dash}/>')
    for index, count in _cut_bars(panel):
        x = sx((panel.edges[index] + panel.edges[index + 1]) / 2)
        anchor = "start" if x < (x0 + x1) / 2 else "end"
        shift = 5 if anchor == "start" else -5
        out.append(f'<text x="{_f(x + shift)}" y="{_f(y_top + 12)}" text-anchor="{anchor}" fill="#1d2330">'
                   f'{count:,} (cut)</text>')
    for tick in _ticks(low, high):
        x = sx(tick)
        out.append(f'<line x1="{_f(x)}" y1="{_f(y_base)}" x2="{_f(x)}" y2="{_f(y_base + 4)}" stroke="#556070"/>')
        out.append(f'<text x="{_f(x)}" y="{_f(y_base + 16)}" text-anchor="middle" fill="#556070">{_number(tick)}</text>')
    for tick in _ticks(0, peak, 4):
        y = sy(tick)
        out.append(f'<line x1="{x0 - 4}" y1="{_f(y)}" x2="{x0}" y2="{_f(y)}" stroke="#556070"/>')
        out.append(f'<text x="{x0 - 6}" y="{_f(y + 4)}" text-anchor="end" fill="#556070">{int(tick):,}</text>')
    out.append(f'<text x="{_f((x0 + x1) / 2)}" y="{_f(y_base + 32)}" text-anchor="middle" fill="#1d2330">'
               f'{_esc(panel.x_label)}</text>')
    out.append(f'<text x="14" y="{_f(y_top + _PLOT_HEIGHT / 2)}" text-anchor="middle" fill="#556070" '
               f'transform="rotate(-90 14 {_f(y_top + _PLOT_HEIGHT / 2)})">pixels</text>')
    x = float(x0)
    for colour, text in panel.notes:
        out.append(f'<rect x="{_f(x)}" y="{_f(y_base + 42)}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{_f(x + 14)}" y="{_f(y_base + 51)}" fill="#1d2330">{_esc(text)}</text>')
        x += 24 + 6.2 * len(text)
    out.append("</g>")
    return out


def _cut_bars(panel: Panel) -> list[tuple[int, int]]:
    """(bar, count) of the bars taller than the count axis (their tallest series)."""
    tallest = panel.counts.max(axis=0) if panel.counts.size else np.zeros(0, dtype=np.int64)
    return [(int(i), int(tallest[i])) for i in np.flatnonzero(tallest > panel.y_max)]


def _f(value: float) -> str:
    """A coordinate: one decimal, no exponent."""
    return f"{float(value):.1f}"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


# -- PNG ---------------------------------------------------------------------


def histogram_png(histograms: SeriesHistograms | HistogramFigure) -> bytes:
    """The same picture as PNG, drawn by matplotlib (Agg, no display; imported only here)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = histograms if isinstance(histograms, HistogramFigure) else histogram_figure(histograms)
    height = (_TOP + _PANEL * len(figure.panels)) / 100
    fig = Figure(figsize=(_WIDTH / 100, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(figure.title, x=_LEFT / _WIDTH, y=0.985, ha="left", fontsize=11, fontweight="bold")
    axes = fig.subplots(len(figure.panels), 1)
    for ax, panel in zip(np.atleast_1d(axes), figure.panels):
        _png_panel(ax, panel)
    fig.subplots_adjust(left=_LEFT / _WIDTH, right=1 - _RIGHT / _WIDTH, top=0.89, bottom=0.15, hspace=0.8)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _png_panel(ax: Any, panel: Panel) -> None:
    edges = panel.edges
    if panel.counts.shape[0] == 1:
        colours = list(panel.fills) if panel.fills is not None else panel.colours[0]
        ax.bar(edges[:-1], panel.counts[0], width=np.diff(edges), align="edge", color=colours, linewidth=0)
    else:
        for series, colour in zip(panel.counts, panel.colours):
            ax.stairs(series, edges, color=colour, linewidth=1.2)
    for x, colour, dashed in panel.lines:
        ax.axvline(x, color=colour, linewidth=1.4 if dashed else 0.7, linestyle="--" if dashed else "-",
                   alpha=1.0 if dashed else 0.7)
    ax.set_xlim(float(edges[0]), float(edges[-1]))
    ax.set_ylim(0, panel.y_max)
    ax.yaxis.set_major_formatter(lambda value, _position: f"{int(value):,}")
    for index, count in _cut_bars(panel):
        middle = (edges[index] + edges[index + 1]) / 2
        left = middle < (edges[0] + edges[-1]) / 2
        ax.annotate(f"{count:,} (cut)", xy=(middle, panel.y_max), xytext=(5 if left else -5, -12),
                    textcoords="offset points", ha="left" if left else "right", fontsize=8)
    ax.set_title(panel.title, loc="left", fontsize=10)
    ax.set_xlabel(panel.x_label, fontsize=9)
    ax.set_ylabel("pixels", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_facecolor("#f7f8fa")
    if panel.notes:
        text = "    ".join(note for _, note in panel.notes)
        ax.annotate(text, xy=(0, -0.45), xycoords="axes fraction", fontsize=8, color="#1d2330")


# -- files -------------------------------------------------------------------


def write_histogram(path: str | os.PathLike, histograms: SeriesHistograms) -> Path:
    """Write the picture of *histograms* to *path*: SVG for ``.svg``, PNG for ``.png`` (atomically).

    Raises
    ------
    ValueError
        For any other suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".svg":
        data = ('<?xml version="1.0" encoding="UTF-8"?>\n' + histogram_svg(histograms) + "\n").encode("utf-8")
    elif suffix == ".png":
        data = histogram_png(histograms)
    else:
        raise ValueError(f"{path}: a histogram is written as FILE.svg or FILE.png")
    with atomic_output(path) as handle:
        handle.write(data)
    return path
