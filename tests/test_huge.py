"""A huge multi-frame object through the running node: streamed to the spool, processed frame by frame.

One ~250 MB Ultrasound Multi-frame Image (800 frames of 640x480 8-bit) is pushed with dcmtk
``storescu`` to ``dicom-node serve`` (pipeline to PNG, folder destination).  The node's peak
resident memory (``VmHWM`` of its process) must stay under 400 MB and well below the file size:
the data set is written to the spool as its PDUs arrive, never held whole, and processing reads
one frame at a time.  ``scripts/bench/huge.py`` does the same with 1 GB.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support import NodeProcess, bundled, free_port, node_config, store_responses, storescu, wait_for

pytestmark = pytest.mark.peers

ROWS, COLUMNS = 480, 640
FRAMES = 800  # 245.8 MB of pixel data
RSS_LIMIT = 400 * 2**20

_DROP = ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
         "SmallestImagePixelValue", "LargestImagePixelValue", "KVP", "SliceThickness",
         "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation")


def frame(index: int, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """Frame *index* of the generated cine: a diagonal ramp moving with the frame number."""
    y, x = np.ogrid[0:rows, 0:columns]
    return ((x + y + 3 * index) % 256).astype(np.uint8)


def write_cine(path: Path, frames: int, *, rows: int = ROWS, columns: int = COLUMNS,
               make_frame: Callable[[int, int, int], np.ndarray] = frame) -> Path:
    """Write an 8-bit MONOCHROME2 US Multi-frame Image of *frames* frames, one frame at a time.

    The header is pydicom's bundled CT_small.dcm made into ultrasound (new UIDs); Pixel Data is
    appended frame by frame after it (Explicit VR Little Endian, OB, defined length), so a 1 GB
    file costs a frame of memory to make.  ``make_frame(index, rows, columns)`` gives each frame
    (``uint8``; default :func:`frame`).
    """
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    for keyword in ("PixelData", *_DROP):
        if keyword in ds:
            delattr(ds, keyword)
    for tag in [t for t in ds.keys() if t >= 0x7FE00010]:
        del ds[tag]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.SeriesDescription = f"huge {frames} frames"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 33.3
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    length = frames * rows * columns
    length += length % 2
    with path.open("wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length))
        for index in range(frames):
            handle.write(np.ascontiguousarray(make_frame(index, rows, columns), dtype=np.uint8).tobytes())
        if (frames * rows * columns) % 2:
            handle.write(b"\x00")
    return path


def pixel_data_span(path: Path) -> tuple[int, int]:
    """(file offset, length) of the Pixel Data value, read from the header only."""
    ds = pydicom.dcmread(path, defer_size=1024)
    elem = ds.get_item("PixelData", keep_deferred=True)
    return int(elem.value_tell), int(elem.length)


def same_bytes(a: Path, a_span: tuple[int, int], b: Path, b_span: tuple[int, int], chunk: int = 1 << 22) -> bool:
    """Whether two byte ranges of two files are equal, compared a chunk at a time."""
    if a_span[1] != b_span[1]:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        fa.seek(a_span[0])
        fb.seek(b_span[0])
        left = a_span[1]
        while left:
            size = min(chunk, left)
            if fa.read(size) != fb.read(size):
                return False
            left -= size
    return True


def peak_rss(pid: int) -> int:
    """Peak resident set size (``VmHWM``) of process *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def png_config(data: Path, port: int, out: Path) -> str:
    return node_config(data, port, extra=f"""
[[pipelines]]
name = "frames"
steps = [{{ op = "rescale" }}]
output = "png"
[[destinations]]
name = "out"
kind = "folder"
path = "{out}"
[[routes]]
match = {{ Modality = "US" }}
pipeline = "frames"
destinations = ["out"]
""")


@pytest.fixture(scope="module")
def huge_cine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cine(tmp_path_factory.mktemp("huge") / "cine.dcm", FRAMES)


def test_huge_multiframe_streams_through_the_node(huge_cine: Path, tmp_path: Path) -> None:
    size = huge_cine.stat().st_size
    header = pydicom.dcmread(huge_cine, stop_before_pixels=True)
    port = free_port()
    out = tmp_path / "out"
    with NodeProcess(png_config(tmp_path / "var", port, out), tmp_path, port=port) as node:
        pushed = storescu("127.0.0.1", port, [huge_cine], called_aet="DICOMNODE", timeout=600)
        assert pushed.returncode == 0 and store_responses(pushed) == ["Success"], pushed.stderr[-2000:]
        wait_for(lambda: "delivered to out" in node.log(), 300, "the PNG frames delivered", node.log)
        rss = peak_rss(node.proc.pid)
        assert node.alive()
    pngs = sorted((out / header.StudyInstanceUID).rglob("*.png"))
    assert len(pngs) == FRAMES, f"{len(pngs)} PNG files"
    spooled = sorted((tmp_path / "var" / "spool").rglob("*.dcm"))
    assert [p.name for p in spooled] == [f"{header.SOPInstanceUID}.dcm"]
    assert not [p for p in (tmp_path / "var" / "spool").rglob("*") if p.is_file() and p not in spooled], \
        "a receive or temporary file was left behind"
    assert same_bytes(huge_cine, pixel_data_span(huge_cine), spooled[0], pixel_data_span(spooled[0])), \
        "the spooled Pixel Data differs from the Pixel Data sent"
    mb = 2**20
    print(f"\nnode peak RSS {rss / mb:.0f} MB for a {size / mb:.0f} MB file ({FRAMES} frames)")
    assert rss < RSS_LIMIT, f"node peak RSS {rss / mb:.0f} MB for a {size / mb:.0f} MB file (limit 400 MB)"
    assert rss < size * 0.75, f"node peak RSS {rss / mb:.0f} MB is not well below the {size / mb:.0f} MB file"
