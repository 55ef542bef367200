"""Helpers of the volume tests: generated series with known geometry, and each slice's truth read from
the DICOM files with pydicom alone (never with the node's geometry code)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.tools import bundled

#: The promise of issue 18: every slice's Image Position (Patient) is ``affine @ (0, 0, k, 1)`` within this (mm).
PLACEMENT_MM = 0.01
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def rotation_about_x(degrees: float) -> list[float]:
    """Image Orientation (Patient) of axial slices turned *degrees* about the patient's x axis."""
    a = math.radians(degrees)
    return [1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a)]


def write_series(
    folder: Path,
    positions: Sequence[Sequence[float]],
    *,
    instance_numbers: Sequence[int] | None = None,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    base: Path | None = None,
    patient: tuple[str, str] | None = None,
    study_uid: str | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """One new series of copies of a real slice (pydicom's CT_small by default), one per position.

    Slice *i* gets the position ``positions[i]``, Instance Number ``instance_numbers[i]`` (default
    ``i + 1``), and pixels ``base + 3 * i`` so that every voxel slice can be traced to its file.
    """
    source = pydicom.dcmread(base or bundled("CT_small.dcm"))
    pixels = source.pixel_array
    study, series = study_uid or generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, position in enumerate(positions):
        ds = source.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = instance_numbers[index] if instance_numbers else index + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.SliceLocation = f"{position[2]:.6f}"
        ds.PixelData = (pixels.astype(np.int32) + 3 * index).astype(pixels.dtype).tobytes()
        if patient is not None:
            ds.PatientName, ds.PatientID = patient
        path = folder / (names[index] if names else f"{index:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def frame_position(ds: Dataset, frame: int) -> np.ndarray | None:
    """Image Position (Patient) of *frame* (0-based): the per-frame or shared Plane Position, else the top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for item in ([per_frame[frame]] if frame < len(per_frame) else []) + list(shared[:1]):
        plane = item.get("PlanePositionSequence")
        if plane:
            return np.array([float(v) for v in plane[0].ImagePositionPatient])
    if "ImagePositionPatient" in ds:
        return np.array([float(v) for v in ds.ImagePositionPatient])
    return None


def dicom_files(root: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for every DICOM file under *root* (files without meta too)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        if "SOPInstanceUID" in ds:
            found.setdefault(str(ds.SOPInstanceUID), path)
    return found


def read_index(path: Path) -> list[dict[str, str]]:
    """``index.csv`` read back with the csv module."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def sidecar_of(volume: Path) -> dict:
    """The JSON sidecar beside a ``.nii.gz`` or ``.npz`` volume."""
    stem = volume.name.removesuffix(".nii.gz").removesuffix(".npz")
    return json.loads((volume.parent / f"{stem}.json").read_text())


def slice_errors(affine: np.ndarray, facts: dict, sources: dict[str, Path]) -> list[float]:
    """For every slice k of a volume: distance (mm) between ``affine @ (0, 0, k, 1)`` and its source's
    Image Position (Patient) read from the DICOM file (LPS -> RAS)."""
    errors = []
    for item in facts["slices"]:
        ds = pydicom.dcmread(sources[item["SOPInstanceUID"]], stop_before_pixels=True, force=True)
        position = frame_position(ds, (item["frame"] or 1) - 1)
        assert position is not None, f"slice {item['k']} has no position in its source, yet the volume is placed"
        placed = (affine @ [0, 0, item["k"], 1])[:3]
        errors.append(float(np.linalg.norm(placed - position * LPS_TO_RAS)))
    return errors


def load_nifti(path: Path) -> nib.Nifti1Image:
    """A NIfTI volume (nibabel)."""
    return nib.load(str(path))
