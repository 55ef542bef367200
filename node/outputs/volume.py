"""Volume outputs: a series as NIfTI (``.nii.gz``, nibabel) or NumPy (``.npz``), each with a JSON sidecar.

One file per volume :func:`node.process.volume.plan_volumes` makes (one per series, or per stack,
or per part of a stack split where its spacing changes), named ``volume[_STACK][_partIofN]`` in the
series folder, and ``volume....json`` beside it.

NIfTI: the voxels in the order ``(columns, rows, slices)``; the sform is the affine that places
every slice at its Image Position (Patient) (sheared for a gantry tilt), the qform the closest
rigid one; both with code 1 (scanner), or 0 when the source has no position.  Modality values are
stored as the source's integers with ``scl_slope``/``scl_inter`` where one slope and intercept,
exact in float32, apply to every slice (so ``nibabel``'s ``get_fdata()`` gives Hounsfield units),
as ``float32`` otherwise; rendered outputs as ``uint8``/``uint16``, RGB as ``RGB24``.

NumPy: ``volume`` (same voxel order; modality values as integers only when they are the stored
values plus a whole intercept, else ``float32``; RGB as a last axis of 3), ``affine`` (4x4 RAS,
the NIfTI sform) and ``spacing`` (mm between columns, rows, slices).

The sidecar holds no patient name or ID unless the pipeline says ``keep_patient = true``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.volumeutils import array_to_file

from node.fsutil import atomic_output
from node.imaging.source import UnsupportedImage
from node.pipeline import OutputFormat, Pipeline
from node.process.volume import PLACEMENT_MM, SPLIT_MM, Placement, VolumePlan, Voxels, plan_volumes, read_voxels
from node.render import series_bins
from node.series import InputSeries

__all__ = ["SUFFIXES", "VolumeFile", "VolumeResult", "sidecar_facts", "write_nifti", "write_npz",
           "write_series_volumes"]

log = logging.getLogger(__name__)

#: File name ending of each volume format.
SUFFIXES = {OutputFormat.NIFTI: ".nii.gz", OutputFormat.NPZ: ".npz"}

# zlib level 1, as nibabel's default and the node's PNGs: several times faster than level 6 for
# files about 10-20% larger.
_COMPRESS_LEVEL = 1
_NIFTI_SCANNER = 1  # NIFTI_XFORM_SCANNER_ANAT
_RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


@dataclass
class VolumeFile:
    """One volume written: its files and the facts an index lists."""

    path: Path
    sidecar: Path
    plan: VolumePlan
    shape: tuple[int, ...]
    dtype: str

    def index_row(self, root: Path) -> dict[str, str]:
        """The row of ``index.csv`` (paths relative to *root*)."""
        header = self.plan.first_header
        return {
            "volume": self.path.relative_to(root).as_posix(),
            "study_uid": self.plan.study_uid,
            "series_uid": self.plan.series_uid,
            "modality": str(header.get("Modality") or ""),
            "shape": "x".join(str(n) for n in self.shape),
            "spacing": "x".join(f"{v:.6g}" for v in self.plan.placement.spacing),
            "orientation": orientation_code(self.plan.placement),
            "source_files": str(self.plan.source_files),
        }


@dataclass
class VolumeResult:
    """What writing a series' volumes produced."""

    outputs: list[Path] = field(default_factory=list)
    volumes: list[VolumeFile] = field(default_factory=list)
    failures: list[UnsupportedImage] = field(default_factory=list)
    instances: int = 0
    frames: int = 0


def orientation_code(placement: Placement) -> str:
    """The RAS letters the voxel axes point to most (nibabel's ``aff2axcodes``, e.g. ``LPS``); ``-`` unplaced."""
    if not placement.placed:
        return "-"
    return "".join(str(code) for code in nib.aff2axcodes(placement.affine))


