"""Senders against real peers: Orthanc 1.10 (DIMSE + DICOMweb plugin), pynetdicom SCPs, folders.

Observed peer answers the classification relies on (asserted below):

* Orthanc 1.10 refusing a SOP class (Lua ``ReceivedInstanceFilter`` error, see
  ``tests/support/peers.py``): association accepted, C-STORE status 0xA700 (Refused:
  Out of Resources) -> transient.  Its STOW-RS answers HTTP 200 with empty
  Referenced/Failed SOP Sequences -> transient (nothing referenced).
* A pynetdicom SCP supporting only Verification + MR accepts the association
  with the CT context rejected ("abstract syntax not supported"); with no
  context accepted pynetdicom aborts the association itself -> permanent.
* Orthanc with basic auth answers HTTP 401 to a wrong password -> permanent.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from node.config import Destination, FolderDestination
from node.deliver.dicom import DicomSender, _split_runs
from node.deliver.dicomweb import DicomWebSender
from node.deliver.failures import DeliveryError, classify_http_status, classify_store_status
from node.deliver.folder import COMPLETE_MARKER, FolderSender
from node.deliver.sender import PNG_TO_DICOM
from node.deliver.senders import SENDER_KINDS, sender_for
from node.net.pynetdicom_setup import configure_pynetdicom
from tests.support import REJECTED_SOP_CLASS_STATUS, bundled, free_port, orthanc_fixture


PATIENT_NAME = "CompressedSamples^CT1"  # in CT_small.dcm: must never reach the logs

orthanc = orthanc_fixture(scope="module", name="orthanc", aet="ORTHANC")
rejecting_orthanc = orthanc_fixture(
    scope="module", name="rejecting_orthanc", aet="REJECTS", rejected_sop_classes=[CTImageStorage]
)
auth_orthanc = orthanc_fixture(scope="module", name="auth_orthanc", aet="AUTH", users={"alice": "s3cret"})


@pytest.fixture(autouse=True, scope="module")
def pynetdicom_as_the_node_sets_it() -> None:
    """pynetdicom's process-wide switches as ``dicom-node serve`` sets them at start-up."""
    configure_pynetdicom()


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class Series:
    """A few valid CT (or SC) files of one new series in one new study."""

    def __init__(self, folder: Path, count: int = 3, *, sop_class: str = CTImageStorage) -> None:
        self.study_uid = generate_uid()
        self.series_uid = generate_uid()
        self.files: list[Path] = []
        self.sop_uids: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)
        source = pydicom.dcmread(bundled("CT_small.dcm"))
        for i in range(count):
            ds = source.copy()
            ds.file_meta = source.file_meta.copy()
            ds.StudyInstanceUID = self.study_uid
            ds.SeriesInstanceUID = self.series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.InstanceNumber = i + 1
            path = folder / f"{i + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.files.append(path)
            self.sop_uids.append(ds.SOPInstanceUID)

    @property
    def uids(self) -> dict[str, str]:
        return {"study_uid": self.study_uid, "series_uid": self.series_uid}


def stored_sop_uids(server, series: Series) -> set[str]:
    """SOP Instance UIDs of ``series`` that the Orthanc ``server`` holds."""
    found = server.post(
        "/tools/find",
        json={"Level": "Instance", "Query": {"SeriesInstanceUID": series.series_uid}, "Expand": True},
    )
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}


def closed_port() -> int:
    port = free_port()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return port


