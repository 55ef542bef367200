"""Operator commands: echo, config check, log format, status and retry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.jobstore import JobStore, SeriesState
from tests.conftest import bundled, run_cli
from tests.peers import free_port, running_orthanc
from tests.test_config import NO_SUCH_HOST, marked_line


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


def _node_toml(tmp_path: Path, node_lines: str = "", tables: str = "") -> str:
    """A config on 127.0.0.1 (free ports, data in tmp_path) with *node_lines* in [node] and *tables* after."""
    return f"""\
[node]
host = "127.0.0.1"
port = {free_port()}
data_dir = "{tmp_path / 'var'}"
{node_lines}
[http]
host = "127.0.0.1"
port = {free_port()}
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
{tables}"""


# (id, [node] lines, tables, key as printed, part of the message); the faulty line is marked "# <-"
REFUSED = [
    ("spinning-settle", "settle_seconds = 1e-300 # <-", "", "node.settle_seconds",
     "must be a number of seconds from 0.1 to 86400 (under 0.1 s"),
    ("negative-retention", "retention_hours = -0.5 # <-", "", "node.retention_hours",
     "must be 0 (keep for ever) or a number of hours"),
    ("dicom-on-the-http-port", "", "", "http.port", "and their hosts overlap (both on 127.0.0.1)"),
    ("png-to-dicom", "", '[[pipelines]]\nname = "png"\nsteps = []\noutput = "png"\n[[destinations]]\nname = "pacs"\n'
     'kind = "dicom"\nhost = "127.0.0.1"\nport = 104\nae_title = "PACS"\n[[routes]]\nmatch = {}\npipeline = "png"\n'
     'destinations = ["pacs"] # <-\n', "routes[2].destinations[1]", 'takes DICOM only, and pipeline "png" writes'),
    ("unknown-host", "", f'[[destinations]]\nname = "pacs"\nkind = "dicom"\nhost = "{NO_SUCH_HOST}" # <-\nport = 104\n'
     'ae_title = "PACS"\n', 'destinations[2] (name "pacs").host', "does not resolve: Name or service not known"),
    ("not-our-address", "", "", "node.host", "not an address of this machine"),
    ("data-dir-is-a-file", "", "", "node.data_dir", "is a file, not a folder"),
]


def _refused_config(tmp_path: Path, case: str, node_lines: str, tables: str) -> tuple[Path, str]:
    """The config of *case* in tmp_path, and the ``FILE:LINE: `` its refusal starts with."""
    text = _node_toml(tmp_path, node_lines, tables)
    lines = text.splitlines(keepends=True)
    if case == "dicom-on-the-http-port":  # [http] port = [node] port
        lines[7] = lines[2].rstrip("\n") + " # <-\n"
    elif case == "not-our-address":
        lines[1] = 'host = "203.0.113.7" # <-\n'  # RFC 5737 documentation address: never this machine's
    elif case == "data-dir-is-a-file":
        lines[3] = lines[3].rstrip("\n") + " # <-\n"
        (tmp_path / "var").write_text("a file where the data folder should be")
    text = "".join(lines)
    config = tmp_path / "node.toml"
    config.write_text(text)
    return config, f"{config}:{marked_line(text)}: "


@pytest.mark.parametrize(("case", "node_lines", "tables", "key", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_config_check_and_serve_refuse_a_config_that_cannot_work(
    tmp_path: Path, case: str, node_lines: str, tables: str, key: str, message: str
) -> None:
    config, at = _refused_config(tmp_path, case, node_lines, tables)
    check = run_cli("config", "check", str(config), timeout=60)
    lines = [line for line in check.stderr.splitlines() if line.strip()]
    assert check.returncode == 2 and len(lines) == 1 and check.stdout == "", check.stdout + check.stderr
    assert f" ERROR node.cli: {at}{key}: " in lines[0] and message in lines[0], lines[0]
    serve = run_cli("serve", "--config", str(config), timeout=60)  # refused before anything listens
    assert serve.returncode == 2, serve.stderr
    assert "Traceback" not in serve.stderr and f"{at}{key}: " in serve.stderr, serve.stderr
    assert not (tmp_path / "var").is_dir() and not (tmp_path / "out").exists()  # nothing was started
