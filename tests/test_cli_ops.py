"""Operator commands: echo, config check, log format, status and retry."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pydicom
import pytest

import node
from node.store.jobstore import JobStore, SeriesJob, SeriesState
from tests.support import (
    NO_SUCH_HOST, NodeProcess, bundled, discard_route, dry_run_config, env_without_config, folder_destination,
    folder_route, free_port, marked_line, node_config, pipeline, route, run_cli, running_orthanc, table,
)


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


def _cli_in(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``dicom-node ARGS`` run in *cwd* with *env* added to the environment (no $DICOM_NODE_CONFIG unless given)."""
    return run_cli(*args, timeout=120, env=env_without_config(**(env or {})), cwd=cwd)


def _series(jobs: JobStore, uid: str, path: Path, modality: str) -> SeriesJob:
    """One series of one instance (*path*), settled and claimed for processing."""
    jobs.record_instance(study_uid="1.2.3", series_uid=uid, sop_uid=f"{uid}.1", sop_class_uid="1.2", path=path,
                         size=1, modality=modality, calling_ae="SCU")
    jobs.settle(0)
    job = jobs.claim_next()
    assert job is not None and job.series_uid == uid
    return job


def test_status_and_retry_say_what_they_did_per_job(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(table("node", {"data_dir": tmp_path / "var", "max_processing_attempts": 2})
                      + table("delivery", {"max_attempts": 3}) + pipeline("plain", [])
                      + folder_destination("pacs", tmp_path / "out")
                      + route("plain", ["pacs"], match={"Modality": "MR"}))
    ct, mr = bundled("CT_small.dcm"), bundled("MR_small.dcm")
    jobs = JobStore(tmp_path / "var" / "jobs.sqlite", clock=lambda: 1000.0)
    jobs.set_outcome(_series(jobs, "1.1", ct, "CT"), SeriesState.FAILED, "no output: <simulated>")  # job 1
    delivering = _series(jobs, "1.2", mr, "MR")  # job 2: its delivery fails for good
    jobs.processed(delivering, route="r", pipeline="plain", output_dir=tmp_path / "o", derived_series_uid="2.25.1",
                   outputs=1, destinations=["pacs"], seconds=0.1)
    for _attempt in range(3):
        (delivery,) = jobs.claim_due_deliveries()
        jobs.delivery_failed(delivery, "refused", permanent=False, max_attempts=3, retry_in=-1)
    jobs.set_outcome(_series(jobs, "1.3", ct, "CT"), SeriesState.UNROUTED, "no route matches (Modality CT)")  # 3
    jobs.set_outcome(_series(jobs, "1.4", mr, "MR"), SeriesState.UNROUTED, "no route matches (Modality MR)")  # 4
    jobs.close()

    status = _cli_in(tmp_path, "status", "--config", str(config))
    assert status.returncode == 0 and "failed 2, unrouted 2" in status.stdout, status.stdout + status.stderr
    assert "<simulated>" in status.stdout and "MB free in" in status.stdout and "MB headroom" in status.stdout

    def retry(*args: str) -> tuple[int, list[str]]:
        result = _cli_in(tmp_path, "retry", *args, env={"DICOM_NODE_CONFIG": str(config)})
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout.splitlines()

    assert retry("1") == (0, ["job 1: failed (no output: <simulated>): queued for processing again, attempt 1 of 2",
                              "1 of 1 series queued again (a running node picks them up)"])
    assert retry("2") == (0, ["job 2: failed: delivery queued again, attempt 1 of 3, to pacs (failed after 3 "
                              "attempts)", "1 of 1 series queued again (a running node picks them up)"])
    assert retry("2") == (1, ["job 2: delivering, delivery to pacs: pending after attempt 0 of 3: not failed, "
                              "nothing to retry"])
    code, lines = retry("3")
    assert code == 1 and lines == [f"job 3: unrouted (no route matches (Modality CT)): not queued again: no route of "
                                   f"{config} matches it now either; add a route, restart the node with it, "
                                   "then retry"]
    assert retry("4") == (0, ["job 4: unrouted (no route matches (Modality MR)): queued for processing again, "
                              "attempt 1 of 2", "1 of 1 series queued again (a running node picks them up)"])
    assert retry("99") == (1, ["job 99: no such job (dicom-node status lists them)"])
    assert retry("--all-failed") == (0, ["no failed series: nothing to retry"])
    after = _cli_in(tmp_path, "status", "--config", str(config)).stdout
    assert "delivering 1, queued 2, unrouted 1" in after, after


def test_status_of_one_job_prints_its_facts_deliveries_and_events(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f"""[node]\ndata_dir = "{tmp_path / 'var'}"\n[delivery]\nmax_attempts = 4\n""")
    clock = [1_700_000_000.0]  # 2023-11-14 22:13:20 UTC
    jobs = JobStore(tmp_path / "var" / "jobs.sqlite", clock=lambda: clock[0])
    job = _series(jobs, "1.9", bundled("MR_small.dcm"), "MR")
    jobs.processed(job, route="mr-route", pipeline="plain", output_dir=tmp_path / "o", derived_series_uid="2.25.7",
                   outputs=3, destinations=["pacs", "share"], seconds=0.25)
    clock[0] += 60
    pacs, share = sorted(jobs.claim_due_deliveries(), key=lambda d: d.destination)
    jobs.delivered(share)
    jobs.delivery_failed(pacs, "association rejected", permanent=False, max_attempts=4, retry_in=30)
    clock[0] += 60
    (pacs,) = jobs.claim_due_deliveries()
    jobs.delivery_failed(pacs, "association rejected\n\x1b[31mby PACS", permanent=False, max_attempts=4,
                         retry_in=30)
    jobs.close()

    result = _cli_in(tmp_path, "status", "7", "--config", str(config))
    assert result.returncode == 1 and result.stdout == "job 7: no such job (dicom-node status lists them)\n", (
        result.stdout + result.stderr)
    result = _cli_in(tmp_path, "status", "1", "--config", str(config))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "job 1: delivering"
    facts = {k.strip(): v.strip() for k, _, v in (line.partition(": ") for line in lines[1:] if line.startswith("  "))
             if k.strip() and not k.strip()[0].isdigit()}
    assert facts["Series Instance UID"] == "1.9" and facts["Calling AE"] == "SCU" and facts["Modality"] == "MR"
    assert facts["Route"] == "mr-route" and facts["Pipeline"] == "plain" and facts["Outputs"] == "3"
    assert facts["First received"] == "2023-11-14 22:13:20 UTC"
    assert "  pacs: pending, attempts 2/4, next attempt 2023-11-14 22:15:50 UTC, last error: association " \
           "rejected??[31mby PACS" in lines
    assert "  share: delivered, attempts 1/4, delivered 2023-11-14 22:14:20 UTC" in lines
    events = lines[lines.index("events:") + 1:]
    assert events[0] == "  2023-11-14 22:13:20 UTC  receiving  first instance from SCU"
    assert "  2023-11-14 22:15:20 UTC  delivery-retry  pacs: attempt 2 failed, retry in 30 s: association " \
           "rejected??[31mby PACS" in events
    assert "\x1b" not in result.stdout


def test_operator_commands_refuse_a_missing_job_store(tmp_path: Path) -> None:
    store = tmp_path / "var" / "jobs.sqlite"
    for command, says in (
        (["status"], "no job store here (status reads the store"),
        (["retry", "7"], "no job store here (retry reads the store"),
        (["retry", "--all-failed"], "no job store here (retry reads the store"),
        (["store", "rebuild"], f"no job store and no spool {tmp_path / 'var' / 'spool'} here ("),
    ):
        result = _cli_in(tmp_path, *command)  # --config forgotten: the embedded default's data_dir "var"
        assert result.returncode == 3 and result.stdout == "", result.stdout + result.stderr
        (line,) = result.stderr.splitlines()
        assert f"{store}: {says}" in line, line
        assert "config: <embedded default>" in line and "--config FILE or $DICOM_NODE_CONFIG" in line, line
        assert not (tmp_path / "var").exists()  # nothing created


def test_config_from_the_environment_options_after_the_subcommand_and_version(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nae_title = "FROMENV"\n')
    check = _cli_in(tmp_path, "config", "check", env={"DICOM_NODE_CONFIG": str(config)})
    assert check.returncode == 0 and check.stderr == f"{config}: OK\n", check.stderr
    assert json.loads(check.stdout)["node"]["ae_title"] == "FROMENV"
    status = _cli_in(tmp_path, "status", "--log-level", "ERROR", "--log-format", "json",
                     env={"DICOM_NODE_CONFIG": str(tmp_path / "missing.toml")})
    assert status.returncode == 2, status.stderr  # $DICOM_NODE_CONFIG read; json although given after "status"
    assert json.loads(status.stderr)["message"].startswith(f"{tmp_path / 'missing.toml'}: ")
    before = _cli_in(tmp_path, "--log-format", "json", "status", "--config", str(tmp_path / "missing.toml"))
    assert json.loads(before.stderr)["level"] == "ERROR"
    version = _cli_in(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dicom-node {node.__version__}"


def _node_toml(tmp_path: Path, node_lines: str = "", tables: str = "") -> str:
    """A config on 127.0.0.1 (free ports, data in tmp_path) with *node_lines* in [node] and *tables* after.

    Its first eight lines are written out: :func:`_refused_config` marks some of them by number.
    """
    return f"""\
[node]
host = "127.0.0.1"
port = {free_port()}
data_dir = "{tmp_path / 'var'}"
{node_lines}
[http]
host = "127.0.0.1"
port = {free_port()}
""" + folder_route(tmp_path / "out", None, output=None) + tables


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
    assert f" ERROR node.app.cli: {at}{key}: " in lines[0] and message in lines[0], lines[0]
    serve = run_cli("serve", "--config", str(config), timeout=60)  # refused before anything listens
    assert serve.returncode == 2, serve.stderr
    assert "Traceback" not in serve.stderr and f"{at}{key}: " in serve.stderr, serve.stderr
    assert not (tmp_path / "var").is_dir() and not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.parametrize("shared", ["node.port", "http.port"])
def test_a_port_in_use_ends_serve_with_one_line_naming_the_listener(tmp_path: Path, shared: str) -> None:
    port, http_port = free_port(), free_port()
    (tmp_path / "first").mkdir()
    with NodeProcess(node_config(tmp_path / "first" / "var", port, http_port=http_port), tmp_path / "first",
                     port=port):
        second = tmp_path / "second.toml"  # its own data_dir; one port of the first node
        second.write_text(node_config(tmp_path / "second", port if shared == "node.port" else free_port(),
                                      http_port=http_port if shared == "http.port" else free_port()))
        result = run_cli("serve", "--config", str(second), timeout=60)
    listener, used = ("the DICOM listener", port) if shared == "node.port" else ("the HTTP listener", http_port)
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0].endswith(
        f"ERROR node.app.cli: {second}: {shared}: {listener} cannot listen on 127.0.0.1:{used}: the port is in use "
        f"(another dicom-node, or another program: `ss -ltnp 'sport = :{used}'` names it); stop it or choose "
        "another port"), result.stderr


@pytest.mark.peers
def test_the_readme_push_sends_every_dicom_file_of_a_mixed_folder(tmp_path: Path, data_dir: Path) -> None:
    """The README's dcmsend command, run as written on the shared data folder (JPEG 2000, JPEG-LS, RLE,
    JPEG lossless, uncompressed; README and LICENSE files; a cut-short file)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"`(dcmsend [^`]*11112 FOLDER)`", readme.replace("\n", " "))
    assert command, "the README's dcmsend example"
    port = free_port()
    args = command.group(1).replace("11112", str(port)).replace("FOLDER", str(data_dir)).split()
    dicom = [p for p in data_dir.rglob("*") if p.is_file() and _has_file_meta(p)]
    cut_short = data_dir / "broken" / "emri_small_jpeg_2k_lossless_too_short.dcm"
    with NodeProcess(node_config(tmp_path / "var", port, extra=folder_route(tmp_path / "out")), tmp_path, port=port):
        sent = subprocess.run(["/usr/bin/dcmsend", "-v", *args[1:]], capture_output=True, text=True, timeout=300)
    summary = sent.stdout + sent.stderr
    assert sent.returncode == 0, summary[-3000:]
    assert f"Number of SOP instances  : {len(dicom)}\n" in summary, summary[-3000:]
    assert f"* with status SUCCESS  : {len(dicom) - 1}\n" in summary and "NOT sent to the peer   : 1\n" in summary
    assert f"cannot send SOP instance from file: {cut_short}" in summary
    assert f"bad DICOM file: {data_dir / 'README.md'}: File meta information header missing, ignoring" in summary
    jobs = JobStore(tmp_path / "var" / "jobs.sqlite")
    try:
        assert sum(row["instances"] for row in jobs.list_series(limit=1000)) == len(dicom) - 1
    finally:
        jobs.close()


def _has_file_meta(path: Path) -> bool:
    """Whether *path* starts as a DICOM Part 10 file (preamble and "DICM")."""
    with path.open("rb") as file:
        return file.read(132)[128:] == b"DICM"


def test_route_prints_per_series_what_the_node_would_do(tmp_path: Path, ct_series_dir: Path) -> None:
    ct_small, mr, rgb = bundled("CT_small.dcm"), bundled("MR_small.dcm"), bundled("SC_rgb_small_odd.dcm")
    uid = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in (ct_small, mr, rgb)}
    head = pydicom.dcmread(next(ct_series_dir.glob("*.dcm")), stop_before_pixels=True)
    config = dry_run_config(tmp_path)
    result = _cli_in(tmp_path, "route", "--config", str(config), str(ct_small), str(mr), str(rgb), str(ct_series_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"{uid[ct_small].SeriesInstanceUID} CT 1 instance -> route 3 (match Modality = 'CT', PatientName = '*'): "
        "pipeline plainpng -> destinations archive",
        f"{uid[mr].SeriesInstanceUID} MR 1 instance -> discarded by route 1 (match Modality = 'MR')",
        f"{uid[rgb].SeriesInstanceUID} OT 1 instance -> no route: kept unrouted; route 1: Modality 'OT' is not 'MR'; "
        "route 2: Modality 'OT' is not 'CT'; route 3: Modality 'OT' is not 'CT'",
        f"{head.SeriesInstanceUID} CT 28 instances -> route 2 (match Modality = 'CT', BodyPartExamined = 'HEAD'): "
        "pipeline brain -> destinations pacs, archive",
    ]
    assert "LICENSE: not DICOM" in result.stderr  # the licence file beside the CT series: skipped, named
    assert not (tmp_path / "data").exists()  # nothing spooled, processed or sent
    # [node] unrouted = "discard" from $DICOM_NODE_CONFIG; a failing match on a patient attribute shows no value
    anonymous = tmp_path / "anon.dcm"
    ds = pydicom.dcmread(ct_small)
    del ds.PatientName
    ds.save_as(anonymous)
    (tmp_path / "d").mkdir()
    discarding = dry_run_config(tmp_path / "d", unrouted="discard")
    result = _cli_in(tmp_path, "route", str(rgb), str(anonymous), env={"DICOM_NODE_CONFIG": str(discarding)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{uid[rgb].SeriesInstanceUID} OT 1 instance -> no route: discarded ([node] unrouted = \"discard\"); "
        "route 1: Modality 'OT' is not 'MR'; route 2: Modality 'OT' is not 'CT'; route 3: Modality 'OT' is not 'CT'",
        f"{uid[ct_small].SeriesInstanceUID} CT 1 instance -> no route: discarded ([node] unrouted = \"discard\"); "
        "route 1: Modality 'CT' is not 'MR'; route 2: BodyPartExamined absent is not 'HEAD'; "
        "route 3: PatientName absent is not '*'",
    ]
    by_name = tmp_path / "by_name.toml"
    by_name.write_text(table("node", {"data_dir": tmp_path / "data"}) + discard_route({"PatientName": ["NOBODY"]}))
    shown = _cli_in(tmp_path, "route", "--config", str(by_name), str(ct_small))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.endswith("-> no route: kept unrouted; route 1: PatientName (value not shown) is not 'NOBODY'\n")
    assert str(uid[ct_small].PatientName) not in shown.stdout + shown.stderr
