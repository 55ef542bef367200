"""The job store's state machine, on a real SQLite file and on a real PostgreSQL (same tests)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.store.database import DatabaseError
from node.store.jobstore import SCHEMA_VERSION, JobStore, JobStoreError, Reconciled, SeriesState, open_job_store
from node.store.spool import InvalidUID, Spool
from tests.support import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    clock = Clock()
    if request.param == "sqlite":
        jobs = JobStore(tmp_path / "jobs.sqlite", clock=clock)
    else:
        jobs = open_job_store(request.getfixturevalue("postgres").new_database(), tmp_path, clock=clock)
    yield jobs, clock
    jobs.close()


def receive(jobs: JobStore, sop: str, series: str = "1.2.3.4") -> bool:
    return jobs.record_instance(study_uid="1.2.3", series_uid=series, sop_uid=sop, sop_class_uid="1.2.840",
                                path=Path(f"/spool/{sop}.dcm"), size=10, modality="CT", calling_ae="SCU")


def claim_settled(jobs: JobStore, clock: Clock):
    """10 s later: settle (10 s of quiet) and claim the next series."""
    clock.now += 10
    jobs.settle(10)
    return jobs.claim_next()


def processed(jobs: JobStore, job, derived_uid: str, destinations: list[str], output_dir: str = "/out") -> bool:
    """Record *job* processed (route ``r``, pipeline ``p``, one output) for *destinations*; jobs.processed's answer."""
    return jobs.processed(job, route="r", pipeline="p", output_dir=Path(output_dir), derived_series_uid=derived_uid,
                          outputs=1, destinations=destinations, seconds=0.1)


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
    job = claim_settled(jobs, clock)
    receive(jobs, "1.2")  # arrives while the worker is busy
    assert jobs.series(1)["state"] == SeriesState.PROCESSING
    scheduled = processed(jobs, job, "2.25.1", ["pacs"])
    assert not scheduled and jobs.series(1)["state"] == SeriesState.RECEIVING
    assert jobs.claim_due_deliveries() == []
    again = claim_settled(jobs, clock)
    assert len(again.instance_paths) == 2


