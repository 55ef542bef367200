"""Ingest edge cases against the running node: duplicates, resends, replacements."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest

from tests.conftest import bundled
from tests.node_process import NodeProcess, copy_as_series, node_config, wait_for
from tests.peers import free_port, storescu

pytestmark = pytest.mark.peers


def folder_config(tmp_path: Path, port: int) -> str:
    return node_config(tmp_path / "var", port, extra=f"""
[[pipelines]]
name = "plain"
steps = [{{ op = "rescale" }}]
[[destinations]]
name = "out"
kind = "folder"
path = "{tmp_path / 'out'}"
[[routes]]
match = {{}}
pipeline = "plain"
destinations = ["out"]
""")


def test_same_instances_from_two_associations_at_once(tmp_path: Path) -> None:
    port = free_port()
    sources = copy_as_series([bundled("CT_small.dcm")] * 50, tmp_path / "in")
    with NodeProcess(folder_config(tmp_path, port), tmp_path, port=port) as node:
        results = []
        threads = [threading.Thread(target=lambda: results.append(storescu("127.0.0.1", port, sources, called_aet="DICOMNODE")))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [r.returncode for r in results] == [0, 0]
        spooled = sorted((tmp_path / "var" / "spool").rglob("*.dcm"))
        assert len(spooled) == 50
        for path in spooled:  # each whole: parses, pixel data complete
            ds = pydicom.dcmread(path)
            assert len(ds.PixelData) == 128 * 128 * 2
        wait_for(lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 50, 60, "one derived series of 50", node.log)
        derived = {p.parent for p in (tmp_path / "out").rglob("*.dcm")}
        assert len(derived) == 1


def test_resend_identical_changes_nothing_and_different_bytes_reprocess(tmp_path: Path) -> None:
    port = free_port()
    sources = copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / "in")
    with NodeProcess(folder_config(tmp_path, port), tmp_path, port=port) as node:
        assert storescu("127.0.0.1", port, sources, called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: node.log().count("delivered to out") == 1, 60, "first delivery", node.log)
        assert storescu("127.0.0.1", port, sources[:1], called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: "identical bytes: acknowledged, nothing changed" in node.log(), 30, "resend noticed", node.log)
        changed = pydicom.dcmread(sources[0])
        changed.WindowCenter = 99  # a corrected instance: same UID, different content
        changed.save_as(sources[0])
        assert storescu("127.0.0.1", port, sources[:1], called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: node.log().count("delivered to out") == 2, 60, "reprocessed after the replacement", node.log)
        assert "received again with different bytes: replaced" in node.log()
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3  # replaced, not added
