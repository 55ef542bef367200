"""Scheduled DICOMweb pulls: find new series with QIDO-RS, fetch them with WADO-RS into the spool.

Many sites cannot push to a new AE; the node then polls their archive. A pulled instance enters
the node exactly like a received one (:meth:`Spool.store` + :meth:`JobStore.record_instance`, with
``calling_ae = "dicomweb:<source name>"``), so series assembly, pipelines and destinations take it
from there.

One poll of one source (:meth:`DicomWebPoller.poll_once`):

1. **Window.** QIDO-RS matches ``StudyDate=YYYYMMDD-`` (whole days, the archive's dates). The first
   poll looks ``lookback_hours`` back (that start is kept as the *floor*: the window never starts
   earlier); later polls start at the saved watermark minus ``late_arrival_hours`` (default 24), so
   studies that reach the archive up to that long after their StudyDate are still found, and a node
   that was down for a week catches up on the whole week. A study imported later than that (an
   outside study loaded a week after it was made) is not found: raise ``late_arrival_hours`` where
   that happens, at the price of larger queries; for older studies see *Backfill* below.
2. **Find.** ``level = "series"``: one series query; ``"study"``: a study query, then each study's
   series. Every query is paged with ``limit``/``offset`` (``page_size``) until a short page.
3. **Skip.** A series is not fetched when it is one of the node's own results (the job store knows
   it as derived, or its Manufacturer is ``"dicom-node"``, or its SeriesDescription ends with
   ``" [<pipeline>]"`` as the node writes them), so polling an archive the node also stores to
   cannot loop; nor when it was fetched before with the same ``NumberOfSeriesRelatedInstances``.
4. **Fetch.** A QIDO-RS instance query lists the series' SOP Instance UIDs; each one not yet in the
   spool is retrieved on its own (WADO-RS, in the transfer syntax the archive holds) and written
   to the spool as it arrives, so a series that grew costs only its new instances and a
   1,000-instance series is never in memory at once. An instance whose Manufacturer is
   ``"dicom-node"`` also marks the series as derived (nothing of it is spooled).
5. **Watermark.** Kept in the job store under ``poll:<source name>``, so a restart resumes from it:
   the start of the last complete poll, the window floor, and the series already handled with
   their instance counts (entries older than the window are dropped). A failed or unfinished
   series holds the watermark at its own StudyDate/Time; a failed query does not move it at all.

**Backfill** (:meth:`DicomWebPoller.backfill`, ``dicom-node poll --once --since YYYY-MM-DD``): studies
dated before the window (an outside study, a phantom, a migrated archive) are never found by the
schedule. A backfill searches a StudyDate range in calendar chunks (:func:`backfill_chunks`, a month
by default, so no query asks an archive for a decade at once), each paged like a poll, and fetches
through the same skip rules (derived; known: handled by the scheduled polls, or every instance
already in the spool) into the spool and the job store, where a running node (or the next start)
processes the series. The watermark is neither read for the window nor written: the schedule goes on
as it was, and a second backfill of the same range fetches nothing.

Failed requests (connection refused, timeouts, HTTP 5xx, 408, 429) are retried within the poll
after :data:`RETRY_DELAYS`; when they keep failing, the poll of that source ends there with its
errors logged. HTTP 401/403 end the poll at once with a message naming the user and the variable
the secret comes from. :func:`schedule` runs each source as its own APScheduler job; one failing
source never stops the others or the scheduler. Logs name the source, series UIDs and counts,
never patient attributes.
"""

from __future__ import annotations

import datetime
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydicom
import requests
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from dicomweb_client import DICOMwebClient
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node import MANUFACTURER
from node.config import BasicAuth, BearerAuth, ConfigError, DicomWebSource
from node.store.jobstore import JobStore
from node.store.spool import InvalidUID, Spool, check_uid

__all__ = [
    "BACKFILL_CHUNKS", "RETRY_DELAYS", "DicomWebPoller", "PollResult", "backfill_chunks", "run_poll", "schedule",
    "state_key",
]

log = logging.getLogger(__name__)

RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0)
"""Seconds to wait before each retry of a failed request within one poll."""

BACKFILL_CHUNKS: tuple[str, ...] = ("day", "month", "year")
"""How a backfill may split its StudyDate range: one QIDO-RS query (paged) per calendar chunk."""

_STATE_VERSION = 1
_ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)

# DICOM JSON tags (PS3.18 F.2) of the attributes the poller reads.
_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_STUDY_DATE = "00080020"
_STUDY_TIME = "00080030"
_MODALITY = "00080060"
_MANUFACTURER = "00080070"
_SERIES_DESCRIPTION = "0008103E"
_SERIES_INSTANCES = "00201209"