def test_delivery_retries_then_fails_then_operator_retry(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    job = claim_settled(jobs, clock)
    assert processed(jobs, job, "2.25.9", ["pacs", "folder"])
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
    job = claim_settled(jobs, clock)
    processed(jobs, job, "2.25.2", ["pacs"])
    (delivery,) = jobs.claim_due_deliveries()
    # a crash while sending: recover() makes it due again
    assert jobs.recover() == {"series_requeued": 0, "series_failed": 0, "deliveries_resumed": 1}
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
    job = claim_settled(jobs, clock)
    processed(jobs, job, "2.25.5", ["out"], output_dir="/out/x")
    (delivery,) = jobs.claim_due_deliveries()
    jobs.delivered(delivery)
    assert jobs.expired(3600) == []
    clock.now += 3600
    (row,) = jobs.expired(3600)
    assert row["paths"] == [Path("/spool/1.1.dcm")] and row["output_dir"] == "/out/x"
    jobs.forget(row["id"])
    assert jobs.series(row["id"]) is None and jobs.counts() == {}


def test_a_series_whose_processing_never_finishes_is_failed_after_max_attempts(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    first = claim_settled(jobs, clock)
    assert jobs.series(first.id)["processing_attempts"] == 1
    # the node is killed while processing: recovery queues it again (attempt 1 of 2)
    assert jobs.recover(max_attempts=2) == {"series_requeued": 1, "series_failed": 0, "deliveries_resumed": 0}
    row = jobs.series(first.id)
    assert row["state"] == SeriesState.QUEUED and row["processing_attempts"] == 1
    assert "attempt 1 of 2 did not finish, queued again" in row["events"][-1]["detail"]
    second = jobs.claim_next()
    assert second.id == first.id and jobs.series(first.id)["processing_attempts"] == 2
    assert jobs.series(first.id)["events"][-1]["detail"] == "attempt 2: the last did not finish"
    # killed again: failed with the reason, not queued for ever
    assert jobs.recover(max_attempts=2) == {"series_requeued": 0, "series_failed": 1, "deliveries_resumed": 0}
    row = jobs.series(first.id)
    assert row["state"] == SeriesState.FAILED
    assert row["error"].startswith("processing did not finish 2 times: the worker died or timed out (last: the node "
                                   "stopped during processing")
    assert f"dicom-node retry {first.id}" in row["error"] and row["events"][-1]["state"] == SeriesState.FAILED
    assert jobs.claim_next() is None and jobs.recover(max_attempts=2)["series_failed"] == 0  # stays failed
    # the operator's retry starts the count again
    assert jobs.retry([first.id]) == 1
    row = jobs.series(first.id)
    assert row["state"] == SeriesState.QUEUED and row["processing_attempts"] == 0 and row["error"] is None
    third = jobs.claim_next()
    assert jobs.series(third.id)["processing_attempts"] == 1
    assert jobs.recover(max_attempts=2)["series_requeued"] == 1


def test_a_finished_processing_resets_the_count(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1", series="1.2.3.1")
    receive(jobs, "2.1", series="1.2.3.2")
    receive(jobs, "3.1", series="1.2.3.3")
    clock.now += 10
    jobs.settle(10)
    jobs.claim_next(), jobs.claim_next(), jobs.claim_next()
    assert jobs.recover(max_attempts=3)["series_requeued"] == 3
    done, unrouted, reopened = jobs.claim_next(), jobs.claim_next(), jobs.claim_next()
    assert [jobs.series(j.id)["processing_attempts"] for j in (done, unrouted, reopened)] == [2, 2, 2]
    assert jobs.processed(done, route="r", pipeline="p", output_dir=Path("/out"), derived_series_uid="2.25.7",
                          outputs=1, destinations=["pacs"], seconds=0.1)
    assert jobs.set_outcome(unrouted, SeriesState.UNROUTED, "no route")
    receive(jobs, "3.2", series="1.2.3.3")  # arrives during processing: the result is for an older generation
    assert not jobs.set_outcome(reopened, SeriesState.FAILED, "no output")
    assert [jobs.series(j.id)["processing_attempts"] for j in (done, unrouted, reopened)] == [0, 0, 0]
    assert jobs.series(reopened.id)["state"] == SeriesState.RECEIVING


def test_abandon_requeues_then_fails_and_ignores_what_is_not_processing(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    job = claim_settled(jobs, clock)
    assert jobs.abandon(job.id, "worker 1 killed by signal 9", max_attempts=2) == SeriesState.QUEUED
    assert jobs.abandon(job.id, "again", max_attempts=2) is None  # queued: nothing to abandon
    assert jobs.series(job.id)["events"][-1]["detail"].startswith("worker 1 killed by signal 9: attempt 1 of 2")
    job = jobs.claim_next()
    assert jobs.abandon(job.id, "worker 2 timed out after 600 s", max_attempts=2) == SeriesState.FAILED
    row = jobs.series(job.id)
    assert row["state"] == SeriesState.FAILED and "(last: worker 2 timed out after 600 s)" in row["error"]
    assert jobs.abandon(999, "no such series") is None
    # max_attempts = 1: the first interruption fails it
    receive(jobs, "2.1", series="1.2.3.9")
    job = claim_settled(jobs, clock)
    assert jobs.abandon(job.id, "worker died", max_attempts=1) == SeriesState.FAILED
    assert jobs.series(job.id)["error"].startswith("processing did not finish 1 times")


def test_an_older_store_gets_the_attempts_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE series (id INTEGER PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL UNIQUE,"
               " state TEXT NOT NULL, generation INTEGER NOT NULL DEFAULT 0, instances INTEGER NOT NULL DEFAULT 0,"
               " modality TEXT, calling_ae TEXT, first_received REAL, last_received REAL, route TEXT, pipeline TEXT,"
               " output_dir TEXT, outputs INTEGER, error TEXT, processing_seconds REAL, updated_at REAL NOT NULL)")
    db.execute("INSERT INTO series(study_uid, series_uid, state, last_received, updated_at)"
               " VALUES ('1.2', '1.2.3', 'processing', 1, 1)")
    db.commit()
    db.close()
    jobs = JobStore(path)
    try:
        assert jobs.series(1)["processing_attempts"] == 0  # claimed before the upgrade: not counted
        assert jobs.recover(max_attempts=1)["series_requeued"] == 1
        jobs.claim_next()
        assert jobs.recover(max_attempts=1)["series_failed"] == 1
        assert jobs.is_derived("2.25.1") is False  # the index on an added column exists too
    finally:
        jobs.close()


def spool_with(tmp_path: Path, count: int) -> tuple[Spool, list[Path]]:
    """A spool holding *count* real instances in two series (pydicom's bundled CT, new UIDs)."""
    import pydicom
    from pydicom.data import get_testdata_file

    spool = Spool(tmp_path / "spool")
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    paths = []
    for number in range(count):
        source.SOPInstanceUID = f"1.2.3.{number % 2}.{number + 1}"
        buffer = __import__("io").BytesIO()
        source.save_as(buffer)
        paths.append(spool.store("1.2.3", f"1.2.3.{number % 2}", source.SOPInstanceUID, [buffer.getvalue()]).path)
    return spool, paths


def damaged_copies(tmp_path: Path) -> dict[str, Path]:
    """A job store file with a bad header, and one whose pages after the first are garbage."""
    import random

    good = tmp_path / "good" / "jobs.sqlite"
    jobs = JobStore(good)
    for number in range(20):
        receive(jobs, f"1.{number + 1}", series=f"1.2.3.{number}")
    jobs.close()  # the last connection: the WAL is checkpointed into the file
    data = good.read_bytes()
    assert len(data) > 3 * 4096
    header = tmp_path / "header" / "jobs.sqlite"
    header.parent.mkdir()
    header.write_bytes(b"this is not an SQLite file" + data[26:])
    pages = tmp_path / "pages" / "jobs.sqlite"
    pages.parent.mkdir()
    noise = random.Random(7)
    pages.write_bytes(data[:4096] + bytes(noise.randrange(256) for _ in range(len(data) - 4096)))
    return {"header": header, "pages": pages}


@pytest.mark.parametrize("damage", ["header", "pages"])
def test_a_damaged_store_is_refused_at_open_naming_the_file_and_the_fix(tmp_path: Path, damage: str) -> None:
    path = damaged_copies(tmp_path)[damage]
    before = path.read_bytes()
    with pytest.raises(JobStoreError) as info:
        JobStore(path)
    error = info.value
    assert error.damaged and error.path == path
    line = error.message(Path("/etc/dicom-node.toml"))
    assert "\n" not in line and line.startswith(f"{path}: the job store is damaged (")
    assert "`dicom-node store rebuild --config /etc/dicom-node.toml`" in line
    assert any(words in line for words in (["file is not a database"] if damage == "header"
                                           else ["malformed", "integrity check failed: "]))
    assert path.read_bytes() == before  # nothing written to it
    assert JobStore.rebuild(path, Spool(tmp_path / "spool")).recorded.instances == 0  # the failed open left no lock


def test_an_unopenable_store_says_so_without_calling_it_damaged(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite").mkdir()  # a folder where the file should be
    with pytest.raises(JobStoreError) as info:
        JobStore(tmp_path / "jobs.sqlite")
    assert not info.value.damaged and "cannot be opened" in str(info.value) and "store rebuild" not in str(info.value)


def test_rebuild_sets_the_damaged_store_aside_and_records_the_spool(tmp_path: Path) -> None:
    path = damaged_copies(tmp_path)["pages"]
    (path.parent / "jobs.sqlite-wal").write_bytes(b"old wal")
    spool, paths = spool_with(path.parent, 5)
    rebuilt = JobStore.rebuild(path, spool, clock=lambda: 5000.0)
    assert "malformed" in rebuilt.damage or "integrity check failed" in rebuilt.damage
    aside = rebuilt.set_aside[0]
    assert aside.name.startswith("jobs.sqlite.corrupt-") and aside.read_bytes()[:16] == b"SQLite format 3\x00"
    assert aside.with_name(aside.name + "-wal").read_bytes() == b"old wal"  # moved with it, as it was
    assert {p.name for p in path.parent.iterdir() if p.name.startswith("jobs.sqlite")} == {
        p.name for p in rebuilt.set_aside} | {"jobs.sqlite"}
    assert rebuilt.recorded == Reconciled(instances=5, series=2, unreadable=0)
    jobs = JobStore(path)
    try:
        assert jobs.known_paths() == {str(p) for p in paths}
        assert sorted(r["instances"] for r in jobs.list_series()) == [2, 3]
        assert jobs.counts() == {"receiving": 2}
    finally:
        jobs.close()
    # a readable store is left alone unless forced
    assert JobStore.rebuild(path, spool).set_aside == ()
    forced = JobStore.rebuild(path, spool, only_if_damaged=False)
    assert ".set-aside-" in forced.set_aside[0].name and forced.recorded.instances == 5


def test_rebuild_refuses_a_store_in_use_and_a_node_does_not_open_one_being_rebuilt(tmp_path: Path) -> None:
    from node.store.jobstore import _FolderLock

    path = tmp_path / "jobs.sqlite"
    jobs = JobStore(path)
    try:
        with pytest.raises(JobStoreError, match="in use"):
            JobStore.rebuild(path, Spool(tmp_path / "spool"), only_if_damaged=False)
        reader = JobStore(path)  # another reader (status) is fine
        assert reader.counts() == {}
        reader.close()
    finally:
        jobs.close()
    lock = _FolderLock(path, exclusive=True)  # as a rebuild holds it
    try:
        with pytest.raises(JobStoreError, match="being rebuilt"):
            JobStore(path)
    finally:
        lock.close()
    JobStore(path).close()


# --------------------------------------------------------------------------- schema versions


_FIRST_SCHEMA = """
CREATE TABLE series (id INTEGER PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL, generation INTEGER NOT NULL DEFAULT 0, instances INTEGER NOT NULL DEFAULT 0,
    modality TEXT, calling_ae TEXT, first_received REAL, last_received REAL, route TEXT, pipeline TEXT,
    output_dir TEXT, outputs INTEGER, error TEXT, processing_seconds REAL, updated_at REAL NOT NULL);
INSERT INTO series(study_uid, series_uid, state, instances, last_received, updated_at)
    VALUES ('1.2.3', '1.2.3.4', 'receiving', 1, 990.0, 990.0);
"""


def test_a_database_of_the_first_release_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(_FIRST_SCHEMA)
    jobs = JobStore(path, clock=lambda: 1000.0)
    try:
        assert jobs.settle(5) == {1: "settled with 1 instances"}  # the old row, with the new columns
        assert jobs.claim_next(worker="w").series_uid == "1.2.3.4" and jobs.claimed_by("w") == [1]
    finally:
        jobs.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_database_of_a_newer_release_is_refused(store) -> None:
    jobs, _ = store
    with jobs._transaction() as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(DatabaseError, match=f"schema version {SCHEMA_VERSION + 1}, written by a newer dicom-node"):
        JobStore(jobs._db)


def test_an_unreachable_postgresql_is_named_without_the_password(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(DatabaseError) as refused:
        open_job_store(f"postgresql://node@127.0.0.1:{port}/dicomnode", tmp_path, password="s3cret-word")
    message = str(refused.value)
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/dicomnode" in message
    assert "s3cret-word" not in message and "\n" not in message


def end_as(jobs: JobStore, clock: Clock, sop: str, series: str, state: SeriesState):
    """A series of one instance, claimed and ended as *state* (set_outcome)."""
    receive(jobs, sop, series)
    job = claim_settled(jobs, clock)
    assert job is not None and job.series_uid == series
    assert jobs.set_outcome(job, state, "test")
    return job


def test_expired_takes_unrouted_and_discarded_with_delivered_and_failed_only_when_asked(store) -> None:
    jobs, clock = store
    unrouted = end_as(jobs, clock, "1.1", "1.2.3.1", SeriesState.UNROUTED)
    discarded = end_as(jobs, clock, "1.2", "1.2.3.2", SeriesState.DISCARDED)
    failed = end_as(jobs, clock, "1.3", "1.2.3.3", SeriesState.FAILED)
    receive(jobs, "1.4", "1.2.3.4")  # still receiving: never expires
    assert jobs.expired(3600, 7200) == []
    clock.now += 3600
    assert [(r["id"], r["state"]) for r in jobs.expired(3600, 7200)] == [
        (unrouted.id, "unrouted"), (discarded.id, "discarded")]
    assert [r["id"] for r in jobs.expired(3600)] == [unrouted.id, discarded.id]  # failed: kept for ever by default
    assert jobs.expired(0, 0) == []  # 0: never
    clock.now += 3600
    assert [r["id"] for r in jobs.expired(3600, 7200)] == [unrouted.id, discarded.id, failed.id]
    assert [r["id"] for r in jobs.expired(0, 7200)] == [failed.id]
    assert jobs.expired(3600, 7200)[2]["paths"] == [Path("/spool/1.3.dcm")]


def test_discarded_series_instances_are_forgotten_and_a_reopened_series_holds_only_new_ones(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    receive(jobs, "1.2")
    job = claim_settled(jobs, clock)
    assert jobs.set_outcome(job, SeriesState.DISCARDED, "discard route")
    assert jobs.counts() == {"discarded": 1}
    assert jobs.forget_discarded_instances(job) == 2
    assert jobs.instances(job.id) == [] and jobs.series(job.id)["state"] == "discarded"
    assert receive(jobs, "1.2")  # sent again after it was discarded: new, and the series re-opens
    assert jobs.series(job.id)["state"] == "receiving"
    again = claim_settled(jobs, clock)
    assert again.instance_paths == (Path("/spool/1.2.dcm"),)
    assert jobs.forget_discarded_instances(job) == 0  # an older generation: nothing dropped
    assert jobs.instances(job.id) == [("1.2", Path("/spool/1.2.dcm"))]


def test_a_discard_overtaken_by_a_new_instance_keeps_every_record(store) -> None:
    jobs, clock = store
    receive(jobs, "1.1")
    job = claim_settled(jobs, clock)
    receive(jobs, "1.2")  # arrives while the worker decides
    assert not jobs.set_outcome(job, SeriesState.DISCARDED, "discard route")
    assert jobs.series(job.id)["state"] == "receiving"
    assert jobs.forget_discarded_instances(job) == 0 and len(jobs.instances(job.id)) == 2


def test_record_instances_is_record_instance_in_one_transaction_all_or_none(store, tmp_path: Path) -> None:
    jobs, _ = store
    rows = [dict(study_uid="1.2.3", series_uid=series, sop_uid=sop, sop_class_uid="1.2.840",
                 path=Path(f"/spool/{sop}.dcm"), size=10, modality="CT", calling_ae="SCU", received_at=1000.0 + i)
            for i, (series, sop) in enumerate([("1.2.3.4", "1.1"), ("1.2.3.4", "1.2"), ("1.2.3.5", "2.1"),
                                               ("1.2.3.4", "1.2")])]  # the last: a resend, not new
    assert jobs.record_instances(rows) == 3
    one_by_one = JobStore(tmp_path / "one-by-one.sqlite")
    try:
        assert [one_by_one.record_instance(**row) for row in rows] == [True, True, True, False]
        for series_id in (1, 2):
            batched, single = jobs.series(series_id), one_by_one.series(series_id)
            assert {k: batched[k] for k in ("series_uid", "instances", "state", "generation", "last_received")} == \
                   {k: single[k] for k in ("series_uid", "instances", "state", "generation", "last_received")}
            assert jobs.instances(series_id) == one_by_one.instances(series_id)
    finally:
        one_by_one.close()
    broken = [dict(rows[0], sop_uid="3.1", series_uid="1.2.3.6"), dict(rows[0], sop_uid="3.2", size=None)]
    with pytest.raises(Exception):  # NOT NULL size: the whole batch is refused
        jobs.record_instances(broken)
    assert "/spool/3.1.dcm" not in jobs.known_paths()
    assert [s["series_uid"] for s in jobs.list_series()].count("1.2.3.6") == 0
