"""`dicom-node serve` against real peers: dcmtk storescu pushes, Orthanc receives and pushes back."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.support import (
    BRAIN, NodeProcess, OrthancServer, bundled, copy_as_series, dicom_destination, echoscu, folder_destination,
    free_port, node_config, pipeline, route, run_cli, running_orthanc, store_responses, storescu, wait_for,
)

pytestmark = pytest.mark.peers

NODE_PORT = free_port()


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    with running_orthanc(aet="ORTHANC", modalities={"node": ("DICOMNODE", NODE_PORT)}) as server:
        yield server


def pacs_config(data: Path, orthanc: OrthancServer, out: Path, **kw) -> str:
    """The node: CT through the brain window to Orthanc and to folder *out*."""
    return node_config(data, NODE_PORT, **kw, extra=pipeline("ct-brain", BRAIN)
                       + dicom_destination("pacs", orthanc.dicom_port, orthanc.aet) + folder_destination("out", out)
                       + route("ct-brain", ["pacs", "out"], match={"Modality": "CT"}))


def derived_in_orthanc(orthanc: OrthancServer, study_uid: str) -> list[dict]:
    """Orthanc's series of *study_uid* that the node derived."""
    found = []
    for series in orthanc.series():
        tags = series.get("MainDicomTags", {})
        if "[ct-brain]" in tags.get("SeriesDescription", "") and series_study(orthanc, series) == study_uid:
            found.append(series)
    return found


def series_study(orthanc: OrthancServer, series: dict) -> str:
    return orthanc.get(f"/studies/{series['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]


def folder_outputs(out: Path, study_uid: str) -> list[Path]:
    return sorted((out / study_uid).rglob("*.dcm")) if (out / study_uid).exists() else []


def test_ct_series_from_storescu_reaches_orthanc_and_folder(ct_series_dir: Path, orthanc: OrthancServer, tmp_path: Path) -> None:
    sources = copy_as_series(sorted(ct_series_dir.glob("*.dcm")), tmp_path / "in")
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    out = tmp_path / "out"
    http = free_port()
    with NodeProcess(pacs_config(tmp_path / "var", orthanc, out, http_port=http), tmp_path, port=NODE_PORT) as node:
        assert requests.get(f"http://127.0.0.1:{http}/healthz", timeout=5).status_code == 200
        result = storescu("127.0.0.1", NODE_PORT, sources, called_aet="DICOMNODE")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: len(folder_outputs(out, study)) == 28, 60, "28 outputs in the folder", node.log)
        series = wait_for(lambda: [s for s in derived_in_orthanc(orthanc, study) if len(s["Instances"]) == 28],
                          60, "28 derived instances in Orthanc", node.log)
        assert len(series) == 1
        assert list(out.rglob(".complete")), "folder delivery marks the series complete"
        sc = pydicom.dcmread(folder_outputs(out, study)[0])
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == study
        wait_for(lambda: "delivered to pacs" in node.log() and "delivered to out" in node.log(), 30,
                 "both deliveries logged", node.log)
        log = node.log()
        assert "association from STORESCU" in log and "28 instances stored" in log
        metrics = requests.get(f"http://127.0.0.1:{http}/metrics", timeout=5).text
        assert "dicomnode_instances_received_total 28" in metrics
        assert 'dicomnode_deliveries_total{destination="pacs",outcome="delivered"} 1' in metrics
        jobs = requests.get(f"http://127.0.0.1:{http}/api/jobs", timeout=5).json()
        assert any(j["state"] == "delivered" and j["instances"] == 28 for j in jobs)