def write_series_volumes(series: InputSeries, pipeline: Pipeline, folder: Path) -> VolumeResult:
    """Write every volume of *series* through *pipeline* into *folder*, one in memory at a time.

    Parameters
    ----------
    series : InputSeries
        Checked source images of one series.
    pipeline : Pipeline
        Its output is ``nifti`` or ``npz``.
    folder : pathlib.Path
        Where the volumes and sidecars go (created); volume files of an earlier run that this run
        does not write again (a series split differently now) are removed.

    Returns
    -------
    VolumeResult
        The files, and the failures: files with malformed geometry, stacks refused (their
        positions named), volumes whose frames could not be decoded (never written with a slice missing).
    """
    fmt = pipeline.output
    if not fmt.is_volume:
        raise ValueError(f"pipeline {pipeline.name!r} writes {fmt.value}, not a volume")
    result = VolumeResult()
    plans, failures = plan_volumes(series)
    result.failures.extend(failures)
    bins, failed = series_bins(pipeline, series.images)
    result.failures.extend(failed)
    for plan in plans:
        try:
            voxels = read_voxels(plan, pipeline, bins, scaled_integers=fmt is OutputFormat.NIFTI)
        except UnsupportedImage as exc:
            log.error("series %s: volume %s not written: %s", series.series_uid, plan.name, exc)
            result.failures.append(exc)
            continue
        try:
            result.volumes.append(_write_volume(plan, voxels, pipeline, folder))
        except OSError as exc:
            result.failures.append(UnsupportedImage(plan.slices[0].image.path,
                                                    f"cannot write the volume under {folder}: {exc}"))
        del voxels
    for volume in result.volumes:
        result.outputs.extend((volume.path, volume.sidecar))
    _remove_stale(folder, {path.name for path in result.outputs})
    sources = {id(s.image): s.image.number_of_frames for v in result.volumes for s in v.plan.slices}
    result.instances, result.frames = len(sources), sum(sources.values())
    return result


def _write_volume(plan: VolumePlan, voxels: Voxels, pipeline: Pipeline, folder: Path) -> VolumeFile:
    started = time.monotonic()
    path = folder / (plan.name + SUFFIXES[pipeline.output])
    if pipeline.output is OutputFormat.NIFTI:
        write_nifti(path, voxels, plan.placement, description=f"dicom-node {pipeline.describe()}")
    else:
        write_npz(path, voxels, plan.placement)
    shape = voxels.voxel_order().shape
    facts = sidecar_facts(plan, voxels, pipeline, shape=shape)
    sidecar = folder / (plan.name + ".json")
    with atomic_output(sidecar) as handle:
        handle.write(json.dumps(facts, indent=2, default=str).encode() + b"\n")
    log.info("series %s: %s %s written in %.1f s", plan.series_uid, path.name, "x".join(map(str, shape)),
             time.monotonic() - started)
    return VolumeFile(path, sidecar, plan, tuple(shape), str(voxels.array.dtype))


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Volume files and sidecars in *folder* this run did not write (an earlier split, stack, format)."""
    if not folder.is_dir():
        return
    for old in folder.glob("volume*"):
        if old.name not in keep and old.is_file() and old.name.endswith((".nii.gz", ".npz", ".json")):
            log.info("removing %s, left by an earlier run", old)
            old.unlink(missing_ok=True)


def write_nifti(path: Path, voxels: Voxels, placement: Placement, *, description: str = "") -> Path:
    """Write a ``.nii.gz`` (NIfTI-1) atomically, streaming the voxels a slice at a time (no copy).

    Parameters
    ----------
    path : pathlib.Path
        Destination, replaced in one step.
    voxels : Voxels
        The values; ``slope``/``intercept`` become ``scl_slope``/``scl_inter`` for integers.
    placement : Placement
        sform = :attr:`Placement.affine`, qform = :attr:`Placement.rigid` (code 1, or 0 when unplaced).
    description : str
        ``descrip`` (cut to 79 bytes): what was done, never who the patient is.
    """
    data = voxels.voxel_order()
    dtype = data.dtype
    if voxels.rgb:
        data = voxels.array.view(_RGB24).reshape(voxels.array.shape[:3]).T
        dtype = _RGB24
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(data.shape)
    code = _NIFTI_SCANNER if placement.placed else 0
    header.set_qform(placement.rigid, code=code)
    header.set_sform(placement.affine, code=code)
    header.set_zooms(placement.spacing)
    header.set_xyzt_units("mm")
    if dtype.kind in "iu" and not voxels.rgb and (voxels.slope, voxels.intercept) != (1.0, 0.0):
        header.set_slope_inter(voxels.slope, voxels.intercept)
    header["descrip"] = description.encode("ascii", "replace")[:79]
    with atomic_output(path) as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=_COMPRESS_LEVEL, mtime=0) as stream:
            header.write_to(stream)
            array_to_file(data, stream, dtype, offset=None, order="F")
    return path


def write_npz(path: Path, voxels: Voxels, placement: Placement) -> Path:
    """Write a ``.npz`` atomically: ``volume``, ``affine`` (4x4 RAS) and ``spacing``, zlib level 1.

    The volume goes into the archive in chunks (``numpy.lib.format.write_array``), never copied whole.
    """
    if (voxels.slope, voxels.intercept) != (1.0, 0.0):
        raise ValueError("a NumPy volume holds the values themselves: read_voxels(..., scaled_integers=False)")
    arrays = {"volume": voxels.voxel_order(), "affine": placement.affine,
              "spacing": np.asarray(placement.spacing, dtype=np.float64)}
    with atomic_output(path) as raw:
        with zipfile.ZipFile(raw, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESS_LEVEL,
                             allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return path


def _software() -> str:
    try:
        return f"dicom-node {metadata.version('dicom-node')}"
    except metadata.PackageNotFoundError:  # running from a checkout
        return "dicom-node"


def _pipeline_facts(pipeline: Pipeline) -> dict[str, Any]:
    """The pipeline as data: name, what it does, its output and every step's parameters."""
    display = pipeline.display
    return {
        "name": pipeline.name,
        "does": pipeline.describe(),
        "output": pipeline.output.value,
        "grey": pipeline.grey,
        "rescale": pipeline.rescale,
        "clip": dataclasses.asdict(pipeline.clip) if pipeline.clip else None,
        "display": {"kind": type(display).__name__.lower(), **dataclasses.asdict(display)} if display else None,
        "keep_patient": pipeline.keep_patient,
    }


