"""Series as volumes (issue 18): `dicom-node process --format nifti|npz` as a user runs it.

Every slice must be where its Image Position (Patient) says: ``affine @ (0, 0, k, 1)`` within 0.01 mm,
checked against positions read from the DICOM files with pydicom, and voxel slice ``k`` must hold that
same file's pixels.  On every series of the shared data, and on generated series with reversed
Instance Numbers, a gap, and a duplicate slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from node.imaging import to_hu
from tests.support import run_cli
from tests.support.volume_series import (
    LPS_TO_RAS,
    PLACEMENT_MM,
    dicom_files,
    frame_position,
    read_index,
    rotation_about_x,
    sidecar_of,
    slice_errors,
    write_series,
)


def volumes(folder: Path, suffix: str = ".nii.gz") -> list[Path]:
    return sorted(p for p in folder.rglob(f"volume*{suffix}") if not p.name.startswith("."))


def assert_placed_and_traced(volume: Path, sources: dict[str, Path]) -> dict:
    """The property on one NIfTI volume: positions within 0.01 mm, voxel slice k = its source frame."""
    image = nib.load(str(volume))
    facts = sidecar_of(volume)
    assert image.header["sform_code"] == 1 and image.header["qform_code"] == 1
    errors = slice_errors(image.affine, facts, sources)
    assert max(errors) <= PLACEMENT_MM, (volume, errors)
    data = image.get_fdata()
    for item in facts["slices"]:
        ds = pydicom.dcmread(sources[item["SOPInstanceUID"]])
        expected = to_hu(ds, (item["frame"] or 1) - 1 if "NumberOfFrames" in ds else None)
        assert np.array_equal(data[:, :, item["k"]].T, expected), (volume, item)
    return facts


def test_every_series_of_the_shared_data_is_placed_slice_by_slice(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    result = run_cli("export", str(data_dir), "--out", str(out))
    assert result.returncode == 1, result.stderr  # the broken files, and the 9 copies of one MR slice
    sources = dicom_files(data_dir)
    rows = read_index(out / "index.csv")
    placed = unplaced = 0
    for row in rows:
        volume = out / row["volume"]
        facts = sidecar_of(volume)
        has_position = [frame_position(pydicom.dcmread(sources[s["SOPInstanceUID"]], stop_before_pixels=True,
                                                       force=True), (s["frame"] or 1) - 1) is not None
                        for s in facts["slices"]]
        if all(has_position):
            assert_placed_and_traced(volume, sources)
            placed += len(facts["slices"])
        else:  # no position in the source: said, and no place claimed
            assert not any(has_position) and not facts["placement"]["placed"]
            header = nib.load(str(volume)).header
            assert header["sform_code"] == 0 and header["qform_code"] == 0
            unplaced += 1
    assert placed == 28 + 6 + 10 - 10 + 1  # CT, Siemens enhanced MR, MR2_J2KI (emri_small has no positions)
    assert unplaced == 5  # emri_small, CR, US, the palette face, the Modality LUT image
    # the nine transfer-syntax copies of one MR image sit at one position: refused, positions and files named
    assert "share a position along the slice normal" in result.stderr
    assert "(-624.00, -661.83, -6.53) in 1.dcm and 2.dcm" in result.stderr


def test_tilted_ct_with_two_spacings_becomes_two_exact_volumes(ct_series_dir: Path, tmp_path: Path) -> None:
    result = run_cli("process", str(ct_series_dir), "--out", str(tmp_path / "out"), "--format", "nifti")
    assert result.returncode == 0, result.stderr
    found = volumes(tmp_path / "out")
    assert [p.name for p in found] == ["volume_part1of2.nii.gz", "volume_part2of2.nii.gz"]
    sources = dicom_files(ct_series_dir)
    for volume, spacing in zip(found, (4.0, 7.0)):
        facts = assert_placed_and_traced(volume, sources)
        image = nib.load(str(volume))
        assert image.shape == (512, 512, 14) and image.get_data_dtype() == np.int16
        assert abs(facts["spacing_mm"][2] - spacing) < 0.01
        # gantry tilt: a sheared sform, the qform the closest rigid one, and the sidecar says so
        assert abs(facts["gantry_tilt"]["degrees"] - 18.5) < 0.05 and facts["gantry_tilt"]["GantryDetectorTilt"] == 18.5
        sform, qform = image.header.get_sform(), image.header.get_qform()
        assert abs(np.dot(sform[:3, 1], sform[:3, 2])) > 0.1  # sheared: the slice step is not normal to the plane
        rotation = qform[:3, :3] / np.linalg.norm(qform[:3, :3], axis=0)
        assert np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-5)
        qform_errors = slice_errors(qform, facts, sources)
        assert max(qform_errors) > 10 and "misplaces slices by up to" in facts["gantry_tilt"]["qform"]
        assert facts["split"]["parts"] == 2
    # the split names the positions on both sides of the change of spacing
    boundary = sidecar_of(found[0])["split"]["boundaries"][0]
    assert "(-125.00, -123.54, 60.70) (14.dcm)" in boundary and "(-125.00, -123.54, 61.84) (15.dcm)" in boundary
    assert "split into 2 volumes" in result.stderr


def test_reversed_instance_numbers_on_an_oblique_series(tmp_path: Path) -> None:
    orientation = rotation_about_x(30)
    normal = np.cross(orientation[:3], orientation[3:])
    start = np.array([-80.0, -90.0, 20.0])
    positions = [start + normal * 2.5 * i for i in range(10)]
    paths = write_series(tmp_path / "in", positions, instance_numbers=list(range(10, 0, -1)), orientation=orientation)
    result = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--format", "nifti")
    assert result.returncode == 0, result.stderr
    (volume,) = volumes(tmp_path / "out")
    facts = assert_placed_and_traced(volume, dicom_files(tmp_path / "in"))
    by_file = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: i for i, p in enumerate(paths)}
    # voxel order follows the positions, whatever the Instance Numbers say
    assert [by_file[s["SOPInstanceUID"]] for s in facts["slices"]] == list(range(10))
    assert abs(facts["spacing_mm"][2] - 2.5) < 1e-6 and facts["gantry_tilt"] is None and facts["split"] is None


def test_a_gap_splits_the_series_into_two_exact_volumes(tmp_path: Path) -> None:
    positions = [(-100.0, -100.0, 3.0 * i) for i in list(range(6)) + list(range(8, 14))]  # slices 6 and 7 missing
    write_series(tmp_path / "in", positions)
    result = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--format", "nifti")
    assert result.returncode == 0, result.stderr
    found = volumes(tmp_path / "out")
    assert len(found) == 2
    sources = dicom_files(tmp_path / "in")
    shapes = [nib.load(str(v)).shape for v in found]
    assert shapes == [(128, 128, 6), (128, 128, 6)]
    for volume in found:
        assert_placed_and_traced(volume, sources)
    boundary = sidecar_of(found[0])["split"]["boundaries"][0]
    assert "(-100.00, -100.00, 15.00)" in boundary and "(-100.00, -100.00, 24.00)" in boundary
    assert "step of 9.000 mm" in boundary


def test_a_duplicate_slice_is_refused_naming_its_position_and_files(tmp_path: Path) -> None:
    positions = [(-100.0, -100.0, 2.0 * i) for i in range(8)]
    positions.insert(4, positions[3])
    write_series(tmp_path / "in", positions)
    for fmt in ("nifti", "npz"):
        result = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / fmt), "--format", fmt)
        assert result.returncode == 1
        assert "share a position along the slice normal" in result.stderr
        assert "(-100.00, -100.00, 6.00) in 0003.dcm and 0004.dcm" in result.stderr
        assert volumes(tmp_path / fmt, "") == []  # nothing written, rather than a volume placed wrong


def test_npz_holds_the_same_volume_affine_and_spacing(ct_series_dir: Path, tmp_path: Path) -> None:
    for fmt in ("nifti", "npz"):
        result = run_cli("process", str(ct_series_dir), "--out", str(tmp_path / fmt), "--format", fmt)
        assert result.returncode == 0, result.stderr
    sources = dicom_files(ct_series_dir)
    for nifti, npz in zip(volumes(tmp_path / "nifti"), volumes(tmp_path / "npz", ".npz")):
        with np.load(npz) as arrays:
            assert sorted(arrays.files) == ["affine", "spacing", "volume"]
            image = nib.load(str(nifti))
            assert arrays["volume"].dtype == np.int16  # HU: stored values plus a whole intercept
            assert np.array_equal(arrays["volume"], image.get_fdata())
            assert np.allclose(arrays["affine"], image.affine, atol=1e-4)
            assert max(slice_errors(arrays["affine"], sidecar_of(npz), sources)) <= PLACEMENT_MM
            assert np.allclose(arrays["spacing"], sidecar_of(npz)["spacing_mm"])


def test_a_window_gives_the_pixels_the_png_pipeline_writes(ct_series_dir: Path, tmp_path: Path) -> None:
    for fmt in ("nifti", "png"):
        result = run_cli("process", str(ct_series_dir), "--out", str(tmp_path / fmt), "--format", fmt,
                         "--window", "brain")
        assert result.returncode == 0, result.stderr
    pngs = {}
    for path in (tmp_path / "png").rglob("*.png"):
        with Image.open(path) as picture:
            pngs[picture.text["SourceSOPInstanceUID"]] = np.array(picture)
    assert len(pngs) == 28
    compared = 0
    for volume in volumes(tmp_path / "nifti"):
        image = nib.load(str(volume))
        assert image.get_data_dtype() == np.uint8
        data = np.asanyarray(image.dataobj)
        facts = sidecar_of(volume)
        assert facts["pipeline"]["display"]["name"] == "brain" and "brain window" in facts["pipeline"]["does"]
        for item in facts["slices"]:
            assert np.array_equal(data[:, :, item["k"]].T, pngs[item["SOPInstanceUID"]])
            compared += 1
    assert compared == 28


def test_no_patient_name_or_id_in_the_sidecar_unless_asked(tmp_path: Path) -> None:
    write_series(tmp_path / "in", [(0.0, 0.0, 2.0 * i) for i in range(3)], patient=("Doe^Jane", "PID-4711"))
    plain = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / "plain"), "--format", "nifti")
    kept = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / "kept"), "--format", "npz",
                   "--keep-patient")
    assert plain.returncode == 0 and kept.returncode == 0, plain.stderr + kept.stderr
    (plain_json,) = (tmp_path / "plain").rglob("volume.json")
    text = plain_json.read_text()
    assert "Doe" not in text and "PID-4711" not in text and "PatientName" not in text
    (kept_json,) = (tmp_path / "kept").rglob("volume.json")
    facts = json.loads(kept_json.read_text())
    assert facts["PatientName"] == "Doe^Jane" and facts["PatientID"] == "PID-4711"
    assert "Doe" not in plain.stderr + kept.stderr and "PID-4711" not in plain.stderr + kept.stderr
    # a different derived series: what the pipeline writes differs
    assert plain_json.parent.name != kept_json.parent.name
    refused = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / "png"), "--format", "png",
                      "--keep-patient")
    assert refused.returncode == 2 and "keep_patient is for volume outputs" in refused.stderr


def test_sidecar_says_source_geometry_and_pipeline(tmp_path: Path) -> None:
    write_series(tmp_path / "in", [(-10.0, -20.0, 1.25 * i) for i in range(4)])
    result = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--format", "nifti",
                     "--equalise", "--bins", "50", "--per", "series")
    assert result.returncode == 0, result.stderr
    (volume,) = volumes(tmp_path / "out")
    facts = sidecar_of(volume)
    first = pydicom.dcmread(sorted((tmp_path / "in").glob("*.dcm"))[0], stop_before_pixels=True)
    assert facts["StudyInstanceUID"] == first.StudyInstanceUID and facts["SeriesInstanceUID"] == first.SeriesInstanceUID
    assert facts["Modality"] == "CT" and facts["shape"] == [128, 128, 4] and facts["dtype"] == "uint8"
    assert facts["ImageOrientationPatient"] == [1, 0, 0, 0, 1, 0] and facts["orientation"] == "LPS"
    assert np.allclose(facts["spacing_mm"], [0.661468, 0.661468, 1.25])
    assert facts["pipeline"]["display"] == {"kind": "equalise", "bins": 50, "per": "series"}
    assert np.allclose(np.array(facts["affine_ras"])[:3, 3], np.array([-10.0, -20.0, 0.0]) * LPS_TO_RAS)


def test_enhanced_multiframe_with_two_echoes_gives_a_volume_per_echo(data_dir: Path, tmp_path: Path) -> None:
    """The real Siemens enhanced MR, its last three frames made a second echo at the first three's positions."""
    ds = pydicom.dcmread(data_dir / "multiframe" / "siemens_xa10_enhanced_mr_6frames.dcm")
    frames = ds.PerFrameFunctionalGroupsSequence
    for index in (3, 4, 5):
        frames[index].MREchoSequence[0].EffectiveEchoTime = 60.0
        frames[index].PlanePositionSequence[0].ImagePositionPatient = list(
            frames[index - 3].PlanePositionSequence[0].ImagePositionPatient)
    # frames in the file out of slice order: 2, 0, 1 of each echo
    order = [2, 0, 1, 5, 3, 4]
    pixels = ds.pixel_array[order]
    items = [frames[i] for i in order]
    ds.PerFrameFunctionalGroupsSequence = items
    ds.PixelData = pixels.tobytes()
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "echoes.dcm")
    result = run_cli("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--format", "nifti")
    assert result.returncode == 0, result.stderr
    found = volumes(tmp_path / "out")
    assert [p.name for p in found] == ["volume_te30.nii.gz", "volume_te60.nii.gz"]
    sources = dicom_files(tmp_path / "in")
    # ordered along the normal, not by frame number: frames (1-based) 2, 3, 1 hold slices k = 0, 1, 2
    for volume, frames_in_order in zip(found, ([2, 3, 1], [5, 6, 4])):
        facts = assert_placed_and_traced(volume, sources)
        assert nib.load(str(volume)).shape == (64, 64, 3)
        assert [s["frame"] for s in facts["slices"]] == frames_in_order
