"""Scheduled DICOMweb pulls against a real Orthanc (QIDO-RS, WADO-RS, basic auth, restarts)."""

from __future__ import annotations

import datetime
from dataclasses import replace
import logging
import time
import tracemalloc
from pathlib import Path

import pydicom
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from node.config import BasicAuth, DicomWebSource, load_config
from node.store.jobstore import JobStore
from node.receive.poller import DicomWebPoller, schedule, state_key
from node.app.service import NodeService
from node.store.spool import Spool
from tests.support import OrthancServer, free_port, node_config, run_cli, running_orthanc, wait_for
from tests.support.archive import (  # noqa: F401 - orthanc, jobs and spool are fixtures
    SpoolWithFault, archive, counts, day, jobs, orthanc, poller_for, round_trip_tables, series_files, spool, spooled,
    uids, upload,
)

pytestmark = pytest.mark.peers


# --------------------------------------------------------------------------- finding and fetching


def test_ct_series_is_found_fetched_spooled_and_recorded(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.poller")
    sources = upload(orthanc, series_files(tmp_path, "CT_small.dcm", 3))
    study, series, _ = uids(sources[0])
    poller = poller_for(archive(orthanc), spool, jobs)

    result = poller.poll_once()
    assert result.ok, result.errors
    assert counts(result) == (1, 1, 3, 0, 0)
    assert result.since == (datetime.datetime.now() - datetime.timedelta(hours=24)).strftime("%Y%m%d")

    files = spooled(spool)
    assert len(files) == 3
    for source in sources:
        original = pydicom.dcmread(source)
        path = spool.path_for(*uids(source))
        assert path in files
        pulled = pydicom.dcmread(path)  # a valid Part 10 file
        assert pulled.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert pulled.SOPInstanceUID == original.SOPInstanceUID
        assert pulled.PixelData == original.PixelData
        assert pulled.PatientName == original.PatientName
    (row,) = jobs.list_series()
    assert (row["study_uid"], row["series_uid"], row["instances"]) == (study, series, 3)
    assert (row["state"], row["calling_ae"], row["modality"]) == ("receiving", "dicomweb:archive", "CT")

    log = caplog.text
    assert f"source archive: series {series} fetched: 3 instances (3 in the series)" in log
    assert "source archive: poll since StudyDate" in log and "1 series found, 1 fetched (3 instances)" in log
    assert str(pydicom.dcmread(sources[0]).PatientName) not in log  # no patient names in the log

    mtimes = [f.stat().st_mtime_ns for f in files]
    again = poller.poll_once()
    assert again.ok, again.errors
    assert counts(again) == (1, 0, 0, 1, 0)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # nothing written again
    assert jobs.list_series()[0]["instances"] == 3


def test_transfer_syntax_is_kept_as_stored(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    (rle,) = upload(orthanc, series_files(tmp_path, "MR_small_RLE.dcm"))
    (jpeg,) = upload(orthanc, series_files(tmp_path, "SC_rgb_jpeg_dcmtk.dcm"))
    result = poller_for(archive(orthanc), spool, jobs).poll_once()
    assert result.ok and counts(result) == (2, 2, 2, 0, 0), result
    for source in (rle, jpeg):
        original = pydicom.dcmread(source)
        pulled = pydicom.dcmread(spool.path_for(*uids(source)))
        assert pulled.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert pulled.file_meta.TransferSyntaxUID.is_compressed
        assert pulled.PixelData == original.PixelData  # the compressed stream, untouched


@pytest.mark.parametrize("modality", ["MR", "M?", "*R"])
def test_query_filter_modality(orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path,
                               modality: str) -> None:
    """Wildcards reach Orthanc 1.10 as they are (it does not decode a percent-encoded ``%2A``)."""
    upload(orthanc, series_files(tmp_path, "CT_small.dcm", 2))
    (mr,) = upload(orthanc, series_files(tmp_path, "MR_small.dcm"))
    result = poller_for(archive(orthanc, query=(("Modality", modality),)), spool, jobs).poll_once()
    assert result.ok and counts(result) == (1, 1, 1, 0, 0), result
    assert spooled(spool) == [spool.path_for(*uids(mr))]
    assert [row["modality"] for row in jobs.list_series()] == ["MR"]


def test_date_window_first_poll_looks_back_lookback_hours(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    (recent,) = upload(orthanc, series_files(tmp_path, date=day(-1)))
    upload(orthanc, series_files(tmp_path, date=day(-10)))
    result = poller_for(archive(orthanc, lookback_hours=48), spool, jobs).poll_once()
    assert result.ok and counts(result) == (1, 1, 1, 0, 0), result
    assert result.since == day(-2)
    assert spooled(spool) == [spool.path_for(*uids(recent))]
    # the floor stays: the same source polled later never looks further back than its first poll
    later = poller_for(archive(orthanc, lookback_hours=24 * 30), spool, jobs).poll_once()
    assert later.since == day(-1) and counts(later) == (1, 0, 0, 1, 0), later  # watermark (now) - 24 h


def test_a_study_imported_days_after_its_date_is_found_within_late_arrival_hours(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    # the first poll sets the floor (30 days back: the node has polled for a month) and the watermark (now)
    assert counts(poller_for(archive(orthanc, lookback_hours=24 * 30), spool, jobs).poll_once())[0] == 0
    # an outside study made five days ago is loaded into the archive only now
    (late,) = upload(orthanc, series_files(tmp_path, date=day(-5)))
    default = poller_for(archive(orthanc, lookback_hours=24 * 30), spool, jobs).poll_once()
    assert default.since == day(-1) and counts(default)[0] == 0, default  # a day's margin: not found
    week = poller_for(archive(orthanc, lookback_hours=24 * 30, late_arrival_hours=24 * 7), spool, jobs).poll_once()
    assert week.since == day(-7) and counts(week) == (1, 1, 1, 0, 0), week
    assert spooled(spool) == [spool.path_for(*uids(late))]


def test_watermark_survives_restart_and_a_grown_series_costs_only_its_new_instances(
        orthanc: OrthancServer, spool: Spool, tmp_path: Path) -> None:
    first = upload(orthanc, series_files(tmp_path, count=2))
    study, series, _ = uids(first[0])
    db = tmp_path / "var" / "jobs.sqlite"
    jobs = JobStore(db)
    assert counts(poller_for(archive(orthanc), spool, jobs).poll_once()) == (1, 1, 2, 0, 0)
    state = jobs.get_value(state_key("archive"))
    jobs.close()
    assert state["floor"] == day(-1) and state["watermark"][:8] == day()
    assert state["series"] == {series: {"n": 2, "date": day()}}

    # a restart: a new job store on the same file, a new poller
    jobs = JobStore(db)
    try:
        restarted = poller_for(archive(orthanc), Spool(tmp_path / "var" / "spool"), jobs)
        result = restarted.poll_once()
        assert result.ok and counts(result) == (1, 0, 0, 1, 0), result

        # the series grows in the archive; another series arrives
        grown = upload(orthanc, series_files(tmp_path, count=2, study=study, series=series))
        (other,) = upload(orthanc, series_files(tmp_path, "MR_small.dcm"))
        before = {p: p.stat().st_mtime_ns for p in spooled(spool)}
        result = restarted.poll_once()
        assert result.ok and counts(result) == (2, 2, 3, 0, 0), result
        assert {p: p.stat().st_mtime_ns for p in before} == before  # the first two were not fetched again
        assert set(spooled(spool)) == set(before) | {spool.path_for(*uids(p)) for p in [*grown, other]}
        rows = {row["series_uid"]: row for row in jobs.list_series()}
        assert rows[series]["instances"] == 4 and rows[series]["calling_ae"] == "dicomweb:archive"
        assert jobs.get_value(state_key("archive"))["series"][series]["n"] == 4
    finally:
        jobs.close()


def test_instances_already_pushed_to_the_node_are_not_fetched(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    paths = upload(orthanc, series_files(tmp_path, count=3))
    for path in paths[:2]:  # as if the site had pushed two of them by C-STORE
        spool.store(*uids(path), [path.read_bytes()])
    result = poller_for(archive(orthanc), spool, jobs).poll_once()
    assert result.ok and counts(result) == (1, 1, 1, 0, 0), result
    assert len(spooled(spool)) == 3


def test_paging_finds_every_series(orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    for number in range(5):
        upload(orthanc, series_files(tmp_path, count=3, time_of_day=f"08{number:02d}00"))
    # Orthanc answers every match without a limit: only paging with offset can find more than 2
    result = poller_for(archive(orthanc, page_size=2), spool, jobs).poll_once()
    assert result.ok and counts(result) == (5, 5, 15, 0, 0), result  # instance queries page by 2 as well
    assert len(spooled(spool)) == 15


def test_study_level_pages_studies_then_their_series(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    for _ in range(3):
        (ct,) = upload(orthanc, series_files(tmp_path, "CT_small.dcm", StudyDescription="HEAD ROUTINE"))
        patient = pydicom.dcmread(ct, stop_before_pixels=True)  # Orthanc files a study under its patient too
        upload(orthanc, series_files(tmp_path, "MR_small.dcm", study=uids(ct)[0], PatientID=patient.PatientID,
                                     PatientName=patient.PatientName, StudyDescription="HEAD ROUTINE"))
    upload(orthanc, series_files(tmp_path, "CT_small.dcm", StudyDescription="CHEST"))
    source = archive(orthanc, level="study", page_size=2, query=(("StudyDescription", "HEAD*"),))
    result = poller_for(source, spool, jobs).poll_once()
    assert result.ok and counts(result) == (6, 6, 6, 0, 0), result  # whole studies, every series of each
    assert sorted(row["modality"] for row in jobs.list_series()) == ["CT"] * 3 + ["MR"] * 3


def test_modalities_in_study_pages_wrongly_in_orthanc_so_use_a_large_page(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    """Orthanc 1.10 + DICOMweb 1.7 answer nothing for ModalitiesInStudy with offset > 0."""
    for _ in range(3):
        upload(orthanc, series_files(tmp_path, "MR_small.dcm"))
    source = archive(orthanc, level="study", query=(("ModalitiesInStudy", "MR"),))
    paged = poller_for(replace(source, page_size=2), spool, jobs).poll_once()
    assert paged.ok and paged.series_found == 2, paged  # the third study is lost on Orthanc's second page
    whole = poller_for(source, spool, jobs).poll_once()  # page_size 100: one page
    assert whole.ok and counts(whole) == (3, 1, 1, 2, 0), whole


def test_a_large_series_is_written_instance_by_instance(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    paths = upload(orthanc, series_files(tmp_path, count=150))
    total = sum(p.stat().st_size for p in paths)
    tracemalloc.start()
    try:
        result = poller_for(archive(orthanc), spool, jobs).poll_once()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok and counts(result) == (1, 1, 150, 0, 0), result
    assert len(spooled(spool)) == 150
    assert peak < total / 3, f"peak {peak} bytes while fetching {total} bytes: the series was held in memory"


# --------------------------------------------------------------------------- no loops


def test_the_nodes_own_series_are_never_fetched(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path) -> None:
    upload(orthanc, series_files(tmp_path, "CT_small.dcm", 2, Manufacturer="dicom-node"))
    upload(orthanc, series_files(tmp_path, "CT_small.dcm", SeriesDescription="HEAD [ct-brain]"))
    (known_derived,) = upload(orthanc, series_files(tmp_path, "MR_small.dcm"))
    (wanted,) = upload(orthanc, series_files(tmp_path, "MR_small.dcm"))

    # the job store knows known_derived as the result of processing some other series
    _, derived_uid, _ = uids(known_derived)
    (origin,) = series_files(tmp_path, "CT_small.dcm")
    study, series, sop = uids(origin)
    jobs.record_instance(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         path=origin, size=origin.stat().st_size)
    assert jobs.settle(0) and (job := jobs.claim_next()) is not None
    assert jobs.processed(job, route="r", pipeline="p", output_dir=tmp_path, derived_series_uid=derived_uid,
                          outputs=1, destinations=[], seconds=0.1)
    assert jobs.is_derived(derived_uid)

    poller = poller_for(archive(orthanc), spool, jobs, pipeline_names=["ct-brain"])
    result = poller.poll_once()
    assert result.ok and counts(result) == (4, 1, 1, 0, 3), result
    assert spooled(spool) == [spool.path_for(*uids(wanted))]
    assert counts(poller.poll_once()) == (4, 0, 0, 1, 3)


def test_node_processes_a_pulled_series_and_does_not_pull_its_own_result_back(
        orthanc: OrthancServer, tmp_path: Path) -> None:
    """Poll and STOW-RS to the same archive: the derived series comes back in QIDO and is skipped."""
    sources = upload(orthanc, series_files(tmp_path, "CT_small.dcm", 2))
    study, series, _ = uids(sources[0])
    out = tmp_path / "out"
    config_path = tmp_path / "node.toml"
    config_path.write_text(node_config(tmp_path / "var", 0, settle=0.5, extra=round_trip_tables(orthanc, out, 60)))
    config = load_config(config_path)
    service = NodeService(config)
    service.start()  # its scheduler polls the source at once, then every 60 s
    try:
        wait_for(lambda: any(r["state"] == "delivered" for r in service.jobs.list_series()), 60,
                 "the pulled series processed and delivered")
        assert len(list(out.rglob("*.dcm"))) == 2
        assert len([s for s in orthanc.series()]) == 2  # the original and the node's result, by STOW-RS
        derived = [s for s in orthanc.series() if s["MainDicomTags"].get("SeriesInstanceUID") != series]
        assert len(derived) == 1 and len(derived[0]["Instances"]) == 2
        assert "equalise" in orthanc.instance_tags(derived[0]["Instances"][0])["DerivationDescription"]
        # a further poll, as cron would run it: the original is known, the derived series is skipped
        again = run_cli("poll", "--config", str(config_path), "--once")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "2 series found, 0 fetched" in again.stdout and "1 known, 1 derived skipped" in again.stdout
        assert [r["series_uid"] for r in service.jobs.list_series()] == [series]
    finally:
        service.stop()


# --------------------------------------------------------------------------- failures


def test_archive_down_during_a_poll_then_back(
        orthanc: OrthancServer, jobs: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.poller")
    now = [time.time()]
    spool = SpoolWithFault(tmp_path / "var" / "spool", after=3, fault=lambda: orthanc.stop(grace=0))
    poller = poller_for(archive(orthanc), spool, jobs, clock=lambda: now[0])
    upload(orthanc, series_files(tmp_path))
    assert poller.poll_once().ok
    watermark = jobs.get_value(state_key("archive"))["watermark"]
    assert watermark == datetime.datetime.fromtimestamp(now[0]).strftime("%Y%m%d%H%M%S")

    # two series of yesterday arrive late; the archive goes down after the second instance of them
    big = upload(orthanc, series_files(tmp_path, count=4, date=day(-1), time_of_day="080000"))
    small = upload(orthanc, series_files(tmp_path, "MR_small.dcm", 2, date=day(-1), time_of_day="090000"))
    now[0] += 600
    caplog.clear()
    result = poller.poll_once()
    assert not orthanc.running
    assert (result.series_found, result.instances_fetched, result.series_fetched) == (3, 2, 0), result
    assert len(result.errors) == 1
    error = result.errors[0]
    assert f"series {uids(big[0])[1]}: WADO-RS instance" in error
    assert "cannot connect: Connection refused (gave up after 3 attempts)" in error
    assert "retry 1 of 2 in 0.05 s" in caplog.text and "retry 2 of 2 in 0.1 s" in caplog.text
    assert "this poll ends here (3 series left for the next poll)" in caplog.text
    assert "1 errors" in caplog.text
    state = jobs.get_value(state_key("archive"))
    assert state["watermark"] == watermark  # not advanced past what was not fetched
    assert uids(big[0])[1] not in state["series"] and uids(small[0])[1] not in state["series"]

    # still down at the next poll: the query fails, nothing moves
    now[0] += 600
    down = poller.poll_once()
    assert down.series_found == 0 and "QIDO-RS series query (offset 0): cannot connect" in down.errors[0]
    assert jobs.get_value(state_key("archive"))["watermark"] == watermark

    orthanc.start()
    now[0] += 600
    back = poller.poll_once()
    assert back.ok and counts(back) == (3, 2, 4, 1, 0), back  # only the 4 instances not spooled yet
    assert len(spooled(spool)) == 1 + 4 + 2
    assert {spool.path_for(*uids(p)) for p in big + small} <= set(spooled(spool))
    state = jobs.get_value(state_key("archive"))
    assert state["watermark"] == datetime.datetime.fromtimestamp(now[0]).strftime("%Y%m%d%H%M%S")
    assert len(state["series"]) == 3


def test_stop_ends_a_running_poll_between_instances(
        orthanc: OrthancServer, jobs: JobStore, tmp_path: Path) -> None:
    upload(orthanc, series_files(tmp_path, count=5))
    holder: list[DicomWebPoller] = []
    spool = SpoolWithFault(tmp_path / "var" / "spool", after=2, fault=lambda: holder[0].stop())
    poller = poller_for(archive(orthanc), spool, jobs)
    holder.append(poller)
    result = poller.poll_once()
    assert (result.instances_fetched, result.series_fetched) == (2, 0)
    assert result.errors and "stopped after 2 of its instances: the node is stopping" in result.errors[0]
    state = jobs.get_value(state_key("archive"))
    # not past the unfinished series (StudyDate today, StudyTime 08:00): the rest is for the next start
    assert state["watermark"] <= day() + "080000" and state["series"] == {}
    assert poller.poll_once().errors == ["not polled: the node is stopping"]
    again = poller_for(archive(orthanc), spool, jobs).poll_once()  # the next start
    assert again.ok and counts(again) == (1, 1, 3, 0, 0), again


def test_basic_auth(spool: Spool, jobs: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    caplog: pytest.LogCaptureFixture) -> None:
    with running_orthanc(aet="SECURE", users={"alice": "s3cret-pw"}) as orthanc:
        upload(orthanc, series_files(tmp_path))
        source = archive(orthanc, auth=BasicAuth("alice", "TEST_POLL_PW"))

        monkeypatch.delenv("TEST_POLL_PW", raising=False)
        unset = poller_for(source, spool, jobs).poll_once()
        assert unset.errors == ["cannot authenticate: environment variable TEST_POLL_PW (password for basic auth) "
                                "is not set"]

        monkeypatch.setenv("TEST_POLL_PW", "wrong")
        started = time.monotonic()
        wrong = poller_for(source, spool, jobs, retry_delays=(5.0,)).poll_once()
        assert time.monotonic() - started < 5, "a refused login is not retried"
        (error,) = wrong.errors
        assert error == ("QIDO-RS series query (offset 0): the archive refused us as user 'alice' (password from "
                         "$TEST_POLL_PW): HTTP 401 Unauthorized; check the user name and the secret")
        anonymous = poller_for(archive(orthanc), spool, jobs).poll_once()
        assert "the archive refused us without credentials" in anonymous.errors[0]
        assert not spooled(spool)

        monkeypatch.setenv("TEST_POLL_PW", "s3cret-pw")
        right = poller_for(source, spool, jobs).poll_once()
        assert right.ok and counts(right) == (1, 1, 1, 0, 0), right
        assert "s3cret-pw" not in caplog.text


# --------------------------------------------------------------------------- scheduling


def test_schedule_runs_each_source_and_a_bad_one_stops_nothing(
        orthanc: OrthancServer, spool: Spool, jobs: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.poller")
    (path,) = upload(orthanc, series_files(tmp_path))
    nowhere = DicomWebSource(name="nowhere", url=f"http://127.0.0.1:{free_port()}/dicom-web", every_seconds=1.0)
    crashing = poller_for(DicomWebSource(name="crashing", url=orthanc.dicomweb_url, every_seconds=1.0),
                          spool, jobs)
    crashing.jobs = None  # type: ignore[assignment]  # a bug inside the poll: it must not escape
    cron = DicomWebSource(name="nightly", url=orthanc.dicomweb_url, cron="0 0 1 1 *")
    good = poller_for(archive(orthanc, every_seconds=1.0), spool, jobs)
    pollers = [poller_for(nowhere, spool, jobs), crashing, good, poller_for(cron, spool, jobs)]
    scheduler = BackgroundScheduler()
    schedule(pollers, scheduler)
    jobs_by_id = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs_by_id) == {"poll:nowhere", "poll:crashing", "poll:archive", "poll:nightly"}
    for job in jobs_by_id.values():
        assert (job.max_instances, job.coalesce) == (1, True)
    assert isinstance(jobs_by_id["poll:archive"].trigger, IntervalTrigger)
    assert isinstance(jobs_by_id["poll:nightly"].trigger, CronTrigger)
    scheduler.start()
    try:
        wait_for(lambda: spool.path_for(*uids(path)).exists(), 30, "the good source's series in the spool")
        wait_for(lambda: caplog.text.count("source archive: poll since") >= 3, 30, "the good source polling on")
    finally:
        scheduler.shutdown(wait=True)
    log = caplog.text
    assert log.count("source nowhere: poll since") >= 2 and "cannot connect: Connection refused" in log
    assert log.count("source crashing: poll crashed") >= 2
    assert "source nightly: polling" in log and "source nightly: poll since" not in log
