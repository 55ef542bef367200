"""`dicom-node serve` recovering from what stops it: a series that kills it, a damaged job store, leftovers.

Against the running node (``python -m node serve``, killed with SIGKILL as the kernel's
out-of-memory killer would), dcmtk ``storescu`` as the sender and a folder destination.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from tests.support import (
    ROOT, NodeProcess, bundled, copy_as_series, folder_route, free_port, node_config, run_cli, storescu, wait_for,
    write_cine,
)

pytestmark = pytest.mark.peers

#: Three windows as colour, PNG: about 3 s of processing for the 300-frame cine on one core, so the
#: test sees the series in ``processing`` and kills the node then.
SLOW_STEPS = [{"op": "rescale"}, {"op": "channels", "windows": ["brain", "subdural", "brain_bone"]}]


def jobs(http: int) -> list[dict]:
    return requests.get(f"http://127.0.0.1:{http}/api/jobs", timeout=5).json()


def job(http: int, series_id: int) -> dict:
    return requests.get(f"http://127.0.0.1:{http}/api/jobs/{series_id}", timeout=5).json()


def kill_while_processing(node: NodeProcess, http: int, series_uid: str) -> dict:
    """Wait until the node says it is processing *series_uid*, then SIGKILL it; the job as last seen."""
    seen = wait_for(lambda: [j for j in jobs(http) if j["series_uid"] == series_uid and j["state"] == "processing"],
                    120, f"series {series_uid} in processing", node.log)
    node.kill()
    return seen[0]


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp")) if folder.exists() else []


def test_a_series_that_kills_the_node_is_failed_after_two_attempts_and_the_node_goes_on(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    out = tmp_path / "out"
    config = node_config(tmp_path / "var", port, http_port=http,
                         extra=folder_route(out, None, name="slow", steps=SLOW_STEPS, output="png"))
    cine = write_cine(tmp_path / "cine.dcm", 300)
    series_uid = pydicom.dcmread(cine, stop_before_pixels=True).SeriesInstanceUID
    node = NodeProcess(config, tmp_path, port=port)
    try:
        node.start()
        sent = storescu("127.0.0.1", port, [cine], called_aet="DICOMNODE")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        first = kill_while_processing(node, http, series_uid)
        assert first["processing_attempts"] == 1
        node.start()  # recovery queues it again (attempt 1 of 2), a worker takes it at once
        second = kill_while_processing(node, http, series_uid)
        assert second["id"] == first["id"] and second["processing_attempts"] == 2
        node.start()  # the third start: failed with the reason, not processed again
        failed = wait_for(lambda: (lambda j: j if j["state"] == "failed" else None)(job(http, first["id"])),
                          30, "the series failed", node.log)
        assert failed["error"].startswith("processing did not finish 2 times: the worker died or timed out "
                                          "(last: the node stopped during processing"), failed["error"]
        assert [e["state"] for e in failed["events"]][-4:] == ["processing", "queued", "processing", "failed"]
        assert "recovery: 1 series failed: their processing did not finish 2 times" in node.log()
        assert not temporaries(tmp_path / "var" / "outputs")  # what the kills left half-written is gone
        # the node goes on: a normal series is processed and delivered
        good = copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "good")
        study = pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu("127.0.0.1", port, good, called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: len(list((out / study).rglob("*.png"))) == 2, 60, "the good series delivered", node.log)
        assert job(http, failed["id"])["state"] == "failed" and node.alive()
        status = run_cli("status", "--config", str(node.config_path))
        assert status.returncode == 0 and "processing did not finish 2 times" in status.stdout, status.stdout
    finally:
        node.stop()


def damage(path: Path, how: str, original: bytes) -> None:
    """Write *original* to *path* with a bad header, or with its pages after the first made garbage."""
    if how == "header":
        path.write_bytes(b"this is no SQLite database" + original[26:])
    else:
        noise = random.Random(12)
        path.write_bytes(original[:4096] + bytes(noise.randrange(256) for _ in range(len(original) - 4096)))


def test_a_damaged_job_store_stops_serve_and_status_with_one_line_and_store_rebuild_brings_it_back(
    tmp_path: Path,
) -> None:
    port, http = free_port(), free_port()
    out = tmp_path / "out"
    node = NodeProcess(node_config(tmp_path / "var", port, http_port=http, extra=folder_route(out)), tmp_path, port=port)
    first = copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / "first")
    second = copy_as_series([bundled("MR_small.dcm")] * 2, tmp_path / "second")
    with node:
        for series in (first, second):
            assert storescu("127.0.0.1", port, series, called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: node.log().count("delivered to out") == 2, 60, "both series delivered", node.log)
    store = tmp_path / "var" / "jobs.sqlite"
    original = store.read_bytes()  # stopped cleanly: everything is in the file, no -wal left
    assert not (tmp_path / "var" / "jobs.sqlite-wal").exists() and len(original) > 3 * 4096
    config = str(node.config_path)
    for how in ("header", "pages"):
        damage(store, how, original)
        for command in (["serve"], ["status"], ["retry", "--all-failed"]):
            result = run_cli(*command, "--config", config, timeout=60)
            assert result.returncode == 3, (how, command, result.stdout, result.stderr)
            errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
            assert len(errors) == 1 and "Traceback" not in result.stderr, (how, command, result.stderr)
            assert f"ERROR node.app.cli: {store}: the job store is damaged (" in errors[0]
            assert f"run `dicom-node store rebuild --config {config}`" in errors[0]
    # pages damaged: the one that opened without complaint before; rebuilt from the spool
    rebuilt = run_cli("store", "rebuild", "--config", config, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "5 instances of 2 series recorded" in rebuilt.stdout, rebuilt.stdout
    (aside,) = [p for p in store.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert aside.read_bytes()[:4096] == original[:4096]  # the damaged file, kept as it was
    again = run_cli("store", "rebuild", "--config", config, timeout=60)
    assert again.returncode == 1 and "nothing done" in again.stdout  # a readable store is left alone
    for old in out.rglob("*.dcm"):
        old.unlink()
    with node:
        wait_for(lambda: len(list(out.rglob("*.dcm"))) == 5, 60, "every recorded instance processed again", node.log)
        assert sorted(j["state"] for j in jobs(http)) == ["delivered", "delivered"]
        third = copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "third")
        assert storescu("127.0.0.1", port, third, called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: len(list(out.rglob("*.dcm"))) == 7, 60, "a new series after the rebuild", node.log)


def test_a_rebuild_is_refused_while_the_node_runs(tmp_path: Path) -> None:
    port = free_port()
    with NodeProcess(node_config(tmp_path / "var", port), tmp_path, port=port) as node:
        result = run_cli("store", "rebuild", "--force", "--config", str(node.config_path), timeout=60)
        assert result.returncode == 3 and "the job store is in use" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not [p for p in (tmp_path / "var").iterdir() if "set-aside" in p.name]
        assert node.alive()


def test_recovery_removes_what_a_killed_writer_left_in_the_outputs(tmp_path: Path) -> None:
    outputs = tmp_path / "var" / "outputs"
    kept = outputs / "1.2.3" / "2.25.4" / "1.2.3.4.5.dcm"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"a finished output")
    other = outputs / "1.2.3" / "2.25.4" / "notes.tmp"  # not a name of ours
    other.write_bytes(b"x")
    for target in (outputs / "1.2.3" / "2.25.4" / "1.2.3.4.6.dcm", outputs / ".thumbs" / "7" / "after.png"):
        # a writer killed half-way, as the kernel kills a node: atomic_output's temporary file stays behind
        code = ("import os, signal, sys\nfrom node.store.fsutil import atomic_output\n"
                "with atomic_output(sys.argv[1]) as out:\n    out.write(b'half')\n    out.flush()\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n")
        killed = subprocess.run([sys.executable, "-c", code, str(target)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                timeout=60, capture_output=True)
        assert killed.returncode == -signal.SIGKILL and not target.exists()
    assert len(temporaries(outputs)) == 2
    port = free_port()
    with NodeProcess(node_config(tmp_path / "var", port), tmp_path, port=port) as node:
        assert "recovery: 0 temporary spool files and 2 temporary output files removed" in node.log()
    assert not temporaries(outputs) and kept.read_bytes() == b"a finished output" and other.exists()


def test_instances_answered_just_before_a_kill_are_recorded_once_at_the_next_start(tmp_path: Path) -> None:
    """Success is answered once the spool file and its folder entry are fsync'd; the job store row is
    written a moment later (node.store.pending). A node killed mid-push records at start-up what it spooled."""
    port = free_port()
    sources = copy_as_series([bundled("CT_small.dcm")] * 40, tmp_path / "in")
    config = node_config(tmp_path / "var", port, settle=3600)
    spool, database = tmp_path / "var" / "spool", tmp_path / "var" / "jobs.sqlite"

    def recorded() -> tuple[int, int]:
        with __import__("sqlite3").connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
            return (db.execute("SELECT COUNT(*) FROM instances").fetchone()[0],
                    db.execute("SELECT COALESCE(SUM(instances), 0) FROM series").fetchone()[0])

    with NodeProcess(config, tmp_path, port=port) as node:
        push = subprocess.Popen(["/usr/bin/storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, sources)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(list(spool.rglob("*.dcm"))) >= 20, 60, "20 instances spooled", node.log)
            node.kill()  # mid-push: rows of the last C-STOREs answered are not written yet
        finally:
            push.wait(timeout=60)
    spooled = len(list(spool.rglob("*.dcm")))
    with NodeProcess(config, tmp_path, port=port) as node:
        start = len(node.log())
        wait_for(lambda: recorded() == (spooled, spooled), 30, f"the {spooled} spooled instances recorded", node.log)
        again = storescu("127.0.0.1", port, sources, called_aet="DICOMNODE")  # all again: only the rest is new
        assert again.returncode == 0, again.stdout + again.stderr
        wait_for(lambda: "association from STORESCU released" in node.log()[start:], 30, "the resend's end", node.log)
        node.stop()
    assert recorded() == (40, 40)
    assert "Traceback" not in node.log()
