"""Output names: what process_series writes is what node.outputs.naming says (the status page relies on it).

Real series processed into real files: the multi-frame MR of the shared data (10 frames) into PNGs
and a Secondary Capture, and pydicom's CT_small into a PNG.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pydicom

from node.app.process_series import process_series
from node.config.pipeline import Pipeline, parse_steps
from node.outputs.naming import (
    derived_instance_uid,
    derived_series_uid,
    output_file_name,
    outputs_holding_frame,
)
from node.process.series import InputSeries, instance_order, open_images
from tests.support import bundled

PNG = parse_steps("names-png", [{"op": "rescale"}, {"op": "window", "center": 100, "width": 900}], "png")
SC = parse_steps("names-sc", [{"op": "rescale"}, {"op": "window", "center": 100, "width": 900}], "sc")


def _process(source: Path, pipeline: Pipeline, out: Path) -> tuple[pydicom.Dataset, list[Path]]:
    images, failures = open_images([source])
    assert not failures
    header = pydicom.dcmread(source, stop_before_pixels=True)
    series = InputSeries(str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                         sorted(images, key=instance_order))
    result = process_series(series, pipeline, out, now=datetime.datetime(2026, 1, 2, 3, 4, 5))
    assert result.outputs and not result.failures
    assert result.derived_series_uid == derived_series_uid(str(header.SeriesInstanceUID), pipeline.fingerprint())
    folder = out / str(header.StudyInstanceUID) / result.derived_series_uid
    assert {p.parent for p in result.outputs} == {folder}
    return header, result.outputs


def test_pngs_of_a_multi_frame_source_are_named_per_frame(data_dir: Path, tmp_path: Path) -> None:
    header, written = _process(data_dir / "multiframe" / "emri_small.dcm", PNG, tmp_path)
    sop_uid = derived_instance_uid(str(header.SOPInstanceUID), PNG.fingerprint())
    assert sorted(p.name for p in written) == [output_file_name(sop_uid, dicom=False, frame=n) for n in range(1, 11)]
    assert written[0].name == f"{sop_uid}_0001.png"
    names = {p.name for p in written}
    for frame in (0, 4, 9):  # the status page's "after" of frame 4 is the 5th PNG, a single picture
        found = [(name, inside) for name, inside in outputs_holding_frame(str(header.SOPInstanceUID),
                                                                          PNG.fingerprint(), frame) if name in names]
        assert found == [(f"{sop_uid}_{frame + 1:04d}.png", 0)]


def test_a_secondary_capture_holds_every_frame_under_one_name(data_dir: Path, tmp_path: Path) -> None:
    header, written = _process(data_dir / "multiframe" / "emri_small.dcm", SC, tmp_path)
    sop_uid = derived_instance_uid(str(header.SOPInstanceUID), SC.fingerprint())
    (path,) = written
    assert path.name == output_file_name(sop_uid, dicom=True) == f"{sop_uid}.dcm"
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop_uid
    found = [item for item in outputs_holding_frame(str(header.SOPInstanceUID), SC.fingerprint(), 6)
             if item[0] == path.name]
    assert found == [(path.name, 6)]  # frame 6 of the source is frame 6 of the Secondary Capture


def test_a_png_of_a_single_frame_source_has_no_frame_number(tmp_path: Path) -> None:
    header, written = _process(bundled("CT_small.dcm"), PNG, tmp_path)
    sop_uid = derived_instance_uid(str(header.SOPInstanceUID), PNG.fingerprint())
    assert [p.name for p in written] == [output_file_name(sop_uid, dicom=False)] == [f"{sop_uid}.png"]
    assert outputs_holding_frame(str(header.SOPInstanceUID), PNG.fingerprint(), 0)[2] == (f"{sop_uid}.png", 0)
