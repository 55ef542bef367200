"""Ingest edge cases: duplicates, resends, replacements, invalid UIDs, the disk guard, cut transfers.

Against the running node (``dicom-node serve``), and against :class:`node.receive.scp.StoreHandler` on
a real pynetdicom SCP in this process, once with data sets received in memory and once streamed
to ``<spool>/.incoming`` (:func:`node.receive.scp.enable_streamed_receive`).
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from node.receive.scp import disable_streamed_receive, enable_streamed_receive
from node.store.spool import Spool
from tests.support import (
    STORESCU_BIN, NodeProcess, bundled, copy_as_series, echoscu, folder_route, free_port, node_config, nodelay_env,
    store_responses, storescu, wait_for, write_cine,
)
from tests.support.in_process_scp import Scp, c_store, running_scp

pytestmark = pytest.mark.peers


def folder_config(tmp_path: Path, port: int, **node_keys: object) -> str:
    """The node: every series rescaled to folder ``tmp_path / "out"``; *node_keys* in ``[node]``."""
    return node_config(tmp_path / "var", port, extra=folder_route(tmp_path / "out"), **node_keys)


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


# -- the disk guard, in the running node ---------------------------------------------------------


def test_disk_guard_refuses_below_min_free_disk_then_accepts_after_restart(tmp_path: Path) -> None:
    port = free_port()
    sources = copy_as_series([bundled("CT_small.dcm")] * 3, tmp_path / "in")
    spool = tmp_path / "var" / "spool"
    above_free = shutil.disk_usage(tmp_path).free // 2**20 + 10_000
    config = folder_config(tmp_path, port, min_free_disk_mb=above_free)
    node = NodeProcess(config, tmp_path, port=port)
    with node:
        pushed = storescu("127.0.0.1", port, sources, called_aet="DICOMNODE", no_halt=True)
        assert store_responses(pushed) == ["Refused: OutOfResources"] * 3, pushed.stderr[-2000:]
        debug = storescu("127.0.0.1", port, sources[:1], called_aet="DICOMNODE", no_halt=True, extra_args=["-d"])
        assert "[disk low: " in debug.stderr and "ErrorComment" in debug.stderr  # the sender's log says why
        assert not list(spool.rglob("*.dcm")), "nothing may be spooled below min_free_disk_mb"
        assert not [p for p in spool.rglob("*") if p.is_file()], "no temporary file may be left either"
        assert echoscu("127.0.0.1", port, called_aet="DICOMNODE").returncode == 0
        wait_for(lambda: "3 refused (disk low)" in node.log(), 10, "the association's refusals logged", node.log)
    log = node.log()
    warnings = [line for line in log.splitlines() if "C-STORE refused (0xA700" in line]
    assert len(warnings) == 1, warnings  # rate-limited: one line for the four refusals
    assert f"below min_free_disk_mb = {above_free}" in warnings[0] and "MB free" in warnings[0]

    node.config_path.write_text(folder_config(tmp_path, port, min_free_disk_mb=1))
    with node:
        pushed = storescu("127.0.0.1", port, sources, called_aet="DICOMNODE", no_halt=True)
        assert store_responses(pushed) == ["Success"] * 3, pushed.stderr[-2000:]
        assert len(list(spool.rglob("*.dcm"))) == 3
        wait_for(lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 3, 60, "the series processed", node.log)


# -- StoreHandler in this process, data sets in memory and streamed --------------------------------


@pytest.fixture(params=["memory", "streamed"])
def scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scp]:
    """A pynetdicom SCP on 127.0.0.1 with a StoreHandler, receiving in memory or streamed."""
    yield from running_scp(tmp_path / request.param, streamed=request.param == "streamed")


def test_both_ways_of_receiving_spool_the_same_bytes(tmp_path: Path) -> None:
    sources = copy_as_series([bundled("CT_small.dcm"), bundled("MR_small.dcm")], tmp_path / "in")
    spooled = {}
    for streamed in (False, True):
        for scp in running_scp(tmp_path / f"streamed-{streamed}", streamed=streamed):
            assert storescu("127.0.0.1", scp.port, sources, called_aet="DICOMNODE").returncode == 0
            files = scp.spooled()
            assert len(files) == 2 and not scp.incoming
            assert {str(p) for p in files} == scp.jobs.known_paths()
            assert all(p.stat().st_mode & 0o777 == 0o644 for p in files)
            spooled[streamed] = [p.read_bytes() for p in files]
    assert spooled[False] == spooled[True]
    sent = pydicom.dcmread(sources[0])
    assert pydicom.dcmread(tmp_path / "streamed-True" / "spool" / sent.StudyInstanceUID / sent.SeriesInstanceUID
                           / f"{sent.SOPInstanceUID}.dcm").PixelData == sent.PixelData


def test_resend_identical_is_acknowledged_and_different_bytes_replace(
    scp: Scp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.scp")
    sources = copy_as_series([bundled("CT_small.dcm")] * 2, tmp_path / "in")
    assert storescu("127.0.0.1", scp.port, sources, called_aet="DICOMNODE").returncode == 0
    first = [p.read_bytes() for p in scp.spooled()]
    assert storescu("127.0.0.1", scp.port, sources[:1], called_aet="DICOMNODE").returncode == 0
    assert "identical bytes: acknowledged, nothing changed" in caplog.text
    assert [p.read_bytes() for p in scp.spooled()] == first
    changed = pydicom.dcmread(sources[0])
    changed.WindowCenter = 99
    changed.save_as(sources[0])
    assert storescu("127.0.0.1", scp.port, sources[:1], called_aet="DICOMNODE").returncode == 0
    assert "received again with different bytes: replaced" in caplog.text
    assert len(scp.spooled()) == 2 and [p.read_bytes() for p in scp.spooled()] != first
    spooled = scp.spool.path_for(changed.StudyInstanceUID, changed.SeriesInstanceUID, changed.SOPInstanceUID)
    assert pydicom.dcmread(spooled).WindowCenter == 99
    assert not scp.incoming


def test_a_header_longer_than_the_first_bytes_kept_is_read_from_the_file(
    scp: Scp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Streamed, the header is parsed from the first 64 KiB kept in memory; past them, from the file."""
    caplog.set_level(logging.WARNING)
    (path,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    ds = pydicom.dcmread(path)
    references = []
    for _ in range(1500):  # (0008,1140) comes before the UIDs of (0020,000D/E): ~120 KB of header
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = generate_uid()
        references.append(item)
    ds.ReferencedImageSequence = references
    ds.save_as(path)
    assert path.stat().st_size - len(ds.PixelData) > 64 << 10  # the header alone is longer than the head kept
    assert storescu("127.0.0.1", scp.port, [path], called_aet="DICOMNODE").returncode == 0
    (spooled,) = scp.spooled()
    assert spooled == scp.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    received = pydicom.dcmread(spooled)
    assert received.ReferencedImageSequence[-1].ReferencedSOPInstanceUID == references[-1].ReferencedSOPInstanceUID
    assert received.PixelData == ds.PixelData
    assert "Invalid value" not in caplog.text and not scp.incoming


def test_a_deflated_data_set_is_placed_and_spooled_as_sent(scp: Scp, tmp_path: Path) -> None:
    """Deflated Explicit VR Little Endian: the header is read through pydicom's inflating reader."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    (path,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    assert c_store(scp.port, ds, DeflatedExplicitVRLittleEndian, calling_ae="DEFLATER").Status == 0x0000
    (spooled,) = scp.spooled()
    assert spooled == scp.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    received = pydicom.dcmread(spooled)
    assert received.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian  # kept as sent
    assert received.PixelData == ds.PixelData and not scp.incoming


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_uid_is_refused_and_nothing_is_left(scp: Scp, tmp_path: Path) -> None:
    (path,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "1.2.3/../../escape"
    assert c_store(scp.port, ds, ds.file_meta.TransferSyntaxUID, calling_ae="HOSTILE").Status == 0xC211
    assert not scp.spooled() and not scp.incoming and not scp.jobs.known_paths()
    assert scp.handler.metrics.snapshot()["instances_refused"]["invalid_uid"] == 1
    assert not list(tmp_path.rglob("*escape*"))


def test_disk_guard_refuses_stores_nothing_and_warns_once(
    scp: Scp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.scp")
    sources = copy_as_series([bundled("CT_small.dcm")] * 5, tmp_path / "in")
    scp.handler.min_free_bytes = shutil.disk_usage(scp.spool.root).free + 2**40
    pushed = storescu("127.0.0.1", scp.port, sources, called_aet="DICOMNODE", no_halt=True)
    assert store_responses(pushed) == ["Refused: OutOfResources"] * 5
    assert not scp.spooled() and not scp.incoming and not scp.jobs.known_paths()
    assert echoscu("127.0.0.1", scp.port, called_aet="DICOMNODE").returncode == 0
    assert scp.handler.refused_low_disk == 5
    refused = scp.handler.metrics.snapshot()["instances_refused"]
    assert refused == {**refused, "disk_low": 5} and sum(refused.values()) == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "C-STORE refused" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "5 refused (disk low)" in caplog.text
    scp.handler.min_free_bytes = 1  # space again
    assert storescu("127.0.0.1", scp.port, sources, called_aet="DICOMNODE").returncode == 0
    assert len(scp.spooled()) == 5
    assert "C-STOREs accepted again; 5 refused in all" in caplog.text


@pytest.fixture(scope="module")
def cine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 61 MB multi-frame file: long enough to interrupt its transfer midway."""
    return write_cine(tmp_path_factory.mktemp("cine") / "cine.dcm", 200)


@pytest.fixture(scope="module")
def long_cine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 307 MB multi-frame file: its transfer lasts long enough (about a second here) to be cut midway
    when the test sees it under way (the 61 MB one sometimes arrived whole between two looks)."""
    return write_cine(tmp_path_factory.mktemp("long") / "cine.dcm", 1000)


def test_transfer_cut_short_leaves_nothing(long_cine: Path, tmp_path: Path) -> None:
    for scp in running_scp(tmp_path / "node", streamed=True):
        sender = subprocess.Popen(
            [STORESCU_BIN, "-aec", "DICOMNODE", "127.0.0.1", str(scp.port), str(long_cine)],
            env=nodelay_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: any(p.stat().st_size > 5e6 for p in scp.incoming), 60, "the transfer under way")
        finally:
            os.killpg(sender.pid, signal.SIGKILL)
            sender.wait(timeout=10)
        wait_for(lambda: not scp.incoming, 10, "the partly received file deleted")
        assert not scp.spooled() and not scp.jobs.known_paths()
        # and the SCP still receives
        (small,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
        assert storescu("127.0.0.1", scp.port, [small], called_aet="DICOMNODE").returncode == 0
        assert len(scp.spooled()) == 1


def test_left_over_receive_files_are_removed_at_start_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    folder = enable_streamed_receive(spool.root)
    try:
        (folder / ".recv-abc.tmp").write_bytes(b"half a data set")
        assert spool.remove_temporaries() == 1
        assert not list(folder.iterdir()) and not list(spool.walk())
    finally:
        disable_streamed_receive()


def test_disk_guard_stops_a_streamed_transfer_while_it_arrives(
    cine: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.scp")
    for scp in running_scp(tmp_path / "node", streamed=True, min_free_while_receiving=2**60):
        pushed = storescu("127.0.0.1", scp.port, [cine], called_aet="DICOMNODE", no_halt=True)
        assert store_responses(pushed) == ["Refused: OutOfResources"]
        assert not scp.spooled() and not scp.incoming and not scp.jobs.known_paths()
        assert scp.handler.refused_low_disk == 1
        assert "while the instance arrived" in caplog.text


def test_a_write_the_disk_refuses_is_answered_out_of_resources(cine: Path, tmp_path: Path) -> None:
    """A full disk while a data set streams in: 0xA700, nothing left, the association goes on."""
    (small,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    for scp in running_scp(tmp_path / "node", streamed=True):
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, limits[1]))
        try:
            pushed = storescu("127.0.0.1", scp.port, [cine, small], called_aet="DICOMNODE", no_halt=True)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)
        assert store_responses(pushed) == ["Refused: OutOfResources", "Success"], pushed.stderr[-2000:]
        assert len(scp.spooled()) == 1 and not scp.incoming


def test_adopt_from_another_filesystem_copies(tmp_path: Path) -> None:
    """The fallback when receive files are not on the spool's disk: copied, fsync'd, source removed.

    /dev/shm is tmpfs on our machines, another filesystem than the tests' temporary folder, so this
    takes the copy path there; where it is not, the same assertions hold for the rename path.
    """
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    (source,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    spool = Spool(tmp_path / "spool")
    with tempfile.NamedTemporaryFile(dir=shm, suffix=".dcm", delete=False) as handle:
        handle.write(source.read_bytes())
    stored = spool.adopt(handle.name, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert not Path(handle.name).exists()
    assert stored.path.read_bytes() == source.read_bytes() and stored.size == source.stat().st_size
    assert spool.holds_file(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, source)
    assert [item.path for item in spool.walk()] == [stored.path]


def raw_file(tmp_path: Path, name: str, transfer_syntax: str, body: bytes) -> Path:
    """A Part 10 file of CT_small's file meta (with *transfer_syntax*) followed by *body* as the data set."""
    from pynetdicom.dsutils import encode_file_meta

    meta = pydicom.dcmread(bundled("CT_small.dcm"), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / name
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
    return path


def send_as_is(port: int, items: list[pydicom.Dataset | Path]) -> list[pydicom.Dataset]:
    """C-STORE each data set, or each file's data set bytes exactly as written (never decoded), on one association."""
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom.dsutils import split_dataset

    ae = AE(ae_title="BROKEN")
    for item in items:
        meta = item.file_meta if isinstance(item, pydicom.Dataset) else split_dataset(item)[0]
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    sending_files_raw = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # this test process only (the sender): files sent as is
    try:
        return [assoc.send_c_store(item) for item in items]
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = sending_files_raw
        assoc.release()


def test_a_header_that_cannot_be_parsed_is_refused_saying_what(
    scp: Scp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    caplog.set_level(logging.INFO, logger="node.receive.scp")
    (path,) = copy_as_series([bundled("CT_small.dcm")], tmp_path / "in")
    no_study = pydicom.dcmread(path)
    del no_study.StudyInstanceUID
    noise = bytes(range(7, 250)) * 20  # not a data set in any transfer syntax
    replies = send_as_is(scp.port, [
        no_study,
        raw_file(tmp_path, "noise.dcm", ExplicitVRLittleEndian, noise),
        raw_file(tmp_path, "bad-deflate.dcm", DeflatedExplicitVRLittleEndian, noise),
    ])
    assert [int(r.Status) for r in replies] == [0xC210] * 3
    comments = [str(r.ErrorComment) for r in replies]
    assert comments[0] == "Study Instance UID (0020,000D) missing"
    assert comments[1] == "Study and Series Instance UID (0020,000D/E) missing"
    assert comments[2].startswith("cannot parse the header: ") and "decompress" in comments[2], comments[2]
    assert "is not a valid UID" not in caplog.text
    assert "C-STORE from BROKEN refused: cannot parse the data set header: Study Instance UID (0020,000D) missing" \
        in caplog.text
    assert ("cannot parse the data set header: Study Instance UID (0020,000D) and Series Instance UID (0020,000E)"
            " missing (read as Explicit VR Little Endian)") in caplog.text
    assert "cannot parse the data set header: error: Error -3 while decompressing data" in caplog.text
    assert not scp.spooled() and not scp.incoming and not scp.jobs.known_paths()
    assert scp.handler.metrics.snapshot()["instances_refused"]["cannot_parse"] == 3


def test_the_file_meta_of_streamed_files_is_pydicoms_byte_for_byte() -> None:
    """node.receive.scp writes the file meta of each streamed data set itself (pydicom took 0.25 ms each)."""
    import io

    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID, AllTransferSyntaxes
    from pynetdicom.dsutils import create_file_meta

    from node.receive.scp import _encoded_file_meta, _write_file_meta_info

    for syntax in AllTransferSyntaxes:
        for length in range(20, 65):  # odd and even lengths: padded with NUL
            uid = (generate_uid(prefix=None) + "0" * 64)[:length].rstrip(".")
            meta = create_file_meta(sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID(uid),
                                    transfer_syntax=syntax)
            expected = io.BytesIO()
            write_file_meta_info(expected, create_file_meta(sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"),
                                                            sop_instance_uid=UID(uid), transfer_syntax=syntax))
            assert _encoded_file_meta(meta) == expected.getvalue(), (syntax, uid)
    unusual = create_file_meta(sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID("1.2.3"),
                               transfer_syntax=AllTransferSyntaxes[0])
    unusual.SourceApplicationEntityTitle = "SENDER"
    assert _encoded_file_meta(unusual) is None  # anything else: pydicom writes it
    written, expected = io.BytesIO(), io.BytesIO()
    _write_file_meta_info(written, unusual)
    write_file_meta_info(expected, unusual)
    assert written.getvalue() == expected.getvalue()