@contextlib.contextmanager
def pynetdicom_scp(
    *,
    contexts: list[str],
    handler=None,
    ae_title: str = "PYSCP",
    **ae_settings,
) -> Iterator[tuple[int, object]]:
    """A pynetdicom SCP on 127.0.0.1:<free port>; yields (port, AE); always shut down."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=ae_title)
    for uid in contexts:
        ae.add_supported_context(uid)
    for key, value in ae_settings.items():
        setattr(ae, key, value)
    port = free_port()
    handlers = [(evt.EVT_C_STORE, handler)] if handler is not None else []
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield port, ae
    finally:
        server.shutdown()


def dicom_sender(port: int, called_ae: str = "ANY", timeout: float = 10.0) -> DicomSender:
    return DicomSender(host="127.0.0.1", port=port, called_ae=called_ae, calling_ae="NODE", timeout=timeout)


def send_error(sender, series: Series) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        sender.send(series.files, **series.uids)
    return info.value


# --------------------------------------------------------------------------
# classification helpers (pure functions)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, "ok"),
        (0xB000, "warning"),
        (0xB006, "warning"),
        (0xB007, "warning"),
        (0x0001, "warning"),
        (0xA700, "transient"),
        (0xA7FF, "transient"),
        (0xA900, "permanent"),
        (0xC000, "permanent"),
        (0xCFFF, "permanent"),
        (0x0122, "permanent"),  # SOP class not supported
        (0x0211, "permanent"),
        (0xFF00, "permanent"),  # pending makes no sense for C-STORE
    ],
)
def test_classify_store_status(status: int, outcome: str) -> None:
    assert classify_store_status(status) == outcome


@pytest.mark.parametrize(
    ("code", "permanent"),
    [(400, True), (401, True), (403, True), (404, True), (409, True), (413, True),
     (408, False), (429, False), (500, False), (502, False), (503, False), (504, False)],
)
def test_classify_http_status(code: int, permanent: bool) -> None:
    assert classify_http_status(code) is permanent


def test_delivery_error_attributes() -> None:
    exc = DeliveryError("dicom X@h:1: boom", permanent=True, status=0xC000)
    assert (exc.permanent, exc.transient, exc.reason, exc.status) == (True, False, "dicom X@h:1: boom", 0xC000)
    assert str(exc) == "dicom X@h:1: boom"


# --------------------------------------------------------------------------
# DicomSender
# --------------------------------------------------------------------------


def test_describe() -> None:
    assert dicom_sender(4242, "ORTHANC").describe() == "dicom ORTHANC@127.0.0.1:4242"
    assert DicomWebSender(url="http://127.0.0.1:8042/dicom-web/").describe() == (
        "dicomweb http://127.0.0.1:8042/dicom-web"
    )
    assert FolderSender(path=Path("/data/out")).describe() == "folder /data/out"


def test_dicom_sender_delivers_all(orthanc, tmp_path: Path, caplog) -> None:
    series = Series(tmp_path / "ct", 4)
    caplog.set_level(logging.INFO, logger="node.deliver.sender")
    dicom_sender(orthanc.dicom_port, orthanc.aet).send(series.files, **series.uids)
    assert stored_sop_uids(orthanc, series) == set(series.sop_uids)
    lines = [r for r in caplog.records if r.name == "node.deliver.sender"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert f"dicom ORTHANC@127.0.0.1:{orthanc.dicom_port}" in lines[0].getMessage()
    assert "4 file(s)" in lines[0].getMessage()
    assert PATIENT_NAME not in caplog.text


def test_dicom_sender_splits_a_delivery_over_several_associations(orthanc, tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 7)
    sender = DicomSender(host="127.0.0.1", port=orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="NODE",
                         associations=3)
    sender.send(series.files, **series.uids)
    assert stored_sop_uids(orthanc, series) == set(series.sop_uids)


def test_files_go_as_their_bytes_when_their_transfer_syntax_is_accepted(tmp_path: Path, monkeypatch) -> None:
    """No pydicom read and re-encode of the file (pynetdicom's default for a path): its bytes, in chunks."""
    import pynetdicom.association

    def no_read(*args, **kwargs):
        raise AssertionError("pynetdicom read the whole file")

    monkeypatch.setattr(pynetdicom.association, "dcmread", no_read)
    series = Series(tmp_path / "ct", 2)
    syntax = pydicom.dcmread(series.files[0]).file_meta.TransferSyntaxUID
    received = _received_by_a_peer_accepting(syntax, series)
    assert [ts for ts, _ in received] == [syntax] * 2
    for path, (_, data) in zip(series.files, received):
        raw = path.read_bytes()
        assert raw.endswith(data) and len(data) > len(raw) // 2  # the data set as stored, after the file meta


def test_sending_leaves_pynetdicom_switches_to_start_up(tmp_path: Path, monkeypatch) -> None:
    """A delivery never sets pynetdicom's process-wide switches; configure_pynetdicom (start-up) does."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    series = Series(tmp_path / "ct", 2)
    syntax = pydicom.dcmread(series.files[0]).file_meta.TransferSyntaxUID
    received = _received_by_a_peer_accepting(syntax, series)
    assert [ts for ts, _ in received] == [syntax] * 2  # delivered all the same (read whole and encoded again)
    assert _config.STORE_SEND_CHUNKED_DATASET is False
    configure_pynetdicom()
    assert _config.STORE_SEND_CHUNKED_DATASET is True


def test_the_node_sets_pynetdicom_switches_when_it_starts(tmp_path: Path, monkeypatch) -> None:
    from pynetdicom import _config

    from node.app.service import NodeService
    from node.config import load_config
    from tests.support import node_config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    config_path = tmp_path / "node.toml"
    config_path.write_text(node_config(tmp_path / "var", 0))  # no DICOM listener: HTTP only
    service = NodeService(load_config(config_path), role="receiver")
    assert _config.STORE_SEND_CHUNKED_DATASET is False  # not when the senders are made
    service.start()
    try:
        assert _config.STORE_SEND_CHUNKED_DATASET is True
    finally:
        service.stop()


def _received_by_a_peer_accepting(syntax: str, series: Series) -> list[tuple[str, bytes]]:
    """Send *series* to a pynetdicom SCP that accepts CT in *syntax* only: (transfer syntax, data set) received."""
    from pynetdicom import AE, evt

    received: list[tuple[str, bytes]] = []

    def handle(event):
        received.append((event.context.transfer_syntax, event.encoded_dataset(include_meta=False)))
        return 0x0000

    ae = AE(ae_title="ONESYNTAX")
    ae.add_supported_context(CTImageStorage, [syntax])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        dicom_sender(port).send(series.files, **series.uids)
    finally:
        server.shutdown()
    return received


def test_a_file_in_another_transfer_syntax_than_accepted_is_converted(tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 2)
    assert pydicom.dcmread(series.files[0]).file_meta.TransferSyntaxUID != ImplicitVRLittleEndian
    received = _received_by_a_peer_accepting(ImplicitVRLittleEndian, series)
    assert [ts for ts, _ in received] == [ImplicitVRLittleEndian] * 2
    sent = pydicom.dcmread(series.files[0])
    converted = pydicom.dcmread(DicomBytesIO(received[0][1]), force=True)  # implicit VR, no file meta
    assert converted.SOPInstanceUID == sent.SOPInstanceUID and converted.PixelData == sent.PixelData


def test_a_long_delivery_logs_its_progress(tmp_path: Path, caplog, monkeypatch) -> None:
    import node.deliver.sender

    monkeypatch.setattr(node.deliver.sender, "PROGRESS_SECONDS", 0.0)  # a line for every file but the last
    caplog.set_level(logging.INFO, logger="node.deliver.sender")
    series = Series(tmp_path / "ct", 4)
    with pynetdicom_scp(contexts=[CTImageStorage], handler=lambda event: 0x0000) as (port, _):
        DicomSender(host="127.0.0.1", port=port, called_ae="PYSCP", calling_ae="NODE", associations=2).send(
            series.files, **series.uids)
    lines = [r.getMessage() for r in caplog.records if "file(s) sent in" in r.getMessage()]
    assert len(lines) == 3 and all(f"delivery to dicom PYSCP@127.0.0.1:{port}: " in line for line in lines)
    assert sorted(int(line.split(": ")[1].split(" of ")[0]) for line in lines) == [1, 2, 3]
    assert all(" of 4 file(s) sent in " in line for line in lines)


def test_every_destination_kind_has_its_sender(tmp_path: Path) -> None:
    assert set(SENDER_KINDS) == {destination.kind for destination in typing.get_args(Destination)}
    assert isinstance(sender_for(FolderDestination(name="out", path=tmp_path)), FolderSender)
    with pytest.raises(TypeError, match="no sender for destination"):
        sender_for(object())  # type: ignore[arg-type]


def test_split_runs_keeps_order_and_never_makes_an_empty_run() -> None:
    assert _split_runs(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert _split_runs([1, 2], 4) == [[1], [2]]
    assert _split_runs([1], 1) == [[1]]


def test_one_failing_association_fails_the_delivery_and_the_others_finish(tmp_path: Path) -> None:
    """Each association is its own connection: the SCP sees several at once; one refuses its file."""
    series = Series(tmp_path / "ct", 6)
    refused = series.sop_uids[4]
    received: list[str] = []
    peers: set[int] = set()

    def handle(event):
        peers.add(event.assoc.requestor.port)
        if event.request.AffectedSOPInstanceUID == refused:
            return 0xC000
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    with pynetdicom_scp(contexts=[CTImageStorage], handler=handle) as (port, _):
        sender = DicomSender(host="127.0.0.1", port=port, called_ae="PYSCP", calling_ae="NODE", associations=3)
        exc = send_error(sender, series)
    assert exc.permanent and exc.status == 0xC000 and refused in exc.reason
    assert len(peers) == 3  # three associations from three ports
    assert sorted(received) == sorted(series.sop_uids[:4])  # the runs before the refused file's completed


def test_dicom_sender_secondary_capture(orthanc, tmp_path: Path) -> None:
    series = Series(tmp_path / "sc", 2, sop_class=SecondaryCaptureImageStorage)
    dicom_sender(orthanc.dicom_port, orthanc.aet).send(series.files, **series.uids)
    assert stored_sop_uids(orthanc, series) == set(series.sop_uids)


def test_dicom_sender_closed_port_is_transient(tmp_path: Path, caplog) -> None:
    series = Series(tmp_path / "ct", 1)
    port = closed_port()
    caplog.set_level(logging.DEBUG, logger="node.deliver.sender")
    exc = send_error(dicom_sender(port, "PACS"), series)
    assert not exc.permanent
    assert f"PACS@127.0.0.1:{port}" in exc.reason
    assert "cannot connect" in exc.reason
    # the delivery loop logs the failure with what it decided (retry or give up); the sender only at debug
    failures = [r for r in caplog.records if r.name == "node.deliver.sender"]
    assert len(failures) == 1 and failures[0].levelno == logging.DEBUG
    assert "transient" in failures[0].getMessage()


def test_dicom_sender_orthanc_out_of_resources_is_transient(rejecting_orthanc, tmp_path: Path) -> None:
    # Orthanc 1.10 cannot refuse a known SOP class at negotiation; its Lua filter error
    # makes it answer 0xA700 "Refused: Out of Resources" per instance (tests/support/peers.py).
    series = Series(tmp_path / "ct", 2)
    exc = send_error(dicom_sender(rejecting_orthanc.dicom_port, rejecting_orthanc.aet), series)
    assert not exc.permanent
    assert exc.status == REJECTED_SOP_CLASS_STATUS == 0xA700
    assert "0xA700" in exc.reason
    assert series.files[0].name in exc.reason and series.sop_uids[0] in exc.reason
    assert stored_sop_uids(rejecting_orthanc, series) == set()


def test_dicom_sender_sop_class_not_accepted_is_permanent(tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 2)
    with pynetdicom_scp(contexts=[Verification, MRImageStorage]) as (port, _):
        exc = send_error(dicom_sender(port, "PYSCP"), series)
    assert exc.permanent
    assert "CT Image Storage" in exc.reason
    assert "abstract syntax not supported" in exc.reason


def test_dicom_sender_one_refused_class_among_accepted_is_permanent(tmp_path: Path) -> None:
    """The peer accepts MR but not CT: nothing is sent, the CT file is named."""
    received: list[str] = []

    def handle(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    mr = Series(tmp_path / "mr", 1, sop_class=MRImageStorage)
    ct = Series(tmp_path / "ct", 1)
    with pynetdicom_scp(contexts=[Verification, MRImageStorage], handler=handle) as (port, _):
        with pytest.raises(DeliveryError) as info:
            dicom_sender(port).send(mr.files + ct.files, **mr.uids)
    assert info.value.permanent
    assert ct.sop_uids[0] in info.value.reason and "CT Image Storage" in info.value.reason
    assert received == []


def test_dicom_sender_failure_status_is_permanent(tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 2)
    with pynetdicom_scp(contexts=[CTImageStorage], handler=lambda event: 0xC000) as (port, _):
        exc = send_error(dicom_sender(port), series)
    assert exc.permanent
    assert exc.status == 0xC000 and "0xC000" in exc.reason
    assert series.sop_uids[0] in exc.reason


def test_dicom_sender_warning_status_is_ok(tmp_path: Path, caplog) -> None:
    series = Series(tmp_path / "ct", 2)
    caplog.set_level(logging.INFO, logger="node.deliver.sender")
    with pynetdicom_scp(contexts=[CTImageStorage], handler=lambda event: 0xB000) as (port, _):
        dicom_sender(port).send(series.files, **series.uids)
    assert "2 x 0xB000" in caplog.text


def test_dicom_sender_no_response_is_transient(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(event):
        release.wait(5)
        return 0x0000

    series = Series(tmp_path / "ct", 1)
    with pynetdicom_scp(contexts=[CTImageStorage], handler=slow) as (port, _):
        try:
            exc = send_error(dicom_sender(port, timeout=1.0), series)
        finally:
            release.set()
    assert not exc.permanent
    assert exc.status is None
    assert "no C-STORE response within 1 s" in exc.reason


def test_dicom_sender_peer_abort_is_transient(tmp_path: Path) -> None:
    def abort(event):
        event.assoc.abort()
        return 0x0000

    series = Series(tmp_path / "ct", 2)
    with pynetdicom_scp(contexts=[CTImageStorage], handler=abort) as (port, _):
        exc = send_error(dicom_sender(port, timeout=5.0), series)
    assert not exc.permanent
    assert "peer aborted the association" in exc.reason and series.sop_uids[0] in exc.reason


def test_dicom_sender_silent_peer_is_transient(tmp_path: Path) -> None:
    """A peer that accepts the TCP connection but never answers the A-ASSOCIATE-RQ."""
    series = Series(tmp_path / "ct", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        exc = send_error(dicom_sender(port, timeout=1.0), series)
    assert not exc.permanent
    assert "no answer within 1 s" in exc.reason


def test_dicom_sender_association_rejected_permanent(tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 1)
    with pynetdicom_scp(contexts=[CTImageStorage], require_called_aet=True) as (port, _):
        exc = send_error(dicom_sender(port, "WRONG"), series)
    assert exc.permanent
    assert "rejected permanent" in exc.reason.lower()


def test_dicom_sender_association_rejected_transient(tmp_path: Path) -> None:
    """pynetdicom rejects with result 2 (transient) when its association limit is reached."""
    from pynetdicom import AE

    series = Series(tmp_path / "ct", 1)
    with pynetdicom_scp(contexts=[Verification, CTImageStorage], maximum_associations=1) as (port, _):
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        held = holder.associate("127.0.0.1", port, ae_title="PYSCP")
        try:
            assert held.is_established
            exc = send_error(dicom_sender(port), series)
        finally:
            held.release()
            holder.shutdown()
    assert not exc.permanent
    assert "rejected transient" in exc.reason.lower()


def test_dicom_sender_png_is_permanent(tmp_path: Path) -> None:
    png = tmp_path / "0001.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DeliveryError) as info:
        # port is never contacted: the check comes first
        dicom_sender(closed_port()).send([png], study_uid="1.2.3", series_uid="1.2.3.4")
    assert info.value.permanent
    assert PNG_TO_DICOM in info.value.reason and "0001.png" in info.value.reason


def test_dicom_sender_empty_list_is_noop() -> None:
    dicom_sender(closed_port()).send([], study_uid="1.2.3", series_uid="1.2.3.4")


# --------------------------------------------------------------------------
# DicomWebSender
# --------------------------------------------------------------------------


def test_dicomweb_sender_delivers_in_batches(orthanc, tmp_path: Path, caplog) -> None:
    series = Series(tmp_path / "ct", 5)
    caplog.set_level(logging.INFO, logger="node.deliver.sender")
    DicomWebSender(url=orthanc.dicomweb_url, batch_size=2).send(series.files, **series.uids)
    assert stored_sop_uids(orthanc, series) == set(series.sop_uids)
    assert f"delivered 5 file(s) to dicomweb {orthanc.dicomweb_url}" in caplog.text
    assert PATIENT_NAME not in caplog.text


def test_dicomweb_sender_ignores_proxy_variables(orthanc, tmp_path: Path, monkeypatch) -> None:
    """Only the configured address: a proxy named in the environment is not used (it would fail here)."""
    dead_proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    series = Series(tmp_path / "ct", 2)
    DicomWebSender(url=orthanc.dicomweb_url).send(series.files, **series.uids)
    assert stored_sop_uids(orthanc, series) == set(series.sop_uids)


def test_dicomweb_sender_rejected_class_is_transient(rejecting_orthanc, tmp_path: Path) -> None:
    # Orthanc's DICOMweb plugin 1.7 answers HTTP 200 with empty Referenced/Failed SOP Sequences.
    series = Series(tmp_path / "ct", 2)
    exc = send_error(DicomWebSender(url=rejecting_orthanc.dicomweb_url), series)
    assert not exc.permanent
    assert "does not reference 2 of 2" in exc.reason
    assert stored_sop_uids(rejecting_orthanc, series) == set()


def test_dicomweb_sender_basic_auth(auth_orthanc, tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 2)
    exc = send_error(DicomWebSender(url=auth_orthanc.dicomweb_url, auth=("alice", "wrong")), series)
    assert exc.permanent and exc.status == 401 and "HTTP 401" in exc.reason
    exc = send_error(DicomWebSender(url=auth_orthanc.dicomweb_url, auth="some-token"), series)
    assert exc.permanent and exc.status == 401
    assert stored_sop_uids(auth_orthanc, series) == set()

    DicomWebSender(url=auth_orthanc.dicomweb_url, auth=("alice", "s3cret")).send(series.files, **series.uids)
    assert stored_sop_uids(auth_orthanc, series) == set(series.sop_uids)


def test_dicomweb_sender_unknown_path_is_permanent(orthanc, tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 1)
    exc = send_error(DicomWebSender(url=orthanc.http_url + "/no-such-root"), series)
    assert exc.permanent and exc.status == 404


def test_dicomweb_sender_wrong_study_is_permanent(orthanc, tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 1)
    with pytest.raises(DeliveryError) as info:
        DicomWebSender(url=orthanc.dicomweb_url).send(series.files, study_uid="1.2.3.4", series_uid=series.series_uid)
    assert info.value.permanent and "not 1.2.3.4" in info.value.reason


def test_dicomweb_sender_batches(tmp_path: Path) -> None:
    files = []
    for name, size in [("a.dcm", 10), ("b.dcm", 10), ("c.dcm", 10), ("d.dcm", 50), ("e.dcm", 5)]:
        (tmp_path / name).write_bytes(b"x" * size)
        files.append(tmp_path / name)
    sender = DicomWebSender(url="http://127.0.0.1:1/dicom-web", batch_size=2, max_batch_bytes=40)
    assert [[p.name for p in batch] for batch in sender._batches(files)] == [
        ["a.dcm", "b.dcm"], ["c.dcm"], ["d.dcm"], ["e.dcm"],
    ]


def test_dicomweb_sender_png_is_permanent(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DeliveryError) as info:
        DicomWebSender(url=f"http://127.0.0.1:{closed_port()}/dicom-web").send(
            [png], study_uid="1.2.3", series_uid="1.2.3.4"
        )
    assert info.value.permanent and PNG_TO_DICOM in info.value.reason


def test_destination_down_then_up(orthanc, tmp_path: Path) -> None:
    """Orthanc stopped: both senders fail transiently; after a restart the same send succeeds."""
    dimse = Series(tmp_path / "dimse", 2)
    web = Series(tmp_path / "web", 2)
    dimse_sender = dicom_sender(orthanc.dicom_port, orthanc.aet, timeout=5)
    web_sender = DicomWebSender(url=orthanc.dicomweb_url, timeout=5)
    orthanc.stop(grace=0)
    try:
        started = time.monotonic()
        exc = send_error(dimse_sender, dimse)
        assert not exc.permanent and "cannot connect" in exc.reason
        exc = send_error(web_sender, web)
        assert not exc.permanent and "ConnectionError" in exc.reason
        assert time.monotonic() - started < 5  # refused at once, no internal retries
    finally:
        orthanc.start()
    dimse_sender.send(dimse.files, **dimse.uids)
    web_sender.send(web.files, **web.uids)
    assert stored_sop_uids(orthanc, dimse) == set(dimse.sop_uids)
    assert stored_sop_uids(orthanc, web) == set(web.sop_uids)


# --------------------------------------------------------------------------
# FolderSender
# --------------------------------------------------------------------------


def test_folder_sender_copies_and_marks_complete(tmp_path: Path, caplog) -> None:
    series = Series(tmp_path / "ct", 3)
    png = tmp_path / "ct" / "preview.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    root = tmp_path / "out"
    root.mkdir()
    caplog.set_level(logging.INFO, logger="node.deliver.sender")
    FolderSender(path=root).send([*series.files, png], **series.uids)

    folder = root / series.study_uid / series.series_uid
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([COMPLETE_MARKER, "preview.png", *(f.name for f in series.files)])
    for source in [*series.files, png]:
        assert (folder / source.name).read_bytes() == source.read_bytes()
    marker = folder / COMPLETE_MARKER
    assert marker.stat().st_size == 0
    assert marker.stat().st_mtime_ns >= max((folder / f.name).stat().st_mtime_ns for f in series.files)
    assert f"delivered 4 file(s) to folder {root}" in caplog.text

    # A second delivery of the same series replaces the files and the marker.
    FolderSender(path=root).send(series.files[:1], **series.uids)
    assert marker.exists()


def test_folder_sender_path_is_a_file_is_permanent(tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 1)
    not_a_folder = tmp_path / "out"
    not_a_folder.write_text("I am a file")
    exc = send_error(FolderSender(path=not_a_folder), series)
    assert exc.permanent and "not a folder" in exc.reason

    root = tmp_path / "root"
    root.mkdir()
    (root / series.study_uid).write_text("a file where the study folder should be")
    exc = send_error(FolderSender(path=root), series)
    assert exc.permanent


def test_folder_sender_missing_root_is_transient(tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 1)
    exc = send_error(FolderSender(path=tmp_path / "unmounted"), series)
    assert not exc.permanent and "does not exist" in exc.reason
    assert not (tmp_path / "unmounted").exists()


def test_folder_sender_rejects_bad_uids(tmp_path: Path) -> None:
    series = Series(tmp_path / "ct", 1)
    (tmp_path / "out").mkdir()
    with pytest.raises(DeliveryError) as info:
        FolderSender(path=tmp_path / "out").send(series.files, study_uid="../evil", series_uid="1.2")
    assert info.value.permanent
    assert not any((tmp_path / "out").iterdir())