# includefield: what the skip decisions need (servers return their defaults besides).
_STUDY_FIELDS = ("StudyDate", "StudyTime")
_SERIES_FIELDS = (
    "StudyDate", "StudyTime", "Modality", "SeriesDescription", "Manufacturer", "NumberOfSeriesRelatedInstances",
)
_INSTANCE_FIELDS = ("SOPInstanceUID",)

_TRANSIENT_STATUS = {408, 429}
_T = TypeVar("_T")

# Characters dicomweb-client percent-encodes in QIDO-RS values that RFC 3986 allows as they are in a
# query, and that matching needs: wildcards and the UID list separator.
_QUERY_UNESCAPE = {"%2A": "*", "%3F": "?", "%2C": ","}
_QUERY_ESCAPED = re.compile("|".join(_QUERY_UNESCAPE), re.IGNORECASE)


class _Session(requests.Session):
    """A session that sends ``*``, ``?`` and ``,`` in a query string as they are, not percent-encoded.

    dicomweb-client encodes query values with ``quote_plus`` (``*`` becomes ``%2A``). Orthanc 1.10
    with DICOMweb 1.7 does not decode query values, so ``Modality=C%2A`` matches only a literal
    ``C%2A``: every wildcard filter would silently find nothing. Sent as they are, the characters
    mean the same to a server that decodes (RFC 3986 allows them in a query).
    """

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        text = url.decode() if isinstance(url, bytes) else str(url)
        base, mark, query = text.partition("?")
        if mark:
            text = base + mark + _QUERY_ESCAPED.sub(lambda m: _QUERY_UNESCAPE[m.group().upper()], query)
        return super().request(method, text, *args, **kwargs)


def state_key(source_name: str) -> str:
    """The job store key (:meth:`JobStore.get_value`) of a source's watermark."""
    return f"poll:{source_name}"


@dataclass
class PollResult:
    """What one poll of one source did.

    Attributes
    ----------
    series_found : int
        Series the queries returned (in the window, matching the source's query).
    series_fetched : int
        Series of which at least one instance was retrieved.
    instances_fetched : int
        Instances retrieved and spooled.
    skipped_known : int
        Series not fetched: handled before with the same number of instances, or every instance
        already in the spool.
    skipped_derived : int
        Series not fetched because the node produced them.
    errors : list of str
        What went wrong (empty when the poll was complete).
    source : str
        The source's name.
    since : str
        The StudyDate the window (or a backfill) started at (``YYYYMMDD``).
    until : str
        A backfill's last StudyDate (``YYYYMMDD``); empty for a scheduled poll (open-ended).
    """

    series_found: int = 0
    series_fetched: int = 0
    instances_fetched: int = 0
    skipped_known: int = 0
    skipped_derived: int = 0
    errors: list[str] = field(default_factory=list)
    source: str = ""
    since: str = ""
    until: str = ""

    def add(self, other: PollResult) -> None:
        """Add the counts and errors of *other* (one chunk of a backfill) to these."""
        self.series_found += other.series_found
        self.series_fetched += other.series_fetched
        self.instances_fetched += other.instances_fetched
        self.skipped_known += other.skipped_known
        self.skipped_derived += other.skipped_derived
        self.errors.extend(other.errors)

    @property
    def ok(self) -> bool:
        """True when nothing went wrong."""
        return not self.errors

    def log(self, what: str, advice: str = "") -> None:
        """Log this result in one line: INFO when complete, WARNING with the first error otherwise.

        *what* says which run it was (``poll since StudyDate 20260101``); *advice* is appended.
        """
        log.log(
            logging.INFO if self.ok else logging.WARNING,
            "source %s: %s: %d series found, %d fetched (%d instances), %d skipped as known, %d skipped as "
            "derived, %d errors%s%s", self.source, what, self.series_found, self.series_fetched,
            self.instances_fetched, self.skipped_known, self.skipped_derived, len(self.errors),
            f": {self.errors[0]}" if self.errors else "", advice,
        )


class _SourceFailure(Exception):
    """Ends this poll of the source (the archive is unreachable, refuses us, or our disk failed)."""


class _SeriesFailure(Exception):
    """This series cannot be fetched now; the poll goes on with the next one."""


class _Derived(Exception):
    """A retrieved instance shows the series is one of the node's own results."""


