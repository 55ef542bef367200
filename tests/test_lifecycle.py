"""Study triggers, force-complete and retention, on a running node fed by dcmtk storescu."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support import NodeProcess, bundled, copy_as_series, folder_route, free_port, node_config, storescu, wait_for

pytestmark = pytest.mark.peers


def test_study_sent_as_three_series_over_three_associations_is_processed_once(tmp_path: Path) -> None:
    port = free_port()
    study = generate_uid()

    def same_study(ds, _):
        ds.StudyInstanceUID = study

    series = [copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / f"in{i}", tweak=same_study) for i in range(3)]
    config = node_config(tmp_path / "var", port, settle=0.5, study_settle_seconds=4.0,
                         extra=folder_route(tmp_path / "out", "study"))
    with NodeProcess(config, tmp_path, port=port) as node:
        for paths in series:  # three associations, 1.5 s apart: each series settles, the study does not
            assert storescu("127.0.0.1", port, paths, called_aet="DICOMNODE").returncode == 0
            time.sleep(1.5)
        assert "queued:" not in node.log()
        wait_for(lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 6, 60, "the study's 6 outputs", node.log)
        time.sleep(2)
        log = node.log()
        assert log.count("3 series queued: study settled (3 series)") == 1 and log.count("queued:") == 1
        assert log.count(" -> pipeline plain") == 3  # each series processed exactly once


def test_force_complete_processes_a_series_that_never_settles(tmp_path: Path) -> None:
    port = free_port()
    paths = copy_as_series([bundled("CT_small.dcm")] * 12, tmp_path / "in")
    config = node_config(tmp_path / "var", port, settle=3.0, force_complete_seconds=2.0,
                         extra=folder_route(tmp_path / "out"))
    with NodeProcess(config, tmp_path, port=port) as node:
        for path in paths:  # one instance every 0.5 s: never quiet for 3 s
            assert storescu("127.0.0.1", port, [path], called_aet="DICOMNODE").returncode == 0
            time.sleep(0.5)
        assert "processed anyway" in node.log()
        wait_for(lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 12, 60, "all 12 outputs in the end", node.log)


def test_retention_removes_delivered_series_and_keeps_failed_ones(tmp_path: Path) -> None:
    port = free_port()
    good = copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "good")
    plan = pydicom.dcmread(bundled("rtplan.dcm"))
    plan.SOPInstanceUID = generate_uid()
    plan.file_meta.MediaStorageSOPInstanceUID = plan.SOPInstanceUID
    plan.save_as(tmp_path / "plan.dcm")
    config = node_config(tmp_path / "var", port, settle=0.5, retention_hours=0.0005,  # 1.8 s
                         extra=folder_route(tmp_path / "out"))
    spool = tmp_path / "var" / "spool"
    with NodeProcess(config, tmp_path, port=port) as node:
        assert storescu("127.0.0.1", port, [*good, tmp_path / "plan.dcm"], called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: "delivered to out" in node.log() and "failed: no processable instance" in node.log(),
                 60, "one series delivered, one failed", node.log)
        wait_for(lambda: "retention: 1 delivered series" in node.log(), 30, "retention to run", node.log)
        remaining = list(spool.rglob("*.dcm"))
        assert [p.stem for p in remaining] == [plan.SOPInstanceUID]  # the failed one is kept
        assert not list((tmp_path / "var" / "outputs").rglob("*.dcm"))
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2  # what was delivered stays delivered
