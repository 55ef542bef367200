"""Volume pipelines in the service (issue 18): routes send them to folder destinations only.

The config check refuses a route sending volumes to a DICOM or DICOMweb destination (naming the
file, line and key), keep_patient on a non-volume pipeline, and file_names on a folder receiving
volumes; a running node receives a real series and delivers its volumes and sidecars to a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest

from tests.support import (
    HEAD, NodeProcess, copy_as_series, error_of, folder_route, free_port, load_text, marked_line, node_config, storescu,
    wait_for,
)
from tests.support.volume_series import PLACEMENT_MM, dicom_files, sidecar_of, slice_errors

PIPELINE = """\
[[pipelines]]
name = "vol"
steps = [{{ op = "rescale" }}]
output = "{output}"{extra}
"""

DESTINATIONS = """\
[[destinations]]
name = "pacs"
kind = "dicom"
host = "127.0.0.1"
port = 11113
ae_title = "PACS"

[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"

[[destinations]]
name = "folder"
kind = "folder"
path = "out"

[[destinations]]
name = "named"
kind = "folder"
path = "out2"
file_names = "{SeriesNumber:04}_{InstanceNumber:05}"
"""


def route(destination: str) -> str:
    return f"""
[[routes]]
match = {{}}
pipeline = "vol"
destinations = ["{destination}"]  # <-
"""


@pytest.mark.parametrize("output", ["nifti", "npz"])
@pytest.mark.parametrize("destination", ["pacs", "web"])
def test_volumes_to_dicom_destinations_are_refused(tmp_path: Path, output: str, destination: str) -> None:
    text = HEAD + PIPELINE.format(output=output, extra="") + DESTINATIONS + route(destination)
    error = error_of(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'node.toml'}:{marked_line(text)}: routes[1].destinations[1]:"), error
    assert f'writes output = "{output}"' in error and "send it to a folder destination" in error


def test_volumes_to_a_folder_are_accepted_but_not_renamed(tmp_path: Path) -> None:
    text = HEAD + PIPELINE.format(output="nifti", extra="\nkeep_patient = true") + DESTINATIONS + route("folder")
    config = load_text(tmp_path, text)
    assert config.pipelines["vol"].keep_patient and config.pipelines["vol"].output.is_volume
    text = HEAD + PIPELINE.format(output="npz", extra="") + DESTINATIONS + route("named")
    error = error_of(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'node.toml'}:{marked_line(text)}: routes[1].destinations[1]:"), error
    assert "keep their own names" in error


def test_keep_patient_is_for_volumes_only(tmp_path: Path) -> None:
    text = (HEAD + PIPELINE.format(output="png", extra="\nkeep_patient = true  # <-") + DESTINATIONS
            + route("folder").replace("  # <-", ""))
    error = error_of(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'node.toml'}:{marked_line(text)}: pipelines[1] (name \"vol\").keep_patient:")
    assert "volume outputs (nifti, npz) only" in error


@pytest.mark.peers
def test_a_running_node_delivers_volumes_to_a_folder(ct_series_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    sources = copy_as_series(sorted(ct_series_dir.glob("*.dcm")), tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    config = node_config(tmp_path / "var", port, extra=folder_route(out, output="nifti"))
    with NodeProcess(config, tmp_path, port=port) as node:
        assert storescu("127.0.0.1", port, sources, called_aet="DICOMNODE").returncode == 0
        marker = wait_for(lambda: next(out.rglob(".complete"), None), 120, "the delivered series", node.log)
    delivered = sorted(p.name for p in marker.parent.iterdir())
    assert delivered == [".complete", "volume_part1of2.json", "volume_part1of2.nii.gz", "volume_part2of2.json",
                         "volume_part2of2.nii.gz"]
    files = dicom_files(tmp_path / "in")
    for name in ("volume_part1of2.nii.gz", "volume_part2of2.nii.gz"):
        volume = marker.parent / name
        image = nib.load(str(volume))
        assert image.shape == (512, 512, 14)
        facts = sidecar_of(volume)
        assert max(slice_errors(image.affine, facts, files)) <= PLACEMENT_MM
        assert "PatientName" not in json.dumps(facts)
