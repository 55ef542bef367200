"""``[node] receivers``: several processes receiving on one port (SO_REUSEPORT), against the running node.

dcmtk storescu as the senders (many at once), the node's SQLite job store and /metrics checked after.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import requests

from node.app.receivers import REUSE_PORT
from node.config import ConfigError, load_config
from tests.support import NodeProcess, bundled, copy_as_series, free_port, node_config, nodelay_env, wait_for

pytestmark = [pytest.mark.peers,
              pytest.mark.skipif(not REUSE_PORT, reason="SO_REUSEPORT is what several receivers share a port with")]


def recorded(database: Path) -> tuple[int, int]:
    """Instance rows, and the instances the series rows count."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
        return (db.execute("SELECT COUNT(*) FROM instances").fetchone()[0],
                db.execute("SELECT COALESCE(SUM(instances), 0) FROM series").fetchone()[0])


def push_all(port: int, groups: list[list[Path]]) -> list[int]:
    """One storescu per group, all at once; their exit codes."""
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", f"SCU{index:02d}", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                               *map(str, group)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=nodelay_env(), start_new_session=True)
             for index, group in enumerate(groups)]
    try:
        return [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _named(node: NodeProcess, name: str) -> set[int]:
    """Pids the node's log says *name* was started with."""
    found = set()
    for line in node.log().splitlines():
        if f"{name} started (pid " in line:
            found.add(int(line.rsplit("(pid ", 1)[1].rstrip(")")))
    return found


def test_two_receiving_processes_share_the_port_and_record_every_instance_once(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    sources = copy_as_series([bundled("CT_small.dcm")] * 40, tmp_path / "in")
    groups = [sources[i::20] for i in range(20)]  # 20 associations at once: the kernel gives each to one socket
    config = node_config(tmp_path / "var", port, settle=3600, http_port=http,
                         receivers=2, max_associations=20)  # per process; the kernel does not count
    with NodeProcess(config, tmp_path, port=port) as node:
        wait_for(lambda: "receiver-2: listening as DICOMNODE" in node.log(), 30, "the second receiver", node.log)
        assert push_all(port, groups) == [0] * 20
        wait_for(lambda: recorded(tmp_path / "var" / "jobs.sqlite") == (40, 40), 30, "40 instances recorded", node.log)
        log = node.log()
        served_by_second = sum("receiver-2: association from SCU" in line and "released" in line
                               for line in log.splitlines())
        assert 0 < served_by_second < 20  # both processes received
        metrics = requests.get(f"http://127.0.0.1:{http}/metrics", timeout=10).text
        assert "dicomnode_instances_received_total 40.0" in metrics  # the second one's counts reach /metrics
        assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 40
        pids = _named(node, "receiver-2")
        node.stop()
    assert "database is locked" not in log and "Traceback" not in log and " ERROR " not in log
    for pid in pids:  # stopped with the node
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()


def test_a_killed_receiver_is_started_again_and_the_port_keeps_answering(tmp_path: Path) -> None:
    port = free_port()
    sources = copy_as_series([bundled("CT_small.dcm")] * 20, tmp_path / "in")
    config = node_config(tmp_path / "var", port, settle=3600, receivers=2)
    with NodeProcess(config, tmp_path, port=port) as node:
        wait_for(lambda: "receiver-2: listening as DICOMNODE" in node.log(), 30, "the second receiver", node.log)
        (first,) = _named(node, "receiver-2")
        os.kill(first, signal.SIGKILL)
        assert push_all(port, [sources[i::10] for i in range(10)]) == [0] * 10  # the service's listener answers
        wait_for(lambda: len(_named(node, "receiver-2")) == 2, 30, "receiver-2 started again", node.log)
        assert f"receiver-2 (pid {first}) was killed by SIGKILL" in node.log()
        # rows are written after Success: what it spooled but had not recorded is recorded before the restart
        wait_for(lambda: "a receiver process died: 0 spooled instances it had not recorded are recorded now"
                 in node.log(), 30, "the spool recorded again", node.log)
        wait_for(lambda: node.log().count("receiver-2: listening as DICOMNODE") == 2, 30, "listening again", node.log)
        assert push_all(port, [sources[i::10] for i in range(10)]) == [0] * 10  # the same again: resends
        wait_for(lambda: recorded(tmp_path / "var" / "jobs.sqlite") == (20, 20), 30, "20 recorded once", node.log)


def test_receivers_above_one_need_the_plain_port(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\nport = 0\nreceivers = 2\n')
    with pytest.raises(ConfigError, match=r"node.toml:4: node.receivers: 2 receiving processes share the plain "
                                          r"listener's port, and port = 0 turns it off"):
        load_config(config)
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\nreceivers = 17\n')
    with pytest.raises(ConfigError, match=r"node.receivers: must be a whole number 1-16, got 17"):
        load_config(config)
