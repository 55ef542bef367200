"""Process one series through one pipeline into output files.

This is the whole offline path (``dicom-node process``) and the worker step of the service: it
reads the source images, renders them (:mod:`node.process.render`), and writes Secondary Captures or PNGs
(or, for ``output = "gsps"``, presentation states showing the sources: :mod:`node.outputs.gsps`)
in the folder layout ``<out>/<StudyUID>/<DerivedSeriesUID>/<SOPUID>.dcm|.png`` (:mod:`node.outputs.naming`;
volumes, by :mod:`node.app.volumes`: ``volume[...].nii.gz|.npz`` and ``.json`` there).
Derived UIDs come from the source UIDs and the pipeline, so processing the same input again replaces the outputs.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.imaging.colormap import colormap_table
from node.imaging.source import ImageFile, UnsupportedImage
from node.config.pipeline import Channels, OutputFormat, Pipeline, series_description
from node.imaging.display import output_levels
from node.process.histograms import ImageHistograms, SeriesHistograms, merge_image_histograms, value_unit
from node.process.presentation import plan_presentation_states
from node.process.render import FrameRenderer, series_bins
from node.process.series import InputSeries
from node.outputs.png import traceability_text, write_png
from node.outputs.sc import DerivedImage, DerivedSeries, SecondaryCaptureSeriesWriter, SourceImage
from node.outputs import naming
from node.app.volumes import write_series_volumes

__all__ = ["SeriesResult", "derived_series_uid", "process_series"]

log = logging.getLogger(__name__)

_PROGRESS_SECONDS = 5.0
# Images whose frames decode to more than this are processed one at a time within a series (the
# others still in parallel): decoding and rendering hold 2.2-3.1 frames, so four 256 MB frames at
# once would need 2.3-3.2 GB.  A 4096 x 4096 16-bit frame is 32 MB.
_ONE_AT_A_TIME_FRAME_BYTES = 32 * 2**20


@dataclass
class SeriesResult:
    """What processing one series produced."""

    study_uid: str
    series_uid: str
    derived_series_uid: str
    outputs: list[Path] = field(default_factory=list)
    failures: list[UnsupportedImage] = field(default_factory=list)
    instances: int = 0
    frames: int = 0
    seconds: float = 0.0
    histograms: SeriesHistograms | None = None  # when asked for, and grey values were rendered


def derived_series_uid(series_uid: str, pipeline: Pipeline) -> str:
    """The UID of the series *pipeline* derives from *series_uid* (the same every time)."""
    return naming.derived_series_uid(series_uid, pipeline.fingerprint())


def _derived_series(series: InputSeries, pipeline: Pipeline) -> DerivedSeries:
    first = series.images[0].header
    try:
        number = int(first.get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        number = 1000
    return DerivedSeries(
        series_instance_uid=derived_series_uid(series.series_uid, pipeline),
        series_number=number,
        series_description=series_description(pipeline, str(first.get("SeriesDescription") or "")),
        derivation_description=pipeline.describe(),
    )


def process_series(
    series: InputSeries,
    pipeline: Pipeline,
    out_dir: Path,
    *,
    now: datetime.datetime,
    threads: int = 1,
    histograms: bool = False,
) -> SeriesResult:
    """Render every image of *series* and write the outputs under *out_dir*.

    Parameters
    ----------
    series : InputSeries
        Checked source images of one series, in order.
    pipeline : Pipeline
        What to do and what to write.
    out_dir : pathlib.Path
        Root of the output layout.
    now : datetime.datetime
        Content date/time written into Secondary Captures (injected so output is reproducible).
    threads : int
        Images processed at once.  Decoding, the array work, PNG compression and file writes
        release the GIL, so 2 threads on 2 cores take about two thirds of the time of one.
        Images with frames above 32 MB decoded are processed one at a time whatever this says,
        so one series holds at most one such frame (2.2-3.1 times its size) at once.
    histograms : bool
        Count the value histograms before and after (:mod:`node.process.histograms`) while
        rendering, into :attr:`SeriesResult.histograms`: 0.5 ms a 512 x 512 slice rendered
        through a table (a window), 2 ms pixel by pixel (per-image equalisation).

    Returns
    -------
    SeriesResult
        Outputs and per-image failures; a failing image never stops the others.
    """
    started = time.monotonic()
    derived = _derived_series(series, pipeline)
    result = SeriesResult(series.study_uid, series.series_uid, derived.series_instance_uid)
    if pipeline.output is OutputFormat.GSPS:
        return _presentation_states(series, pipeline, out_dir, derived, result, now=now, started=started)
    if pipeline.output.is_volume:  # a file per volume, not per image
        volumes = write_series_volumes(series, pipeline, out_dir / series.study_uid / derived.series_instance_uid)
        result.outputs, result.failures = volumes.outputs, volumes.failures
        result.instances, result.frames = volumes.instances, volumes.frames
        result.seconds = time.monotonic() - started
        return result
    bins, failed = series_bins(pipeline, series.images)
    result.failures.extend(failed)
    failed_paths = {f.path for f in failed}
    folder = out_dir / series.study_uid / derived.series_instance_uid
    todo = [image for image in series.images if image.path not in failed_paths]
    # One writer for the whole series: it encodes the header its SCs share once (see there).
    sc_writer = SecondaryCaptureSeriesWriter(derived, now)
    colormap = None if pipeline.colormap is None else colormap_table(pipeline.colormap)

    big_frames = threading.Lock()
    counts = {image.path: _image_histograms(pipeline, image) for image in todo} if histograms else {}

    def one(image: ImageFile) -> list[Path] | UnsupportedImage:
        try:
            with big_frames if image.frame_bytes > _ONE_AT_A_TIME_FRAME_BYTES else contextlib.nullcontext():
                return _process_image(image, pipeline, sc_writer, folder, bins, colormap, counts.get(image.path))
        except UnsupportedImage as exc:
            return exc
        except OSError as exc:  # the output side: disk full, permissions
            return UnsupportedImage(image.path, f"cannot write output under {folder}: {exc}")

    last_report = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="render") as pool:
        for number, (image, outcome) in enumerate(zip(todo, pool.map(one, todo)), start=1):
            if isinstance(outcome, UnsupportedImage):
                log.error("%s", outcome)
                result.failures.append(outcome)
                continue
            result.outputs.extend(outcome)
            result.instances += 1
            result.frames += image.number_of_frames
            if time.monotonic() - last_report > _PROGRESS_SECONDS:
                last_report = time.monotonic()
                log.info("series %s: %d/%d instances processed", series.series_uid, number, len(todo))
    if histograms and result.instances:
        done = [image for image in todo if image.path not in {f.path for f in result.failures}]
        result.histograms = merge_image_histograms(
            pipeline, [counts[image.path] for image in done], series_edges=bins,
            unit=value_unit(pipeline, done[0].header, done[0].is_grey),
        )
    result.seconds = time.monotonic() - started
    return result


def _image_histograms(pipeline: Pipeline, image: ImageFile) -> ImageHistograms:
    """Empty counts for one image's frames (the middle frame's equalisation edges are kept)."""
    channels = 3 if isinstance(pipeline.display, Channels) else 1
    bits = 8 if channels == 3 or pipeline.colormap is not None else pipeline.output.bits
    return ImageHistograms(output_levels(bits) + 1, channels, edges_frame=image.number_of_frames // 2)


def _presentation_states(
    series: InputSeries,
    pipeline: Pipeline,
    out_dir: Path,
    derived: DerivedSeries,
    result: SeriesResult,
    *,
    now: datetime.datetime,
    started: float,
) -> SeriesResult:
    """``output = "gsps"``: presentation state(s) showing the series' images instead of new pixels
    (one per image size and polarity, :mod:`node.process.presentation`)."""
    from node.outputs.gsps import content_label, write_presentation_state  # highdicom: ~1 s to import

    planned = plan_presentation_states(series, pipeline)
    result.failures.extend(planned.failures)
    folder = out_dir / series.study_uid / derived.series_instance_uid
    for number, plan in enumerate(planned.plans, start=1):
        sop_uid = naming.presentation_state_uid(series.series_uid, pipeline.fingerprint(), plan.key)
        try:
            path = write_presentation_state(
                folder / naming.output_file_name(sop_uid, dicom=True), plan.images, plan.voi, plan.rescale, derived=derived,
                sop_instance_uid=sop_uid, instance_number=number, label=content_label(pipeline.name),
                description=derived.derivation_description, now=now,
            )
        except (ValueError, TypeError, AttributeError, OSError) as exc:  # highdicom refusing, or the disk
            reason = f"no presentation state written for {len(plan.images)} images ({plan.key}): {exc}"
            result.failures.extend(UnsupportedImage(image.path, reason) for image in plan.images)
            continue
        result.outputs.append(path)
        result.instances += len(plan.images)
        result.frames += sum(image.number_of_frames for image in plan.images)
        log.info("series %s: presentation state %s shows %d images", series.series_uid, sop_uid, len(plan.images))
    for failure in result.failures:
        log.error("%s", failure)
    result.seconds = time.monotonic() - started
    return result


def _process_image(
    image: ImageFile,
    pipeline: Pipeline,
    sc_writer: SecondaryCaptureSeriesWriter,
    folder: Path,
    bins: np.ndarray | None,
    colormap: np.ndarray | None = None,
    histograms: ImageHistograms | None = None,
) -> list[Path]:
    renderer = FrameRenderer(pipeline, image, bins, colormap=colormap, histograms=histograms)
    source_sop = str(image.header.get("SOPInstanceUID") or image.path.name)
    sop_uid = naming.derived_instance_uid(source_sop, pipeline.fingerprint())
    folder.mkdir(parents=True, exist_ok=True)
    if pipeline.output.is_dicom:
        return [_write_sc(image, renderer, sc_writer, folder / naming.output_file_name(sop_uid, dicom=True), sop_uid)]
    return _write_pngs(image, renderer, pipeline, folder, sop_uid)


def _write_sc(
    image: ImageFile,
    renderer: FrameRenderer,
    sc_writer: SecondaryCaptureSeriesWriter,
    path: Path,
    sop_uid: str,
) -> Path:
    header = image.header
    source = SourceImage(
        sop_class_uid=str(header.get("SOPClassUID", "")),
        sop_instance_uid=str(header.get("SOPInstanceUID", "")),
        series_instance_uid=str(header.get("SeriesInstanceUID", "")) or None,
    )
    try:
        instance_number = int(header.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        instance_number = 1
    derived = DerivedImage(
        rows=int(header.Rows),
        columns=int(header.Columns),
        number_of_frames=image.number_of_frames,
        samples_per_pixel=3 if renderer.colour_out else 1,
        bits_allocated=renderer.bits,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        source_images=[source],
        multi_frame=image.number_of_frames > 1,
    )
    return sc_writer.write(path, header, derived, frames=renderer.render_all())


def _write_pngs(
    image: ImageFile, renderer: FrameRenderer, pipeline: Pipeline, folder: Path, sop_uid: str
) -> list[Path]:
    written: list[Path] = []
    multi = image.number_of_frames > 1
    derivation = pipeline.describe()
    try:
        for index, frame in enumerate(renderer.render_all(), start=1):
            name = naming.output_file_name(sop_uid, dicom=False, frame=index if multi else None)
            text = traceability_text(
                image.header, pipeline=pipeline.name, derivation=derivation, frame=index if multi else None
            )
            written.append(write_png(folder / name, frame, text))
    except UnsupportedImage:
        for path in written:  # no half-written multi-frame output
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    return written

