"""Operator commands: echo, config check, log format, status and retry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.jobstore import JobStore, SeriesState
from tests.conftest import bundled, run_cli
from tests.peers import free_port, running_orthanc


@pytest.mark.peers
def test_echo_a_real_peer_and_a_closed_port() -> None:
    with running_orthanc(aet="PACS") as orthanc:
        ok = run_cli("echo", "127.0.0.1", str(orthanc.dicom_port), "--aet", "PACS")
        assert ok.returncode == 0 and "Success" in ok.stdout, ok.stdout + ok.stderr
    closed = run_cli("echo", "127.0.0.1", str(free_port()), "--aet", "PACS", "--timeout", "3")
    assert closed.returncode == 1 and "association failed" in closed.stdout


def test_config_check_prints_the_effective_config(tmp_path: Path) -> None:
    result = run_cli("config", "check", "config/orthanc.toml")
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["destinations"]["orthanc"]["kind"] == "dicom"
    assert "mediastinum" in effective["pipelines"]["ct-soft"]["does"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "DICOMNODE"\nport = "eleven"\n')
    result = run_cli("config", "check", str(bad))
    assert result.returncode == 2
    assert f"{bad}:3: node.port" in result.stderr, result.stderr


def test_json_log_format(tmp_path: Path) -> None:
    result = run_cli("--log-format", "json", "process", str(bundled("CT_small.dcm")), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["message"].startswith("done: 1 outputs") for e in entries)


def test_status_and_retry_from_the_job_store(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    jobs = JobStore(tmp_path / "var" / "jobs.sqlite", clock=lambda: 1000.0)
    src = bundled("CT_small.dcm")
    jobs.record_instance(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5", sop_class_uid="1.2",
                         path=src, size=1, modality="CT", calling_ae="SCU")
    jobs.settle(0)
    job = jobs.claim_next()
    jobs.set_outcome(job, SeriesState.FAILED, "no output: <simulated>")
    jobs.close()
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 0 and "failed 1" in status.stdout and "<simulated>" in status.stdout
    assert "MB free in" in status.stdout and "MB headroom" in status.stdout
    retried = run_cli("retry", "--all-failed", "--config", str(config))
    assert retried.returncode == 0 and "1 series queued again" in retried.stdout
    assert "queued 1" in run_cli("status", "--config", str(config)).stdout
    assert run_cli("retry", "999", "--config", str(config)).returncode == 1
