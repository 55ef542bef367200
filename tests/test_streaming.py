"""Multi-frame files stream: memory stays a few frames, never the decoded volume."""

from __future__ import annotations

import datetime
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.imaging.source import ImageFile
from node.config.pipeline import Equalise, OutputFormat, Pipeline
from node.app.process_series import SeriesResult, process_series
from node.process.series import group_series
from tests.support import bundled

FRAMES, ROWS, COLUMNS = 120, 480, 640


@pytest.fixture(scope="module")
def long_cine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 120-frame 640x480 8-bit grey cine built on a real ultrasound-sized header."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "US"
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            del ds[keyword]
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, FRAMES
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ramp = (np.arange(ROWS * COLUMNS) % 251).astype(np.uint8).reshape(ROWS, COLUMNS)
    ds.PixelData = np.stack([np.roll(ramp, i) for i in range(FRAMES)]).tobytes()
    path = tmp_path_factory.mktemp("cine") / "cine.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def processed_traced(cine: Path, out: Path, pipeline: Pipeline) -> tuple[SeriesResult, int]:
    """The series of *cine* processed with *pipeline* into *out*, and the peak of memory traced meanwhile."""
    (series,) = group_series([ImageFile.open(cine)])
    tracemalloc.start()
    try:
        result = process_series(series, pipeline, out, now=datetime.datetime(2026, 1, 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize("output", [OutputFormat.PNG, OutputFormat.SC])
def test_peak_memory_is_a_few_frames(long_cine: Path, tmp_path: Path, output: OutputFormat) -> None:
    frame_bytes = ROWS * COLUMNS
    pipeline = Pipeline(name="mem", output=output, display=Equalise(bins=100, per="image"))
    result, peak = processed_traced(long_cine, tmp_path, pipeline)
    assert not result.failures and result.frames == FRAMES
    assert len(result.outputs) == (FRAMES if output is OutputFormat.PNG else 1)
    # float64 working copies of one frame are 8 bytes a pixel; the decoded volume would be 120 frames
    assert peak < 40 * frame_bytes, f"peak {peak / 2**20:.1f} MiB for {frame_bytes / 2**20:.2f} MiB frames"


def test_series_equalisation_memory_does_not_grow_with_the_series(long_cine: Path, tmp_path: Path) -> None:
    pipeline = Pipeline(name="mem", output=OutputFormat.PNG, display=Equalise(bins=100, per="series"))
    result, peak = processed_traced(long_cine, tmp_path, pipeline)
    assert result.frames == FRAMES
    assert peak < 40 * ROWS * COLUMNS


def test_opening_an_image_does_not_read_its_pixel_data(long_cine: Path) -> None:
    tracemalloc.start()
    try:
        image = ImageFile.open(long_cine)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.number_of_frames == FRAMES
    assert held < ROWS * COLUMNS, f"{held} bytes held after opening: the pixel data was read"
