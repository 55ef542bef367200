"""The HTTP endpoints over real sockets, backed by a job store filled by processing real series.

Rows are made the way the service makes them: instances spooled and recorded, settled, claimed,
processed with :func:`node.app.process_series.process_series`, delivered or failed.  The status page is also
rendered by headless Chromium; its screenshot is kept as ``test-artifacts/status-page.png``, and
the page of one series as ``test-artifacts/series-page.png``.
"""

from __future__ import annotations

import datetime
import html
import http.client
import re
import json
import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import jinja2
import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from node.app.http.pages import series_context
from node.app.http.server import StatusServer
from node.app.http.thumbnails import THUMBNAIL_SIZE
from node.store.jobstore import SeriesState
from node.telemetry.metrics import REFUSAL_REASONS, Metrics
from node.outputs.uids import derived_uid
from tests.support import (
    ROOT, NodeProcess, bundled, chromium_screenshot, copy_as_series, folder_route, free_port, node_config, run_cli,
    storescu, wait_for,
)
from tests.support.status_rows import PNG_PIPELINE, SC_PIPELINE, JobRows, png_image

CT = bundled("CT_small.dcm")
_HEADER = pydicom.dcmread(CT, stop_before_pixels=True)
PATIENT_NAME = str(_HEADER.PatientName)
PATIENT_ID = str(_HEADER.PatientID)
HOSTILE = "<script>alert('pwned')</script> & \"quoted\""
#: HOSTILE as the pages show it: Jinja2's autoescape (markupsafe) writes ' and " as &#39; and &#34;.
ESCAPED = "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; &#34;quoted&#34;"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRows]:
    node = JobRows.create(tmp_path_factory.mktemp("node"))
    jobs, root = node.jobs, node.root
    node.metrics.instance_refused("disk_low")
    node.metrics.instance_refused("disk_low")
    node.metrics.certificates_expire({"tls.cert_file": 1_800_000_000})

    # delivered: 5 CT instances -> 8-bit Secondary Captures, delivered
    job = node.processed_series("delivered", 5, SC_PIPELINE)
    (delivery,) = jobs.claim_due_deliveries()
    jobs.delivered(delivery)
    node.metrics.delivery("archive", "delivered")
    node.ids["delivered"] = job.id

    # failed in delivery: 3 instances -> PNGs; one retry, then a permanent failure with a hostile reason
    job = node.processed_series("png", 3, PNG_PIPELINE)
    (delivery,) = jobs.claim_due_deliveries()
    assert not jobs.delivery_failed(delivery, "connection refused", permanent=False, max_attempts=3, retry_in=0)
    node.metrics.delivery("archive", "retry")
    (delivery,) = jobs.claim_due_deliveries()
    assert jobs.delivery_failed(delivery, HOSTILE, permanent=True, max_attempts=3, retry_in=0)
    node.metrics.delivery("archive", "failed")
    node.ids["png"] = job.id

    # failed in processing, its instance rows pointing outside the spool
    outside = copy_as_series([CT], root / "src-outside")
    node.series_uids["outside"] = node.receive(outside, outside_spool=True)
    job = node.claim()
    assert jobs.set_outcome(job, SeriesState.FAILED, f"no processable instance: {HOSTILE}")
    node.metrics.series_failed()
    node.ids["outside"] = job.id

    # still receiving
    node.series_uids["receiving"] = node.receive(copy_as_series([CT] * 2, root / "src-receiving"))
    node.ids["receiving"] = jobs.list_series(state="receiving")[0]["id"]
    yield node
    jobs.close()


@pytest.fixture(scope="module")
def server(node: JobRows) -> Iterator[StatusServer]:
    status = node.status_server(max_delivery_attempts=3)  # as the rows were made: delivery_failed(..., max_attempts=3)
    status.start()
    yield status
    status.stop()


def get(server: StatusServer, path: str, **kwargs: object) -> requests.Response:
    return requests.get(server.url + path, timeout=30, **kwargs)


