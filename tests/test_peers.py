"""Self-test of the real-peer helpers in tests/support/peers.py (Orthanc + dcmtk)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.support import (
    OrthancServer, StoreSCP, echoscu, free_port, orthanc_fixture, require_test_data, running_orthanc, store_responses,
    storescu,
)

pytestmark = pytest.mark.peers  # the peers are required: scripts/setup --test installs them

CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
MR_SMALL = Path(get_testdata_file("MR_small.dcm", download=False))
STUDY_UID_TAG = "0020000D"

fixture_orthanc = orthanc_fixture(aet="FIXTURE")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _qido_study_uids(orthanc: OrthancServer) -> list[str]:
    r = orthanc.session.get(
        f"{orthanc.dicomweb_url}/studies",
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    r.raise_for_status()
    return [s[STUDY_UID_TAG]["Value"][0] for s in r.json()]


def test_orthanc_roundtrip_restart_and_cleanup() -> None:
    ct_study = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID

    with OrthancServer(aet="PEERTEST") as orthanc:
        pid, workdir = orthanc.pid, orthanc.workdir
        assert pid is not None and _pid_alive(pid)
        assert orthanc.http_url.startswith("http://127.0.0.1:")
        assert orthanc.dicomweb_url == orthanc.http_url + "/dicom-web"

        system = orthanc.get("/system")
        assert system["DicomAet"] == "PEERTEST"
        assert system["DicomPort"] == orthanc.dicom_port
        assert system["Version"].startswith("1.")

        # REST upload
        answer = orthanc.upload(CT_SMALL)
        assert answer["Status"] == "Success"
        assert orthanc.instances() == [answer["ID"]]

        # C-ECHO and C-STORE through dcmtk
        echo = echoscu("127.0.0.1", orthanc.dicom_port, called_aet=orthanc.aet)
        assert echo.returncode == 0, echo.stderr
        store = storescu("127.0.0.1", orthanc.dicom_port, [MR_SMALL],
                         called_aet=orthanc.aet)
        assert store.returncode == 0, store.stderr
        assert store_responses(store) == ["Success"]
        assert len(orthanc.instances()) == 2
        assert {s["MainDicomTags"]["Modality"] for s in orthanc.series()} == {"CT", "MR"}

        # QIDO-RS through the DICOMweb plugin
        assert ct_study in _qido_study_uids(orthanc)

        # Restart keeps ports and data
        ports = (orthanc.http_port, orthanc.dicom_port)
        orthanc.stop()
        assert not orthanc.running and not _pid_alive(pid)
        orthanc.start()
        assert (orthanc.http_port, orthanc.dicom_port) == ports
        assert orthanc.pid != pid
        assert len(orthanc.instances()) == 2
        assert ct_study in _qido_study_uids(orthanc)
        last_pid = orthanc.pid

    assert not _pid_alive(last_pid)
    assert not workdir.exists()


def test_orthanc_stopped_when_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with running_orthanc() as orthanc:
            pid, port = orthanc.pid, orthanc.http_port
            raise RuntimeError("boom")
    assert not _pid_alive(pid)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_orthanc_basic_auth() -> None:
    with OrthancServer(users={"alice": "secret"}) as orthanc:
        anon = requests.Session()
        anon.trust_env = False
        assert anon.get(f"{orthanc.http_url}/system", timeout=10).status_code == 401
        assert anon.get(f"{orthanc.http_url}/system", auth=("alice", "wrong"),
                        timeout=10).status_code == 401
        # the helper's own session authenticates as the first user
        assert orthanc.get("/system")["DicomAet"] == "ORTHANC"


def test_orthanc_rejects_sop_class() -> None:
    ct_class = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPClassUID
    with OrthancServer(rejected_sop_classes=[ct_class]) as orthanc:
        store = storescu("127.0.0.1", orthanc.dicom_port, [CT_SMALL, MR_SMALL],
                         called_aet=orthanc.aet, no_halt=True)
        assert store_responses(store) == ["Refused: OutOfResources", "Success"]
        series = orthanc.series()
        assert [s["MainDicomTags"]["Modality"] for s in series] == ["MR"]


def test_orthanc_store_to_modality(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "received", aet="DEST") as scp:
        with OrthancServer(modalities={"dest": ("DEST", scp.port)}) as orthanc:
            instance_id = orthanc.upload(CT_SMALL)["ID"]
            orthanc.store_to_modality("dest", [instance_id])
            files = scp.files()
            assert len(files) == 1
            received = pydicom.dcmread(files[0], stop_before_pixels=True)
            assert received.SOPInstanceUID == orthanc.instance_tags(instance_id)["SOPInstanceUID"]
            scp_pid = scp.pid
    assert not _pid_alive(scp_pid)


def test_orthanc_fixture(fixture_orthanc: OrthancServer) -> None:
    assert fixture_orthanc.running
    assert fixture_orthanc.get("/system")["DicomAet"] == "FIXTURE"
    assert fixture_orthanc.instances() == []


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_require_test_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DICOM_NODE_TEST_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="DICOM_NODE_TEST_DATA"):
        require_test_data()
    monkeypatch.setenv("DICOM_NODE_TEST_DATA", str(tmp_path))
    assert require_test_data() == tmp_path
