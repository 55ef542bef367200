"""The HTML pages of the status server: the status page ``/`` and the page of one series ``/series/{id}``.

The pages are Jinja2 templates (``templates/*.j2``, package data) rendered with autoescape on:
every value from the job store, a peer's reason included, reaches the page escaped, and only
the templates write markup.  This module turns job-store rows into the plain values the
templates show (times, truncated errors, which thumbnails exist); it reads no file.

No patient name or ID is ever shown: the job store holds none (the Series Instance UID is the
only identifier), and thumbnails are pixels only.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import jinja2
from markupsafe import Markup

from node.app.http.thumbnails import Thumbnails
from node.app.seriesview import series_view, utc_time
from node.outputs.histogram import HistogramView
from node.store.jobstore import SeriesState

__all__ = ["Pages", "series_context"]

#: The states on the status page, in the job store's order (a state unknown to it follows, by name).
_STATES = [state.value for state in SeriesState]
_ALERT_STATES = (SeriesState.FAILED.value, SeriesState.UNROUTED.value)
_ERROR_SHOWN = 400  # characters of an error on the status page (all of it in its tooltip and its own page)


def _when(epoch: object, now: float) -> tuple[str, str]:
    """(local time, how long ago) of a timestamp, or dashes."""
    if not isinstance(epoch, (int, float)):
        return "—", ""
    stamp = datetime.datetime.fromtimestamp(epoch).astimezone()
    ago = max(0.0, now - epoch)
    if ago < 90:
        rel = f"{ago:.0f} s ago"
    elif ago < 90 * 60:
        rel = f"{ago / 60:.0f} min ago"
    elif ago < 36 * 3600:
        rel = f"{ago / 3600:.0f} h ago"
    else:
        rel = f"{ago / 86400:.0f} d ago"
    return stamp.strftime("%Y-%m-%d %H:%M:%S"), rel


def _error_class(state: str) -> str:
    """How an error is shown: a discarded series' reason is no fault (muted), anything else is."""
    return "muted" if state == SeriesState.DISCARDED.value else "error"


def _before_after(row: Mapping[str, Any]) -> list[dict[str, str | None]]:
    """The before/after pictures of a series: each a label and its thumbnail URL (None: none yet)."""
    state = str(row.get("state") or "")
    has_source = bool(row.get("instances")) and state != SeriesState.DISCARDED.value
    has_output = bool(row.get("output_dir")) and bool(row.get("outputs"))
    pictures: list[dict[str, str | None]] = []
    for kind, label, available in (("source", "before", has_source), ("output", "after", has_output)):
        src = f"/thumbs/{int(row['id'])}/{kind}.png?v={Thumbnails.version(row, kind)}" if available else None
        pictures.append({"label": label, "src": src})
    return pictures


def _count_views(counts: Mapping[str, int], current: str) -> list[dict[str, object]]:
    """One entry per state for the counts bar: its number and its CSS classes."""
    views = []
    for name in _STATES + sorted(set(counts) - set(_STATES)):
        number = int(counts.get(name, 0))
        classes = [c for c in ("current" if name == current else "",
                               "zero" if not number else "alert" if name in _ALERT_STATES else "") if c]
        views.append({"state": name, "number": number, "classes": " ".join(classes)})
    return views


def _row_view(row: Mapping[str, Any], now: float) -> dict[str, object]:
    """One series as a line of the status page (every value text or a number)."""
    state = str(row.get("state") or "")
    received, ago = _when(row.get("last_received"), now)
    error = str(row.get("error") or "")
    outputs = row.get("outputs")
    return {
        "id": int(row["id"]),
        "series_uid": str(row.get("series_uid") or ""),
        "state": state,
        "modality": str(row.get("modality") or "—"),
        "instances": int(row.get("instances") or 0),
        "outputs": "—" if outputs is None else int(outputs),
        "pipeline": str(row.get("pipeline") or ""),
        "received": received,
        "ago": ago,
        "error": error,
        "error_shown": error if len(error) <= _ERROR_SHOWN else error[:_ERROR_SHOWN] + "…",
        "error_class": _error_class(state),
        "pictures": _before_after(row),
    }


def series_context(row: Mapping[str, Any], *, max_attempts: int | None, now: float,
                   histogram: HistogramView | None = None) -> dict[str, object]:
    """What ``series.html.j2`` shows of one series (a template extending it gets the same values).

    Returns
    -------
    dict
        ``view`` (:class:`~node.app.seriesview.SeriesView`), ``generated`` (UTC time of the page),
        ``error_class`` (how its error is shown), ``before_after`` (its two thumbnails) and
        ``histogram`` (None, or ``svg``: the picture as markup, else ``note``: why there is none).
    """
    view = series_view(row, max_attempts)
    shown = None
    if histogram is not None:
        # the SVG is made by node.outputs.histogram from numbers it formats and words it escapes
        shown = {"svg": None if histogram.svg is None else Markup(histogram.svg), "note": histogram.note}
    return {"view": view, "generated": utc_time(now), "error_class": _error_class(view.state),
            "before_after": _before_after(row), "histogram": shown}


class Pages:
    """The server's templates, loaded once, and the pages rendered from them.

    Each :class:`~node.app.http.server.StatusServer` holds one (no module-level environment).
    Every template is loaded here, so a missing or broken one stops the server at start-up, not
    at its first request.
    """

    def __init__(self) -> None:
        self.environment = jinja2.Environment(
            loader=jinja2.PackageLoader("node.app.http", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self._status = self.environment.get_template("status.html.j2")
        self._series = self.environment.get_template("series.html.j2")
        self._message = self.environment.get_template("message.html.j2")

    def status_page(
        self, counts: Mapping[str, int], rows: list[dict[str, Any]], *, state: str | None, limit: int, now: float
    ) -> str:
        """The status page: counts by state, then the recent series with their thumbnails.

        Parameters
        ----------
        counts : mapping of str to int
            Series per state (:meth:`~node.store.jobstore.JobStore.counts`).
        rows : list of dict
            The series listed, newest first (:meth:`~node.store.jobstore.JobStore.list_series`).
        state : str or None
            The state the list is filtered by, None for all.
        limit : int
            The most series listed.
        now : float
            The time the page is made (seconds since the epoch).
        """
        return self._status.render(
            total=sum(counts.values()), generated=_when(now, now)[0], state=state or "", limit=limit,
            counts=_count_views(counts, state or ""), rows=[_row_view(row, now) for row in rows],
        )

    def series_page(self, row: Mapping[str, Any], *, max_attempts: int | None, now: float,
                    histogram: HistogramView | None = None) -> str:
        """The page of one series: its facts, before/after thumbnails and histograms, deliveries and events.

        Parameters
        ----------
        row : mapping
            :meth:`~node.store.jobstore.JobStore.series` of the series.
        max_attempts : int or None
            ``[delivery] max_attempts``, the *m* of each delivery's ``n/m``.
        now : float
            The time the page is made (seconds since the epoch).
        histogram : HistogramView, optional
            The series' histograms (:func:`node.outputs.histogram.series_histogram_view`); no section when None.
        """
        return self._series.render(series_context(row, max_attempts=max_attempts, now=now, histogram=histogram))

    def message_page(self, title: str, message: str) -> str:
        """A short page saying why a request shows nothing (a 400 or 404), with a link to the status page."""
        return self._message.render(title=title, message=message)