def raw_get(server: StatusServer, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """GET *path* byte for byte as given (requests would resolve "..")."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


# --------------------------------------------------------------------------- probes and metrics


def test_port_zero_picks_a_port_and_stop_closes_it(node: JobRows) -> None:
    status = StatusServer(host="127.0.0.1", port=0, jobs=node.jobs, metrics=node.metrics, outputs_dir=node.outputs,
                          spool_dir=node.spool.root, is_alive=lambda: True, is_ready=lambda: True)
    status.start()
    assert status.port > 0
    assert requests.get(status.url + "/healthz", timeout=10).status_code == 200
    status.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(status.url + "/healthz", timeout=5)
    status.stop()  # twice is harmless


def test_healthz_and_readyz_follow_the_node(node: JobRows, server: StatusServer) -> None:
    response = get(server, "/healthz")
    assert (response.status_code, response.text.strip()) == (200, "ok")
    assert get(server, "/readyz").status_code == 200
    node.ready = False
    try:
        response = get(server, "/readyz")
        assert response.status_code == 503 and "not ready" in response.text
        assert get(server, "/healthz").status_code == 200
        node.alive = False
        assert get(server, "/healthz").status_code == 503
    finally:
        node.alive = node.ready = True


def test_a_probe_that_raises_is_unhealthy(node: JobRows) -> None:
    def broken() -> bool:
        raise RuntimeError("store closed")

    status = StatusServer(host="127.0.0.1", port=0, jobs=node.jobs, metrics=node.metrics, outputs_dir=node.outputs,
                          spool_dir=node.spool.root, is_alive=broken, is_ready=broken)
    status.start()
    try:
        assert requests.get(status.url + "/healthz", timeout=10).status_code == 503
        assert requests.get(status.url + "/readyz", timeout=10).status_code == 503
    finally:
        status.stop()


def test_metrics_parse_as_prometheus_text(node: JobRows, server: StatusServer) -> None:
    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    assert families["dicomnode_instances_received"].type == "counter"
    assert samples[("dicomnode_instances_received_total", ())] == 5 + 3 + 1 + 2
    refused = {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "dicomnode_instances_refused_total"}
    assert refused == {**dict.fromkeys(REFUSAL_REASONS, 0), "disk_low": 2}
    assert samples[("dicomnode_tls_certificate_expiry_timestamp_seconds", (("certificate", "tls.cert_file"),))] == 1.8e9
    assert samples[("dicomnode_series_processed_total", ())] == 2
    assert samples[("dicomnode_series_failed_total", ())] == 1
    assert samples[("dicomnode_series_discarded_total", ())] == 0
    for outcome, value in (("delivered", 1), ("retry", 1), ("failed", 1)):
        assert samples[("dicomnode_deliveries_total", (("destination", "archive"), ("outcome", outcome)))] == value

    assert families["dicomnode_queue_depth"].type == "gauge"
    depth = {dict(k[1])["state"]: v for k, v in samples.items() if k[0] == "dicomnode_queue_depth"}
    assert depth == {
        "receiving": 1, "queued": 0, "processing": 0, "delivering": 0, "delivered": 1, "failed": 2, "unrouted": 0,
        "discarded": 0,
    }
    assert depth == {**dict.fromkeys(depth, 0), **node.jobs.counts()}
    assert list(depth) == [state.value for state in SeriesState]  # every state of the job store, in its order

    histogram = families["dicomnode_processing_seconds"]
    assert histogram.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert list(buckets) == ["0.1", "0.5", "1.0", "2.0", "5.0", "10.0", "30.0", "60.0", "+Inf"]
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert buckets["+Inf"] == samples[("dicomnode_processing_seconds_count", ())] == 2
    assert samples[("dicomnode_processing_seconds_sum", ())] > 0


def test_metrics_count_exactly_from_many_threads_and_never_raise() -> None:
    metrics = Metrics()

    def hammer() -> None:
        for n in range(2000):
            metrics.instance_received()
            metrics.delivery('pa"cs\\1\n', "retry")
            metrics.series_processed(n % 70)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrics.series_processed("not a number")  # type: ignore[arg-type]  # ignored, not raised
    metrics.series_processed(math.nan)
    metrics.delivery(None, None)  # type: ignore[arg-type]
    metrics.instance_received(object())  # type: ignore[arg-type]

    families = {f.name: f for f in text_string_to_metric_families(metrics.render({"queued": 3, "odd": 1}))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("dicomnode_instances_received_total", ())] == 16000
    assert samples[("dicomnode_deliveries_total", (("destination", 'pa"cs\\1\n'), ("outcome", "retry")))] == 16000
    assert samples[("dicomnode_processing_seconds_count", ())] == 16001  # NaN counted as 0 s
    assert samples[("dicomnode_processing_seconds_bucket", (("le", "60.0"),))] == 8 * sum(
        1 for n in range(2000) if n % 70 <= 60) + 1
    assert samples[("dicomnode_queue_depth", (("state", "queued"),))] == 3
    assert samples[("dicomnode_queue_depth", (("state", "odd"),))] == 1
    # only the states given are written: the server gives every state of the job store (the test above)
    assert not any(labels == (("state", "delivered"),) for _, labels in samples)


def test_metrics_of_two_nodes_count_apart_in_their_own_registries() -> None:
    """Each Metrics has its own registry: nothing in prometheus_client's global one, no ``_created`` series."""
    first, second = Metrics(["pacs"]), Metrics()
    first.instance_received(3)
    first.delivery("pacs", "delivered")
    second.instance_refused("too_large")

    def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(metrics.render({"queued": 2})) for s in f.samples}

    one, two = samples(first), samples(second)
    assert one[("dicomnode_instances_received_total", ())] == 3 and two[("dicomnode_instances_received_total", ())] == 0
    assert one[("dicomnode_deliveries_total", (("destination", "pacs"), ("outcome", "delivered")))] == 1
    assert not any(name == "dicomnode_deliveries_total" for name, _ in two)
    assert one[("dicomnode_instances_refused_total", (("reason", "too_large"),))] == 0
    assert two[("dicomnode_instances_refused_total", (("reason", "too_large"),))] == 1
    assert {name for name, _ in one} == {
        "dicomnode_instances_received_total", "dicomnode_instances_refused_total",
        "dicomnode_connections_refused_total", "dicomnode_series_processed_total", "dicomnode_series_failed_total",
        "dicomnode_series_discarded_total", "dicomnode_deliveries_total", "dicomnode_queue_depth",
        "dicomnode_processing_seconds_bucket", "dicomnode_processing_seconds_sum",
        "dicomnode_processing_seconds_count",
    }
    assert "_created" not in first.render()
    assert one[("dicomnode_queue_depth", (("state", "queued"),))] == 2
    assert REGISTRY.get_sample_value("dicomnode_instances_received_total") is None


