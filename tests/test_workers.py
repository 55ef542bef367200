"""Worker processes and delivery lanes, against the running node.

- A destination that accepts TCP and never answers delays no other destination: a series routed
  to a folder as well is delivered there within 2 s of being processed, while the hung one waits.
- A worker process killed in the middle of a series is replaced; its series is processed again by
  the new worker and delivered once; the receiving process goes on answering.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests

from tests.support import (
    NodeProcess, bundled, copy_as_series, dicom_destination, echoscu, folder_destination, folder_route, free_port,
    node_config, pipeline, route, storescu, table, wait_for, write_cine,
)

pytestmark = pytest.mark.peers


@contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts connections and never sends a byte (a hung peer)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def api(http_port: int, path: str) -> object:
    return requests.get(f"http://127.0.0.1:{http_port}{path}", timeout=10).json()


def series_record(http_port: int, series_uid: str) -> dict | None:
    for row in api(http_port, "/api/jobs"):
        if row["series_uid"] == series_uid:
            return api(http_port, f"/api/jobs/{row['id']}")
    return None


def delivery_to(record: dict | None, destination: str) -> dict | None:
    if record is None:
        return None
    return next((d for d in record["deliveries"] if d["destination"] == destination), None)


def processed_at(record: dict) -> float:
    """When processing ended and deliveries were scheduled (the ``delivering`` event)."""
    return max(e["at"] for e in record["events"] if e["state"] == "delivering")


def lanes(hung_port: int, out: Path) -> str:
    """Config tables: every series rescaled, to a destination that never answers and to folder *out*."""
    return (pipeline("plain") + dicom_destination("hung", hung_port, "NEVERANSWERS") + folder_destination("out", out)
            + route("plain", ["hung", "out"]))


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_hung_destination_delays_no_other(tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    port, http = free_port(), free_port()
    out = tmp_path / "out"
    store_table = ""
    if store == "postgresql":  # deliveries are Procrastinate jobs, one queue per destination
        store_table = table("store", {"url": request.getfixturevalue("postgres").new_database()})
    with silent_listener() as hung_port:
        config = node_config(tmp_path / "var", port, http_port=http, settle=0.5,
                             extra=store_table + lanes(hung_port, out))
        with NodeProcess(config, tmp_path, port=port) as node:
            for name in ("a", "b"):  # b arrives while the hung lane still waits on a
                files = copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / name)
                series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
                assert storescu("127.0.0.1", port, files, called_aet="DICOMNODE").returncode == 0
                record = wait_for(
                    lambda: (r := series_record(http, series_uid)) and (delivery_to(r, "out") or {}).get(
                        "delivered_at") and r,
                    30, f"series {name} delivered to the folder", node.log)
                late = delivery_to(record, "out")["delivered_at"] - processed_at(record)
                assert late < 2.0, f"series {name}: folder delivery {late:.1f} s after processing"
                assert delivery_to(record, "hung")["state"] in ("pending", "sending")
            assert len(list(out.rglob("*.dcm"))) == 6


def worker_pids(log: str) -> dict[str, int]:
    """The latest pid of each worker, from the node's "worker-N started (pid P)" lines."""
    return {name: int(pid) for name, pid in re.findall(r"(worker-\d+) started \(pid (\d+)\)", log)}


#: Per-image equalisation (fastai's hist_scaled on each frame): a few seconds for a few hundred frames.
EQUALISE = [{"op": "equalise", "per": "image"}]


def test_a_killed_worker_is_replaced_and_its_series_finished(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    out = tmp_path / "out"
    (tmp_path / "in").mkdir()
    cine = write_cine(tmp_path / "in" / "cine.dcm", 300)
    series_uid = pydicom.dcmread(cine, stop_before_pixels=True).SeriesInstanceUID
    config = node_config(tmp_path / "var", port, http_port=http, settle=0.5,
                         extra=folder_route(out, steps=EQUALISE))
    with NodeProcess(config, tmp_path, port=port) as node:
        before = wait_for(lambda: len(worker_pids(node.log())) == 2 and worker_pids(node.log()), 30,
                          "two workers started", node.log)
        assert storescu("127.0.0.1", port, [cine], called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: (series_record(http, series_uid) or {}).get("state") == "processing", 30,
                 "the series being processed", node.log)
        for pid in before.values():
            os.kill(pid, signal.SIGKILL)
        assert echoscu("127.0.0.1", port, called_aet="DICOMNODE").returncode == 0  # the receiver goes on
        record = wait_for(lambda: (r := series_record(http, series_uid)) and r["state"] == "delivered" and r,
                          120, "the series processed again and delivered", node.log)
        log = node.log()
        assert "was killed by SIGKILL" in log and "starting it again" in log
        after = worker_pids(log)
        assert set(after) == set(before) and not set(after.values()) & set(before.values())
        assert any("was killed by SIGKILL" in (e["detail"] or "") and "did not finish, queued again" in e["detail"]
                   for e in record["events"])
        outputs = list(out.rglob("*.dcm"))
        assert len(outputs) == 1  # one multi-frame SC, written once
        assert node.alive()


def test_a_series_that_outlasts_the_processing_timeout_is_failed_and_the_node_goes_on(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    out = tmp_path / "out"
    (tmp_path / "in").mkdir()
    slow = write_cine(tmp_path / "in" / "slow.dcm", 800)  # several seconds of per-image equalisation
    slow_uid = pydicom.dcmread(slow, stop_before_pixels=True).SeriesInstanceUID
    config = node_config(tmp_path / "var", port, http_port=http, settle=0.5,
                         extra=folder_route(out, steps=EQUALISE),
                         processing_timeout_seconds=1, max_processing_attempts=2)
    with NodeProcess(config, tmp_path, port=port) as node:
        assert storescu("127.0.0.1", port, [slow], called_aet="DICOMNODE").returncode == 0
        record = wait_for(lambda: (r := series_record(http, slow_uid)) and r["state"] == "failed" and r, 60,
                          "the slow series failed", node.log)
        assert record["error"].startswith("processing did not finish 2 times")
        assert "processing took longer than processing_timeout_seconds (1 s)" in record["error"]
        small = copy_as_series([bundled("CT_small.dcm")], tmp_path / "small")
        small_uid = pydicom.dcmread(small[0], stop_before_pixels=True).SeriesInstanceUID
        assert storescu("127.0.0.1", port, small, called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: (series_record(http, small_uid) or {}).get("state") == "delivered", 30,
                 "the next series delivered", node.log)
        assert not list(out.rglob(f"*{slow_uid}*")) and node.alive()
