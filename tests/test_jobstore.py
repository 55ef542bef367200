"""The job store's state machine, on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.jobstore import JobStore, SeriesState
from node.spool import InvalidUID, Spool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path):
    clock = Clock()
    jobs = JobStore(tmp_path / "jobs.sqlite", clock=clock)
    yield jobs, clock
    jobs.close()


def receive(jobs: JobStore, sop: str, series: str = "1.2.3.4") -> bool:
    return jobs.record_instance(study_uid="1.2.3", series_uid=series, sop_uid=sop, sop_class_uid="1.2.840",
                                path=Path(f"/spool/{sop}.dcm"), size=10, modality="CT", calling_ae="SCU")


def test_series_settles_after_the_quiet_time(store) -> None:
    jobs, clock = store
    assert receive(jobs, "1.1") and receive(jobs, "1.2") and not receive(jobs, "1.2")  # duplicate: not new
    assert not jobs.settle(10)
    clock.now += 10
    assert list(jobs.settle(10)) == [1]
    job = jobs.claim_next()
    assert job is not None and len(job.instance_paths) == 2
    assert jobs.claim_next() is None  # claimed once only
    assert jobs.series(1)["instances"] == 2


def test_instance_during_processing_makes_it_run_again(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    clock.now += 10
    jobs.settle(10)
    job = jobs.claim_next()
    receive(jobs, "1.2")  # arrives while the worker is busy
    assert jobs.series(1)["state"] == SeriesState.PROCESSING
    scheduled = jobs.processed(job, route="r", pipeline="p", output_dir=Path("/out"), derived_series_uid="2.25.1",
                               outputs=1, destinations=["pacs"], seconds=0.1)
    assert not scheduled and jobs.series(1)["state"] == SeriesState.RECEIVING
    assert jobs.claim_due_deliveries() == []
    clock.now += 10
    jobs.settle(10)
    again = jobs.claim_next()
    assert len(again.instance_paths) == 2


def test_delivery_retries_then_fails_then_operator_retry(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    clock.now += 10
    jobs.settle(10)
    job = jobs.claim_next()
    assert jobs.processed(job, route="r", pipeline="p", output_dir=Path("/out"), derived_series_uid="2.25.9",
                          outputs=1, destinations=["pacs", "folder"], seconds=0.1)
    assert jobs.is_derived("2.25.9") and not jobs.is_derived("1.2.3.4")
    due = {d.destination: d for d in jobs.claim_due_deliveries()}
    jobs.delivered(due["folder"])
    assert not jobs.delivery_failed(due["pacs"], "refused", permanent=False, max_attempts=2, retry_in=5)
    assert jobs.claim_due_deliveries() == []  # not due yet
    clock.now += 5
    (second,) = jobs.claim_due_deliveries()
    assert jobs.delivery_failed(second, "still refused", permanent=False, max_attempts=2, retry_in=5)
    row = jobs.series(1)
    assert row["state"] == SeriesState.FAILED and "pacs: still refused" in row["error"]
    assert jobs.retry() == 1
    (third,) = jobs.claim_due_deliveries()
    jobs.delivered(third)
    assert jobs.series(1)["state"] == SeriesState.DELIVERED


def test_permanent_failure_ends_at_once_and_recover_resumes(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    clock.now += 10
    jobs.settle(10)
    job = jobs.claim_next()
    jobs.processed(job, route="r", pipeline="p", output_dir=Path("/out"), derived_series_uid="2.25.2",
                   outputs=1, destinations=["pacs"], seconds=0.1)
    (delivery,) = jobs.claim_due_deliveries()
    # a crash while sending: recover() makes it due again
    assert jobs.recover() == {"series_requeued": 0, "deliveries_resumed": 1}
    (delivery,) = jobs.claim_due_deliveries()
    assert jobs.delivery_failed(delivery, "0xA900", permanent=True, max_attempts=10, retry_in=1)
    assert jobs.series(1)["state"] == SeriesState.FAILED


def test_values_survive_reopening(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "j.sqlite")
    jobs.set_value("poll:x", {"watermark": "20260101"})
    jobs.close()
    jobs = JobStore(tmp_path / "j.sqlite")
    assert jobs.get_value("poll:x") == {"watermark": "20260101"} and jobs.get_value("nope") is None
    jobs.close()


@pytest.mark.parametrize("bad", ["../../x", "1.2.3/..", "", "1.2.03", "1." + "2" * 70, "1.2.3\x00x"])
def test_spool_refuses_uids_that_would_be_paths(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUID):
        spool.store("1.2.3", "1.2.3.4", bad, [b"data"])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_spool_write_is_whole_or_absent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", [b"abc", b"def"])
    assert stored.path.read_bytes() == b"abcdef" and stored.size == 6

    def failing():
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError):
        spool.store("1.2.3", "1.2.3.4", "1.2.3.4.6", failing())
    assert [p.name for p in spool.series_folder("1.2.3", "1.2.3.4").iterdir()] == ["1.2.3.4.5.dcm"]
    assert [i.sop_uid for i in spool.walk()] == ["1.2.3.4.5"]


def receive_in(jobs: JobStore, sop: str, series: str, study: str) -> None:
    jobs.record_instance(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid="1.2.840",
                         path=Path(f"/spool/{sop}.dcm"), size=10)


def test_study_trigger_waits_for_the_whole_study(store) -> None:
    jobs, clock = store
    asked = []

    def trigger_of(series_id: int) -> str:
        asked.append(series_id)
        return "study"

    settle = dict(study_settle_seconds=30, force_complete_seconds=3600, trigger_of=trigger_of)
    receive_in(jobs, "1.1", "1.2.1", "1.2")
    clock.now += 10
    receive_in(jobs, "2.1", "1.2.2", "1.2")  # a second series of the study, 10 s later
    clock.now += 10
    assert not jobs.settle(5, **settle)  # series 1 and 2 are quiet, the study is not
    clock.now += 15
    receive_in(jobs, "3.1", "1.2.3", "1.2")
    clock.now += 29
    assert not jobs.settle(5, **settle)
    clock.now += 1
    assert sorted(jobs.settle(5, **settle)) == [1, 2, 3]  # all at once, once
    assert sorted(set(asked)) == [1, 2, 3] and len(asked) == 3  # asked once per series, then kept
    assert "study settled (3 series)" in jobs.series(1)["events"][-1]["detail"]


def test_force_complete_bounds_a_sender_that_never_goes_quiet(store) -> None:
    jobs, clock = store
    for second in range(0, 100, 2):  # an instance every 2 s for 100 s
        clock.now = 1000.0 + second
        receive_in(jobs, f"1.{second + 1}", "1.2.1", "1.2")
        assert list(jobs.settle(5, force_complete_seconds=60)) == ([1] if second >= 60 else [])
        if second >= 60:
            break
    assert "processed anyway" in jobs.series(1)["events"][-1]["detail"]
    # processed, then more instances: it re-opens and the clock starts again
    job = jobs.claim_next()
    jobs.set_outcome(job, SeriesState.UNROUTED, "test")
    receive_in(jobs, "1.999", "1.2.1", "1.2")
    assert not jobs.settle(5, force_complete_seconds=60)


def test_expired_and_forget(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    clock.now += 10
    jobs.settle(10)
    job = jobs.claim_next()
    jobs.processed(job, route="r", pipeline="p", output_dir=Path("/out/x"), derived_series_uid="2.25.5",
                   outputs=1, destinations=["out"], seconds=0.1)
    (delivery,) = jobs.claim_due_deliveries()
    jobs.delivered(delivery)
    assert jobs.expired(3600) == []
    clock.now += 3600
    (row,) = jobs.expired(3600)
    assert row["paths"] == [Path("/spool/1.1.dcm")] and row["output_dir"] == "/out/x"
    jobs.forget(row["id"])
    assert jobs.series(row["id"]) is None and jobs.counts() == {}