# --------------------------------------------------------------------------- the job API


def test_api_jobs_lists_recent_series(node: JobRows, server: StatusServer) -> None:
    response = get(server, "/api/jobs")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    rows = response.json()
    assert isinstance(rows, list) and len(rows) == 4
    assert {row["id"] for row in rows} == set(node.ids.values())
    assert [row["updated_at"] for row in rows] == sorted((row["updated_at"] for row in rows), reverse=True)
    by_id = {row["id"]: row for row in rows}
    delivered = by_id[node.ids["delivered"]]
    assert delivered["state"] == "delivered"
    assert delivered["series_uid"] == node.series_uids["delivered"]
    assert (delivered["instances"], delivered["outputs"], delivered["pipeline"]) == (5, 5, "ct-brain")
    assert delivered["modality"] == "CT" and isinstance(delivered["last_received"], float)
    assert by_id[node.ids["png"]]["error"] == f"archive: {HOSTILE}"
    assert by_id[node.ids["receiving"]]["state"] == "receiving"

    assert len(get(server, "/api/jobs?limit=2").json()) == 2
    failed = get(server, "/api/jobs?state=failed").json()
    assert {row["id"] for row in failed} == {node.ids["png"], node.ids["outside"]}
    assert get(server, "/api/jobs?state=unrouted").json() == []


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=-1", "limit=100000", "state=bogus",
                                   "state=<script>"])
