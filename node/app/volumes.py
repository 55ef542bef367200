"""A series through a volume pipeline (``output = "nifti"`` or ``"npz"``) into volume files and sidecars.

The step :func:`node.app.process_series.process_series` takes for volume outputs, and the one
``dicom-node export`` takes per series: plan the volumes (:func:`node.process.volume.plan_volumes`),
then for each, decode its frames into one array (:func:`node.process.voxels.read_voxels`), write it
(:mod:`node.outputs.volume`) with its JSON sidecar, and let it go before the next: one volume in
memory at a time.  Files are named ``volume[_STACK][_partIofN].nii.gz|.npz`` and ``....json``
(:func:`node.outputs.naming.volume_file_stem`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config.pipeline import OutputFormat, Pipeline
from node.imaging.source import UnsupportedImage
from node.outputs.naming import volume_file_stem
from node.outputs.volume import NIFTI_SUFFIX, NPZ_SUFFIX, write_nifti, write_npz, write_sidecar
from node.process.render import series_bins
from node.process.series import InputSeries
from node.process.volume import VolumePlan, plan_volumes
from node.process.volume_facts import orientation_code, sidecar_facts
from node.process.voxels import Voxels, read_voxels

__all__ = ["OutputWriteError", "VolumeFile", "VolumeResult", "write_series_volumes"]

log = logging.getLogger(__name__)

_SUFFIXES = {OutputFormat.NIFTI: NIFTI_SUFFIX, OutputFormat.NPZ: NPZ_SUFFIX}


class OutputWriteError(UnsupportedImage):
    """A volume that could not be written (disk full, permissions): worth another run, unlike bad input."""


@dataclass
class VolumeFile:
    """One volume written: its files, and the facts an export's index lists."""

    path: Path
    sidecar: Path
    plan: VolumePlan
    shape: tuple[int, ...]

    def index_row(self, root: Path) -> dict[str, str]:
        """The row of ``index.csv``, the volume's path relative to *root*."""
        return {
            "volume": self.path.relative_to(root).as_posix(),
            "study_uid": self.plan.study_uid,
            "series_uid": self.plan.series_uid,
            "modality": str(self.plan.first_header.get("Modality") or ""),
            "shape": "x".join(str(n) for n in self.shape),
            "spacing": "x".join(f"{v:.6g}" for v in self.plan.placement.spacing),
            "orientation": orientation_code(self.plan.placement),
            "source_files": str(self.plan.source_files),
        }


@dataclass
class VolumeResult:
    """What writing a series' volumes produced: files, volumes, failures, and the sources they hold."""

    outputs: list[Path] = field(default_factory=list)
    volumes: list[VolumeFile] = field(default_factory=list)
    failures: list[UnsupportedImage] = field(default_factory=list)
    instances: int = 0
    frames: int = 0


def write_series_volumes(series: InputSeries, pipeline: Pipeline, folder: Path) -> VolumeResult:
    """Write every volume of *series* through *pipeline* into *folder*, one in memory at a time.

    Parameters
    ----------
    series : InputSeries
        Checked source images of one series.
    pipeline : Pipeline
        Its output is ``nifti`` or ``npz``.
    folder : pathlib.Path
        Where the volumes and sidecars go (created).  Volume files an earlier run left there and
        this one does not write again (the series was split differently then) are removed.

    Returns
    -------
    VolumeResult
        The files and the failures: files with malformed geometry, stacks refused (positions and
        files named), volumes whose frames could not be decoded (never written with a slice missing).
    """
    if not pipeline.output.is_volume:
        raise ValueError(f"pipeline {pipeline.name!r} writes {pipeline.output.value}, not volumes")
    result = VolumeResult()
    plans, failures = plan_volumes(series)
    result.failures.extend(failures)
    bins, failed = series_bins(pipeline, series.images)
    result.failures.extend(failed)
    for plan in plans:
        try:
            voxels = read_voxels(plan, pipeline, bins, scaled_integers=pipeline.output is OutputFormat.NIFTI)
        except UnsupportedImage as exc:
            log.error("series %s: %s not written: %s", series.series_uid, _stem(plan), exc)
            result.failures.append(exc)
            continue
        try:
            result.volumes.append(_write_volume(plan, voxels, pipeline, folder))
        except OSError as exc:  # the output side: disk full, permissions
            result.failures.append(OutputWriteError(plan.slices[0].image.path,
                                                    f"cannot write {_stem(plan)} under {folder}: {exc}"))
        del voxels
    for volume in result.volumes:
        result.outputs.extend((volume.path, volume.sidecar))
    _remove_stale(folder, {path.name for path in result.outputs})
    frames = {id(s.image): s.image.number_of_frames for v in result.volumes for s in v.plan.slices}
    result.instances, result.frames = len(frames), sum(frames.values())
    return result


def _stem(plan: VolumePlan) -> str:
    return volume_file_stem(plan.stack, plan.part, plan.parts)


def _write_volume(plan: VolumePlan, voxels: Voxels, pipeline: Pipeline, folder: Path) -> VolumeFile:
    started = time.monotonic()
    path = folder / (_stem(plan) + _SUFFIXES[pipeline.output])
    placement = plan.placement
    data = voxels.voxel_order()
    if pipeline.output is OutputFormat.NIFTI:
        write_nifti(path, data, affine=placement.affine, rigid=placement.rigid, zooms=placement.spacing,
                    placed=placement.placed, slope=voxels.slope, intercept=voxels.intercept,
                    description=f"dicom-node: {pipeline.describe()}")
    else:
        write_npz(path, data, affine=placement.affine, spacing=placement.spacing)
    sidecar = write_sidecar(folder / (_stem(plan) + ".json"), sidecar_facts(plan, voxels, pipeline))
    log.info("series %s: %s %s written in %.1f s", plan.series_uid, path.name, "x".join(map(str, data.shape)),
             time.monotonic() - started)
    return VolumeFile(path, sidecar, plan, tuple(data.shape))


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Remove the volume files and sidecars in *folder* this run did not write."""
    if not folder.is_dir():
        return
    for old in folder.glob("volume*"):
        if old.name not in keep and old.is_file() and old.name.endswith((NIFTI_SUFFIX, NPZ_SUFFIX, ".json")):
            log.info("removing %s, left by an earlier run", old)
            old.unlink(missing_ok=True)
