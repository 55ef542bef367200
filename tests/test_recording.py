"""The recorder of received instances (node.store.pending.PendingRecords) on a real SQLite job store."""

from __future__ import annotations

import threading
from pathlib import Path

from node.store.jobstore import JobStore
from node.store.pending import PendingRecords


def row(series: str, sop: str) -> dict:
    return dict(study_uid="1.2.3", series_uid=series, sop_uid=sop, sop_class_uid="1.2.840",
                path=Path(f"/spool/{series}/{sop}.dcm"), size=10, modality="CT", calling_ae="SCU", received_at=1000.0)


def test_rows_from_many_threads_are_recorded_once_each_in_few_transactions(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs.sqlite")
    transactions = []
    record_instances = jobs.record_instances

    def counted(rows):
        transactions.append(len(rows))
        return record_instances(rows)

    jobs.record_instances = counted
    pending = PendingRecords(jobs)
    stop = threading.Event()
    recorder = threading.Thread(target=pending.run, args=(stop,))
    recorder.start()
    try:
        senders = [threading.Thread(target=lambda n=n: [pending.submit(row(f"1.2.3.{n}", f"1.{n}.{i}"))
                                                          for i in range(25)]) for n in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=30)
        pending.submit(row("1.2.3.0", "1.0.0"))  # a resend: recorded again, counted once
    finally:
        stop.set()
        recorder.join(timeout=30)
    try:
        assert not recorder.is_alive() and len(pending) == 0 and not pending.failing
        assert len(jobs.known_paths()) == 100
        assert sorted(s["instances"] for s in jobs.list_series()) == [25, 25, 25, 25]
        assert sum(transactions) == 101 and len(transactions) < 101  # rows gathered into shared transactions
    finally:
        jobs.close()


def test_rows_wait_while_the_store_fails_and_are_recorded_when_it_answers(tmp_path: Path) -> None:
    gone = JobStore(tmp_path / "gone.sqlite")
    gone.close()  # every write now fails
    pending = PendingRecords(gone)
    for i in range(3):
        pending.submit(row("1.2.3.4", f"1.{i}"))
    assert pending.flush() == 0 and pending.failing and len(pending) == 3
    back = JobStore(tmp_path / "jobs.sqlite")
    try:
        pending.jobs = back
        assert pending.flush() == 3 and not pending.failing and len(pending) == 0
        assert back.series(1)["instances"] == 3
    finally:
        back.close()


def test_a_row_the_store_refuses_is_set_aside_and_the_rows_after_it_are_recorded(
        tmp_path: Path, caplog) -> None:
    jobs = JobStore(tmp_path / "jobs.sqlite")
    pending = PendingRecords(jobs)
    bad = row("1.2.3.4", "1.1") | {"sop_class_uid": ["not", "bindable"]}  # sqlite3 cannot bind a list
    for item in (row("1.2.3.4", "1.0"), bad, row("1.2.3.4", "1.2")):
        pending.submit(item)
    try:
        pending.flush()
        assert len(pending) == 0 and not pending.failing
        assert jobs.known_paths() == {str(Path("/spool/1.2.3.4/1.0.dcm")), str(Path("/spool/1.2.3.4/1.2.dcm"))}
        assert "job store refused the record of spooled file /spool/1.2.3.4/1.1.dcm" in caplog.text
    finally:
        jobs.close()
