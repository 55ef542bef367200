"""Backfill of a StudyDate range (``dicom-node poll --once --since``) against a real Orthanc.

A study dated years back is never found by the scheduled window; a backfill finds it, in calendar
chunks each paged like a poll, through the same skip rules, without moving the watermark.
"""

from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path

import pytest

from node.config import load_config
from node.store.jobstore import JobStore
from node.receive.poller import backfill_chunks, state_key
from node.app.service import NodeService
from node.store.spool import Spool
from tests.support import OrthancServer, node_config, run_cli, wait_for
from tests.support.archive import (  # noqa: F401 - orthanc, jobs and spool are fixtures
    SpoolWithFault, archive, counts, day, jobs, orthanc, poller_for, round_trip_tables, series_files, spool, spooled,
    uids, upload,
)

OLD = "20150615"  # a study made years before the node polled this archive
D = datetime.date


# --------------------------------------------------------------------------- chunks (no peers)


@pytest.mark.parametrize(("since", "until", "chunk", "expected"), [
    (D(2015, 6, 15), D(2015, 6, 15), "month", [(D(2015, 6, 15), D(2015, 6, 15))]),
    (D(2015, 11, 15), D(2016, 3, 2), "month", [
        (D(2015, 11, 15), D(2015, 11, 30)), (D(2015, 12, 1), D(2015, 12, 31)), (D(2016, 1, 1), D(2016, 1, 31)),
        (D(2016, 2, 1), D(2016, 2, 29)), (D(2016, 3, 1), D(2016, 3, 2))]),  # a leap year's February
    (D(2014, 11, 30), D(2016, 2, 1), "year", [
        (D(2014, 11, 30), D(2014, 12, 31)), (D(2015, 1, 1), D(2015, 12, 31)), (D(2016, 1, 1), D(2016, 2, 1))]),
    (D(2015, 12, 30), D(2016, 1, 1), "day", [
        (D(2015, 12, 30), D(2015, 12, 30)), (D(2015, 12, 31), D(2015, 12, 31)), (D(2016, 1, 1), D(2016, 1, 1))]),
    (D(9999, 12, 30), D.max, "month", [(D(9999, 12, 30), D.max)]),
])
def test_chunks_are_calendar_units_cut_to_the_range(since: D, until: D, chunk: str, expected: list) -> None:
    assert backfill_chunks(since, until, chunk) == expected


def test_a_decade_is_asked_a_month_at_a_time_without_gaps() -> None:
    chunks = backfill_chunks(D(2015, 1, 1), D(2024, 12, 31))
    assert len(chunks) == 120
    assert chunks[0][0] == D(2015, 1, 1) and chunks[-1][1] == D(2024, 12, 31)
    for (_, end), (start, _) in zip(chunks, chunks[1:]):
        assert start - end == datetime.timedelta(days=1)
    assert max((end - start).days for start, end in chunks) == 30
    with pytest.raises(ValueError, match="since 2016-01-01 is after until 2015-01-01"):
        backfill_chunks(D(2016, 1, 1), D(2015, 1, 1))
    with pytest.raises(ValueError, match="chunk 'week'"):
        backfill_chunks(D(2015, 1, 1), D(2016, 1, 1), "week")


