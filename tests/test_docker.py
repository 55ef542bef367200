"""docker/: no Docker engine here, so the Dockerfile is linted and the node's config in it is loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from node.config import load_config

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_config_is_valid_and_wired_to_orthanc() -> None:
    config = load_config(DOCKER / "node.toml")
    orthanc = json.loads((DOCKER / "orthanc.json").read_text())
    assert config.destinations["orthanc"].port == orthanc["DicomPort"]
    assert config.destinations["orthanc"].ae_title == orthanc["DicomAet"]
    assert orthanc["DicomModalities"]["node"][0] == config.node.ae_title
    assert orthanc["DicomModalities"]["node"][2] == config.node.port
    assert "11112:11112" in (DOCKER / "compose.yaml").read_text()