def test_api_jobs_rejects_bad_parameters(server: StatusServer, query: str) -> None:
    response = get(server, f"/api/jobs?{query}")
    assert response.status_code == 400
    assert "error" in response.json()


def test_api_job_gives_one_series_with_deliveries_and_events(node: JobRows, server: StatusServer) -> None:
    series_id = node.ids["png"]
    body = get(server, f"/api/jobs/{series_id}").json()
    assert body["id"] == series_id and body["state"] == "failed"
    assert body["series_uid"] == node.series_uids["png"]
    (delivery,) = body["deliveries"]
    assert delivery["destination"] == "archive" and delivery["state"] == "failed" and delivery["attempts"] == 2
    assert delivery["last_error"] == HOSTILE
    states = [event["state"] for event in body["events"]]
    assert states[:4] == ["receiving", "queued", "processing", "delivering"]
    assert "delivery-retry" in states and states[-1] == "failed"


@pytest.mark.parametrize("path,status", [
    ("/api/jobs/999999", 404),
    ("/api/jobs/abc", 400),
    ("/api/jobs/-1", 400),
    ("/api/jobs/1.5", 400),
    ("/api/jobs/1/../../etc/passwd", 400),
    ("/api/jobs/%2e%2e%2fjobs.sqlite", 400),
    ("/api/jobs/99999999999999999999999", 400),
    ("/nothing-here", 404),
    ("/spool/", 404),
    ("/outputs/../jobs.sqlite", 404),
])
def test_unknown_and_malformed_paths(server: StatusServer, path: str, status: int) -> None:
    code, headers, body = raw_get(server, path)  # sent as written: no client-side ".." clean-up
    assert code == status
    assert headers["Content-Type"].startswith("application/json")
    assert "error" in json.loads(body)


