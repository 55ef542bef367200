"""Scale-out: receivers and workers as separate processes over one PostgreSQL and one shared folder.

Real PostgreSQL (Debian's, started by the tests as the ``postgres`` user), real Orthanc as the
destination, dcmtk ``storescu`` as the modality.  Every process has its own data_dir; they share
``shared_dir`` (spool and outputs) and ``[store]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support import (
    NodeProcess, OrthancServer, PostgresServer, bundled, copy_as_series, dicom_destination, free_port, node_config,
    pipeline, route, run_cli, running_orthanc, storescu, table, wait_for, write_cine,
)

pytestmark = pytest.mark.peers

STALLED_SECONDS = 3


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    with running_orthanc(aet="ORTHANC") as server:
        yield server


def site_config(data_dir: Path, shared: Path, url: str, orthanc: OrthancServer, *, port: int = 0,
                http_port: int | None = None, workers: int = 1, pipeline_name: str = "plain") -> str:
    """One process of a scaled-out site: its own data_dir and ports, the shared folder and database."""
    return node_config(
        data_dir, port, settle=0.5, workers=workers, shared_dir=shared, http_port=http_port,
        extra=table("store", {"url": url, "stalled_seconds": STALLED_SECONDS}) + pipeline("plain")
        + pipeline("slow", [{"op": "equalise", "per": "image"}])
        + dicom_destination("pacs", orthanc.dicom_port, orthanc.aet) + route(pipeline_name, ["pacs"]))


class Site:
    """Receivers and workers of one site, started and stopped together."""

    def __init__(self, root: Path, url: str, orthanc: OrthancServer) -> None:
        self.root, self.url, self.orthanc = root, url, orthanc
        self.shared = root / "shared"
        self.processes: dict[str, NodeProcess] = {}

    def start(self, name: str, role: str, *, port: int = 0, **kw: object) -> NodeProcess:
        work = self.root / name
        work.mkdir(parents=True, exist_ok=True)
        text = site_config(work / "var", self.shared, self.url, self.orthanc, port=port, **kw)
        node = NodeProcess(text, work, port=port, args=("--role", role))
        self.processes[name] = node
        if port:
            node.start()
        else:
            node.start_without_echo(ready=lambda: "node started (worker)" in node.log())
        return node

    def stop(self) -> None:
        for node in self.processes.values():
            node.stop()


@pytest.fixture
def site(tmp_path: Path, postgres: PostgresServer, orthanc: OrthancServer) -> Iterator[Site]:
    orthanc.clear()
    one = Site(tmp_path, postgres.new_database(), orthanc)
    try:
        yield one
    finally:
        one.stop()


def push_series(tmp_path: Path, name: str, port: int, count: int = 3) -> str:
    files = copy_as_series([bundled("CT_small.dcm")] * count, tmp_path / "in" / name)
    result = storescu("127.0.0.1", port, files, called_aet="DICOMNODE")
    assert result.returncode == 0, result.stdout + result.stderr
    return pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID


def derived_in_orthanc(orthanc: OrthancServer) -> dict[str, int]:
    """Instances of each series in Orthanc whose description says the node derived it."""
    return {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in orthanc.series()
            if "[" in s["MainDicomTags"].get("SeriesDescription", "")}


def processed_by(node: NodeProcess) -> set[str]:
    """Series Instance UIDs the worker's log says it processed."""
    return set(re.findall(r"series ([0-9.]+) -> [0-9.]+: \d+ outputs", node.log()))


def test_one_receiver_three_workers_share_a_burst(site: Site, tmp_path: Path) -> None:
    port = free_port()
    receiver = site.start("receiver", "receiver", port=port)
    workers = [site.start(f"worker{n}", "worker") for n in range(1, 4)]
    sources = [push_series(tmp_path, f"s{n}", port) for n in range(10)]
    wait_for(lambda: len(derived_in_orthanc(site.orthanc)) == 10 and
             all(v == 3 for v in derived_in_orthanc(site.orthanc).values()), 120,
             "10 derived series of 3 instances in Orthanc", lambda: "\n".join(w.log()[-1500:] for w in workers))
    done = [processed_by(w) for w in workers]
    assert all(done), f"a worker processed nothing: {[len(d) for d in done]}"
    assert set().union(*done) == set(sources) and sum(len(d) for d in done) == 10  # each series once
    assert "Traceback" not in receiver.log() + "".join(w.log() for w in workers)


def test_a_worker_killed_mid_series_is_finished_by_another(site: Site, tmp_path: Path) -> None:
    port = free_port()
    site.start("receiver", "receiver", port=port)
    first = site.start("worker1", "worker", pipeline_name="slow")
    (tmp_path / "in").mkdir()
    cine = write_cine(tmp_path / "in" / "cine.dcm", 400)
    series_uid = pydicom.dcmread(cine, stop_before_pixels=True).SeriesInstanceUID
    assert storescu("127.0.0.1", port, [cine], called_aet="DICOMNODE").returncode == 0
    wait_for(lambda: f"series {series_uid}: 1 instances" in first.log(), 60, "worker 1 processing", first.log)
    first.kill()  # kill -9 of the worker's process group: the worker process dies with it
    second = site.start("worker2", "worker", pipeline_name="slow")
    wait_for(lambda: len(derived_in_orthanc(site.orthanc)) == 1, 120, "the series in Orthanc", second.log)
    assert list(derived_in_orthanc(site.orthanc).values()) == [1]  # one derived series, one instance
    assert series_uid in processed_by(second) and "stopped heartbeating" in second.log()


