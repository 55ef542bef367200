"""A huge multi-frame object through the running node: streamed to the spool, processed frame by frame.

One ~250 MB Ultrasound Multi-frame Image (800 frames of 640x480 8-bit) is pushed with dcmtk
``storescu`` to ``dicom-node serve`` (pipeline to PNG, folder destination).  The node's peak
resident memory (``VmHWM`` of its process) must stay under 400 MB and well below the file size:
the data set is written to the spool as its PDUs arrive, never held whole, and processing reads
one frame at a time.  ``scripts/bench/huge.py`` does the same with 1 GB.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.support import (
    NodeProcess, folder_route, free_port, node_config, peak_rss, pixel_data_span, same_bytes, store_responses, storescu,
    wait_for, write_cine,
)

pytestmark = pytest.mark.peers

FRAMES = 800  # 245.8 MB of pixel data
RSS_LIMIT = 400 * 2**20


def png_config(data: Path, port: int, out: Path) -> str:
    """The node: ultrasound, rescaled, to PNG frames in folder *out*."""
    return node_config(data, port, extra=folder_route(out, None, name="frames", output="png", match={"Modality": "US"}))


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