def test_head_and_other_methods(server: StatusServer) -> None:
    head = requests.head(server.url + "/api/jobs", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(get(server, "/api/jobs").content)
    response = requests.post(server.url + "/api/jobs", data=b"{}", timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"


# --------------------------------------------------------------------------- thumbnails


def _assert_thumbnail(picture: Image.Image) -> None:
    assert max(picture.size) <= THUMBNAIL_SIZE and min(picture.size) > 0
    low, high = picture.convert("L").getextrema()
    assert high - low > 50, f"blank thumbnail (values {low}..{high})"


@pytest.mark.parametrize("kind", ["delivered", "png"])
def test_before_and_after_thumbnails(node: JobRows, server: StatusServer, kind: str) -> None:
    series_id = node.ids[kind]
    for which in ("source", "output"):
        response = get(server, f"/thumbs/{series_id}/{which}.png")
        assert response.status_code == 200, (which, response.text[:200])
        picture = png_image(response)
        assert picture.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)  # CT_small is 128 x 128: not enlarged
        _assert_thumbnail(picture)
        assert (node.outputs / ".thumbs" / str(series_id)).is_dir()
        again = get(server, f"/thumbs/{series_id}/{which}.png")  # from the cache, byte for byte
        assert again.content == response.content


def test_after_is_the_output_of_the_before_instance(node: JobRows, server: StatusServer) -> None:
    thumbs = server.thumbnails
    for kind, pipeline in (("delivered", SC_PIPELINE), ("png", PNG_PIPELINE)):
        row = node.jobs.series(node.ids[kind])
        source = thumbs.choose_source(row["id"])
        assert source is not None
        path, sop_uid, frame = source
        count = row["instances"]
        assert pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber == count // 2 + 1  # the middle
        assert path.is_relative_to(node.spool.root) and frame == 0
        output, _ = thumbs.choose_output(row, source)
        expected = derived_uid(sop_uid, "instance", pipeline.fingerprint())
        assert output.stem == expected
    # without the pipelines a Secondary Capture is still matched, by its Source Image Sequence
    bare = StatusServer(host="127.0.0.1", port=0, jobs=node.jobs, metrics=node.metrics, outputs_dir=node.outputs,
                        spool_dir=node.spool.root, is_alive=lambda: True, is_ready=lambda: True).thumbnails
    row = node.jobs.series(node.ids["delivered"])
    source = bare.choose_source(row["id"])
    output, _ = bare.choose_output(row, source)
    referenced = pydicom.dcmread(output, stop_before_pixels=True).SourceImageSequence[0].ReferencedSOPInstanceUID
    assert referenced == source[1]


def test_thumbnails_that_cannot_be_made_are_404_images(node: JobRows, server: StatusServer) -> None:
    # no output yet; a row whose instance lies outside the spool (a real, readable DICOM file); unknown ids
    for path in (f"/thumbs/{node.ids['receiving']}/output.png", f"/thumbs/{node.ids['outside']}/source.png",
                 f"/thumbs/{node.ids['outside']}/output.png", "/thumbs/424242/source.png"):
        response = get(server, path)
        assert response.status_code == 404, path
        png_image(response)
    receiving = get(server, f"/thumbs/{node.ids['receiving']}/source.png")
    assert receiving.status_code == 200
    _assert_thumbnail(png_image(receiving))
    assert raw_get(server, "/thumbs/abc/source.png")[0] == 400
    assert raw_get(server, "/thumbs/..%2f..%2fjobs.sqlite/source.png")[0] == 400
    assert raw_get(server, "/thumbs/../source.png")[0] == 400
    assert raw_get(server, f"/thumbs/{node.ids['delivered']}/other.png")[0] == 404
    assert raw_get(server, f"/thumbs/{node.ids['delivered']}/../../jobs.sqlite")[0] == 404
    assert raw_get(server, f"/thumbs/{node.ids['delivered']}/source.png/../../../jobs.sqlite")[0] == 404


def test_output_folder_outside_outputs_is_not_read(node: JobRows, tmp_path: Path) -> None:
    """A row naming an output folder outside outputs_dir (a tampered store) gives no thumbnail."""
    row = dict(node.jobs.series(node.ids["delivered"]))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(row["output_dir"], elsewhere)
    thumbs = StatusServer(host="127.0.0.1", port=0, jobs=node.jobs, metrics=node.metrics, outputs_dir=node.outputs,
                          spool_dir=node.spool.root, is_alive=lambda: True, is_ready=lambda: True).thumbnails
    source = thumbs.choose_source(row["id"])
    assert thumbs.choose_output(row, source) is not None
    row["output_dir"] = str(elsewhere)
    assert thumbs.choose_output(row, source) is None
    row["output_dir"] = str(node.outputs / ".." / "outputs" / ".." / "spool")
    assert thumbs.choose_output(row, source) is None


# --------------------------------------------------------------------------- the page


def test_status_page(node: JobRows, server: StatusServer) -> None:
    response = get(server, "/")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none': no script
    page = response.text
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "<script" not in page.lower()
    assert html.unescape(ESCAPED) == HOSTILE
    hostile = f"no processable instance: {ESCAPED}"  # the error cell and its tooltip, both escaped
    assert f'<div class="error" title="{hostile}">{hostile}</div>' in page
    assert PATIENT_NAME not in page and PATIENT_NAME.split("^")[0] not in page and PATIENT_ID not in page
    for name, series_id in node.ids.items():
        assert f'href="/api/jobs/{series_id}"' in page, name
        assert node.series_uids[name] in page
        assert f'src="/thumbs/{series_id}/source.png?v=' in page
    for name in ("delivered", "png"):
        assert f'src="/thumbs/{node.ids[name]}/output.png?v=' in page
    assert f'/thumbs/{node.ids["receiving"]}/output.png' not in page  # nothing to show yet
    for state in ("receiving", "delivered", "failed"):
        assert f'class="state st-{state}">{state}<' in page
    assert "ct-brain" in page and "ct-wide" in page
    # every image the page names is served
    for src in {part.split('"', 1)[0] for part in page.split('src="')[1:]}:
        assert get(server, src.replace("&amp;", "&")).headers["Content-Type"] == "image/png"


def test_status_page_filters_and_rejects(node: JobRows, server: StatusServer) -> None:
    page = get(server, "/?state=failed&limit=10").text
    assert f'href="/api/jobs/{node.ids["png"]}"' in page
    assert f'href="/api/jobs/{node.ids["delivered"]}"' not in page
    assert '<a href="/?state=failed" class="current alert">' in page
    bad = get(server, "/?state=%3Cscript%3E")
    assert bad.status_code == 400 and "<script" not in bad.text
    assert get(server, "/?limit=0").status_code == 400


def test_json_has_no_patient_data(server: StatusServer) -> None:
    text = get(server, "/api/jobs").text
    assert PATIENT_NAME not in text and PATIENT_NAME.split("^")[0] not in text


def test_status_page_in_a_browser(node: JobRows, server: StatusServer, tmp_path: Path) -> None:
    """Headless Chromium renders the page (no JavaScript needed); the screenshot is kept."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    result = chromium_screenshot(server.url + "/", shot, (1280, 900), tmp_path)
    assert shot.is_file(), f"no screenshot (exit {result.returncode}):\n{result.stderr[-3000:]}"
    picture = Image.open(shot)
    picture.load()
    assert picture.size == (1280, 900)
    grey = np.asarray(picture.convert("L"))
    assert grey.std() > 10, "the screenshot is blank"
    assert len(np.unique(grey)) > 32
    # the thumbnails were drawn: the dark thumbnail boxes hold bright pixels (the CT body)
    assert (grey > 200).mean() > 0.2 and (grey < 40).mean() > 0.005


# --------------------------------------------------------------------------- the page of one series

_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} UTC")


def _fact(page: str, label: str) -> str:
    """The value shown for *label* in a series page's facts, unescaped."""
    found = re.search(rf"<dt>{re.escape(label)}</dt><dd>(.*?)</dd>", page)
    assert found, label
    return html.unescape(found.group(1))


def test_series_page_of_a_delivered_series(node: JobRows, server: StatusServer) -> None:
    series_id = node.ids["delivered"]
    response = get(server, f"/series/{series_id}")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in response.headers["Content-Security-Policy"]
    page = response.text
    row = node.jobs.series(series_id)
    assert row is not None
    assert _fact(page, "Series Instance UID") == node.series_uids["delivered"]
    assert _fact(page, "Calling AE") == "TESTSCU"
    assert _fact(page, "Route") == "ct-brain" and _fact(page, "Pipeline") == "ct-brain"
    assert _fact(page, "Instances") == "5" and _fact(page, "Outputs") == str(row["outputs"]) != "0"
    assert _fact(page, "Derived Series UID") == row["derived_series_uid"]
    first = datetime.datetime.fromtimestamp(row["first_received"], tz=datetime.timezone.utc)
    assert _fact(page, "First received") == first.strftime("%Y-%m-%d %H:%M:%S UTC")
    # the delivery: destination, state, attempts n/m with m = [delivery] max_attempts, when
    (delivery,) = row["deliveries"]
    delivered = datetime.datetime.fromtimestamp(delivery["delivered_at"], tz=datetime.timezone.utc)
    assert (f'<tr><td>archive</td><td><span class="state st-delivered">delivered</span></td><td class="num">1/3</td>'
            f'<td>{delivered:%Y-%m-%d %H:%M:%S} UTC</td>') in page
    # every event with its time
    events = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    assert [state for _, state, _ in events] == [e["state"] for e in row["events"]]
    assert all(_UTC.fullmatch(at) for at, _, _ in events) and len(events) >= 4
    assert ("delivered-to", "archive") in [(state, detail) for _, state, detail in events]
    # before/after thumbnails, served as PNG
    for kind in ("source", "output"):
        src = re.search(rf'src="(/thumbs/{series_id}/{kind}\.png\?v=[0-9a-f]+)"', page)
        assert src, kind
        assert png_image(get(server, src.group(1))).size[0] <= THUMBNAIL_SIZE
    assert '<a href="/">status</a>' in page and f'href="/api/jobs/{series_id}"' in page
    assert "<script" not in page.lower()
    assert PATIENT_NAME not in page and PATIENT_NAME.split("^")[0] not in page and PATIENT_ID not in page


def test_series_page_shows_the_peers_reason_escaped(node: JobRows, server: StatusServer) -> None:
    page = get(server, f"/series/{node.ids['png']}").text
    escaped = ESCAPED
    assert "<script" not in page.lower() and HOSTILE not in page
    assert (f'<td><span class="state st-failed">failed</span></td><td class="num">2/3</td><td>-</td><td>-</td>'
            f'<td><div class="error">{escaped}</div></td>') in page
    assert "connection refused" in page  # the first attempt's reason, in the events
    assert _fact(page, "Route") == "ct-wide"
    failed = get(server, f"/series/{node.ids['outside']}").text
    assert "<script" not in failed.lower()
    assert f'<dt>Error</dt><dd><div class="error">no processable instance: {escaped}</div></dd>' in failed
    assert "No deliveries." in failed
    receiving = get(server, f"/series/{node.ids['receiving']}").text
    assert _fact(receiving, "Route") == "-" and f"/thumbs/{node.ids['receiving']}/output.png" not in receiving


def test_status_page_links_each_series_page(node: JobRows, server: StatusServer) -> None:
    page = get(server, "/").text
    for name, series_id in node.ids.items():
        assert f'<a href="/series/{series_id}">#{series_id}</a>' in page, name
        assert get(server, f"/series/{series_id}").status_code == 200


@pytest.mark.parametrize(("path", "status"), [
    ("/series/999999", 404),
    ("/series/abc", 400),
    ("/series/-1", 400),
    ("/series/1/../../etc/passwd", 404),
    ("/series/%3Cscript%3E", 400),
    ("/series/99999999999999999999999", 400),
])
def test_series_page_of_no_series(server: StatusServer, path: str, status: int) -> None:
    code, headers, body = raw_get(server, path)
    assert code == status, path
    assert b"<script" not in body.lower()
    if status == 400:
        assert headers["Content-Type"] == "text/html; charset=utf-8" and b"whole number" in body
    elif path == "/series/999999":
        assert b"no series 999999" in body


def test_series_page_in_a_browser(node: JobRows, server: StatusServer, tmp_path: Path) -> None:
    """Headless Chromium renders one series' page with its thumbnails; the screenshot is kept."""
    shot = tmp_path / "series-page.png"
    result = chromium_screenshot(f"{server.url}/series/{node.ids['png']}", shot, (1100, 1000), tmp_path)
    assert shot.is_file(), f"no screenshot (exit {result.returncode}):\n{result.stderr[-3000:]}"
    assert shot.stat().st_size > 20_000
    picture = Image.open(shot)
    picture.load()
    assert picture.format == "PNG" and picture.size == (1100, 1000)
    grey = np.asarray(picture.convert("L"))
    assert grey.std() > 10 and len(np.unique(grey)) > 32, "the screenshot is blank"
    assert (grey < 40).mean() > 0.005  # the dark header and thumbnail boxes
    for kind in ("source", "output"):  # each thumbnail drawn pixel for pixel (the middle row of it found)
        thumb = np.asarray(png_image(get(server, f"/thumbs/{node.ids['png']}/{kind}.png")).convert("L")).astype(int)
        _assert_drawn(grey.astype(int), thumb[thumb.shape[0] // 2], kind)
    rgb = np.asarray(picture.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 50, "the failed state badge is drawn"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "series-page.png")


def test_pages_are_autoescaped_templates_each_server_loads_once(node: JobRows, server: StatusServer) -> None:
    """The templates are package files, loaded by each server; a page extending the series page is escaped too."""
    environment = server.pages.environment
    other = StatusServer(host="127.0.0.1", port=0, jobs=node.jobs, metrics=node.metrics, outputs_dir=node.outputs,
                         spool_dir=node.spool.root, is_alive=lambda: True, is_ready=lambda: True)
    assert other.pages.environment is not environment  # one per server, none global
    assert environment.autoescape is True and isinstance(environment.loader, jinja2.PackageLoader)
    shipped = sorted(p.name for p in (ROOT / "node" / "app" / "http" / "templates").iterdir())
    assert sorted(environment.list_templates()) == shipped
    assert "pictures" in environment.get_template("series.html.j2").blocks
    # what the histogram of a later change would do: add a picture to the block, its caption escaped
    child = environment.from_string(
        '{% extends "series.html.j2" %}{% block pictures %}{{ super() }}<h2>More</h2><p id="more">{{ caption }}</p>'
        "{% endblock %}")
    row = node.jobs.series(node.ids["png"])
    page = child.render(series_context(row, max_attempts=3, now=0.0), caption=HOSTILE)
    assert f'<p id="more">{ESCAPED}</p>' in page and HOSTILE not in page
    before_after, more = page.index("<h2>Outputs: before / after</h2>"), page.index('<p id="more">')
    assert before_after < more < page.index("<h2>Deliveries</h2>")
    assert f'src="/thumbs/{row["id"]}/output.png?v=' in page


def _assert_drawn(screen: np.ndarray, row: np.ndarray, what: str) -> None:
    """*row* (a line of a thumbnail's pixels) appears in *screen*, each pixel within a few grey levels."""
    windows = np.lib.stride_tricks.sliding_window_view(screen, row.size, axis=1)
    error = np.abs(windows - row).mean(axis=2)
    assert row.std() > 10, f"the {what} thumbnail is flat"
    assert error.min() < 4, f"the {what} thumbnail is not on the screenshot (closest: {error.min():.1f})"


def test_a_running_node_serves_the_series_page_with_its_delivery_attempts(tmp_path: Path) -> None:
    """The service hands ``[delivery] max_attempts`` (20 in node_config) to the page; ``status JOB`` agrees."""
    port, http_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(node_config(tmp_path / "var", port, settle=0.5, http_port=http_port,
                                  extra=folder_route(tmp_path / "out")))
    base = f"http://127.0.0.1:{http_port}"
    with NodeProcess(config.read_text(), tmp_path, port=port) as running:
        sent = storescu("127.0.0.1", port, copy_as_series([CT] * 2, tmp_path / "src"), called_aet="DICOMNODE",
                        calling_aet="MODALITY1")
        assert sent.returncode == 0, sent.stderr[-3000:]
        wait_for(lambda: [j["state"] for j in requests.get(f"{base}/api/jobs", timeout=10).json()] == ["delivered"],
                 60, "the series delivered", running.log)
        (job,) = requests.get(f"{base}/api/jobs", timeout=10).json()
        page = requests.get(f"{base}/series/{job['id']}", timeout=10).text
        status = run_cli("status", str(job["id"]), "--config", str(config), timeout=60)
    assert _fact(page, "Calling AE") == "MODALITY1" and _fact(page, "Pipeline") == "plain"
    assert '<td>out</td><td><span class="state st-delivered">delivered</span></td><td class="num">1/20</td>' in page
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"job {job['id']}: delivered" in status.stdout and "  Calling AE:          MODALITY1" in status.stdout
    assert "  out: delivered, attempts 1/20, delivered 20" in status.stdout
