"""Rendering a large frame a block of rows at a time: the same pixels, a fraction of the memory.

``FrameRenderer(block_pixels=N)`` renders frames of more than N pixels in blocks of whole rows,
with the statistics that per-image equalisation and the default display read from the whole
frame gathered in a first pass.  Every pipeline of :mod:`tests.support.render_cases`, with and
without the lookup table, must give identical arrays in blocks and whole; and the float
temporaries of a 4096 x 4096 frame must stay a fraction of what rendering it whole needs.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from node.imaging.source import ImageFile, UnsupportedImage
from node.config.pipeline import Pipeline
from node.process.render import FrameRenderer, row_blocks, series_bins
from tests.support import bundled
from tests.support.render_cases import (  # noqa: F401 - made_files is a fixture
    BUNDLED, PIPELINES, made_files, modality_value_shapes,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL_BLOCK = 1000  # pixels: a 128 x 128 slice in 17 blocks of 7 rows (and one of 2)


def assert_same_in_blocks(path: Path, pipeline: Pipeline) -> None:
    """Every frame of *path*: identical output rendered whole and in blocks, with and without the table."""
    image = ImageFile.open(path)
    bins, failures = series_bins(pipeline, [image])
    assert not failures
    for lookup_table in (True, False):
        whole = FrameRenderer(pipeline, image, bins, lookup_table=lookup_table, block_pixels=10**9)
        blocks = FrameRenderer(pipeline, image, bins, lookup_table=lookup_table, block_pixels=SMALL_BLOCK)
        for index, arr in enumerate(image.iter_frames()):
            try:
                expected = whole.render(arr, index)
            except (UnsupportedImage, ValueError) as exc:  # a pipeline the file cannot take fails alike in blocks
                with pytest.raises(type(exc)):
                    blocks.render(arr, index)
                continue
            got = blocks.render(arr, index)
            assert got.dtype == expected.dtype and got.shape == expected.shape, f"frame {index}"
            assert np.array_equal(got, expected), f"frame {index}: {np.count_nonzero(got != expected)} pixels differ"


@pytest.mark.parametrize("pipeline", PIPELINES, ids=str)
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files_same_in_blocks(name: str, pipeline: str) -> None:
    assert_same_in_blocks(bundled(name), PIPELINES[pipeline])


@pytest.mark.parametrize("pipeline", PIPELINES, ids=str)
@pytest.mark.parametrize("made", ["monochrome1", "fractional slope", "voi lut sequence", "modality lut sequence",
                                  "no window", "enhanced multi-frame"])
def test_made_files_same_in_blocks(made_files: dict[str, Path], made: str, pipeline: str) -> None:  # noqa: F811
    assert_same_in_blocks(made_files[made], PIPELINES[pipeline])


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "OT-PAL-8-face.dcm"])
def test_colour_same_in_blocks(data_dir: Path, name: str) -> None:
    path = next(data_dir.rglob(name))
    assert_same_in_blocks(path, Pipeline(name="colour", rescale=False))
    assert_same_in_blocks(path, Pipeline(name="grey", grey=True))


def test_rows_are_rendered_a_block_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-image equalisation of a 128 x 128 slice in blocks of 7 rows: a statistics pass, then the render."""
    image = ImageFile.open(bundled("CT_small.dcm"))
    arr = next(image.iter_frames())
    shapes = modality_value_shapes(monkeypatch)
    FrameRenderer(PIPELINES["equalise image"], image, block_pixels=SMALL_BLOCK).render(arr, 0)
    one_pass = [(7, 128)] * 18 + [(2, 128)]
    assert shapes == one_pass + one_pass


def test_row_blocks_cover_the_frame_once() -> None:
    frame = np.arange(10 * 7 * 3).reshape(10, 7, 3)
    blocks = list(row_blocks(frame, 15))  # 2 rows (14 pixels) a block
    assert [len(b) for b in blocks] == [2, 2, 2, 2, 2] and np.array_equal(np.concatenate(blocks), frame)
    assert [len(b) for b in row_blocks(frame, 3)] == [1] * 10  # at least one row
    (whole,) = row_blocks(frame, 70)
    assert whole is frame


@pytest.mark.parametrize("pipeline", ["brain", "default display", "equalise image", "channels"])
def test_temporaries_of_a_large_frame_are_a_fraction_of_it(tmp_path: Path, pipeline: str) -> None:
    """A 4096 x 4096 16-bit frame (32 MB): traced numpy memory while rendering, output included.

    Rendered whole, the peak was 144 MB (lookup table: its intp index), 209 MB (per-image
    equalisation), 336 MB (default display: float64 values) and 176 MB (3 channels, 48 MB of
    output); in blocks of 2**20 pixels, 26-38 MB and 62 MB: the output plus a few MB."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.Rows = ds.Columns = 4096
    rng = np.random.default_rng(7)
    ds.PixelData = rng.integers(-1000, 3000, size=(4096, 4096), dtype=np.int16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = ImageFile.open(path)
    arr = next(image.iter_frames())
    renderer = FrameRenderer(PIPELINES[pipeline], image)
    tracemalloc.start()
    try:
        out = renderer.render(arr, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output = out.nbytes
    assert peak < output + 48 * 2**20, f"{peak / 2**20:.0f} MB traced for a {output / 2**20:.0f} MB output"


def test_big_frames_of_a_series_are_processed_one_at_a_time(tmp_path: Path) -> None:
    """Four 64 MB frames with 4 threads: traced memory is that of about one image, not four."""
    import datetime

    from pydicom.uid import generate_uid

    from node.config.pipeline import parse_steps
    from node.app.process_series import process_series
    from node.process.series import group_series, open_images
    from tests.support import write_rle_ct

    study, series = generate_uid(), generate_uid()
    paths = [write_rle_ct(tmp_path / f"{n}.dcm", 4096, 8192, value=100 * n, study_uid=study, series_uid=series)
             for n in range(4)]
    images, failures = open_images(paths)
    assert not failures and all(image.frame_bytes == 64 * 2**20 for image in images)
    (input_series,) = group_series(images)
    tracemalloc.start()
    try:
        result = process_series(input_series, parse_steps("p", [{"op": "rescale"}], "sc"), tmp_path / "out",
                                now=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), threads=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result.outputs) == 4 and not result.failures
    # one image: its 64 MB frame decoded (and the decoder's 64 MB buffer), its 32 MB 8-bit output
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MB traced for four 64 MB frames"
