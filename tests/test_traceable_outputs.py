"""Outputs say where they came from and what was done: PNG text chunks, Burned In Annotation,
Series Description (real files, read back with Pillow and pydicom)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.config.pipeline import parse_steps, series_description
from node.app.process_series import SeriesResult, process_series
from node.process.series import group_series, open_images
from node.outputs.png import traceability_text, write_png
from tests.support import bundled, dciodvfy_errors

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


# --- Series Description: what was done, one test per kind of step ---------------------------


def _description(steps: list[dict], output: str = "sc", source: str = "", name: str = "p") -> str:
    return series_description(parse_steps(name, steps, output), source)


def test_description_window_preset_says_its_name_width_and_level() -> None:
    assert _description([{"op": "rescale"}, {"op": "window", "preset": "lungs"}]) == "lungs W1500 L-600 [p]"


def test_description_window_centre_width_and_function() -> None:
    assert _description([{"op": "window", "center": 40, "width": 80}]) == "W80 L40 [p]"
    sigmoid = [{"op": "window", "center": 40.5, "width": 80, "function": "sigmoid"}]
    assert _description(sigmoid) == "W80 L40.5 SIGMOID [p]"


def test_description_file_window() -> None:
    assert _description([{"op": "window", "from": "file"}]) == "file window [p]"
    assert _description([{"op": "window", "from": "file", "index": 1}]) == "file window 2 [p]"


def test_description_equalise_per_image_and_per_series() -> None:
    assert _description([{"op": "equalise"}]) == "equalised 100 bins [p]"
    per_series = [{"op": "equalise", "bins": 50, "per": "series"}]
    assert _description(per_series) == "equalised 50 bins per series [p]"


def test_description_channels() -> None:
    steps = [{"op": "channels", "windows": ["brain", "40,80"], "equalise": {"bins": 20}}]
    assert _description(steps) == "RGB brain/W80 L40/equalised 20 bins [p]"


def test_description_clip() -> None:
    both = [{"op": "clip", "min": -1000, "max": 3000.5}]
    assert _description(both) == "clip -1000..3000.5, default window [p]"
    assert _description([{"op": "clip", "max": 100}]) == "clip -inf..100, default window [p]"
    assert _description([{"op": "clip", "min": 0}]) == "clip 0..inf, default window [p]"


def test_description_grey_rescale_and_16_bit() -> None:
    assert _description([{"op": "grey"}, {"op": "equalise"}], "png") == "grey, equalised 100 bins [p]"
    # the modality rescale changes units, not what is shown: not named (DerivationDescription has it)
    assert _description([{"op": "rescale"}], "sc16") == "default window, 16-bit [p]"
    assert _description([], "png16") == "default window, 16-bit [p]"


def test_description_source_first_when_it_fits_and_never_over_64() -> None:
    steps = [{"op": "window", "preset": "lungs"}]
    assert _description(steps, source="Thorax 1.0 B70f", name="ct-lung") == (
        "Thorax 1.0 B70f: lungs W1500 L-600 [ct-lung]"
    )
    long_source = "S" * 50
    assert _description(steps, source=long_source, name="ct-lung") == "lungs W1500 L-600 [ct-lung]"
    # what was done is cut short; the [name] the poller recognises is kept
    long_name = "n" * 50
    text = _description(steps, name=long_name)
    assert len(text) <= 64 and text.endswith(f" [{long_name}]") and text.startswith("lungs W")
    assert len(_description(steps, name="x" * 80)) == 64


def test_description_is_one_line_without_backslash() -> None:
    text = _description([{"op": "equalise"}], source="A\\B\nC", name="a\\b")
    assert text == "A/B C: equalised 100 bins [a/b]"


def test_derived_sc_says_what_was_done_and_passes_dciodvfy(tmp_path: Path) -> None:
    src = bundled("CT_small.dcm")
    result = _process([src], [{"op": "rescale"}, {"op": "window", "preset": "lungs"}], "sc", tmp_path)
    (path,) = result.outputs
    sc = pydicom.dcmread(path)
    source = pydicom.dcmread(src, stop_before_pixels=True)
    assert "SeriesDescription" not in source  # CT_small has none: no prefix
    assert sc.SeriesDescription == "lungs W1500 L-600 [trace]"
    assert sc.BurnedInAnnotation == "YES"  # CT_small does not say
    errors, report = dciodvfy_errors(path)
    assert not errors, report