@pytest.mark.parametrize(("options", "message"), [
    (["--since", "2015-02-30"], "argument --since: '2015-02-30' is not a date: write YYYY-MM-DD"),
    (["--since", "20150101"], "argument --since: '20150101' is not a date: write YYYY-MM-DD"),
    (["--since", "2015-01-01", "--until", "2015-1-31"], "argument --until: '2015-1-31' is not a date"),
    (["--since", "2016-01-01", "--until", "2015-12-31"], "--since 2016-01-01 is after --until 2015-12-31"),
    (["--since", "2999-01-01"], f"--since 2999-01-01 is after --until {datetime.date.today():%Y-%m-%d} (today"),
    (["--until", "2015-12-31"], "--until is for a backfill: give --since YYYY-MM-DD too"),
    (["--chunk", "year"], "--chunk is for a backfill: give --since YYYY-MM-DD too"),
    (["--since", "2015-01-01", "--chunk", "week"], "argument --chunk: invalid choice: 'week'"),
])
def test_cli_rejects_bad_dates_naming_the_option(options: list[str], message: str) -> None:
    done = run_cli("poll", "--once", *options, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_poll_help_explains_the_backfill() -> None:
    done = run_cli("poll", "--help", timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--since YYYY-MM-DD" in text and "--until YYYY-MM-DD" in text and "--chunk day|month|year" in text
    assert "Studies dated before the window are never found by the schedule" in text
    assert "leaving the watermark as it was" in text


# --------------------------------------------------------------------------- against Orthanc


@pytest.mark.peers
def test_an_old_study_is_found_by_the_backfill_only_once_and_the_watermark_stays(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.poller")
    old = upload(orthanc, series_files(tmp_path, count=3, date=OLD))
    (recent,) = upload(orthanc, series_files(tmp_path, "MR_small.dcm"))
    study, series, _ = uids(old[0])
    poller = poller_for(archive(orthanc), spool, jobs)

    scheduled = poller.poll_once()
    assert scheduled.ok and counts(scheduled) == (1, 1, 1, 0, 0), scheduled  # today's only
    assert spooled(spool) == [spool.path_for(*uids(recent))]
    assert (f"source archive: first poll: searching StudyDate {day(-1)} onwards (lookback_hours 24); later polls "
            "start at the watermark minus late_arrival_hours (24)") in caplog.text
    assert ("Studies dated earlier are never polled: to fetch them once, run: dicom-node poll --once --source "
            "archive --since YYYY-MM-DD [--until YYYY-MM-DD]") in caplog.text
    watermark = jobs.get_value(state_key("archive"))
    assert watermark["watermark"][:8] == day()

    caplog.clear()
    result = poller.backfill(D(2015, 1, 1), D(2015, 12, 31))
    assert result.ok and counts(result) == (1, 1, 3, 0, 0), result
    assert (result.since, result.until) == ("20150101", "20151231")
    assert set(spooled(spool)) == {spool.path_for(*uids(p)) for p in [*old, recent]}
    rows = {row["series_uid"]: row for row in jobs.list_series()}
    assert (rows[series]["study_uid"], rows[series]["instances"]) == (study, 3)
    assert (rows[series]["state"], rows[series]["calling_ae"]) == ("receiving", "dicomweb:archive")
    assert jobs.get_value(state_key("archive")) == watermark  # not moved, not even rewritten
    assert "first poll" not in caplog.text
    chunk_lines = re.findall(r"backfill StudyDate (\d{8})-(\d{8}) \(chunk (\d+) of 12\): (\d+) series found",
                             caplog.text)
    assert len(chunk_lines) == 12, caplog.text  # a query a month, each logged
    assert ("20150601", "20150630", "6", "1") in chunk_lines
    assert sum(int(found) for *_, found in chunk_lines) == 1
    assert ("source archive: backfill of StudyDate 20150101-20151231: 1 series found, 1 fetched (3 instances), "
            "0 skipped as known, 0 skipped as derived, 0 errors") in caplog.text

    # a second backfill, over a range with today's series too: nothing is fetched again
    mtimes = {p: p.stat().st_mtime_ns for p in spooled(spool)}
    again = poller.backfill(D(2015, 1, 1), datetime.date.today(), chunk="year")
    assert again.ok and counts(again) == (2, 0, 0, 2, 0), again
    assert {p: p.stat().st_mtime_ns for p in spooled(spool)} == mtimes
    assert jobs.get_value(state_key("archive")) == watermark
    # and the schedule goes on as it was: its window still does not reach 2015
    later = poller.poll_once()
    assert later.ok and later.since == day(-1) and counts(later) == (1, 0, 0, 1, 0), later


@pytest.mark.peers
@pytest.mark.parametrize("level", ["series", "study"])
def test_a_backfill_pages_each_chunk_skips_derived_series_and_sets_no_watermark(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        level: str) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.poller")
    for number in range(3):
        upload(orthanc, series_files(tmp_path, date="20140310", time_of_day=f"08{number:02d}00"))
    upload(orthanc, series_files(tmp_path, "MR_small.dcm", 2, date="20141102"))
    upload(orthanc, series_files(tmp_path, "MR_small.dcm", 3, date="20141130"))
    upload(orthanc, series_files(tmp_path, date="20140311", Manufacturer="dicom-node"))
    upload(orthanc, series_files(tmp_path, date="20141103", SeriesDescription="HEAD [ct-brain]"))
    upload(orthanc, series_files(tmp_path, date="20150101"))  # the day after the range
    # page_size 2: Orthanc answers every match at once, so only paging with offset finds 3 in March
    poller = poller_for(archive(orthanc, level=level, page_size=2), spool, jobs, pipeline_names=["ct-brain"])

    result = poller.backfill(D(2014, 1, 1), D(2014, 12, 31))
    assert result.ok and counts(result) == (7, 5, 8, 0, 2), result
    assert len(spooled(spool)) == 8
    assert jobs.get_value(state_key("archive")) is None  # a backfill before any poll sets no floor, no watermark
    assert "(chunk 3 of 12): 4 series found, 3 fetched (3 instances), 0 skipped as known, 1 skipped as derived" \
        in caplog.text
    assert "(chunk 11 of 12): 3 series found, 2 fetched (5 instances), 0 skipped as known, 1 skipped as derived" \
        in caplog.text

    again = poller.backfill(D(2014, 1, 1), D(2014, 12, 31), chunk="year")
    assert again.ok and counts(again) == (7, 0, 0, 5, 2), again
    caplog.clear()
    first = poller.poll_once()  # the schedule starts as if no backfill had run
    assert first.ok and first.since == day(-1) and counts(first) == (0, 0, 0, 0, 0), first
    assert "first poll: searching StudyDate" in caplog.text


@pytest.mark.peers
def test_a_backfill_cut_short_by_the_archive_says_where_to_resume(
        orthanc: OrthancServer, jobs: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.poller")
    march = upload(orthanc, series_files(tmp_path, count=3, date="20140310"))
    may = upload(orthanc, series_files(tmp_path, "MR_small.dcm", 2, date="20140520"))
    spool = SpoolWithFault(tmp_path / "var" / "spool", after=1, fault=lambda: orthanc.stop(grace=0))
    poller = poller_for(archive(orthanc), spool, jobs)

    result = poller.backfill(D(2014, 1, 1), D(2014, 12, 31))
    assert not orthanc.running
    assert (result.series_found, result.instances_fetched, result.series_fetched) == (1, 1, 0), result
    assert len(result.errors) == 2
    assert f"series {uids(march[0])[1]}: WADO-RS instance" in result.errors[0]
    assert result.errors[1].startswith("StudyDate 20140401-20140430: QIDO-RS series query (offset 0): cannot connect")
    assert "backfill of StudyDate 20140401-20140430:" in caplog.text and "the backfill ends here" in caplog.text
    assert ("; run it again from --since 2014-03-01 (what was fetched is skipped as known)") in caplog.text
    assert jobs.get_value(state_key("archive")) is None

    orthanc.start()
    resumed = poller.backfill(D(2014, 3, 1), D(2014, 12, 31))
    assert resumed.ok and counts(resumed) == (2, 2, 4, 0, 0), resumed  # only what the first one lacked
    assert set(spooled(spool)) == {spool.path_for(*uids(p)) for p in [*march, *may]}


@pytest.mark.peers
def test_a_running_node_processes_a_backfilled_series_once(orthanc: OrthancServer, tmp_path: Path) -> None:
    """The CLI backfills into the job store of a running node, which processes and delivers the series."""
    old = upload(orthanc, series_files(tmp_path, "CT_small.dcm", 2, date=OLD))
    study, series, _ = uids(old[0])
    out = tmp_path / "out"
    config_path = tmp_path / "node.toml"
    config_path.write_text(node_config(tmp_path / "var", 0, settle=0.5, extra=round_trip_tables(orthanc, out, 3600)))
    service = NodeService(load_config(config_path))
    service.start()  # its scheduler polls the source at once: the 2015 study is outside the window
    try:
        wait_for(lambda: service.jobs.get_value(state_key("archive")) is not None, 60, "the node's first poll")
        watermark = service.jobs.get_value(state_key("archive"))
        assert service.jobs.list_series() == []

        done = run_cli("poll", "--config", str(config_path), "--once", "--source", "archive",
                       "--since", "2015-06-01", "--until", "2015-06-30", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("archive: StudyDate 2015-06-01 to 2015-06-30: 1 series found, 1 fetched (2 instances), 0 known, "
                "0 derived skipped, 0 errors") in done.stdout
        wait_for(lambda: [r["state"] for r in service.jobs.list_series()] == ["delivered"], 60,
                 "the backfilled series processed and delivered")
        outputs = sorted(out.rglob("*.dcm"))
        assert len(outputs) == 2
        derived = [s for s in orthanc.series() if s["MainDicomTags"].get("SeriesInstanceUID") != series]
        assert len(derived) == 1 and len(derived[0]["Instances"]) == 2

        # again: the original is known (spooled), the node's result (STOW-RS, StudyDate 2015) is skipped
        mtimes = [p.stat().st_mtime_ns for p in outputs]
        again = run_cli("poll", "--config", str(config_path), "--once", "--since", "2015-06-15", timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "2 series found, 0 fetched (0 instances), 1 known, 1 derived skipped, 0 errors" in again.stdout
        (row,) = service.jobs.list_series()
        assert (row["series_uid"], row["state"], row["instances"]) == (series, "delivered", 2)
        assert [p.stat().st_mtime_ns for p in sorted(out.rglob("*.dcm"))] == mtimes  # processed once
        assert service.jobs.get_value(state_key("archive")) == watermark
    finally:
        service.stop()
