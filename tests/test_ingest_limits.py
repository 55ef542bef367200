"""The decode limits at C-STORE, in :class:`node.receive.scp.StoreHandler` on a real pynetdicom SCP.

The header is read up to Bits Allocated (0028,0100) before answering: an image whose Rows x
Columns x Number of Frames x Samples per Pixel x Bits Allocated is above ``[node] max_frame_mb``
(one frame) or ``max_decoded_mb`` (all frames) is answered 0xC000 with the reason in the Error
Comment, nothing is spooled or recorded, ``too_large`` is counted and one WARNING names the SOP
Instance UID, the size and the limit.  The same in memory and streamed, in every encoding the
header can come in (explicit and implicit VR, big endian, deflated).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.imaging.source import DecodeLimits
from tests.support import bundled, copy_as_series, write_rle_ct
from tests.support.in_process_scp import Scp, c_store, running_scp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on big-endian conversion


@pytest.fixture(params=["memory", "streamed"])
def scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scp]:
    """A pynetdicom SCP on 127.0.0.1 with the default decode limits, receiving in memory or streamed."""
    yield from running_scp(tmp_path / request.param, streamed=request.param == "streamed",
                           decode_limits=DecodeLimits())


def send(port: int, ds: pydicom.Dataset, syntax: str) -> pydicom.Dataset:
    """C-STORE *ds* in transfer syntax *syntax*; the response (Status, Error Comment)."""
    syntax = pydicom.uid.UID(syntax)
    ds.file_meta.TransferSyntaxUID = syntax
    if not syntax.is_compressed:  # encoded in that syntax, as a sender holds it
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    return c_store(port, ds, syntax)


def ct(tmp_path: Path, source: str = "CT_small.dcm", **values: object) -> pydicom.Dataset:
    """A new instance of a bundled file (CT: its 128 x 128 Pixel Data) with header values changed."""
    (path,) = copy_as_series([bundled(source)], tmp_path / pydicom.uid.generate_uid())
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def refusals(scp: Scp) -> int:
    return scp.handler.metrics.snapshot()["instances_refused"]["too_large"]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian], ids=lambda s: s.name)
def test_frame_over_the_limit_is_refused_in_every_encoding(
    scp: Scp, tmp_path: Path, syntax: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.receive.scp")
    # 763 MB a frame, 32 KB of Pixel Data sent (big endian: pydicom's MR, it converts no endianness)
    source = "MR_small_bigendian.dcm" if syntax == ExplicitVRBigEndian else "CT_small.dcm"
    ds = ct(tmp_path, source, Rows=20000, Columns=20000)
    reply = send(scp.port, ds, syntax)
    assert reply.Status == 0xC000
    assert reply.ErrorComment == "frame 763 MB decoded > max_frame_mb 256"
    assert not scp.stored() and not scp.incoming and not scp.jobs.known_paths()
    assert refusals(scp) == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"C-STORE from SENDER refused (0xC000): SOP Instance {ds.SOPInstanceUID}: ")
    assert warning.endswith("one frame of Rows 20000 x Columns 20000 x 1 frame x 1 sample x 16 bits is 762.9 MB "
                            "decoded, above the 256 MB limit ([node] max_frame_mb)")
    assert str(ds.PatientName) not in caplog.text and str(ds.PatientID) not in caplog.text


def test_all_frames_over_the_limit_and_within_it(scp: Scp, tmp_path: Path) -> None:
    many = ct(tmp_path, NumberOfFrames=70000)  # 2,187.5 MB in all, 32 KB a frame
    reply = send(scp.port, many, ExplicitVRLittleEndian)
    assert reply.Status == 0xC000 and reply.ErrorComment == "image 2,188 MB decoded > max_decoded_mb 2048"
    fits = ct(tmp_path, NumberOfFrames=60000)  # 1,875 MB: accepted here (processing finds its Pixel Data short)
    assert send(scp.port, fits, ExplicitVRLittleEndian).Status == 0x0000
    normal = ct(tmp_path)
    assert send(scp.port, normal, ExplicitVRLittleEndian).Status == 0x0000
    assert len(scp.stored()) == 2 and refusals(scp) == 1


def test_the_hostile_rle_file_is_refused(scp: Scp, tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_rle_ct(tmp_path / "hostile.dcm"))
    reply = send(scp.port, ds, ds.file_meta.TransferSyntaxUID)
    assert reply.Status == 0xC000 and reply.ErrorComment == "frame 512 MB decoded > max_frame_mb 256"
    assert not scp.stored() and not scp.incoming and refusals(scp) == 1


@pytest.mark.parametrize("values", [{"Rows": None}, {"BitsAllocated": None}, {"NumberOfFrames": "0"}],
                         ids=["no Rows", "no Bits Allocated", "zero frames"])
def test_missing_or_corrupt_dimensions_are_left_to_processing(
    scp: Scp, tmp_path: Path, values: dict[str, object]
) -> None:
    """Not refused at C-STORE: the image is stored and its series fails with the reason later."""
    ds = ct(tmp_path, **{"Rows": 20000, "Columns": 20000, **values})
    assert send(scp.port, ds, ExplicitVRLittleEndian).Status == 0x0000
    assert len(scp.stored()) == 1 and refusals(scp) == 0


def test_not_an_image_is_not_checked(scp: Scp) -> None:
    ds = pydicom.dcmread(bundled("rtplan.dcm"))
    assert send(scp.port, ds, ExplicitVRLittleEndian).Status == 0x0000
    assert len(scp.stored()) == 1 and refusals(scp) == 0


def test_limits_are_the_handlers(tmp_path: Path) -> None:
    """A handler with higher limits accepts what the default refuses; without limits, nothing is checked."""
    ds = pydicom.dcmread(write_rle_ct(tmp_path / "hostile.dcm"))
    for name, limits in (("higher", DecodeLimits.from_mb(2048, 512)), ("none", None)):
        for scp in running_scp(tmp_path / name, streamed=False, decode_limits=limits):
            assert send(scp.port, ds, ds.file_meta.TransferSyntaxUID).Status == 0x0000, name
