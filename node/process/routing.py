"""Which route a series takes (:func:`route_for`), and dry runs that say why (``dicom-node route``).

The service decides with :func:`route_for`, then :attr:`Route.discards` and ``[node] unrouted``;
:func:`explain_route` says the same in one line per series, with no patient data: values of the
series are shown only for coded attributes (VR CS, UI, IS, DS, such as Modality or SOP Class UID),
never for names, IDs, dates or free text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from node.config import Config, Route

__all__ = ["HeaderSeries", "element_text", "explain_route", "group_headers", "matches", "read_headers", "route_for",
           "route_label", "series_line"]

log = logging.getLogger(__name__)

#: Value representations whose values are codes or numbers, safe to print (no patient data).
_CODED_VRS = frozenset({"CS", "UI", "IS", "DS", "US", "SS", "UL", "SL"})


def element_text(value: Any) -> str:
    """The text a route's ``match`` patterns are compared with: a data element's value as a string
    (multiple values joined with backslashes, as DICOM writes them; None as empty)."""
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


def matches(route: Route, ds: Dataset) -> bool:
    """Whether *ds* (any instance of the series) is taken by *route*.

    Each element's ``str(value)`` (values of a multi-valued element joined with ``\\``) is
    compared case-sensitively with the glob patterns; an attribute that is absent matches
    only the pattern ``""``.

    Parameters
    ----------
    route : Route
        The route.
    ds : pydicom.Dataset
        The dataset to test.

    Returns
    -------
    bool
        True when every keyword matches one of its patterns.
    """
    for keyword, patterns in route.match:
        if keyword not in ds:
            if "" not in patterns:
                return False
            continue
        text = element_text(ds[keyword].value)
        if not any(fnmatchcase(text, pattern) for pattern in patterns):
            return False
    return True


def route_for(config: Config, ds: Dataset) -> Route | None:
    """The first route of *config* that matches *ds*, or None.

    Parameters
    ----------
    config : Config
        The node's configuration.
    ds : pydicom.Dataset
        The dataset to route.

    Returns
    -------
    Route or None
        The route, or None when no route matches.
    """
    for route in config.routes:
        if matches(route, ds):
            return route
    return None


@dataclass
class HeaderSeries:
    """The headers (no pixel data) of one series, in instance order."""

    study_uid: str
    series_uid: str
    headers: list[Dataset] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        """The header the series is routed on (the lowest Instance Number)."""
        return self.headers[0]


def read_headers(paths: Iterable[Path]) -> tuple[list[Dataset], list[str]]:
    """The DICOM headers of *paths* (pixel data not read) and, for each file skipped, why.

    Parameters
    ----------
    paths : iterable of pathlib.Path
        The files.

    Returns
    -------
    tuple of (list of pydicom.Dataset, list of str)
        Headers of the instances found; one message per file that is not a DICOM instance.
    """
    headers: list[Dataset] = []
    skipped: list[str] = []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append(f"{path}: not DICOM ({exc})")
            continue
        if "SeriesInstanceUID" not in header:
            skipped.append(f"{path}: no Series Instance UID (0020,000E): not an instance of a series")
            continue
        headers.append(header)
    return headers, skipped


def _instance_order(header: Dataset) -> tuple[int, str]:
    try:
        number = int(header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number, str(header.get("SOPInstanceUID", ""))


def group_headers(headers: Iterable[Dataset]) -> list[HeaderSeries]:
    """Group *headers* by Study and Series Instance UID (first seen first), each by Instance Number."""
    groups: dict[tuple[str, str], HeaderSeries] = {}
    for header in headers:
        key = (str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")))
        groups.setdefault(key, HeaderSeries(*key)).headers.append(header)
    for group in groups.values():
        group.headers.sort(key=_instance_order)
    return list(groups.values())


def _match_text(route: Route) -> str:
    if not route.match:
        return "match all"
    keys = (f"{keyword} = {' | '.join(repr(p) for p in patterns)}" for keyword, patterns in route.match)
    return "match " + ", ".join(keys)


def route_label(config: Config, route: Route) -> str:
    """``route N (match ...)``: the route's number in the config (from 1) and its match keys."""
    return f"route {config.routes.index(route) + 1} ({_match_text(route)})"


def _shown_value(keyword: str, ds: Dataset) -> str:
    """The value of *keyword* in *ds* for a message: coded values only, never patient data."""
    if keyword not in ds:
        return "absent"
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        vr = ""
    if vr not in _CODED_VRS:
        return "(value not shown)"
    return repr(element_text(ds[keyword].value))  # the text the route's patterns are matched against


def _first_mismatch(route: Route, ds: Dataset) -> str:
    """Which match key of *route* *ds* fails, with its value when that is safe to show."""
    for keyword, patterns in route.match:
        single = Route(match=((keyword, patterns),), pipeline="", destinations=())
        if not matches(single, ds):
            return f"{keyword} {_shown_value(keyword, ds)} is not {' | '.join(repr(p) for p in patterns)}"
    return "matches"  # not reached for a route that failed


def explain_route(config: Config, ds: Dataset) -> str:
    """What the service does with the series whose (first) header is *ds*, as ``-> ...``.

    Parameters
    ----------
    config : Config
        The node's configuration.
    ds : pydicom.Dataset
        A header of the series.

    Returns
    -------
    str
        ``-> route N (match ...): pipeline P -> destinations a, b``, ``-> discarded by route N
        (match ...)``, or ``-> no route: kept unrouted`` / ``-> no route: discarded ([node]
        unrouted = "discard")`` followed by why each route does not match.
    """
    route = route_for(config, ds)
    if route is not None and route.discards:
        return f"-> discarded by {route_label(config, route)}"
    if route is not None:
        destinations = ", ".join(route.destinations) or "none"
        trigger = " (trigger study)" if route.trigger == "study" else ""
        return f"-> {route_label(config, route)}: pipeline {route.pipeline} -> destinations {destinations}{trigger}"
    fate = ('discarded ([node] unrouted = "discard")' if config.node.unrouted == "discard" else "kept unrouted")
    if not config.routes:
        return f"-> no route: {fate}; {config.source} has no [[routes]]"
    reasons = "; ".join(f"route {n}: {_first_mismatch(r, ds)}" for n, r in enumerate(config.routes, start=1))
    return f"-> no route: {fate}; {reasons}"


def series_line(config: Config, series: HeaderSeries) -> str:
    """One line: Series Instance UID, Modality, instance count and :func:`explain_route`."""
    modality = str(series.first.get("Modality") or "?")
    count = len(series.headers)
    return (f"{series.series_uid} {modality} {count} instance{'s' if count != 1 else ''} "
            f"{explain_route(config, series.first)}")

