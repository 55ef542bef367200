"""What an operator is shown about one series: the facts behind ``/series/{id}`` and ``dicom-node status JOB``.

Both views print the same facts, read from :meth:`node.store.jobstore.JobStore.series`: readable UTC
times, the calling AE, route, pipeline, outputs, each delivery with its attempts ``n/m`` and the
peer's last reason, and the series' events.  Nothing patient-identifying is in a job row: the
Series Instance UID is the only identifier shown (as on the status page).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DeliveryView", "EventView", "SeriesView", "series_text", "series_view", "utc_time"]


def utc_time(epoch: object) -> str:
    """A timestamp (seconds since the epoch) as ``YYYY-MM-DD HH:MM:SS UTC``, or ``-`` when there is none.

    Parameters
    ----------
    epoch : object
        A number of seconds, or anything else (None) for "no time".
    """
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return "-"
    stamp = datetime.datetime.fromtimestamp(float(epoch), tz=datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class DeliveryView:
    """One delivery of a series, as shown: destination, state, attempts ``n/m``, times, last reason."""

    destination: str
    state: str
    attempts: str
    delivered_at: str
    next_attempt_at: str
    last_error: str


@dataclass(frozen=True)
class EventView:
    """One event of a series' history: when, which state, and what happened."""

    at: str
    state: str
    detail: str


@dataclass(frozen=True)
class SeriesView:
    """One series as an operator sees it (every value already text).

    ``facts`` are (label, value) pairs in display order; ``error`` is the series' last error or
    reason ("" for none).
    """

    id: int
    state: str
    facts: tuple[tuple[str, str], ...]
    error: str
    deliveries: tuple[DeliveryView, ...]
    events: tuple[EventView, ...]


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _attempts(done: object, max_attempts: int | None) -> str:
    count = int(done) if isinstance(done, int) else 0
    return f"{count}/{max_attempts}" if max_attempts else str(count)


def series_view(row: Mapping[str, Any], max_attempts: int | None) -> SeriesView:
    """The operator's view of a :meth:`~node.store.jobstore.JobStore.series` row.

    Parameters
    ----------
    row : mapping
        The series row with its ``deliveries`` and ``events`` lists.
    max_attempts : int or None
        ``[delivery] max_attempts``: the *m* of each delivery's ``n/m``; None shows *n* alone.
    """
    seconds = row.get("processing_seconds")
    facts = (
        ("Series Instance UID", _text(row.get("series_uid"))),
        ("Modality", _text(row.get("modality"))),
        ("Calling AE", _text(row.get("calling_ae"))),
        ("Instances", _text(row.get("instances"))),
        ("First received", utc_time(row.get("first_received"))),
        ("Last received", utc_time(row.get("last_received"))),
        ("Closed by", _text(row.get("trigger"))),
        ("Route", _text(row.get("route"))),
        ("Pipeline", _text(row.get("pipeline"))),
        ("Processing", f"{seconds:.2f} s" if isinstance(seconds, (int, float)) else "-"),
        ("Outputs", _text(row.get("outputs"))),
        ("Derived Series UID", _text(row.get("derived_series_uid"))),
        ("Updated", utc_time(row.get("updated_at"))),
    )
    deliveries = tuple(
        DeliveryView(
            destination=_text(d.get("destination")),
            state=_text(d.get("state")),
            attempts=_attempts(d.get("attempts"), max_attempts),
            delivered_at=utc_time(d.get("delivered_at")),
            next_attempt_at=utc_time(d.get("next_attempt_at")) if d.get("state") == "pending" else "-",
            last_error=str(d.get("last_error") or ""),
        )
        for d in row.get("deliveries") or ()
    )
    events = tuple(
        EventView(at=utc_time(e.get("at")), state=_text(e.get("state")), detail=str(e.get("detail") or ""))
        for e in row.get("events") or ()
    )
    return SeriesView(id=int(row["id"]), state=_text(row.get("state")), facts=facts,
                      error=str(row.get("error") or ""), deliveries=deliveries, events=events)


_CONTROL = {code: "?" for code in (*range(0x20), 0x7F)}


def series_text(view: SeriesView) -> list[str]:
    """The view as lines of plain text (``dicom-node status JOB``).

    A control character in a value (a peer's reason with a newline or a terminal escape) is
    printed as ``?``: one fact stays on one line and nothing reaches the terminal as a command.
    """
    return [line.translate(_CONTROL) for line in _lines(view)]


def _lines(view: SeriesView) -> list[str]:
    lines = [f"job {view.id}: {view.state}"]
    width = max(len(label) for label, _ in view.facts)
    lines += [f"  {label + ':':<{width + 1}} {value}" for label, value in view.facts]
    if view.error:
        lines.append(f"  {'Error:':<{width + 1}} {view.error}")
    lines.append("deliveries:" if view.deliveries else "deliveries: none")
    for d in view.deliveries:
        line = f"  {d.destination}: {d.state}, attempts {d.attempts}"
        if d.delivered_at != "-":
            line += f", delivered {d.delivered_at}"
        if d.next_attempt_at != "-":
            line += f", next attempt {d.next_attempt_at}"
        if d.last_error:
            line += f", last error: {d.last_error}"
        lines.append(line)
    lines.append("events:" if view.events else "events: none")
    lines += [f"  {e.at}  {e.state}" + (f"  {e.detail}" if e.detail else "") for e in view.events]
    return lines
