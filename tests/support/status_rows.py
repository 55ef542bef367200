"""A job store filled the way the service fills it, for the status server's tests (no node process).

:class:`JobRows` spools and records instances as the SCP does, settles and claims them, processes
them with :func:`node.app.process_series.process_series` and records the result, counting in its
:class:`Metrics` as the service would; the tests then mark deliveries done or failed themselves.
:meth:`JobRows.status_server` serves those rows over HTTP on 127.0.0.1 (a free port).
"""

from __future__ import annotations

import datetime
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import requests
from PIL import Image

from node.app.process_series import process_series
from node.config.pipeline import Pipeline, parse_steps
from node.app.http.server import StatusServer
from node.process.series import InputSeries, instance_order, open_images
from node.store.jobstore import JobStore, SeriesJob
from node.store.spool import Spool
from node.telemetry.metrics import Metrics
from tests.support.node_process import copy_as_series
from tests.support.peers import LOCALHOST
from tests.support.tools import bundled

__all__ = ["PIPELINES", "PNG_PIPELINE", "SC_PIPELINE", "JobRows", "png_image", "shifted"]

SC_PIPELINE = parse_steps("ct-brain", [{"op": "rescale"}, {"op": "window", "preset": "brain"}], "sc")
PNG_PIPELINE = parse_steps("ct-wide", [{"op": "rescale"}, {"op": "window", "center": 100, "width": 900}], "png")
PIPELINES = {p.name: p for p in (SC_PIPELINE, PNG_PIPELINE)}

#: The one destination the rows name.
DESTINATION = "archive"


def shifted(ds: pydicom.Dataset, number: int) -> None:
    """Each instance a different picture (rolled sideways), so which one is "middle" matters."""
    ds.PixelData = np.roll(ds.pixel_array, number * 20, axis=1).tobytes()


@dataclass
class JobRows:
    """What the tests share: the store, the folders, the metrics and the ids of each kind of series."""

    root: Path
    jobs: JobStore
    spool: Spool
    outputs: Path
    metrics: Metrics
    ids: dict[str, int] = field(default_factory=dict)
    series_uids: dict[str, str] = field(default_factory=dict)
    alive: bool = True
    ready: bool = True

    @classmethod
    def create(cls, root: Path) -> JobRows:
        """Empty rows under *root*: ``jobs.sqlite``, ``spool/``, ``outputs/``; metrics for one destination."""
        rows = cls(root, JobStore(root / "jobs.sqlite"), Spool(root / "spool"), root / "outputs",
                   Metrics(destinations=[DESTINATION]))
        rows.outputs.mkdir()
        return rows

    def receive(self, files: list[Path], *, outside_spool: bool = False) -> str:
        """Spool and record instances as the SCP does; returns the Series Instance UID."""
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if outside_spool:  # a row pointing at a file the server must not read
                stored, size = path, path.stat().st_size
            else:
                item = self.spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                        [path.read_bytes()])
                stored, size = item.path, item.size
            self.jobs.record_instance(
                study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
                sop_class_uid=str(ds.SOPClassUID), path=stored, size=size, modality=str(ds.Modality),
                calling_ae="TESTSCU",
            )
            self.metrics.instance_received()
        return str(ds.SeriesInstanceUID)

    def claim(self) -> SeriesJob:
        """Settle what was received and claim the series for processing."""
        assert self.jobs.settle(0)
        job = self.jobs.claim_next()
        assert job is not None
        return job

    def process(self, job: SeriesJob, pipeline: Pipeline) -> None:
        """Process *job* with *pipeline* into :attr:`outputs` and record it for delivery to ``archive``."""
        images, failures = open_images(job.instance_paths)
        assert not failures
        series = InputSeries(job.study_uid, job.series_uid, sorted(images, key=instance_order))
        result = process_series(series, pipeline, self.outputs, now=datetime.datetime(2026, 1, 2, 3, 4, 5))
        assert result.outputs and not result.failures
        assert self.jobs.processed(
            job, route=pipeline.name, pipeline=pipeline.name,
            output_dir=self.outputs / job.study_uid / result.derived_series_uid,
            derived_series_uid=result.derived_series_uid, outputs=len(result.outputs),
            destinations=[DESTINATION], seconds=result.seconds,
        )
        self.metrics.series_processed(result.seconds)

    def processed_series(self, name: str, count: int, pipeline: Pipeline) -> SeriesJob:
        """*count* copies of CT_small (each :func:`shifted`) received, claimed and processed as series *name*."""
        sent = copy_as_series([bundled("CT_small.dcm")] * count, self.root / f"src-{name}", tweak=shifted)
        self.series_uids[name] = self.receive(sent)
        job = self.claim()
        self.process(job, pipeline)
        return job

    def status_server(self, **settings: object) -> StatusServer:
        """A :class:`StatusServer` (not started) on 127.0.0.1, a free port, serving these rows and
        :data:`PIPELINES`, alive and ready as :attr:`alive` and :attr:`ready` say; *settings* add or replace."""
        return StatusServer(**{
            "host": LOCALHOST, "port": 0, "jobs": self.jobs, "metrics": self.metrics, "outputs_dir": self.outputs,
            "spool_dir": self.spool.root, "is_alive": lambda: self.alive, "is_ready": lambda: self.ready,
            "pipelines": PIPELINES, **settings})


def png_image(response: requests.Response) -> Image.Image:
    """The PNG picture an HTTP response carries (the test fails when it is no PNG)."""
    assert response.headers["Content-Type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    picture.load()
    assert picture.format == "PNG"
    return picture