def test_two_receivers_and_one_worker(site: Site, tmp_path: Path) -> None:
    ports = free_port(), free_port()
    for n, port in enumerate(ports, start=1):
        site.start(f"receiver{n}", "receiver", port=port)
    worker = site.start("worker", "worker")
    sources = {push_series(tmp_path, f"r{n}-{k}", port) for n, port in enumerate(ports) for k in range(2)}
    wait_for(lambda: len(derived_in_orthanc(site.orthanc)) == 4, 90, "4 derived series in Orthanc", worker.log)
    assert processed_by(worker) == sources


def test_a_receiver_killed_mid_push_loses_nothing_acknowledged(site: Site, tmp_path: Path) -> None:
    port = free_port()
    receiver = site.start("receiver", "receiver", port=port)
    site.start("worker", "worker")
    files = copy_as_series([bundled("CT_small.dcm")] * 40, tmp_path / "in" / "big")
    push = __import__("subprocess").Popen(
        ["/usr/bin/storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
        stdout=__import__("subprocess").DEVNULL, stderr=__import__("subprocess").DEVNULL)
    wait_for(lambda: len(list((site.shared / "spool").rglob("*.dcm"))) >= 10, 60, "a part of the push spooled")
    receiver.kill()
    push.wait(timeout=60)
    receiver.start()  # same config: recovery records what was spooled
    result = storescu("127.0.0.1", port, files, called_aet="DICOMNODE")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: list(derived_in_orthanc(site.orthanc).values()) == [40], 120, "40 instances in Orthanc",
             receiver.log)


def test_postgresql_away_for_10_seconds_during_a_push(site: Site, tmp_path: Path, postgres: PostgresServer) -> None:
    port, receiver_http, worker_http = free_port(), free_port(), free_port()
    receiver = site.start("receiver", "receiver", port=port, http_port=receiver_http)
    worker = site.start("worker", "worker", http_port=worker_http)

    def ready(http: int) -> int:
        return __import__("requests").get(f"http://127.0.0.1:{http}/readyz", timeout=5).status_code

    before = push_series(tmp_path, "before", port)
    wait_for(lambda: len(derived_in_orthanc(site.orthanc)) == 1, 60, "the first series delivered", worker.log)
    assert ready(receiver_http) == ready(worker_http) == 200
    postgres.stop()
    try:
        during = push_series(tmp_path, "during", port, count=5)  # answered Success: the spool is the record
        wait_for(lambda: "wait to be recorded" in receiver.log(), 15, "the receiver saying it waits", receiver.log)
        assert ready(receiver_http) == ready(worker_http) == 503
        __import__("time").sleep(7)
    finally:
        postgres.start()
    wait_for(lambda: ready(receiver_http) == ready(worker_http) == 200, 30, "both ready again", receiver.log)
    after = push_series(tmp_path, "after", port)
    wait_for(lambda: len(derived_in_orthanc(site.orthanc)) == 3, 120, "all three series delivered",
             lambda: receiver.log()[-2000:] + worker.log()[-2000:])
    counts = derived_in_orthanc(site.orthanc)
    assert sorted(counts.values()) == [3, 3, 5]
    assert processed_by(worker) == {before, during, after}
    assert receiver.alive() and worker.alive()


def test_a_worker_without_the_shared_folder_leaves_the_series_to_another(site: Site, tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    site.start("receiver", "receiver", port=port)
    unmounted = Site(tmp_path / "elsewhere", site.url, site.orthanc)  # an empty mount point: no spool
    unmounted.shared.mkdir(parents=True)
    try:
        lost = unmounted.start("lost", "worker", http_port=http)
        wait_for(lambda: "has no spool folder (is the share mounted on this machine?)" in lost.log(), 30,
                 "the worker saying why it is not ready", lost.log)
        assert __import__("requests").get(f"http://127.0.0.1:{http}/readyz", timeout=5).status_code == 503
        source = push_series(tmp_path, "s", port)
        good = site.start("good", "worker")
        wait_for(lambda: len(derived_in_orthanc(site.orthanc)) == 1, 90, "the series delivered by the good worker",
                 lambda: lost.log()[-2000:] + good.log()[-2000:])
        assert processed_by(good) == {source} and not processed_by(lost)
        assert "failed" not in (lost.log() + good.log()).lower().replace("failed: 0", "")
    finally:
        unmounted.stop()


def test_serve_without_its_database_says_where_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nport = {free_port()}\n[http]\nport = {free_port()}\n'
                      f'[store]\nurl = "postgresql://node@127.0.0.1:{port}/dicomnode"\npassword_env = "TEST_DB_PW"\n')
    result = run_cli("serve", "--config", str(config), "--role", "worker", timeout=60,
                     env=dict(os.environ, TEST_DB_PW="s3cret-pw"))
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and "Traceback" not in result.stderr, result.stderr  # the config line, then why
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/dicomnode" in lines[-1]
    assert "s3cret-pw" not in result.stderr