def test_orthanc_pushes_to_the_node(orthanc: OrthancServer, tmp_path: Path) -> None:
    (source,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    study = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    uploaded = orthanc.upload(source)
    out = tmp_path / "out"
    with NodeProcess(pacs_config(tmp_path / "var", orthanc, out), tmp_path, port=NODE_PORT) as node:
        orthanc.store_to_modality("node", [uploaded["ID"]])
        wait_for(lambda: derived_in_orthanc(orthanc, study), 60, "the derived series back in Orthanc", node.log)
        assert "association from ORTHANC" in node.log()


def test_sigkill_during_receipt_loses_no_acknowledged_instance(ct_series_dir: Path, orthanc: OrthancServer, tmp_path: Path) -> None:
    slices = sorted(ct_series_dir.glob("*.dcm"))
    sources = copy_as_series(slices * 4, tmp_path / "in")  # 112 instances: long enough to kill midway
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    out = tmp_path / "out"
    config = pacs_config(tmp_path / "var", orthanc, out, settle=2.0)
    node = NodeProcess(config, tmp_path, port=NODE_PORT).start()
    spool = tmp_path / "var" / "spool"
    pushed: dict[str, subprocess.CompletedProcess] = {}
    sender = threading.Thread(target=lambda: pushed.setdefault(
        "result", storescu("127.0.0.1", NODE_PORT, sources, called_aet="DICOMNODE", no_halt=True)))
    sender.start()
    wait_for(lambda: len(list(spool.rglob("*.dcm"))) >= 30, 60, "30 instances spooled", node.log)
    node.kill()
    sender.join(timeout=120)
    acknowledged = store_responses(pushed["result"]).count("Success")
    assert 30 <= acknowledged < len(sources), f"{acknowledged} acknowledged: the kill must land mid-series"
    node.start()
    try:
        wait_for(lambda: len(folder_outputs(out, study)) >= acknowledged, 90,
                 f"{acknowledged} acknowledged instances delivered after restart", node.log)
        assert "spooled instances re-recorded" in node.log()
        # push everything again: the series completes, without duplicates
        again = storescu("127.0.0.1", NODE_PORT, sources, called_aet="DICOMNODE")
        assert again.returncode == 0, again.stdout + again.stderr
        wait_for(lambda: [s for s in derived_in_orthanc(orthanc, study) if len(s["Instances"]) == len(sources)],
                 120, "every instance once in Orthanc", node.log)
        wait_for(lambda: len(folder_outputs(out, study)) == len(sources), 60, "every output once in the folder", node.log)
        time.sleep(3)  # let any late reprocessing finish: still no duplicates
        assert len(folder_outputs(out, study)) == len(sources)
        assert [len(s["Instances"]) for s in derived_in_orthanc(orthanc, study)] == [len(sources)]
    finally:
        node.stop()


def test_destination_down_then_up_delivers_everything(orthanc: OrthancServer, tmp_path: Path) -> None:
    sources = copy_as_series([bundled("CT_small.dcm")] * 5, tmp_path / "in")
    study = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    with NodeProcess(pacs_config(tmp_path / "var", orthanc, tmp_path / "out"), tmp_path, port=NODE_PORT) as node:
        orthanc.stop(grace=0)
        try:
            assert storescu("127.0.0.1", NODE_PORT, sources, called_aet="DICOMNODE").returncode == 0
            wait_for(lambda: node.log().count("failed, will retry") >= 2, 60, "two failed attempts", node.log)
        finally:
            orthanc.start()
        series = wait_for(lambda: [s for s in derived_in_orthanc(orthanc, study) if len(s["Instances"]) == 5],
                          60, "all 5 derived instances after Orthanc came back", node.log)
        assert len(series) == 1
        status = run_cli("status", "--config", str(node.config_path))
        assert status.returncode == 0, status.stderr
        assert "delivered 1" in status.stdout, status.stdout


def send_datasets(port: int, datasets: list[pydicom.Dataset], *, calling: str = "HOSTILE") -> list[int | None]:
    """C-STORE datasets with pynetdicom (it sends whatever we build); the statuses, None if no answer."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "association refused"
    statuses = []
    for ds in datasets:
        reply = assoc.send_c_store(ds)
        statuses.append(int(reply.Status) if "Status" in reply else None)
    assoc.release()
    return statuses


def test_hostile_input_is_contained(orthanc: OrthancServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = pacs_config(tmp_path / "var", orthanc, out, allowed=["STORESCU", "HOSTILE", "ECHOSCU"])
    with NodeProcess(config, tmp_path, port=NODE_PORT) as node:
        def ct(tweak) -> pydicom.Dataset:
            (path,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / generate_uid()[-8:], tweak=tweak)
            return pydicom.dcmread(path)

        def truncate(ds, _):
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]

        def huge(ds, _):
            ds.Rows = ds.Columns = 65535
            ds.NumberOfFrames = 50000

        def odd_bits(ds, _):
            ds.BitsAllocated = 12

        def no_pixels(ds, _):
            del ds.PixelData

        bad = [ct(truncate), ct(huge), ct(odd_bits), ct(no_pixels)]
        plan = pydicom.dcmread(bundled("rtplan.dcm"))
        plan.SOPInstanceUID = generate_uid()
        plan.file_meta.MediaStorageSOPInstanceUID = plan.SOPInstanceUID
        evil = ct(lambda ds, _: None)
        evil.SOPInstanceUID = "1.2.3.4/../../../escape"
        statuses = send_datasets(NODE_PORT, [*bad, plan, evil])
        # stored as received, judged later in the pipeline; but a header asking for 200 TB decoded is
        # refused at once (0xC000), and so is an invalid UID (0xC211)
        assert statuses == [0, 0xC000, 0, 0, 0, 0xC211], statuses
        assert not list((tmp_path / "var").rglob("*escape*")) and not list(tmp_path.parent.rglob("escape*"))
        # a disallowed calling AE is refused at association
        assert echoscu("127.0.0.1", NODE_PORT, called_aet="DICOMNODE", calling_aet="INTRUDER").returncode != 0
        wait_for(lambda: node.log().count("failed: no processable instance") == 4, 60,
                 "the 4 hostile series stored marked failed", node.log)
        # the node is alive and still processes a good series
        good = copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "good")
        study = pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu("127.0.0.1", NODE_PORT, good, called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: len(folder_outputs(out, study)) == 2, 60, "the good series after the hostile ones", node.log)
        assert node.alive()
        log = node.log()
        assert "truncated" in log and "Bits Allocated (0028,0100) 12" in log
        assert "refused (0xC000)" in log and "above the 2,048 MB limit ([node] max_decoded_mb)" in log
        assert "RT Plan Storage" in log and "is not a valid UID" in log and "refused" in log


def test_ten_associations_at_once(orthanc: OrthancServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    studies = []
    batches = []
    for number in range(10):
        paths = copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / f"in{number}")
        studies.append(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        batches.append(paths)
    with NodeProcess(pacs_config(tmp_path / "var", orthanc, out), tmp_path, port=NODE_PORT) as node:
        results: list[subprocess.CompletedProcess] = []
        threads = [threading.Thread(target=lambda p=p: results.append(
            storescu("127.0.0.1", NODE_PORT, p, called_aet="DICOMNODE"))) for p in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results if r.returncode]
        wait_for(lambda: all(len(folder_outputs(out, s)) == 3 for s in studies), 90, "10 series processed", node.log)
        assert "database is locked" not in node.log()


def test_a_destination_refusing_the_sc_class_fails_at_once(tmp_path: Path) -> None:
    from pynetdicom.sop_class import CTImageStorage, Verification

    refusing = AE(ae_title="NOSC")
    refusing.add_supported_context(Verification)
    refusing.add_supported_context(CTImageStorage)  # CT only: the node's Secondary Captures are refused
    pacs_port = free_port()
    server = refusing.start_server(("127.0.0.1", pacs_port), block=False)
    try:
        port, http = free_port(), free_port()
        config = node_config(tmp_path / "var", port, http_port=http, extra=pipeline("plain")
                             + dicom_destination("nosc", pacs_port, "NOSC") + route("plain", ["nosc"]))
        sources = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
        with NodeProcess(config, tmp_path, port=port) as node:
            assert storescu("127.0.0.1", port, sources, called_aet="DICOMNODE").returncode == 0
            wait_for(lambda: "failed for good" in node.log(), 60, "the delivery to fail", node.log)
            (job,) = requests.get(f"http://127.0.0.1:{http}/api/jobs", timeout=5).json()
            detail = requests.get(f"http://127.0.0.1:{http}/api/jobs/{job['id']}", timeout=5).json()
            assert detail["state"] == "failed" and "abstract syntax not supported" in detail["error"]
            assert [d["attempts"] for d in detail["deliveries"]] == [1]  # permanent: not retried
            assert "will retry" not in node.log()
    finally:
        server.shutdown()
