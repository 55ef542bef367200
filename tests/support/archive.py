"""A DICOMweb archive (a real Orthanc) for the poller's and the backfill's tests, and what they read back.

Fixtures (import them into the test module): ``orthanc`` (an Orthanc with AE title ARCHIVE, one per
test), ``jobs`` and ``spool`` (a job store and a spool under the test's ``tmp_path / "var"``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from node.config import DicomWebSource
from node.receive.poller import DicomWebPoller, PollResult
from node.store.jobstore import JobStore
from node.store.spool import Spool
from tests.support.config import RESCALE, dicomweb_destination, dicomweb_source, folder_destination, pipeline, route
from tests.support.node_process import copy_as_series
from tests.support.peers import OrthancServer, running_orthanc
from tests.support.tools import bundled

__all__ = [
    "FAST_RETRIES", "TODAY", "SpoolWithFault", "archive", "counts", "day", "jobs", "orthanc", "poller_for",
    "round_trip_tables", "series_files", "spool", "spooled", "uids", "upload",
]

#: Retry delays of the test pollers (seconds): fast, so a failure costs the test little time.
FAST_RETRIES = (0.05, 0.1)
TODAY = datetime.date.today()


def day(offset: int = 0) -> str:
    """Today + *offset* days as a DICOM date (YYYYMMDD)."""
    return (TODAY + datetime.timedelta(days=offset)).strftime("%Y%m%d")


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    """The archive: an Orthanc (AE title ARCHIVE) for one test."""
    with running_orthanc(aet="ARCHIVE") as server:
        yield server


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    """A job store in ``tmp_path / "var"``, closed after the test."""
    store = JobStore(tmp_path / "var" / "jobs.sqlite")
    yield store
    store.close()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A spool in ``tmp_path / "var"``."""
    return Spool(tmp_path / "var" / "spool")


def archive(orthanc: OrthancServer, **overrides: object) -> DicomWebSource:
    """The source settings of *orthanc* (name ``archive``, every 60 s), *overrides* replacing any."""
    settings: dict[str, object] = {"name": "archive", "url": orthanc.dicomweb_url, "every_seconds": 60.0}
    settings.update(overrides)
    return DicomWebSource(**settings)  # type: ignore[arg-type]


def poller_for(source: DicomWebSource, spool: Spool, jobs: JobStore, **kw: object) -> DicomWebPoller:
    """A poller of *source* into *spool* and *jobs* with :data:`FAST_RETRIES` unless told."""
    kw.setdefault("retry_delays", FAST_RETRIES)
    return DicomWebPoller(source, spool=spool, jobs=jobs, **kw)  # type: ignore[arg-type]


def series_files(tmp_path: Path, name: str = "CT_small.dcm", count: int = 1, *, date: str | None = None,
                 time_of_day: str = "080000", study: str | None = None, series: str | None = None,
                 **attributes: object) -> list[Path]:
    """*count* copies of a bundled file as one new series (new UIDs), dated today unless told."""
    def tweak(ds: pydicom.Dataset, _number: int) -> None:
        ds.StudyDate, ds.StudyTime = date or day(), time_of_day
        if study:
            ds.StudyInstanceUID = study
        if series:
            ds.SeriesInstanceUID = series
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)

    return copy_as_series([bundled(name)] * count, tmp_path / "made" / generate_uid()[-12:], tweak=tweak)


def upload(orthanc: OrthancServer, paths: list[Path]) -> list[Path]:
    """Store *paths* in *orthanc* over REST (the test fails on a refusal); returns *paths*."""
    for path in paths:
        try:
            status = orthanc.upload(path)["Status"]
        except requests.ConnectionError:  # a kept-alive connection Orthanc closed (it keeps them 1 s): again
            status = orthanc.upload(path)["Status"]
        assert status in ("Success", "AlreadyStored")
    return paths


def uids(path: Path) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of a file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def spooled(spool: Spool) -> list[Path]:
    """The files in *spool*, sorted."""
    return sorted(item.path for item in spool.walk())


def counts(result: PollResult) -> tuple[int, int, int, int, int]:
    """(series found, series fetched, instances fetched, skipped as known, skipped as derived) of a poll."""
    return (result.series_found, result.series_fetched, result.instances_fetched, result.skipped_known,
            result.skipped_derived)


class SpoolWithFault(Spool):
    """A real spool that runs *fault* right after its *after*-th write (e.g. stops the archive)."""

    def __init__(self, root: Path, after: int, fault: Callable[[], None]) -> None:
        super().__init__(root)
        self.after, self.fault, self.writes = after, fault, 0

    def store(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        stored = super().store(*args, **kwargs)
        self.writes += 1
        if self.writes == self.after:
            self.fault()
        return stored


def round_trip_tables(orthanc: OrthancServer, out: Path, every_seconds: int) -> str:
    """Config tables: CT polled from Orthanc, equalised per series, sent back by STOW-RS and to folder *out*."""
    return (pipeline("ct-eq", [*RESCALE, {"op": "equalise", "per": "series"}])
            + dicomweb_destination("archive", orthanc.dicomweb_url) + folder_destination("out", out)
            + route("ct-eq", ["archive", "out"], match={"Modality": "CT"})
            + dicomweb_source("archive", orthanc.dicomweb_url, every_seconds=every_seconds))
