"""What a volume's JSON sidecar says: its source, geometry, values, and the decisions made on the way.

No patient name or ID unless the pipeline says ``keep_patient = true``; no file paths (the folder
names of a site's export often carry the patient's name).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import nibabel as nib

from node import SOFTWARE
from node.config.pipeline import Pipeline
from node.process.volume import PLACEMENT_MM, SPLIT_MM, Placement, VolumePlan
from node.process.voxels import Voxels

__all__ = ["orientation_code", "sidecar_facts"]


def orientation_code(placement: Placement) -> str:
    """The RAS letters the voxel axes point to most (nibabel's ``aff2axcodes``, e.g. ``LPS``); ``-`` unplaced."""
    if not placement.placed:
        return "-"
    return "".join(str(code) for code in nib.aff2axcodes(placement.affine))


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


def sidecar_facts(plan: VolumePlan, voxels: Voxels, pipeline: Pipeline) -> dict[str, Any]:
    """What the JSON sidecar says of a volume: its source, geometry, values and the decisions made.

    No patient name or ID unless ``pipeline.keep_patient``; no file paths (folder names of an
    export often carry the patient's name).
    """
    header = plan.first_header
    placement, plane = plan.placement, plan.plane
    series_number = str(header.get("SeriesNumber") or "").strip()
    facts: dict[str, Any] = {
        "StudyInstanceUID": plan.study_uid,
        "SeriesInstanceUID": plan.series_uid,
        "Modality": str(header.get("Modality") or ""),
        "SeriesNumber": int(series_number) if series_number.lstrip("-").isdigit() else None,
        "SeriesDescription": str(header.get("SeriesDescription") or ""),
        "stack": plan.stack or None,
        "part": plan.part,
        "parts": plan.parts,
        "shape": list(voxels.voxel_order().shape),
        "voxel_order": "i = column, j = row, k = slice along the slice normal" + (", then R, G, B" if voxels.rgb else ""),
        "dtype": "RGB24" if voxels.rgb else str(voxels.array.dtype),
        "values": voxels.values,
        "slope": voxels.slope,
        "intercept": voxels.intercept,
        "spacing_mm": [round(v, 6) for v in placement.spacing],
        "ImageOrientationPatient": ((_number_list(plane.row_cosine) or []) + (_number_list(plane.column_cosine) or [])
                                    or None),
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
        "software": SOFTWARE,
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
    tilt = plan.first_header.get("GantryDetectorTilt")
    try:
        header_tilt = float(tilt) if tilt not in (None, "") else None
    except (TypeError, ValueError):
        header_tilt = None
    return {
        "degrees": round(placement.tilt_degrees, 4),
        "GantryDetectorTilt": header_tilt,
        "sform": "sheared: its third column is the step between slices, so every slice is placed where it is; "
                 "voxels are as stored, not resampled",
        "qform": f"the closest rigid affine (third column along the slice normal): it misplaces slices by up to "
                 f"{placement.rigid_error_mm:.3f} mm; readers that use the qform (ignoring the sform) see the "
                 f"slices stacked straight",
        "threshold_mm": SPLIT_MM,
    }
