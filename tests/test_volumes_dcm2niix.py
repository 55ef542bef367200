"""The node's volumes against dcm2niix (the converter researchers trust), both run here on the same files.

After ``nibabel.as_closest_canonical`` on both, the same shape and the same voxel values: on the real
gantry-tilted CT with two slice spacings, and on the two enhanced MR files.

On the tilted CT dcm2niix writes two files: ``NAME.nii`` (voxels as stored) and ``NAME_Tilt_1.nii``
(resampled onto an orthogonal grid: another shape, interpolated values).  The node's voxels are those
of the first; its sheared sform places every slice at its Image Position (Patient), which
dcm2niix's first file does not (its affine puts slices tens of mm away) and which its second file
agrees with: sampling the node's volume through its own affine at the world positions of the
``_Tilt_1`` grid gives ``_Tilt_1``'s values (up to interpolation).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.support import run_cli, tool
from tests.support.volume_series import PLACEMENT_MM, dicom_files, sidecar_of, slice_errors


def dcm2niix(inputs: Path, out: Path, *, single_file: bool = False) -> list[Path]:
    """Run dcm2niix (gzip, names from series number), return the NIfTI files it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    args = [tool("dcm2niix"), "-z", "y", "-f", "%s", "-o", str(out)] + (["-s", "y"] if single_file else [])
    result = subprocess.run([*args, str(inputs)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(out.glob("*.nii.gz"))


def node_volumes(inputs: Path, out: Path) -> list[Path]:
    result = run_cli("process", str(inputs), "--out", str(out), "--format", "nifti")
    assert result.returncode == 0, result.stderr
    return sorted(out.rglob("volume*.nii.gz"))


def canonical(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(str(path)))
    return image, image.get_fdata()


def sample_through_affine(values: np.ndarray, affine: np.ndarray, grid: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """*values* (placed by *affine*) at the world positions of every 4th in-plane voxel of *grid*
    (nearest neighbour), and *grid*'s own values there; only points inside *values*."""
    i, j, k = np.meshgrid(*(np.arange(0, n, 4 if axis < 2 else 1) for axis, n in enumerate(grid.shape)),
                          indexing="ij")
    points = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    index = np.rint(np.linalg.inv(affine) @ grid.affine @ points)[:3].astype(int)
    inside = np.all((index >= 0) & (index < np.array(values.shape)[:, None]), axis=0)
    ours = values[index[0, inside], index[1, inside], index[2, inside]]
    theirs = grid.get_fdata()[i.ravel()[inside], j.ravel()[inside], k.ravel()[inside]]
    return ours, theirs


def test_tilted_ct_same_voxels_as_dcm2niix_placed_as_its_tilt_corrected_copy(ct_series_dir: Path,
                                                                            tmp_path: Path) -> None:
    ours = node_volumes(ct_series_dir, tmp_path / "node")
    assert [p.name for p in ours] == ["volume_part1of2.nii.gz", "volume_part2of2.nii.gz"]
    # the whole series: dcm2niix makes one 28-slice volume ("interslice distance varies") plus an
    # equalised, tilt-corrected copy; the node two exact volumes of 14, which are its two halves
    whole = dcm2niix(ct_series_dir, tmp_path / "d2n")
    assert [p.name for p in whole] == ["2.nii.gz", "2_Tilt_Eq_1.nii.gz"]
    _, theirs = canonical(whole[0])
    assert theirs.shape == (512, 512, 28)
    parts = [canonical(p)[1] for p in ours]
    assert [p.shape for p in parts] == [(512, 512, 14)] * 2
    assert np.array_equal(np.concatenate(parts, axis=2), theirs)
    assert nib.load(str(whole[1])).shape != (512, 512, 28)  # resampled: not what the node writes

    # each half alone: one spacing, so dcm2niix's outputs line up with the node's volumes one to one
    sources = dicom_files(ct_series_dir)
    names = sorted(p.name for p in ct_series_dir.glob("*.dcm"))
    for number, (volume, half) in enumerate(zip(ours, (names[:14], names[14:])), start=1):
        folder = tmp_path / f"half{number}"
        folder.mkdir()
        for name in half:
            (folder / name).symlink_to(ct_series_dir / name)
        plain, tilt = dcm2niix(folder, tmp_path / f"d2n{number}")
        assert tilt.name == "2_Tilt_1.nii.gz"
        node_image, node_values = canonical(volume)
        _, plain_values = canonical(plain)
        assert node_values.shape == plain_values.shape == (512, 512, 14)
        assert np.array_equal(node_values, plain_values)  # same voxels as dcm2niix's uncorrected file
        assert nib.load(str(tilt)).shape[:2] != (512, 512)  # the corrected copy is resampled
        # placement: ours within 0.01 mm of every Image Position (Patient); dcm2niix's plain file far off
        facts = sidecar_of(volume)
        assert max(slice_errors(nib.load(str(volume)).affine, facts, sources)) <= PLACEMENT_MM
        index_of_first_voxel = np.linalg.inv(node_image.affine) @ nib.load(str(volume)).affine
        plain_canonical = nib.as_closest_canonical(nib.load(str(plain)))
        their_errors = slice_errors(plain_canonical.affine @ np.rint(index_of_first_voxel), facts, sources)
        assert max(their_errors) > 10, their_errors
        # ... and the tilt-corrected copy agrees with where the node puts the voxels
        node_raw = nib.load(str(volume))
        ours_there, tilt_there = sample_through_affine(node_raw.get_fdata(), node_raw.affine, nib.load(str(tilt)))
        plain_raw = nib.load(str(plain))
        plain_there, tilt_there_too = sample_through_affine(plain_raw.get_fdata(), plain_raw.affine, nib.load(str(tilt)))
        ours_r = np.corrcoef(ours_there, tilt_there)[0, 1]
        plain_r = np.corrcoef(plain_there, tilt_there_too)[0, 1]
        assert ours_r > 0.999 and np.median(np.abs(ours_there - tilt_there)) == 0, ours_r
        assert plain_r < 0.95, plain_r


def test_enhanced_mr_same_shape_and_voxels_as_dcm2niix(data_dir: Path, tmp_path: Path) -> None:
    for name in ("siemens_xa10_enhanced_mr_6frames", "emri_small"):
        source = data_dir / "multiframe" / f"{name}.dcm"
        (ours,) = node_volumes(source, tmp_path / name / "node")
        (theirs,) = dcm2niix(source, tmp_path / name / "d2n", single_file=True)
        our_image, our_values = canonical(ours)
        their_image, their_values = canonical(theirs)
        assert our_values.shape == their_values.shape and our_values.shape[2] in (6, 10)
        assert np.array_equal(our_values, their_values), name
        header, their_header = nib.load(str(ours)).header, nib.load(str(theirs)).header
        if name == "emri_small":  # no Plane Position/Orientation at all: neither claims a place
            assert header["sform_code"] == header["qform_code"] == their_header["sform_code"] == 0
        else:  # an ordinary stack: both place it the same, within the DS rounding of its positions
            assert np.allclose(our_image.affine, their_image.affine, atol=1e-3), (our_image.affine, their_image.affine)
            facts = sidecar_of(ours)
            assert max(slice_errors(nib.load(str(ours)).affine, facts, dicom_files(source.parent))) <= PLACEMENT_MM
