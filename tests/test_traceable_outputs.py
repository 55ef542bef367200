"""Outputs say where they came from and what was done: PNG text chunks, Burned In Annotation,
Series Description (real files, read back with Pillow and pydicom)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.pipeline import parse_steps
from node.process import SeriesResult, process_series
from node.series import group_series, open_images
from node.writers.png import traceability_text, write_png
from tests.conftest import bundled

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def _process(paths: list[Path], steps: list[dict], output: str, out: Path) -> SeriesResult:
    images, failures = open_images(paths)
    assert not failures
    (series,) = group_series(images)
    result = process_series(series, parse_steps("trace", steps, output), out, now=NOW)
    assert not result.failures
    return result


def _patient_strings(source: pydicom.Dataset) -> list[str]:
    values = [str(source.get(k) or "") for k in ("PatientName", "PatientID", "PatientBirthDate")]
    return [value for value in values if value]


def test_png_carries_source_uids_and_pipeline_never_the_patient(tmp_path: Path) -> None:
    src = bundled("CT_small.dcm")
    source = pydicom.dcmread(src, stop_before_pixels=True)
    result = _process([src], [{"op": "rescale"}, {"op": "window", "preset": "lungs"}], "png", tmp_path)
    (png,) = result.outputs
    with Image.open(png) as picture:
        text = dict(picture.text)
        pixels = np.array(picture)
    assert text == {
        "Software": text["Software"],
        "SourceStudyInstanceUID": source.StudyInstanceUID,
        "SourceSeriesInstanceUID": source.SeriesInstanceUID,
        "SourceSOPInstanceUID": source.SOPInstanceUID,
        "Pipeline": "trace",
        "DerivationDescription": "modality rescale; lungs window C=-600 W=1500 LINEAR; 8-bit",
    }
    assert text["Software"].startswith("dicom-node")
    assert pixels.shape == (128, 128) and pixels.dtype == np.uint8
    raw = png.read_bytes()
    strings = _patient_strings(source)
    assert strings  # CT_small has a name, an ID and a birth date: the check below means something
    for value in strings:
        assert value.encode() not in raw, value
        assert all(value not in chunk for chunk in text.values()), value


def test_png_frames_of_a_multiframe_source_say_their_frame(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "multiframe" / "emri_small.dcm"
    source = pydicom.dcmread(src, stop_before_pixels=True)
    result = _process([src], [{"op": "equalise"}], "png16", tmp_path)
    assert len(result.outputs) == 10
    frames = []
    for path in result.outputs:
        with Image.open(path) as picture:
            assert picture.text["SourceSOPInstanceUID"] == source.SOPInstanceUID
            assert picture.text["DerivationDescription"].endswith("16-bit")
            frames.append(int(picture.text["SourceFrameNumber"]))
    assert sorted(frames) == list(range(1, 11))


def test_traceability_text_leaves_out_what_the_source_lacks() -> None:
    source = pydicom.dcmread(bundled("CT_small.dcm"), stop_before_pixels=True)
    del source.SeriesInstanceUID
    source.SOPInstanceUID = ""
    text = traceability_text(source, pipeline="p", derivation="d", frame=3)
    assert set(text) == {"Software", "SourceStudyInstanceUID", "SourceFrameNumber", "Pipeline",
                         "DerivationDescription"}
    assert text["SourceFrameNumber"] == "3"


def test_write_png_text_outside_latin1_reads_back(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = write_png(tmp_path / "a.png", image, {"Pipeline": "лёгкие", "Comment": "plain"})
    with Image.open(path) as picture:
        assert picture.text == {"Pipeline": "лёгкие", "Comment": "plain"}
        assert np.array_equal(np.array(picture), image)


@pytest.mark.parametrize("keyword", ["", " lead", "trail ", "two  spaces", "x" * 80, "tab\there"])
def test_write_png_rejects_keywords_png_does_not_allow(tmp_path: Path, keyword: str) -> None:
    with pytest.raises(ValueError, match="PNG text keyword"):
        write_png(tmp_path / "b.png", np.zeros((2, 2), np.uint8), {keyword: "x"})
    assert not list(tmp_path.iterdir())  # nothing written
