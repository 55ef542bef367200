"""Volume files: NIfTI-1 (``.nii.gz``, nibabel) and NumPy (``.npz``), and their JSON sidecars.

The writers take a volume in voxel order ``(i, j, k)`` = (columns, rows, slices), ``(..., 3)`` for
RGB, and its affines (RAS mm); what the volume is and where its slices are comes from
:mod:`node.process.volume`.  Every file is written atomically (temporary file, rename) and the
voxels are streamed a slice at a time, never copied whole.

NIfTI: sform = the affine that places every slice (sheared for a gantry tilt), qform = the closest
rigid one, both with code 1 (scanner), or 0 when the source has no position; integers with
``scl_slope``/``scl_inter`` when a slope and intercept are given, so ``get_fdata()`` gives the
modality values; RGB as ``RGB24``.  NumPy: ``volume``, ``affine`` (4x4 RAS) and ``spacing``.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.volumeutils import array_to_file

from node.store.fsutil import atomic_output

__all__ = ["NIFTI_SUFFIX", "NPZ_SUFFIX", "write_nifti", "write_npz", "write_sidecar"]

NIFTI_SUFFIX = ".nii.gz"
NPZ_SUFFIX = ".npz"

# zlib level 1, as nibabel's default and the node's PNGs: several times faster than level 6 for
# files about 10-20% larger.
_COMPRESS_LEVEL = 1
_NIFTI_SCANNER = 1  # NIFTI_XFORM_SCANNER_ANAT
_RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def _rgb24(data: np.ndarray) -> np.ndarray:
    """``(i, j, k, 3)`` uint8 as ``(i, j, k)`` RGB24 records (a view when the memory allows)."""
    slices_first = np.ascontiguousarray(data.transpose(2, 1, 0, 3))  # no copy for Voxels.voxel_order()
    return slices_first.view(_RGB24).reshape(slices_first.shape[:3]).T


def write_nifti(
    path: Path,
    data: np.ndarray,
    *,
    affine: np.ndarray,
    rigid: np.ndarray,
    zooms: Sequence[float],
    placed: bool = True,
    slope: float = 1.0,
    intercept: float = 0.0,
    description: str = "",
) -> Path:
    """Write a ``.nii.gz`` (NIfTI-1, one file), zlib level 1.

    Parameters
    ----------
    path : pathlib.Path
        Destination, replaced in one step.
    data : numpy.ndarray
        ``(i, j, k)`` integers or floats, or ``(i, j, k, 3)`` uint8 RGB.
    affine, rigid : numpy.ndarray
        4x4 voxel -> RAS mm: the sform (may be sheared) and the qform (must be rigid).
    zooms : sequence of float
        Voxel sizes (mm), ``pixdim[1:4]``.
    placed : bool
        False writes qform_code = sform_code = 0: the affines are not a place in the patient.
    slope, intercept : float
        ``scl_slope``/``scl_inter`` of integer data (value = stored * slope + intercept).
    description : str
        ``descrip``, cut to 79 bytes.
    """
    dtype = data.dtype
    if data.ndim == 4:
        if data.shape[3] != 3 or data.dtype != np.uint8:
            raise ValueError(f"NIfTI RGB takes (i, j, k, 3) uint8, got {data.dtype} {data.shape}")
        data, dtype = _rgb24(data), _RGB24
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(data.shape)
    code = _NIFTI_SCANNER if placed else 0
    header.set_qform(rigid, code=code)
    header.set_sform(affine, code=code)
    header.set_zooms(tuple(float(z) for z in zooms))
    header.set_xyzt_units("mm")
    if dtype.kind in "iu" and (slope, intercept) != (1.0, 0.0):
        header.set_slope_inter(slope, intercept)
    header["descrip"] = description.encode("ascii", "replace")[:79]
    with atomic_output(path) as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=_COMPRESS_LEVEL, mtime=0) as stream:
            header.write_to(stream)  # 348 bytes and the 4 of "no extensions": vox_offset 352
            array_to_file(data, stream, dtype, offset=None, order="F")  # a slice at a time
    return path


def write_npz(path: Path, data: np.ndarray, *, affine: np.ndarray, spacing: Sequence[float]) -> Path:
    """Write a ``.npz`` with ``volume`` (*data*), ``affine`` (4x4 RAS) and ``spacing`` (mm), zlib level 1.

    ``numpy.load(path)["volume"]`` reads it back; the volume goes into the archive in chunks.
    """
    arrays = {"volume": data, "affine": np.asarray(affine, dtype=np.float64),
              "spacing": np.asarray(spacing, dtype=np.float64)}
    with atomic_output(path) as raw:
        with zipfile.ZipFile(raw, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESS_LEVEL,
                             allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
    return path


def write_sidecar(path: Path, facts: Mapping[str, Any]) -> Path:
    """Write *facts* as indented JSON (UTF-8), atomically."""
    with atomic_output(path) as handle:
        handle.write(json.dumps(facts, indent=2, default=str, ensure_ascii=False).encode("utf-8") + b"\n")
    return path
