"""Presentation states reach a PACS beside their source: Orthanc 1.10 by C-STORE and STOW-RS.

The senders propose each file's own SOP class, so Grayscale Softcopy Presentation State Storage
is negotiated like any other; what Orthanc then holds, rendered by dcmtk with the source Orthanc
holds, shows the image as the node's own PNG does.
"""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.app.process_series import SeriesResult, process_series
from node.config.pipeline import parse_steps
from node.deliver.dicom import DicomSender
from node.deliver.dicomweb import DicomWebSender
from node.net.pynetdicom_setup import configure_pynetdicom
from node.outputs.gsps import GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
from node.outputs.uids import derived_uid
from node.process.series import InputSeries, group_series, open_images
from tests.support import (
    BRAIN, NodeProcess, OrthancServer, copy_as_series, dicom_destination, free_port, node_config, pipeline, route,
    running_orthanc, storescu, tool, wait_for,
)

pytestmark = pytest.mark.peers

NOW = datetime.datetime(2026, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
BRAIN = [{"op": "rescale"}, {"op": "window", "preset": "brain"}]
EQUALISE = [{"op": "rescale"}, {"op": "equalise", "per": "series"}]
NODE_PORT = free_port()


@pytest.fixture(autouse=True, scope="module")
def pynetdicom_as_the_node_sets_it() -> None:
    """pynetdicom's process-wide switches as ``dicom-node serve`` sets them at start-up."""
    configure_pynetdicom()


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    with running_orthanc(aet="ORTHANC") as server:
        yield server


def _source(ct_series_dir: Path, folder: Path, count: int = 4) -> tuple[list[Path], InputSeries]:
    paths = copy_as_series(sorted(ct_series_dir.glob("*.dcm"))[10:10 + count], folder)
    images, failures = open_images(paths)
    assert not failures
    (series,) = group_series(images)
    return paths, series


def _process(series: InputSeries, steps: list[dict], output: str, out: Path) -> SeriesResult:
    result = process_series(series, parse_steps("pacs-view", steps, output), out, now=NOW)
    assert not result.failures and result.outputs
    return result


def _study_series(orthanc: OrthancServer, study_uid: str) -> dict[str, list[dict]]:
    """Orthanc's instances of *study_uid* by Series Instance UID (simplified tags)."""
    found = orthanc.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                              "Expand": True})
    by_series: dict[str, list[dict]] = {}
    for item in found:
        tags = orthanc.instance_tags(item["ID"])
        tags["ID"] = item["ID"]
        by_series.setdefault(tags["SeriesInstanceUID"], []).append(tags)
    return by_series


def test_c_store_and_stow_rs_put_presentation_states_beside_their_source(
    ct_series_dir: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    paths, series = _source(ct_series_dir, tmp_path / "in")
    for path in paths:
        assert orthanc.upload(path)["Status"] == "Success"
    by_c_store = _process(series, BRAIN, "gsps", tmp_path / "gsps")
    by_stow = _process(series, EQUALISE, "gsps", tmp_path / "gsps")
    DicomSender(host="127.0.0.1", port=orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="NODE",
                timeout=30).send(by_c_store.outputs, study_uid=series.study_uid,
                                 series_uid=by_c_store.derived_series_uid)
    DicomWebSender(url=orthanc.dicomweb_url, timeout=30).send(
        by_stow.outputs, study_uid=series.study_uid, series_uid=by_stow.derived_series_uid)

    stored = _study_series(orthanc, series.study_uid)
    assert set(stored) == {series.series_uid, by_c_store.derived_series_uid, by_stow.derived_series_uid}
    sources = sorted(str(i.header.SOPInstanceUID) for i in series.images)
    for result in (by_c_store, by_stow):
        (state,) = stored[result.derived_series_uid]
        assert state["SOPClassUID"] == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
        assert state["Modality"] == "PR"
        assert state["SOPInstanceUID"] == pydicom.dcmread(result.outputs[0]).SOPInstanceUID
        referenced = [item["ReferencedSOPInstanceUID"] for s in state["ReferencedSeriesSequence"]
                      for item in s["ReferencedImageSequence"]]
        assert sorted(referenced) == sources

    # What the PACS holds shows the source as the node does: dcmtk renders Orthanc's copies.
    (pacs_state,) = stored[by_c_store.derived_series_uid]
    state_file = tmp_path / "from-pacs-pr.dcm"
    state_file.write_bytes(orthanc.get(f"/instances/{pacs_state['ID']}/file"))
    source_tags = stored[series.series_uid][0]
    source_file = tmp_path / "from-pacs-ct.dcm"
    source_file.write_bytes(orthanc.get(f"/instances/{source_tags['ID']}/file"))
    pgm = tmp_path / "pacs.pgm"
    subprocess.run([tool("dcmp2pgm"), "-p", str(state_file), str(source_file), str(pgm)], check=True,
                   capture_output=True, timeout=60)
    png = _process(series, BRAIN, "png", tmp_path / "png")
    stem = derived_uid(source_tags["SOPInstanceUID"], "instance", parse_steps("pacs-view", BRAIN, "png").fingerprint())
    with Image.open(tmp_path / "png" / series.study_uid / png.derived_series_uid / f"{stem}.png") as node, \
            Image.open(pgm) as dcmtk:
        assert np.array_equal(np.asarray(node), np.asarray(dcmtk))


def test_a_running_node_sends_the_presentation_state_to_the_pacs(
    ct_series_dir: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    """storescu -> dicom-node serve (output = "gsps") -> C-STORE to Orthanc, which holds the source too."""
    paths, series = _source(ct_series_dir, tmp_path / "in", count=5)
    for path in paths:
        orthanc.upload(path)
    config = node_config(tmp_path / "var", NODE_PORT, extra=pipeline("ct-brain-view", BRAIN, "gsps")
                         + dicom_destination("pacs", orthanc.dicom_port, orthanc.aet)
                         + route("ct-brain-view", ["pacs"], match={"Modality": "CT"}))
    with NodeProcess(config, tmp_path, port=NODE_PORT) as node:
        result = storescu("127.0.0.1", NODE_PORT, paths, called_aet="DICOMNODE")
        assert result.returncode == 0, result.stdout + result.stderr

        def presentation_states() -> list[dict]:
            return [tags for uid, instances in _study_series(orthanc, series.study_uid).items()
                    if uid != series.series_uid for tags in instances]

        (state,) = wait_for(presentation_states, 60, "the presentation state in Orthanc", node.log)
    assert state["SOPClassUID"] == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
    assert state["SeriesDescription"].endswith("[ct-brain-view]")
    referenced = sorted(item["ReferencedSOPInstanceUID"] for s in state["ReferencedSeriesSequence"]
                        for item in s["ReferencedImageSequence"])
    assert referenced == sorted(str(i.header.SOPInstanceUID) for i in series.images)
    assert state["SoftcopyVOILUTSequence"][0]["WindowCenter"] == "40.0"
    assert "REMOVED" not in node.log()  # the sources' patient name never reaches the log
