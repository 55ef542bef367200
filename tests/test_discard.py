"""Discard routes and ``unrouted = "discard"`` on a running node fed by dcmtk storescu: a mixed feed
leaves in the spool only what is routed; discarded series stay in the job store, counted in /metrics."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests.support import (
    NodeProcess, bundled, copy_as_series, discard_route, folder_destination, free_port, node_config, pipeline, route,
    storescu, wait_for,
)

pytestmark = pytest.mark.peers

def routes(out: Path) -> str:
    """Config tables: US and MR discarded, CT rescaled to folder *out*; the rest matches no route."""
    return (pipeline("plain") + folder_destination("out", out) + discard_route({"Modality": ["US", "MR"]})
            + route("plain", ["out"], match={"Modality": "CT"}))


def _plan(folder: Path) -> Path:
    """A one-instance RT Plan series (no pixel data; no route matches it)."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = pydicom.dcmread(bundled("rtplan.dcm"))
    plan.SeriesInstanceUID = generate_uid()
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    plan.save_as(folder / "plan.dcm")
    return folder / "plan.dcm"


def _feed(tmp_path: Path, round_: int) -> dict[str, list[Path]]:
    """One round of a mixed feed: a CT series, an MR series, an US series and an RT Plan."""
    base = tmp_path / f"feed{round_}"
    return {
        "ct": copy_as_series([bundled("CT_small.dcm")] * 3, base / "ct"),
        "mr": copy_as_series([bundled("MR_small.dcm")] * 4, base / "mr"),
        "us": copy_as_series([bundled("examples_ybr_color.dcm")], base / "us"),
        "plan": [_plan(base / "plan")],
    }


def _uids(paths: list[Path]) -> tuple[str, set[str]]:
    """The Series Instance UID and the SOP Instance UIDs of *paths*."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return str(headers[0].SeriesInstanceUID), {str(h.SOPInstanceUID) for h in headers}


def _jobs(http: int) -> dict[str, str]:
    """Series Instance UID -> state, from /api/jobs."""
    return {job["series_uid"]: job["state"] for job in requests.get(f"http://127.0.0.1:{http}/api/jobs",
                                                                     timeout=10).json()}


def _metric(http: int, name: str) -> float:
    for line in requests.get(f"http://127.0.0.1:{http}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"dicomnode_{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"no dicomnode_{name} in /metrics")


def _spooled(spool: Path) -> set[str]:
    return {p.stem for p in spool.rglob("*.dcm")}


def test_mixed_feed_with_discard_routes_keeps_only_what_is_routed(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    config = node_config(tmp_path / "var", port, settle=0.5, http_port=http, unrouted="discard",
                         extra=routes(tmp_path / "out"))
    spool = tmp_path / "var" / "spool"
    routed: set[str] = set()
    with NodeProcess(config, tmp_path, port=port) as node:
        for round_ in (1, 2):  # the spool does not grow with what is dropped, round after round
            feed = _feed(tmp_path, round_)
            every = [p for paths in feed.values() for p in paths]
            sent = storescu("127.0.0.1", port, every, called_aet="DICOMNODE", extra_args=["-xy"])  # US: JPEG
            assert sent.returncode == 0, sent.stderr[-3000:] + node.log()[-3000:]
            series = {kind: _uids(paths) for kind, paths in feed.items()}
            routed |= series["ct"][1]
            expected = {series["ct"][0]: "delivered", series["mr"][0]: "discarded", series["us"][0]: "discarded",
                        series["plan"][0]: "discarded"}
            wait_for(lambda: all(_jobs(http).get(uid) == state for uid, state in expected.items()), 60,
                     f"round {round_}: CT delivered, MR, US and the plan discarded", node.log)
            assert _spooled(spool) == routed  # only the routed CT instances are kept
            assert _metric(http, "series_discarded_total") == 3 * round_
            assert _metric(http, 'queue_depth{state="discarded"}') == 3 * round_
        log = node.log()
        assert log.count("discarded: a discard route matches (Modality MR") == 2
        assert log.count("discarded: a discard route matches (Modality US") == 2
        assert log.count('discarded: no route matches and unrouted = "discard" (Modality RTPLAN') == 2
        assert "WARNING" not in log and "unrouted" not in _jobs(http).values()
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 6  # the CT outputs, delivered
        page = requests.get(f"http://127.0.0.1:{http}/?state=discarded", timeout=10).text
        assert page.count('class="state st-discarded"') == 6
        assert "source.png" not in page  # its spool files are gone: no thumbnail asked for
        assert page.count('<div class="muted" title="a discard route matches') == 4  # the reason, not an error


def test_unrouted_keep_is_the_default_beside_a_discard_route(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    config = node_config(tmp_path / "var", port, settle=0.5, http_port=http, extra=routes(tmp_path / "out"))
    feed = {
        "ct": copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / "ct"),
        "mr": copy_as_series([bundled("MR_small.dcm")] * 4, tmp_path / "mr"),
        "cr": copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "cr",
                             tweak=lambda ds, _: setattr(ds, "Modality", "CR")),
    }
    with NodeProcess(config, tmp_path, port=port) as node:
        assert storescu("127.0.0.1", port, [p for paths in feed.values() for p in paths],
                        called_aet="DICOMNODE").returncode == 0
        series = {kind: _uids(paths) for kind, paths in feed.items()}
        expected = {series["ct"][0]: "delivered", series["mr"][0]: "discarded", series["cr"][0]: "unrouted"}
        wait_for(lambda: all(_jobs(http).get(uid) == state for uid, state in expected.items()), 60,
                 "CT delivered, MR discarded, CR kept unrouted", node.log)
        assert _spooled(tmp_path / "var" / "spool") == series["ct"][1] | series["cr"][1]
        assert f"WARNING node.app.workers: series {series['cr'][0]} kept unrouted: no route matches" in node.log()
        assert _metric(http, "series_discarded_total") == 1
        assert _metric(http, 'queue_depth{state="unrouted"}') == 1


def test_retention_removes_unrouted_discarded_and_failed_series_too(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    config = node_config(tmp_path / "var", port, settle=0.5, http_port=http,
                         retention_hours=0.0005, failed_retention_hours=0.001,  # 1.8 s, 3.6 s
                         extra=routes(tmp_path / "out"))
    feed = {
        "ct": copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "ct"),
        "mr": copy_as_series([bundled("MR_small.dcm")] * 2, tmp_path / "mr"),
        "cr": copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "cr",
                             tweak=lambda ds, _: setattr(ds, "Modality", "CR")),
        "plan": [_plan(tmp_path / "plan")],  # no route: fails (no pixel data), as before
    }
    spool = tmp_path / "var" / "spool"
    with NodeProcess(config, tmp_path, port=port) as node:
        assert storescu("127.0.0.1", port, [p for paths in feed.values() for p in paths],
                        called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: len(_jobs(http)) == 4, 30, "the 4 series recorded", node.log)
        wait_for(lambda: not _jobs(http), 60, "retention to remove every series", node.log)
        assert not list(spool.rglob("*.dcm"))
        assert not list((tmp_path / "var" / "outputs").rglob("*.dcm"))
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2  # what was delivered stays delivered
        log = node.log()
        for state in ("delivered", "discarded", "unrouted", "failed"):
            assert f"1 {state} series" in log, state
        assert "(retention_hours 0.0005, failed_retention_hours 0.001)" in log
