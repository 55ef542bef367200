"""docker/: no Docker engine here, so the Dockerfile is linted and the node's config in it is loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from node.config import BasicAuth, load_config

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


def test_compose_scales_workers_over_postgresql_with_the_password_from_the_environment() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    config = load_config(DOCKER / "node.toml")
    assert config.store.url == "postgresql://node@postgres:5432/dicomnode" and config.node.shared_dir == Path("/shared")
    database = services["postgres"]["environment"]
    assert (database["POSTGRES_USER"], database["POSTGRES_DB"]) == ("node", "dicomnode")
    for name, role in (("dicom-node", "receiver"), ("worker", "worker")):
        service = services[name]
        assert service["command"][-2:] == ["--role", role]
        assert "shared:/shared" in service["volumes"] and "ports" not in service or name == "dicom-node"
        password = service["environment"][config.store.password_env]
        assert password.startswith("${DICOM_NODE_DB_PASSWORD:?") and password == database["POSTGRES_PASSWORD"]
    assert "node-data:/data" not in services["worker"]["volumes"]  # each worker its own data_dir


def test_the_status_page_needs_a_login_with_the_password_from_the_environment() -> None:
    """node.toml binds HTTP to 0.0.0.0, so it has [http] auth; compose passes the password to every service
    that serves that file (the receiver and the workers), as it passes the database password."""
    config = load_config(DOCKER / "node.toml")
    assert config.http.host == "0.0.0.0" and config.http.auth == BasicAuth("ops", "DICOM_NODE_HTTP_PASSWORD")
    assert not config.http.allow_anonymous and not config.http.public_metrics
    text = (DOCKER / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    variable = config.http.auth.password_env
    for name in ("dicom-node", "worker"):
        assert services[name]["command"][2] == "/etc/dicom-node/node.toml"
        value = services[name]["environment"][variable]
        # ${VAR:?message}: compose refuses to start without it
        assert value.startswith(f"${{{variable}:?") and value.endswith("}"), value
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(line.startswith(f"#   export {variable}=") for line in header), header