@dataclass(frozen=True)
class _Series:
    study_uid: str
    series_uid: str
    study_date: str  # YYYYMMDD or ""
    study_time: str
    instances: int | None
    manufacturer: str
    description: str

    @property
    def when(self) -> datetime.datetime | None:
        """StudyDate + StudyTime (naive, the archive's local time), or None without a valid date."""
        try:
            day = datetime.datetime.strptime(self.study_date, "%Y%m%d")
        except ValueError:
            return None
        digits = re.match(r"\d*", self.study_time.replace(":", "")).group()[:6]
        try:
            hour, minute, second = int(digits[0:2] or 0), int(digits[2:4] or 0), int(digits[4:6] or 0)
            return day.replace(hour=hour, minute=minute, second=second)
        except ValueError:
            return day


def _value(item: Mapping[str, Any], tag: str) -> Any:
    """The first value of *tag* in a DICOM JSON object, or None."""
    element = item.get(tag)
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    return values[0]


def _text(item: Mapping[str, Any], tag: str) -> str:
    value = _value(item, tag)
    return "" if value is None or isinstance(value, Mapping) else str(value).strip()


def _reason(exc: BaseException, timeout: float) -> str:
    """A short, secret-free description of a failed request."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        response = exc.response
        detail = f"HTTP {response.status_code} {response.reason or ''}".strip()
        body = (response.text or "").strip().replace("\n", " ")
        return f"{detail}: {body[:200]}" if body and "json" in response.headers.get("Content-Type", "") else detail
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, requests.ConnectionError):
        found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
        return f"cannot connect: {found.group(1).strip()}" if found else f"cannot connect: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _part10(ds: pydicom.Dataset) -> bytes:
    """The instance as a Part 10 file, in the transfer syntax it was retrieved in."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:  # a server that sent a bare dataset
        meta = FileMetaDataset(meta or {})
        implicit, little = getattr(ds, "original_encoding", (False, True))
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class DicomWebPoller:
    """Polls one DICOMweb source into the spool and the job store.

    Parameters
    ----------
    source : DicomWebSource
        The archive, its schedule and query.
    spool : Spool
        Where pulled instances are written (as received ones are).
    jobs : JobStore
        Records pulled instances; keeps the watermark (``poll:<source name>``).
    clock : callable, optional
        Returns the current time in seconds since the epoch (``time.time``).
    pipeline_names : iterable of str, optional
        The configured pipelines: a SeriesDescription ending with ``" [<name>]"`` is the node's own.
    retry_delays : sequence of float, optional
        Seconds before each retry of a failed request (:data:`RETRY_DELAYS`).
    sleep : callable, optional
        Waits that many seconds (``time.sleep``).
    """

    def __init__(
        self,
        source: DicomWebSource,
        *,
        spool: Spool,
        jobs: JobStore,
        clock: Callable[[], float] = time.time,
        pipeline_names: Iterable[str] = (),
        retry_delays: Iterable[float] = RETRY_DELAYS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.spool = spool
        self.jobs = jobs
        self._clock = clock
        self._suffixes = tuple(f" [{name}]" for name in pipeline_names)
        self._retry_delays = tuple(float(d) for d in retry_delays)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.calling_ae = f"dicomweb:{source.name}"

    def stop(self) -> None:
        """Make a running poll end after the instance it is writing (and later polls do nothing).

        What was not fetched stays for the next start: the watermark does not pass it.
        """
        self._stopping.set()

    def __repr__(self) -> str:
        return f"<DicomWebPoller {self.source.name} {self.source.url}>"

    # -- one poll ---------------------------------------------------------------------------------

    def poll_once(self) -> PollResult:
        """Find and fetch what is new now; never raises (problems are in ``errors`` and the log).

        Returns
        -------
        PollResult
            Counts and errors of this poll.
        """
        with self._lock:
            result = PollResult(source=self.source.name)
            started = datetime.datetime.fromtimestamp(self._clock())
            state: dict[str, Any] | None = None
            try:
                state = self._load_state()
                self._poll(state, started, result)
            except Exception as exc:  # a bug must not stop the scheduler: report it as this poll's error
                log.exception("source %s: poll crashed", self.source.name)
                result.errors.append(f"poll crashed: {type(exc).__name__}: {exc}")
            if state is not None:
                try:
                    self.jobs.set_value(state_key(self.source.name), state)
                except Exception as exc:
                    log.error("source %s: cannot save the watermark: %s", self.source.name, exc)
                    result.errors.append(f"cannot save the watermark: {exc}")
            result.log(f"poll since StudyDate {result.since}")
            return result

    def _poll(self, state: dict[str, Any], started: datetime.datetime, result: PollResult) -> None:
        first = not state.get("floor")
        since = self._window_start(state, started)
        result.since = since
        if first:
            self._log_first_window(since)
        if self._stopping.is_set():
            result.errors.append("not polled: the node is stopping")
            return
        try:
            session, headers = self._session()
        except ConfigError as exc:
            result.errors.append(f"cannot authenticate: {exc}")
            log.error("source %s: cannot authenticate: %s", self.source.name, exc)
            return
        with session:
            client = self._client(session, headers)
            try:
                found = self._find(client, f"{since}-")
            except _SourceFailure as exc:
                result.errors.append(str(exc))
                log.error("source %s: %s", self.source.name, exc)
                return  # nothing known about the window: the watermark stays
            result.series_found = len(found)
            found.sort(key=lambda s: (s.study_date, s.study_time, s.series_uid))
            unfetched = self._fetch_all(client, found, state, result)
        self._advance(state, started, found, unfetched)

    def _fetch_all(self, client: DICOMwebClient, found: list[_Series], state: dict[str, Any],
                   result: PollResult) -> list[_Series]:
        """Fetch what is new; returns the series left unfetched (failed, or not reached)."""
        known: dict[str, Any] = state["series"]
        unfetched: list[_Series] = []
        for index, series in enumerate(found):
            entry = known.get(series.series_uid)
            if self._is_derived(series) or (entry and entry.get("derived")):
                result.skipped_derived += 1
                known[series.series_uid] = {"n": series.instances, "date": series.study_date, "derived": True}
                continue
            if entry is not None and series.instances is not None and entry.get("n") == series.instances:
                result.skipped_known += 1
                continue
            try:
                fetched, total = self._fetch_series(client, series, entry, result)
            except _Derived as exc:
                result.skipped_derived += 1
                known[series.series_uid] = {"n": series.instances, "date": series.study_date, "derived": True}
                log.info("source %s: series %s skipped: %s", self.source.name, series.series_uid, exc)
                continue
            except _SeriesFailure as exc:
                result.errors.append(f"series {series.series_uid}: {exc}")
                log.error("source %s: series %s not fetched: %s", self.source.name, series.series_uid, exc)
                unfetched.append(series)
                continue
            except _SourceFailure as exc:
                result.errors.append(f"series {series.series_uid}: {exc}")
                log.error("source %s: series %s: %s; this poll ends here (%d series left for the next poll)",
                          self.source.name, series.series_uid, exc, len(found) - index)
                unfetched.extend(found[index:])
                break
            known[series.series_uid] = {"n": series.instances if series.instances is not None else total,
                                        "date": series.study_date}
            if fetched:
                result.series_fetched += 1
                log.info("source %s: series %s fetched: %d instances (%d in the series)",
                         self.source.name, series.series_uid, fetched, total)
            else:
                result.skipped_known += 1
        return unfetched

    def _log_first_window(self, since: str) -> None:
        """Say, once per source, which StudyDates the schedule searches and how to fetch earlier ones."""
        log.info(
            "source %s: first poll: searching StudyDate %s onwards (lookback_hours %g); later polls start at "
            "the watermark minus late_arrival_hours (%g). Studies dated earlier are never polled: to fetch "
            "them once, run: dicom-node poll --once --source %s --since YYYY-MM-DD [--until YYYY-MM-DD]",
            self.source.name, since, self.source.lookback_hours, self.source.late_arrival_hours, self.source.name,
        )

    # -- backfill ---------------------------------------------------------------------------------

    def backfill(self, since: datetime.date, until: datetime.date, *, chunk: str = "month") -> PollResult:
        """Find and fetch every series with a StudyDate from *since* to *until*.

        Problems with the archive never raise: they are in ``errors`` and the log, with the
        ``--since`` to run it again from.

        The range is searched one calendar *chunk* at a time (:func:`backfill_chunks`), oldest
        first, each chunk paged like a poll; every chunk's counts are logged as it ends. Series go
        through the skip rules of a poll (derived; known to the watermark, or every instance already
        spooled) and are recorded in the job store as polled ones are. The watermark is not saved:
        the schedule goes on as it was.

        Parameters
        ----------
        since, until : datetime.date
            First and last StudyDate (inclusive); *since* must not be after *until*.
        chunk : {"day", "month", "year"}
            How the range is split into queries (:data:`BACKFILL_CHUNKS`).

        Returns
        -------
        PollResult
            The counts and errors of the whole backfill (``since``/``until`` as ``YYYYMMDD``).

        Raises
        ------
        ValueError
            *since* is after *until*, or *chunk* is not one of :data:`BACKFILL_CHUNKS`.
        """
        chunks = backfill_chunks(since, until, chunk)
        with self._lock:
            result = PollResult(source=self.source.name, since=f"{since:%Y%m%d}", until=f"{until:%Y%m%d}")
            log.info("source %s: backfill of StudyDate %s-%s in %d chunks (a %s each; page_size %d)",
                     self.source.name, result.since, result.until, len(chunks), chunk, self.source.page_size)
            resume: datetime.date | None = None
            try:
                resume = self._backfill(chunks, result)
            except Exception as exc:  # a bug: reported as this backfill's error, like a poll's
                log.exception("source %s: backfill crashed", self.source.name)
                result.errors.append(f"backfill crashed: {type(exc).__name__}: {exc}")
            result.log(f"backfill of StudyDate {result.since}-{result.until}",
                       "" if resume is None else
                       f"; run it again from --since {resume:%Y-%m-%d} (what was fetched is skipped as known)")
            return result

    def _backfill(self, chunks: list[tuple[datetime.date, datetime.date]], result: PollResult) -> datetime.date | None:
        """Fetch chunk by chunk into *result*; returns the first day not surely done (None when all were)."""
        # The series the scheduled polls handled, so they are skipped as known; a copy, never saved.
        scratch = {"series": dict(self._load_state()["series"])}
        try:
            session, headers = self._session()
        except ConfigError as exc:
            result.errors.append(f"cannot authenticate: {exc}")
            log.error("source %s: cannot authenticate: %s", self.source.name, exc)
            return chunks[0][0]
        resume: datetime.date | None = None
        with session:
            client = self._client(session, headers)
            for number, (first, last) in enumerate(chunks, start=1):
                if self._stopping.is_set():
                    result.errors.append(f"stopped before StudyDate {first:%Y%m%d}: the node is stopping")
                    return resume or first
                part = PollResult(source=self.source.name, since=f"{first:%Y%m%d}", until=f"{last:%Y%m%d}")
                try:
                    found = self._find(client, f"{part.since}-{part.until}")
                except _SourceFailure as exc:
                    result.errors.append(f"StudyDate {part.since}-{part.until}: {exc}")
                    log.error("source %s: backfill of StudyDate %s-%s: %s; the backfill ends here",
                              self.source.name, part.since, part.until, exc)
                    return resume or first
                part.series_found = len(found)
                found.sort(key=lambda s: (s.study_date, s.study_time, s.series_uid))
                unfetched = self._fetch_all(client, found, scratch, part)
                result.add(part)
                if unfetched and resume is None:
                    resume = first
                log.log(
                    logging.INFO if part.ok else logging.WARNING,
                    "source %s: backfill StudyDate %s-%s (chunk %d of %d): %d series found, %d fetched "
                    "(%d instances), %d skipped as known, %d skipped as derived, %d errors", self.source.name,
                    part.since, part.until, number, len(chunks), part.series_found, part.series_fetched,
                    part.instances_fetched, part.skipped_known, part.skipped_derived, len(part.errors),
                )
        return resume

    # -- watermark --------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        value = self.jobs.get_value(state_key(self.source.name))
        if not isinstance(value, dict) or value.get("version") != _STATE_VERSION:
            value = {"version": _STATE_VERSION, "floor": None, "watermark": None, "series": {}}
        if not isinstance(value.get("series"), dict):
            value["series"] = {}
        return value

    def _window_start(self, state: dict[str, Any], started: datetime.datetime) -> str:
        if not state.get("floor"):
            state["floor"] = (started - datetime.timedelta(hours=self.source.lookback_hours)).strftime("%Y%m%d")
        since = state["floor"]
        watermark = _parse_stamp(state.get("watermark"))
        if watermark is not None:
            margin = datetime.timedelta(hours=self.source.late_arrival_hours)
            since = max(since, (watermark - margin).strftime("%Y%m%d"))
        return since

    def _advance(self, state: dict[str, Any], started: datetime.datetime, found: list[_Series],
                 unfetched: list[_Series]) -> None:
        """Move the watermark up to what was fetched; drop known series the next window cannot return."""
        stamps = [s.when for s in unfetched]
        if any(when is None for when in stamps):
            target = None  # a failed series without a date: nothing tells how far it is safe to go
        else:
            target = min([started, *(w for w in stamps if w is not None)])
        old = _parse_stamp(state.get("watermark"))
        if target is not None and (old is None or target > old):
            state["watermark"] = target.strftime("%Y%m%d%H%M%S")
        seen = [s.when for s in found if s.when is not None and s.when <= started]
        if seen:
            latest = max(seen).strftime("%Y%m%d%H%M%S")
            state["latest_study"] = max(latest, state.get("latest_study") or "")
        state["last_poll"] = started.strftime("%Y%m%d%H%M%S")
        if not unfetched:
            state["last_complete_poll"] = state["last_poll"]
        next_since = self._window_start(state, started)
        state["series"] = {
            uid: entry for uid, entry in state["series"].items()
            if isinstance(entry, dict) and str(entry.get("date") or "") >= next_since
        }

    # -- finding ----------------------------------------------------------------------------------

    def _find(self, client: DICOMwebClient, study_dates: str) -> list[_Series]:
        """Every series matching the source's query with StudyDate in *study_dates* (``A-``, ``A-B``)."""
        filters = {**self.source.filters(), "StudyDate": study_dates}
        if self.source.level == "series":
            items = self._paged(
                "QIDO-RS series query", _SERIES_UID,
                lambda limit, offset: client.search_for_series(
                    search_filters=filters, fields=_SERIES_FIELDS, limit=limit, offset=offset),
            )
            return self._series_list(items, None)
        studies = self._paged(
            "QIDO-RS study query", _STUDY_UID,
            lambda limit, offset: client.search_for_studies(
                search_filters=filters, fields=_STUDY_FIELDS, limit=limit, offset=offset),
        )
        found: list[_Series] = []
        for study in studies:
            study_uid = _text(study, _STUDY_UID)
            try:
                check_uid(study_uid, "Study Instance UID")
            except InvalidUID as exc:
                log.warning("source %s: study skipped: %s", self.source.name, exc)
                continue
            items = self._paged(
                f"QIDO-RS series query of study {study_uid}", _SERIES_UID,
                lambda limit, offset: client.search_for_series(
                    study_instance_uid=study_uid, fields=_SERIES_FIELDS, limit=limit, offset=offset),
            )
            found.extend(self._series_list(items, study))
        return found

    def _series_list(self, items: list[dict[str, Any]], study: Mapping[str, Any] | None) -> list[_Series]:
        out = []
        for item in items:
            study_uid = _text(item, _STUDY_UID) or (_text(study, _STUDY_UID) if study else "")
            series_uid = _text(item, _SERIES_UID)
            try:
                check_uid(study_uid, "Study Instance UID")
                check_uid(series_uid, "Series Instance UID")
            except InvalidUID as exc:  # it can never be spooled: say so, but do not hold the watermark
                log.warning("source %s: series skipped: %s", self.source.name, exc)
                continue
            count = _value(item, _SERIES_INSTANCES)
            try:
                instances = int(count) if count is not None else None
            except (TypeError, ValueError):
                instances = None
            out.append(_Series(
                study_uid=study_uid,
                series_uid=series_uid,
                study_date=_text(item, _STUDY_DATE) or (_text(study, _STUDY_DATE) if study else ""),
                study_time=_text(item, _STUDY_TIME) or (_text(study, _STUDY_TIME) if study else ""),
                instances=instances,
                manufacturer=_text(item, _MANUFACTURER),
                description=_text(item, _SERIES_DESCRIPTION),
            ))
        return out

    def _paged(self, what: str, key: str, query: Callable[[int, int], list[dict[str, Any]]],
               *, per_series: bool = False, keys_only: bool = False) -> list[Any]:
        """Every result of a QIDO-RS query, asked page by page until a short page.

        With *keys_only*, only each result's *key* attribute is kept (a long instance list is then
        a list of UIDs, not of whole DICOM JSON objects).
        """
        limit = self.source.page_size
        offset = 0
        out: list[Any] = []
        keys: set[str] = set()
        while True:
            page = self._call(f"{what} (offset {offset})",
                              lambda: query(limit, offset), per_series=per_series)
            if not isinstance(page, list):
                raise (_SeriesFailure if per_series else _SourceFailure)(f"{what}: the answer is not a list")
            fresh = 0
            for item in page:
                uid = _text(item, key) if isinstance(item, Mapping) else ""
                if uid and uid in keys:
                    continue
                keys.add(uid)
                out.append(uid if keys_only else item)
                fresh += 1
            if len(page) < limit or fresh == 0:  # a short page, or a server that ignores offset
                return out
            offset += len(page)

    def _is_derived(self, series: _Series) -> bool:
        if series.manufacturer == MANUFACTURER:
            return True
        if self._suffixes and series.description.endswith(self._suffixes):
            return True
        return self.jobs.is_derived(series.series_uid)

    # -- fetching ---------------------------------------------------------------------------------

    def _fetch_series(self, client: DICOMwebClient, series: _Series, entry: Mapping[str, Any] | None,
                      result: PollResult) -> tuple[int, int]:
        """Retrieve the instances of *series* the spool lacks; returns (fetched, instances listed).

        Each spooled instance is counted in ``result.instances_fetched`` at once, so a series the
        poll could not finish still shows what it got.
        """
        study_uid, series_uid = series.study_uid, series.series_uid
        items = self._paged(
            f"QIDO-RS instance query of series {series_uid}", _SOP_UID,
            lambda limit, offset: client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid, fields=_INSTANCE_FIELDS,
                limit=limit, offset=offset),
            per_series=True, keys_only=True,
        )
        sops = []
        for item in items:
            try:
                sops.append(check_uid(item, "SOP Instance UID"))
            except InvalidUID as exc:  # it can never be spooled: say so, but do not hold the watermark
                result.errors.append(f"series {series_uid}: an instance was skipped: {exc}")
                log.error("source %s: series %s: an instance was skipped: %s", self.source.name, series_uid, exc)
        if entry is not None and series.instances is None and entry.get("n") == len(sops):
            return 0, len(sops)  # the server gives no count at series level: the instance list tells
        fetched = 0
        for sop_uid in sops:
            if self._stopping.is_set():
                raise _SourceFailure(f"stopped after {fetched} of its instances: the node is stopping")
            if self.spool.path_for(study_uid, series_uid, sop_uid).exists():
                continue  # already here (pulled before, or pushed to us): never twice
            ds = self._call(
                f"WADO-RS instance {sop_uid}",
                lambda sop=sop_uid: client.retrieve_instance(study_uid, series_uid, sop,
                                                             media_types=_ANY_TRANSFER_SYNTAX),
                per_series=True,
            )
            self._check_instance(ds, series, sop_uid, first=fetched == 0)
            try:
                data = _part10(ds)
            except Exception as exc:
                raise _SeriesFailure(f"instance {sop_uid} cannot be written as a DICOM file: {exc}") from exc
            sop_class = str(ds.get("SOPClassUID") or "")
            modality = str(ds.get("Modality") or "") or None
            del ds
            try:
                stored = self.spool.store(study_uid, series_uid, sop_uid, (data,))
            except OSError as exc:
                raise _SourceFailure(f"spool write failed for {sop_uid}: {exc.strerror or exc}") from exc
            try:
                self.jobs.record_instance(
                    study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class_uid=sop_class,
                    path=stored.path, size=stored.size, modality=modality, calling_ae=self.calling_ae,
                )
            except Exception as exc:  # the file is safe in the spool; start-up re-records it
                raise _SourceFailure(f"job store failed for {sop_uid}: {exc}") from exc
            fetched += 1
            result.instances_fetched += 1
        return fetched, len(sops)

    def _check_instance(self, ds: pydicom.Dataset, series: _Series, sop_uid: str, *, first: bool) -> None:
        got = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
               str(ds.get("SOPInstanceUID", "")))
        if got != (series.study_uid, series.series_uid, sop_uid):
            raise _SeriesFailure(f"asked for instance {sop_uid}, the archive sent {got[2] or 'no SOP Instance UID'} "
                                 f"of series {got[1] or '?'}")
        if first and str(ds.get("Manufacturer", "")).strip() == MANUFACTURER:  # decided before anything is spooled
            raise _Derived(f"its instances were made by {MANUFACTURER} (this node's own output)")

    # -- HTTP -------------------------------------------------------------------------------------

    def _client(self, session: requests.Session, headers: dict[str, str] | None) -> DICOMwebClient:
        client = DICOMwebClient(self.source.url, session=session, headers=headers,
                                timeout=self.source.timeout_seconds)
        client.set_http_retry_params(retry=False)  # retries are ours, logged, within the poll
        return client

    def _session(self) -> tuple[requests.Session, dict[str, str] | None]:
        """A session that ignores proxy variables and netrc, with the source's credentials (read now)."""
        session = _Session()
        session.trust_env = False
        if self.source.ca_file is not None:
            session.verify = str(self.source.ca_file)  # the hospital's CA instead of the system's store
        headers = None
        auth = self.source.auth
        try:
            if isinstance(auth, BasicAuth):
                session.auth = requests.auth.HTTPBasicAuth(*auth.resolve())
            elif isinstance(auth, BearerAuth):
                headers = {"Authorization": f"Bearer {auth.resolve()}"}
        except ConfigError:
            session.close()
            raise
        return session, headers

    def _who(self) -> str:
        auth = self.source.auth
        if isinstance(auth, BasicAuth):
            return f" as user {auth.username!r} (password from ${auth.password_env})"
        if isinstance(auth, BearerAuth):
            return f" with the bearer token from ${auth.token_env}"
        return " without credentials (the source has no auth configured)"

    def _call(self, what: str, request: Callable[[], _T], *, per_series: bool) -> _T:
        """*request*, retried after :attr:`_retry_delays` when the failure may pass."""
        attempts = len(self._retry_delays) + 1
        for attempt in range(1, attempts + 1):
            try:
                return request()
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status in (401, 403):
                    raise _SourceFailure(
                        f"{what}: the archive refused us{self._who()}: {_reason(exc, 0)}; check the user name "
                        "and the secret") from exc
                if not (status >= 500 or status in _TRANSIENT_STATUS):
                    failure = _SeriesFailure if per_series else _SourceFailure
                    raise failure(f"{what}: {_reason(exc, self.source.timeout_seconds)}") from exc
                reason = _reason(exc, self.source.timeout_seconds)
            except requests.exceptions.SSLError as exc:  # a refused certificate stays refused: no retry
                raise _SourceFailure(f"{what}: TLS: {exc}") from exc
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                reason = _reason(exc, self.source.timeout_seconds)
            except requests.RequestException as exc:
                raise _SourceFailure(f"{what}: {_reason(exc, self.source.timeout_seconds)}") from exc
            except Exception as exc:  # an answer the client could not decode
                failure = _SeriesFailure if per_series else _SourceFailure
                raise failure(f"{what}: unreadable answer: {type(exc).__name__}: {exc}") from exc
            if attempt == attempts:
                raise _SourceFailure(f"{what}: {reason} (gave up after {attempts} attempts)")
            delay = self._retry_delays[attempt - 1]
            if self._stopping.is_set():
                raise _SourceFailure(f"{what}: {reason} (not retried: the node is stopping)")
            log.warning("source %s: %s failed: %s; retry %d of %d in %g s", self.source.name, what, reason,
                        attempt, attempts - 1, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def _parse_stamp(text: Any) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(str(text), "%Y%m%d%H%M%S") if text else None
    except ValueError:
        return None


def backfill_chunks(since: datetime.date, until: datetime.date,
                    chunk: str = "month") -> list[tuple[datetime.date, datetime.date]]:
    """Split the StudyDate range *since* to *until* (inclusive) into calendar days, months or years.

    Parameters
    ----------
    since, until : datetime.date
        First and last day.
    chunk : {"day", "month", "year"}
        The calendar unit; the first and last chunks are cut to the range.

    Returns
    -------
    list of (datetime.date, datetime.date)
        First and last day of each chunk, oldest first, covering the range without gaps or overlap.

    Raises
    ------
    ValueError
        *since* is after *until*, or *chunk* is not one of :data:`BACKFILL_CHUNKS`.
    """
    if chunk not in BACKFILL_CHUNKS:
        raise ValueError(f"chunk {chunk!r}: one of {', '.join(BACKFILL_CHUNKS)}")
    if since > until:
        raise ValueError(f"since {since:%Y-%m-%d} is after until {until:%Y-%m-%d}")
    chunks = []
    start = since
    while start <= until:
        if chunk == "day":
            end = start
        elif chunk == "month" and start.month < 12:
            end = datetime.date(start.year, start.month + 1, 1) - datetime.timedelta(days=1)
        else:
            end = datetime.date(start.year, 12, 31)
        end = min(end, until)
        chunks.append((start, end))
        if end == datetime.date.max:
            break
        start = end + datetime.timedelta(days=1)
    return chunks


# --------------------------------------------------------------------------- scheduling


def run_poll(poller: DicomWebPoller) -> PollResult | None:
    """One scheduled poll; never raises (a failing source must not stop the scheduler or the others)."""
    try:
        return poller.poll_once()
    except Exception:
        log.exception("source %s: poll failed", poller.source.name)
        return None


def schedule(pollers: Iterable[DicomWebPoller], scheduler: Any) -> None:
    """Add one job per source to an APScheduler (3.x) scheduler, e.g. a ``BackgroundScheduler``.

    ``every_seconds`` sources poll at once, then at that interval; ``cron`` sources follow their
    crontab (local time). Each job has ``max_instances=1`` (a poll still running is never started
    again) and ``coalesce=True`` (missed runs become one); its id is ``poll:<source name>``.

    Parameters
    ----------
    pollers : iterable of DicomWebPoller
        One per source.
    scheduler : apscheduler.schedulers.base.BaseScheduler
        Started before or after; this only adds jobs.
    """
    for poller in pollers:
        source = poller.source
        options: dict[str, Any] = {}
        if source.every_seconds is not None:
            trigger: Any = IntervalTrigger(seconds=source.every_seconds)
            options["next_run_time"] = datetime.datetime.now(datetime.timezone.utc)
        elif source.cron is not None:
            trigger = CronTrigger.from_crontab(source.cron)
        else:  # pragma: no cover - the configuration never allows it
            raise ValueError(f"source {source.name!r} has neither every_seconds nor cron")
        scheduler.add_job(
            run_poll, trigger, args=(poller,), id=state_key(source.name), name=f"poll {source.name}",
            max_instances=1, coalesce=True, misfire_grace_time=None, replace_existing=True, **options,
        )
        log.info("source %s: polling %s %s", source.name, source.url, source.schedule_text())