def _number_list(values: Any) -> list[float] | None:
    return None if values is None else [round(float(v), 6) for v in values]


def sidecar_facts(plan: VolumePlan, voxels: Voxels, pipeline: Pipeline, *, shape: tuple[int, ...]) -> dict[str, Any]:
    """What the JSON sidecar says of a volume: its source, geometry, values and the decisions made.

    No patient name or ID unless ``pipeline.keep_patient``.
    """
    header = plan.first_header
    placement = plan.placement
    plane = plan.plane
    facts: dict[str, Any] = {
        "StudyInstanceUID": plan.study_uid,
        "SeriesInstanceUID": plan.series_uid,
        "Modality": str(header.get("Modality") or ""),
        "SeriesNumber": int(header.SeriesNumber) if str(header.get("SeriesNumber") or "").isdigit() else None,
        "SeriesDescription": str(header.get("SeriesDescription") or ""),
        "stack": plan.stack or None,
        "part": plan.part,
        "parts": plan.parts,
        "shape": list(shape),
        "voxel_order": "i = column, j = row, k = slice along the slice normal" + (", then R, G, B" if voxels.rgb else ""),
        "dtype": "RGB24" if voxels.rgb else str(voxels.array.dtype),
        "values": voxels.values,
        "slope": voxels.slope,
        "intercept": voxels.intercept,
        "spacing_mm": [round(v, 6) for v in placement.spacing],
        "ImageOrientationPatient": (_number_list(plane.row_cosine) or []) + (_number_list(plane.column_cosine) or [])
        or None,
        "slice_normal_lps": _number_list(plane.normal) if plane.oriented else None,
        "affine_ras": [[round(float(v), 6) for v in row] for row in placement.affine],
        "orientation": orientation_code(placement),
        "placement": _placement_facts(plan),
        "gantry_tilt": _tilt_facts(plan),
        "split": {"part": plan.part, "parts": plan.parts, "boundaries": plan.split} if plan.parts > 1 else None,
        "pipeline": _pipeline_facts(pipeline),
        "source_files": plan.source_files,
        "slices": [
            {"k": k, "SOPInstanceUID": s.sop_instance_uid,
             "frame": s.frame + 1 if s.image.number_of_frames > 1 else None,
             "ImagePositionPatient": _number_list(s.position)}
            for k, s in enumerate(plan.slices)
        ],
        "software": _software(),
    }
    if pipeline.keep_patient:
        facts["PatientName"] = str(header.get("PatientName") or "")
        facts["PatientID"] = str(header.get("PatientID") or "")
    return facts


def _placement_facts(plan: VolumePlan) -> dict[str, Any]:
    placement = plan.placement
    if not placement.placed:
        return {"placed": False, "order": plan.order,
                "text": "the source has no Image Position/Orientation (Patient): the affine is the voxel sizes "
                        "only (NIfTI qform_code = sform_code = 0), not a place in the patient"}
    return {"placed": True, "order": plan.order, "max_error_mm": round(placement.error_mm, 6),
            "promise_mm": PLACEMENT_MM,
            "text": f"every slice's Image Position (Patient) is affine_ras (LPS -> RAS) applied to its first voxel "
                    f"(0, 0, k) within {PLACEMENT_MM} mm"}


def _tilt_facts(plan: VolumePlan) -> dict[str, Any] | None:
    placement = plan.placement
    if not placement.sheared:
        return None
    header = plan.first_header
    tilt = header.get("GantryDetectorTilt")
    return {
        "degrees": round(placement.tilt_degrees, 4),
        "GantryDetectorTilt": float(tilt) if tilt not in (None, "") else None,
        "sform": "sheared: its third column is the step between slices, so every slice is placed where it is; "
                 "voxels are as stored, not resampled",
        "qform": f"the closest rigid affine (third column along the slice normal): it misplaces slices by up to "
                 f"{placement.rigid_error_mm:.3f} mm; readers that use the qform (ignoring the sform) see the "
                 f"slices stacked straight",
        "threshold_mm": SPLIT_MM,
    }
