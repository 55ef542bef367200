"""The service configuration: embedded default, shipped files, errors with file:line: key, routing."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from pydicom import Dataset

from node.config import (
    BasicAuth,
    BearerAuth,
    ConfigError,
    DeliverySettings,
    DicomDestination,
    DicomWebDestination,
    DicomWebSource,
    FolderDestination,
    NodeSettings,
    Route,
    RouteAction,
    SourceLevel,
    Trigger,
    Unrouted,
    load_config,
)
from node.config.pipeline import Channels, OutputFormat, WindowSpec
from node.process.routing import matches, route_for
from tests.support import HEAD, NO_SUCH_HOST, ROOT, error_of, load_text, marked_line, node_env, write_config

TAIL = """\
[[pipelines]]
name = "default"
steps = [{ op = "rescale" }]

[[destinations]]
name = "folder"
kind = "folder"
path = "out"

[[routes]]
match = {}
pipeline = "default"
destinations = ["folder"]
"""


# --------------------------------------------------------------------------- good files


def test_embedded_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.source == "<embedded default>"
    node = config.node
    assert (node.ae_title, node.host, node.port) == ("DICOMNODE", "0.0.0.0", 11112)
    assert node.data_dir == tmp_path / "var"  # relative to the working directory
    assert node.allowed_calling_aets == ()
    assert node.max_associations == 10
    assert node.settle_seconds == 10.0
    assert node.workers == min(4, os.cpu_count() or 1)
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)
    assert config.delivery == DeliverySettings(8, 2.0, 300.0)
    assert list(config.pipelines) == ["default"]
    pipeline = config.pipelines["default"]
    assert pipeline.rescale and not pipeline.grey
    assert pipeline.display is None and pipeline.clip is None
    assert pipeline.output is OutputFormat.SC
    assert dict(config.destinations) == {"folder": FolderDestination("folder", tmp_path / "var" / "out")}
    assert config.routes == (Route(match=(), pipeline="default", destinations=("folder",)),)
    assert route_for(config, Dataset()) is config.routes[0]


def test_config_is_read_only() -> None:
    config = load_config(None)
    with pytest.raises(AttributeError):
        config.node.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.pipelines["x"] = config.pipelines["default"]  # type: ignore[index]


def test_shipped_node_toml_matches_the_default() -> None:
    path = ROOT / "config" / "node.toml"
    config = load_config(path)
    default = load_config(None)
    assert config.source == str(path)
    assert config.node.data_dir == path.parent / "var"  # relative to the file's folder
    for field in ("ae_title", "host", "port", "allowed_calling_aets", "max_associations", "settle_seconds",
                  "min_free_disk_mb", "retention_hours", "study_settle_seconds", "force_complete_seconds",
                  "association_timeout_seconds", "max_negotiating_connections", "max_connections_per_address"):
        assert getattr(config.node, field) == getattr(default.node, field)
    assert config.http == default.http
    assert config.delivery == default.delivery
    assert config.pipelines["default"] == default.pipelines["default"]
    assert config.destinations["folder"] == FolderDestination("folder", path.parent / "var" / "out")
    assert config.routes == default.routes
    channels = config.pipelines["ct-channels"].display
    assert isinstance(channels, Channels)
    assert [w.name for w in channels.windows] == ["brain", "subdural", "brain_bone"]
    soft = config.pipelines["ct-soft"].display
    assert isinstance(soft, WindowSpec) and soft.name == "mediastinum"


def test_shipped_orthanc_toml() -> None:
    config = load_config(ROOT / "config" / "orthanc.toml")
    assert config.destinations["orthanc"] == DicomDestination("orthanc", "127.0.0.1", 4242, "ORTHANC", "DICOMNODE")
    ct, mr = Dataset(), Dataset()
    ct.Modality, mr.Modality = "CT", "MR"
    ct_route, other = route_for(config, ct), route_for(config, mr)
    assert ct_route is not None and other is not None
    assert (ct_route.pipeline, ct_route.destinations) == ("ct-soft", ("orthanc",))
    assert (other.pipeline, other.destinations) == ("default", ("folder",))
    assert config.pipelines["ct-soft"].display.name == "mediastinum"  # type: ignore[union-attr]


def test_full_example(tmp_path: Path) -> None:
    config = load_text(tmp_path, """\
[node]
ae_title = " NODE "
host = "::"
port = 0
data_dir = "/srv/dicom-node"
allowed_calling_aets = ["CT01", "MR 2"]
max_associations = 3
settle_seconds = 2
workers = 7
[http]
host = "0.0.0.0"
port = 9000
[delivery]
max_attempts = 1
backoff_seconds = 0.5
max_backoff_seconds = 0.5
[[pipelines]]
name = "ct-soft"
steps = [{ op = "rescale" }, { op = "window", preset = "mediastinum" }]
output = "sc16"
[[destinations]]
name = "pacs"
kind = "dicom"
host = "pacs.example.org"
port = 104
ae_title = "PACS"
calling_ae_title = "ME"
associations = 4
[[destinations]]
name = "archive"
kind = "dicomweb"
url = "https://archive.example.org/dicom-web"
auth = { kind = "bearer", token_env = "ARCHIVE_TOKEN" }
timeout_seconds = 5
[[destinations]]
name = "web2"
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
[destinations.auth]
kind = "basic"
username = "orthanc"
password_env = "ORTHANC_PW"
[[destinations]]
name = "out"
kind = "folder"
path = "results/out"
[[routes]]
match = { Modality = ["CT", "PT"], SeriesDescription = "*soft*" }
pipeline = "ct-soft"
destinations = ["pacs", "archive", "web2", "out"]
[[routes]]
match = {}
pipeline = "ct-soft"
destinations = []
""")
    node = config.node
    assert node.ae_title == "NODE" and node.port == 0 and node.workers == 7
    assert node.data_dir == Path("/srv/dicom-node")
    assert node.allowed_calling_aets == ("CT01", "MR 2")
    assert node.settle_seconds == 2.0 and isinstance(node.settle_seconds, float)
    assert config.delivery == DeliverySettings(1, 0.5, 0.5)
    assert config.pipelines["ct-soft"].output is OutputFormat.SC16
    assert config.destinations["pacs"] == DicomDestination("pacs", "pacs.example.org", 104, "PACS", "ME",
                                                           associations=4)
    assert config.destinations["archive"] == DicomWebDestination(
        "archive", "https://archive.example.org/dicom-web", BearerAuth("ARCHIVE_TOKEN"), 5.0
    )
    web2 = config.destinations["web2"]
    assert isinstance(web2, DicomWebDestination)
    assert web2.auth == BasicAuth("orthanc", "ORTHANC_PW") and web2.timeout_seconds == 30.0
    assert config.destinations["out"] == FolderDestination("out", tmp_path / "results" / "out")
    assert list(config.destinations) == ["pacs", "archive", "web2", "out"]
    assert config.routes[0].match == (("Modality", ("CT", "PT")), ("SeriesDescription", ("*soft*",)))
    assert config.routes[1].destinations == ()


def test_settings_default_to_the_embedded_values(tmp_path: Path) -> None:
    """[node], [http] and [delivery] may be left out, wholly or key by key."""
    default = load_config(None)
    config = load_text(tmp_path, "[delivery]\nmax_attempts = 3\n" + TAIL)
    assert config.node == NodeSettings(**{**vars(default.node), "data_dir": tmp_path / "var"})
    assert config.http == default.http
    assert config.delivery == DeliverySettings(3, 2.0, 300.0)


def test_no_routes_is_valid(tmp_path: Path) -> None:
    """A node without routes receives and spools; nothing is processed."""
    config = load_text(tmp_path, HEAD)
    assert config.routes == () and not config.pipelines and not config.destinations
    assert route_for(config, Dataset()) is None


def test_defaults_have_one_place(tmp_path: Path) -> None:
    """node/config/default.toml holds every default of [node], [http] and [delivery] (workers aside: the
    machine's); a file that leaves them out gets exactly those; config/node.toml documents the same."""
    embedded = tomllib.loads((ROOT / "node" / "config" / "default.toml").read_text(encoding="utf-8"))
    documented = tomllib.loads((ROOT / "config" / "node.toml").read_text(encoding="utf-8"))
    empty = load_text(tmp_path, "")
    optional = {"workers", "shared_dir", "auth", "cert_file", "key_file"}  # no value by default, or the CPUs
    for table in ("node", "http", "delivery"):
        settings = getattr(empty, table)
        keys = [f.name for f in dataclasses.fields(settings) if f.name not in optional]
        assert sorted(embedded[table]) == sorted(keys), table
        for key in keys:
            default = embedded[table][key]
            expected = tmp_path / default if key == "data_dir" else tuple(default) if isinstance(default, list) \
                else default
            assert getattr(settings, key) == expected, (table, key)
            assert documented[table].get(key, default) == default, (table, key)
    assert empty.node.workers == min(4, os.cpu_count() or 1) and empty.node.shared_dir is None


def test_config_pickles_and_its_parts_hash(tmp_path: Path) -> None:
    """Worker processes get the Config by pickle (spawn); states are StrEnum members that still equal the
    file's strings."""
    config = load_text(tmp_path, HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nunrouted = "discard"')
                       + TAIL.replace('destinations = ["folder"]', 'destinations = ["folder"]\ntrigger = "study"')
                       + '[[routes]]\nmatch = { Modality = "SR" }\naction = "discard"\n'
                       + '[[sources]]\nname = "a"\nkind = "dicomweb"\nurl = "http://127.0.0.1/d"\nevery_seconds = 60\n'
                       + 'level = "study"\nauth = { kind = "bearer", token_env = "T" }\n')
    again = pickle.loads(pickle.dumps(config))
    assert again == config and again.sources["a"].auth.where == config.sources["a"].auth.where != ""
    with pytest.raises(TypeError):
        again.destinations["x"] = again.destinations["folder"]  # type: ignore[index]
    for part in (config.node, config.http, config.delivery, *config.destinations.values(), *config.sources.values(),
                 *config.routes, config.store):
        assert hash(part) == hash(pickle.loads(pickle.dumps(part)))
    process, discard = config.routes
    assert process.trigger is Trigger.STUDY and process.trigger == "study" and f"{process.trigger}" == "study"
    assert process.action is RouteAction.PROCESS and discard.action is RouteAction.DISCARD and discard.discards
    assert config.node.unrouted is Unrouted.DISCARD and config.sources["a"].level is SourceLevel.STUDY


def test_delivery_delay_doubles_up_to_the_ceiling() -> None:
    delivery = DeliverySettings(max_attempts=8, backoff_seconds=2.0, max_backoff_seconds=300.0)
    assert [delivery.delay(n) for n in range(1, 10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert delivery.delay(5000) == 300.0


# --------------------------------------------------------------------------- errors

ERRORS = [
    # (id, text with the faulty line marked "# <-", key as printed, part of the message)
    ("port-text", HEAD.replace("port = 11112", 'port = "abc" # <-') + TAIL,
     "node.port", 'must be a whole number 0-65535 (0: no plain listener), got "abc"'),
    ("port-range", HEAD.replace("port = 11112", "port = 70000 # <-") + TAIL,
     "node.port", "got 70000"),
    ("port-bool", HEAD.replace("port = 8080", "port = true # <-") + TAIL,
     "http.port", "must be a whole number 1-65535, got true"),
    ("http-port-zero", HEAD.replace("port = 8080", "port = 0 # <-") + TAIL,
     "http.port", "must be a whole number 1-65535, got 0"),
    ("ae-long", HEAD.replace('ae_title = "DICOMNODE"', 'ae_title = "ABCDEFGHIJKLMNOPQ" # <-') + TAIL,
     "node.ae_title", "not a valid AE title: must be at most 16 characters, got 17"),
    ("ae-backslash", HEAD.replace('ae_title = "DICOMNODE"', 'ae_title = "A\\\\B" # <-') + TAIL,
     "node.ae_title", "must not contain a backslash"),
    ("ae-spaces", HEAD.replace('ae_title = "DICOMNODE"', 'ae_title = "   " # <-') + TAIL,
     "node.ae_title", "must not be all spaces"),
    ("ae-control", HEAD.replace('ae_title = "DICOMNODE"', 'ae_title = "A\\tB" # <-') + TAIL,
     "node.ae_title", "control characters"),
    ("calling-aets", HEAD.replace("allowed_calling_aets = []", 'allowed_calling_aets = [\n  "OK",\n  "",  # <-\n]')
     + TAIL, "node.allowed_calling_aets[2]", "not a valid AE title: must not be empty"),
    ("settle-zero", HEAD.replace("settle_seconds = 10.0", "settle_seconds = 0 # <-") + TAIL,
     "node.settle_seconds", "must be a number of seconds from 0.1 to 86400 (under 0.1 s a series is split "
     "wherever its sender pauses, and the idle node spends its CPU looking for quiet series; over a day (86400) "
     "a finished series waits that long), got 0"),
    ("settle-nan", HEAD.replace("settle_seconds = 10.0", "settle_seconds = nan # <-") + TAIL,
     "node.settle_seconds", "must be a number of seconds from 0.1 to 86400"),
    ("workers", HEAD.replace("settle_seconds = 10.0", "settle_seconds = 10.0\nworkers = 0 # <-") + TAIL,
     "node.workers", "must be a whole number >= 1, got 0"),
    ("association-timeout-low", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nassociation_timeout_seconds = 0.5 # <-') + TAIL,
     "node.association_timeout_seconds", 'must be a number of seconds from 1 to 300 (under 1 s a sender on a slow or lossy network is cut off while it negotiates; over 300 s a silent connection holds its place that long), got 0.5'),
    ("association-timeout-high", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nassociation_timeout_seconds = 301 # <-') + TAIL,
     "node.association_timeout_seconds", 'must be a number of seconds from 1 to 300 (under 1 s'),
    ("association-timeout-text", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nassociation_timeout_seconds = "5" # <-') + TAIL,
     "node.association_timeout_seconds", 'must be a number of seconds from 1 to 300 (under 1 s'),
    ("max-negotiating-low", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nmax_negotiating_connections = 0 # <-') + TAIL,
     "node.max_negotiating_connections", 'must be a whole number 1-1000, got 0'),
    ("max-negotiating-high", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nmax_negotiating_connections = 1001 # <-') + TAIL,
     "node.max_negotiating_connections", 'must be a whole number 1-1000, got 1001'),
    ("per-address-low", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nmax_connections_per_address = -1 # <-') + TAIL,
     "node.max_connections_per_address", 'must be a whole number 0-1000 (0: no limit), got -1'),
    ("per-address-high", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nmax_connections_per_address = 1001 # <-') + TAIL,
     "node.max_connections_per_address", 'must be a whole number 0-1000 (0: no limit), got 1001'),
    ("data-dir", HEAD.replace('data_dir = "var"', "data_dir = 3 # <-") + TAIL,
     "node.data_dir", "must be a non-empty string, got 3"),
    ("missing-key-header-line", HEAD + """\
[[pipelines]] # <-
name = "default"
output = "sc"
""" + TAIL[TAIL.index("[[destinations]]"):],
     'pipelines[1] (name "default").steps', "missing (required)"),
    ("unknown-key", HEAD.replace("max_associations = 10", "max_asociations = 10 # <-") + TAIL,
     "node.max_asociations", "unknown key (did you mean 'max_associations'?); allowed keys: ae_title, host, "
     "port, data_dir, allowed_calling_aets, max_associations, settle_seconds, workers"),
    ("unknown-table", HEAD + "[[destination]] # <-\nname = \"x\"\n" + TAIL,
     "destination", "unknown key (did you mean 'destinations'?)"),
    ("table-not-table", "http = 8080 # <-\n" + HEAD.split("[http]")[0] + TAIL,
     "http", "must be a table, got 8080"),
    ("delivery-ceiling", HEAD + "[delivery]\nmax_attempts = 3\nbackoff_seconds = 10\nmax_backoff_seconds = 5 # <-\n"
     + TAIL, "delivery.max_backoff_seconds", "must be >= backoff_seconds (10), got 5"),
    ("delivery-attempts", HEAD + "[delivery]\nmax_attempts = 0 # <-\nbackoff_seconds = 1\nmax_backoff_seconds = 5\n"
     + TAIL, "delivery.max_attempts", "must be a whole number >= 1, got 0"),
    ("second-destination-port", HEAD + """\
[[pipelines]]
name = "default"
steps = [{ op = "rescale" }]
[[destinations]]
name = "folder"
kind = "folder"
path = "out"
[[destinations]]
name = "pacs"
kind = "dicom"
host = "127.0.0.1"
port = "abc" # <-
ae_title = "ORTHANC"
[[routes]]
match = {}
pipeline = "default"
destinations = ["pacs"]
""", 'destinations[2] (name "pacs").port', 'must be a whole number 1-65535, got "abc"'),
    ("destination-missing-key", HEAD + """\
[[pipelines]]
name = "default"
steps = [{ op = "rescale" }]
[[destinations]]
name = "folder"
kind = "folder"
path = "out"
[[destinations]] # <-
name = "pacs"
kind = "dicom"
port = 4242
ae_title = "ORTHANC"
""", 'destinations[2] (name "pacs").host', "missing (required)"),
    ("destination-kind", HEAD + """\
[[destinations]]
name = "pacs"
kind = "dimse" # <-
""" + TAIL, 'destinations[1] (name "pacs").kind', 'must be one of dicom, dicomweb, folder, got "dimse"'),
    ("destination-kind-typo", HEAD + """\
[[destinations]]
name = "pacs"
knid = "dicom" # <-
""" + TAIL, 'destinations[1] (name "pacs").knid', "unknown key (did you mean 'kind'?)"),
    ("destination-key-of-other-kind", HEAD + """\
[[destinations]]
name = "pacs"
kind = "folder"
path = "x"
url = "http://x" # <-
""" + TAIL, 'destinations[1] (name "pacs").url', "unknown key; allowed keys: name, kind, path"),
    ("destination-url", HEAD + """\
[[destinations]]
name = "web"
kind = "dicomweb"
url = "ftp://host/dicom-web" # <-
""" + TAIL, 'destinations[1] (name "web").url', 'must be an http:// or https:// URL, got "ftp://host/dicom-web"'),
    ("destination-calling-ae", HEAD + """\
[[destinations]]
name = "pacs"
kind = "dicom"
host = "h"
port = 104
ae_title = "PACS"
calling_ae_title = "" # <-
""" + TAIL, 'destinations[1] (name "pacs").calling_ae_title', "not a valid AE title"),
    ("ca-file-http", HEAD + """\
[[destinations]]
name = "archive"
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
ca_file = "ca.pem" # <-
""" + TAIL, 'destinations[1] (name "archive").ca_file', "is for https:// URLs"),
    ("associations", HEAD + """\
[[destinations]]
name = "pacs"
kind = "dicom"
host = "h"
port = 104
ae_title = "PACS"
associations = 0 # <-
""" + TAIL, 'destinations[1] (name "pacs").associations', "must be a whole number 1-16, got 0"),
    ("destination-name", HEAD + """\
[[destinations]]
name = "my pacs" # <-
kind = "folder"
path = "x"
""" + TAIL, "destinations[1] (name \"my pacs\").name", "must be 1-64 letters"),
    ("duplicate-destination", HEAD + TAIL + """\
[[destinations]]
name = "folder" # <-
kind = "folder"
path = "other"
""", 'destinations[2] (name "folder").name', 'duplicate name "folder" (also at line 19)'),
    ("auth-inline-kind", HEAD + """\
[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://h/dicom-web"
auth = { kind = "digest", username = "u" } # <-
""" + TAIL, 'destinations[1] (name "web").auth.kind', 'must be one of basic, bearer, got "digest"'),
    ("auth-inline-missing", HEAD + """\
[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://h/dicom-web"
auth = { kind = "basic", username = "u" } # <-
""" + TAIL, 'destinations[1] (name "web").auth.password_env', "missing (required)"),
    ("auth-inline-unknown", HEAD + """\
[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://h/dicom-web"
auth = { kind = "bearer", token = "secret" } # <-
""" + TAIL, 'destinations[1] (name "web").auth.token',
     "unknown key (did you mean 'token_env'?); allowed keys: kind, token_env"),
    ("auth-subtable", HEAD + TAIL + """\
[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://h/dicom-web"
[destinations.auth]
kind = "basic"
username = "u"
password_env = "NOT A NAME" # <-
""", 'destinations[2] (name "web").auth.password_env', "must name an environment variable"),
    ("timeout", HEAD + """\
[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://h/dicom-web"
timeout_seconds = -1 # <-
""" + TAIL, 'destinations[1] (name "web").timeout_seconds', "must be a number of seconds from 1 to 3600 "
     "(under 1 s requests to a working server time out; over an hour (3600) a server that hangs holds a "
     "sender that long), got -1"),
    ("pipeline-steps", HEAD + """\
[[pipelines]]
name = "ct"
steps = [ # <-
    { op = "rescale" },
    { op = "window", preset = "nope" },
]
""" + TAIL, 'pipelines[1] (name "ct").steps', "pipeline 'ct' step 2: unknown preset 'nope'"),
    ("pipeline-order", HEAD + """\
[[pipelines]]
name = "ct"
steps = [{ op = "window", preset = "brain" }, { op = "rescale" }] # <-
""" + TAIL, 'pipelines[1] (name "ct").steps', "pipeline 'ct' step 2: rescale must come before display"),
    ("pipeline-channels-16-bit", HEAD + """\
[[pipelines]]
name = "rgb"
steps = [{ op = "channels", windows = ["brain", "subdural"] }] # <-
output = "png16"
""" + TAIL, 'pipelines[1] (name "rgb").steps', "8-bit only"),
    ("pipeline-steps-not-list", HEAD + """\
[[pipelines]]
name = "ct"
steps = "rescale" # <-
""" + TAIL, 'pipelines[1] (name "ct").steps', 'must be a list of steps'),
    ("pipeline-output", HEAD + """\
[[pipelines]]
name = "ct"
steps = [{ op = "rescale" }]
output = "jpeg" # <-
""" + TAIL, 'pipelines[1] (name "ct").output', 'must be one of sc, sc16, png, png16, gsps, nifti, npz, got "jpeg"'),
    ("duplicate-pipeline", HEAD + TAIL + """\
[[pipelines]]
name = "default" # <-
steps = []
""", 'pipelines[2] (name "default").name', 'duplicate name "default" (also at line 15)'),
    ("route-pipeline", HEAD + TAIL + """\
[[routes]]
match = { Modality = "CT" }
pipeline = "ct-soft" # <-
destinations = ["folder"]
""", "routes[2].pipeline", 'unknown pipeline "ct-soft"; defined: default'),
    ("route-destination", HEAD + TAIL + """\
[[routes]]
match = { Modality = "CT" }
pipeline = "default"
destinations = [
    "folder",
    "pacs", # <-
]
""", "routes[2].destinations[2]", 'unknown destination "pacs"; defined: folder'),
    ("route-destination-twice", HEAD + TAIL + """\
[[routes]]
match = {}
pipeline = "default"
destinations = ["folder", "folder"] # <-
""", "routes[2].destinations[2]", 'destination "folder" is listed twice'),
    ("route-keyword", HEAD + TAIL + """\
[[routes]]
match = { Modalty = "CT" } # <-
pipeline = "default"
destinations = ["folder"]
""", "routes[2].match.Modalty", "\"Modalty\" is not a DICOM keyword; did you mean 'Modality'?"),
    ("route-keyword-subtable", HEAD + TAIL + """\
[[routes]]
pipeline = "default"
destinations = ["folder"]
[routes.match]
Modality = "CT"
SeriesDescrption = "x" # <-
""", "routes[2].match.SeriesDescrption", "is not a DICOM keyword"),
    ("route-sequence", HEAD + TAIL + """\
[[routes]]
match = { ReferencedImageSequence = "x" } # <-
pipeline = "default"
destinations = ["folder"]
""", "routes[2].match.ReferencedImageSequence", "its VR SQ has no text value"),
    ("route-pattern-type", HEAD + TAIL + """\
[[routes]]
match = { Modality = [
    "CT",
    1.5, # <-
] }
pipeline = "default"
destinations = ["folder"]
""", "routes[2].match.Modality[2]", "must be a string (glob pattern), a whole number or a list of them, got 1.5"),
    ("route-match-missing", HEAD + TAIL + """\
[[routes]] # <-
pipeline = "default"
destinations = ["folder"]
""", "routes[2].match", "missing (required)"),
    ("route-unknown-key", HEAD + TAIL + """\
[[routes]]
match = {}
pipeline = "default"
destination = ["folder"] # <-
""", "routes[2].destination", "unknown key (did you mean 'destinations'?); allowed keys: match, pipeline, "
     "destinations"),
    ("multi-line-string-before", HEAD + '''\
[[destinations]]
name = "pacs"
kind = "dicom"
host = """
not a real
host name"""
port = 0 # <-
ae_title = "X"
''' + TAIL, 'destinations[1] (name "pacs").port', "got 0"),
    ("dotted-key", HEAD + TAIL + """\
[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://h"
auth.kind = "basic"
auth.username = "u:v" # <-
auth.password_env = "PW"
""", 'destinations[2] (name "web").auth.username', "must not contain ':'"),
]


@pytest.mark.parametrize(("text", "key", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_names_file_line_and_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = tmp_path / "node.toml"
    expected_line = marked_line(text)
    error = error_of(tmp_path, text)
    prefix = f"{path}:{expected_line}: {key}: "
    assert error.startswith(prefix), f"\n{error}\ndoes not start with\n{prefix}"
    assert message in error


def test_error_line_numbers_written_out(tmp_path: Path) -> None:
    """The example from the docs, with the line counted by hand."""
    text = HEAD + TAIL + '[[destinations]]\nname = "pacs"\nkind = "dicom"\nhost = "h"\nport = "abc"\nae_title = "A"\n'
    assert text.splitlines()[30] == 'port = "abc"'
    error = error_of(tmp_path, text)
    assert error == (f'{tmp_path / "node.toml"}:31: destinations[2] (name "pacs").port: '
                     'must be a whole number 1-65535, got "abc"')


def test_relative_source_is_kept_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, HEAD.replace("port = 11112", "port = -1") + TAIL)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^node\.toml:4: node\.port: "):
        load_config("node.toml")


def test_toml_syntax_error(tmp_path: Path) -> None:
    text = HEAD + "[[pipelines]]\nname = \"default\"\nsteps = [{ op = \"rescale\" }\n" + TAIL
    error = error_of(tmp_path, text)
    # tomllib notices the unclosed array on the next line, and says so
    assert error == f"{tmp_path / 'node.toml'}:17: TOML syntax error: Unclosed array (at line 17, column 1)"


def test_toml_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    error = error_of(tmp_path, HEAD.replace("port = 11112", "port = 11112\nport = 104") + TAIL)
    assert error.startswith(f"{tmp_path / 'node.toml'}:5: TOML syntax error: ")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nae_title = "\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml:2: not UTF-8"):
        load_config(path)


# --------------------------------------------------------------------------- routing


def route(match: dict[str, object], tmp_path: Path) -> Route:
    """A route built through the loader, so the checks and conversions apply."""
    items = ", ".join(f"{k} = {_toml(v)}" for k, v in match.items())
    text = HEAD + TAIL + f'[[routes]]\nmatch = {{ {items} }}\npipeline = "default"\ndestinations = []\n'
    return load_text(tmp_path, text).routes[1]


def _toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\") + '"'
    return str(value)


def dataset(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def test_route_glob(tmp_path: Path) -> None:
    r = route({"SeriesDescription": "*HEAD*"}, tmp_path)
    assert matches(r, dataset(SeriesDescription="CT HEAD W/O"))
    assert not matches(r, dataset(SeriesDescription="ct head"))  # case-sensitive
    assert not matches(r, dataset(SeriesDescription="CHEST"))


def test_route_list_is_any_and_keywords_are_all(tmp_path: Path) -> None:
    r = route({"Modality": ["CT", "PT"], "BodyPartExamined": "HEAD"}, tmp_path)
    assert matches(r, dataset(Modality="PT", BodyPartExamined="HEAD"))
    assert matches(r, dataset(Modality="CT", BodyPartExamined="HEAD"))
    assert not matches(r, dataset(Modality="MR", BodyPartExamined="HEAD"))
    assert not matches(r, dataset(Modality="CT", BodyPartExamined="CHEST"))


def test_route_missing_attribute_matches_only_empty_pattern(tmp_path: Path) -> None:
    assert not matches(route({"BodyPartExamined": "*"}, tmp_path), dataset(Modality="CT"))
    optional = route({"BodyPartExamined": ["HEAD", ""]}, tmp_path)
    assert matches(optional, dataset(Modality="CT"))
    assert matches(optional, dataset(BodyPartExamined="HEAD"))
    assert not matches(optional, dataset(BodyPartExamined="CHEST"))
    # present but empty is the empty text, which "*" matches
    assert matches(route({"BodyPartExamined": "*"}, tmp_path), dataset(BodyPartExamined=""))


def test_route_multi_valued(tmp_path: Path) -> None:
    ds = dataset(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert matches(route({"ImageType": "ORIGINAL\\PRIMARY*"}, tmp_path), ds)
    assert matches(route({"ImageType": "*\\AXIAL"}, tmp_path), ds)
    assert not matches(route({"ImageType": "DERIVED*"}, tmp_path), ds)
    assert not matches(route({"ImageType": "ORIGINAL"}, tmp_path), ds)


def test_route_numbers_and_names(tmp_path: Path) -> None:
    assert matches(route({"EchoNumbers": 2}, tmp_path), dataset(EchoNumbers=2))
    assert matches(route({"PatientName": "Doe^*"}, tmp_path), dataset(PatientName="Doe^John"))
    assert matches(route({"SliceThickness": "0.625"}, tmp_path), dataset(SliceThickness="0.625"))


def test_empty_match_takes_everything_and_first_route_wins(tmp_path: Path) -> None:
    text = HEAD + TAIL.replace("[[routes]]", '[[routes]]\nmatch = { Modality = "CT" }\npipeline = "default"\n'
                               'destinations = []\n[[routes]]')
    config = load_text(tmp_path, text)
    ct, mr = route_for(config, dataset(Modality="CT")), route_for(config, dataset(Modality="MR"))
    assert ct is config.routes[0] and ct.destinations == ()
    assert mr is config.routes[1] and mr.destinations == ("folder",)
    assert route_for(config, Dataset()) is config.routes[1]


def test_no_route_matches(tmp_path: Path) -> None:
    config = load_text(tmp_path, HEAD + TAIL.replace("match = {}", 'match = { Modality = "CT" }'))
    assert route_for(config, dataset(Modality="MR")) is None


# --------------------------------------------------------------------------- secrets


def test_auth_reads_the_environment_when_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_NODE_PW", raising=False)
    monkeypatch.delenv("TEST_NODE_TOKEN", raising=False)
    text = HEAD + TAIL + """\
[[destinations]]
name = "basic"
kind = "dicomweb"
url = "http://h/dicom-web"
auth = { kind = "basic", username = "orthanc", password_env = "TEST_NODE_PW" }
[[destinations]]
name = "bearer"
kind = "dicomweb"
url = "https://h/dicom-web"
auth = { kind = "bearer", token_env = "TEST_NODE_TOKEN" }
"""
    config = load_text(tmp_path, text)  # unset variables are fine at load time
    basic, bearer = config.destinations["basic"].auth, config.destinations["bearer"].auth  # type: ignore[union-attr]
    assert isinstance(basic, BasicAuth) and isinstance(bearer, BearerAuth)
    path = tmp_path / "node.toml"
    with pytest.raises(ConfigError) as info:
        basic.resolve()
    assert str(info.value) == (f'{path}:31: destinations[2] (name "basic").auth.password_env: '
                               "environment variable TEST_NODE_PW (password for basic auth) is not set")
    with pytest.raises(ConfigError, match=r":36: .*environment variable TEST_NODE_TOKEN \(bearer token\) is not set"):
        bearer.resolve()
    monkeypatch.setenv("TEST_NODE_TOKEN", "")
    with pytest.raises(ConfigError, match="TEST_NODE_TOKEN .* is empty"):
        bearer.resolve()
    monkeypatch.setenv("TEST_NODE_PW", "s3cret")
    monkeypatch.setenv("TEST_NODE_TOKEN", "tok")
    assert basic.resolve() == ("orthanc", "s3cret")
    assert bearer.resolve() == "tok"
    monkeypatch.setenv("TEST_NODE_TOKEN", "rotated")  # read at use time, not cached
    assert bearer.resolve() == "rotated"
    assert "s3cret" not in repr(config)


def test_auth_made_directly_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_NODE_NOPE", raising=False)
    with pytest.raises(ConfigError, match="^environment variable TEST_NODE_NOPE"):
        BearerAuth("TEST_NODE_NOPE").resolve()


# --------------------------------------------------------------------------- sources (DICOMweb polling)


def test_no_sources_by_default(tmp_path: Path) -> None:
    assert dict(load_config(None).sources) == {}
    assert dict(load_config(ROOT / "config" / "node.toml").sources) == {}  # the example there is commented out
    assert dict(load_text(tmp_path, HEAD + TAIL).sources) == {}


def test_sources_full_and_minimal(tmp_path: Path) -> None:
    config = load_text(tmp_path, HEAD + TAIL + """\
[[sources]]
name = "archive"
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
every_seconds = 60
level = "study"
query = { ModalitiesInStudy = "CT", AccessionNumber = "A*", SeriesNumber = 3 }
lookback_hours = 1.5
late_arrival_hours = 168
auth = { kind = "basic", username = "orthanc", password_env = "ARCHIVE_PASSWORD" }
page_size = 25
timeout_seconds = 5

[[sources]]
name = "cloud"
kind = "dicomweb"
url = "https://pacs.example.org/dicomweb"
cron = "*/5 7-19 * * mon-fri"
[sources.auth]
kind = "bearer"
token_env = "CLOUD_TOKEN"
""")
    assert list(config.sources) == ["archive", "cloud"]
    assert config.sources["archive"] == DicomWebSource(
        name="archive", url="http://127.0.0.1:8042/dicom-web", every_seconds=60.0, cron=None, level="study",
        query=(("ModalitiesInStudy", "CT"), ("AccessionNumber", "A*"), ("SeriesNumber", "3")),
        lookback_hours=1.5, late_arrival_hours=168.0, auth=BasicAuth("orthanc", "ARCHIVE_PASSWORD"), page_size=25,
        timeout_seconds=5.0,
    )
    assert config.sources["archive"].filters() == {"ModalitiesInStudy": "CT", "AccessionNumber": "A*",
                                                   "SeriesNumber": "3"}
    assert isinstance(config.sources["archive"].every_seconds, float)
    cloud = config.sources["cloud"]
    assert (cloud.every_seconds, cloud.cron) == (None, "*/5 7-19 * * mon-fri")
    assert (cloud.level, cloud.query, cloud.lookback_hours, cloud.late_arrival_hours, cloud.page_size,
            cloud.timeout_seconds) == ("series", (), 24.0, 24.0, 100, 30.0)
    assert cloud.auth == BearerAuth("CLOUD_TOKEN")
    assert cloud.kind == "dicomweb"
    assert cloud.schedule_text() == "cron '*/5 7-19 * * mon-fri'"
    assert config.sources["archive"].schedule_text() == "every 60 s"
    with pytest.raises(TypeError):
        config.sources["x"] = cloud  # type: ignore[index]


def test_source_secret_is_read_when_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_SOURCE_PW", raising=False)
    text = HEAD + TAIL + """\
[[sources]]
name = "archive"
kind = "dicomweb"
url = "http://h/dicom-web"
every_seconds = 60
auth = { kind = "basic", username = "u", password_env = "TEST_SOURCE_PW" }
"""
    auth = load_text(tmp_path, text).sources["archive"].auth
    assert isinstance(auth, BasicAuth)
    with pytest.raises(ConfigError) as info:
        auth.resolve()
    assert str(info.value) == (f'{tmp_path / "node.toml"}:32: sources[1] (name "archive").auth.password_env: '
                               "environment variable TEST_SOURCE_PW (password for basic auth) is not set")


SOURCE = """\
[[sources]]
name = "archive"
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
"""

SOURCE_ERRORS = [
    ("both-schedules", SOURCE + 'every_seconds = 60\ncron = "*/5 * * * *" # <-\n',
     'sources[1] (name "archive").cron', "give either every_seconds or cron, not both"),
    ("both-schedules-cron-first", SOURCE + 'cron = "*/5 * * * *"\nevery_seconds = 60 # <-\n',
     'sources[1] (name "archive").every_seconds', "give either every_seconds or cron, not both"),
    ("no-schedule", SOURCE.replace("[[sources]]", "[[sources]] # <-"),
     'sources[1] (name "archive").every_seconds', "missing (required): give every_seconds (e.g. 60) or cron"),
    ("every-zero", SOURCE + "every_seconds = 0 # <-\n",
     'sources[1] (name "archive").every_seconds', "must be a number of seconds from 1 to 604800 ("),
    ("every-text", SOURCE + 'every_seconds = "60" # <-\n',
     'sources[1] (name "archive").every_seconds', 'use cron), got "60"'),
    ("cron-out-of-range", SOURCE + 'cron = "61 * * * *" # <-\n',
     'sources[1] (name "archive").cron', 'not a valid crontab expression (minute hour day month weekday): '
     '"61 * * * *": '),
    ("cron-fields", SOURCE + 'cron = "*/5 * *" # <-\n',
     'sources[1] (name "archive").cron', "Wrong number of fields; got 3, expected 5"),
    ("cron-empty", SOURCE + 'cron = "" # <-\n',
     'sources[1] (name "archive").cron', 'must be a non-empty string, got ""'),
    ("cron-numeric-weekday", SOURCE + 'cron = "0 3 * * 1-5" # <-\n',
     'sources[1] (name "archive").cron', "write the weekday as a name (sun, mon, ... sat), not a number"),
    ("level", SOURCE + 'every_seconds = 60\nlevel = "instance" # <-\n',
     'sources[1] (name "archive").level', 'must be one of series, study, got "instance"'),
    ("missing-url", """\
[[sources]] # <-
name = "archive"
kind = "dicomweb"
every_seconds = 60
""", 'sources[1] (name "archive").url', "missing (required)"),
    ("url-scheme", SOURCE.replace('url = "http://127.0.0.1:8042/dicom-web"', 'url = "127.0.0.1:8042" # <-')
     + "every_seconds = 60\n", 'sources[1] (name "archive").url',
     'must be an http:// or https:// URL, got "127.0.0.1:8042"'),
    ("kind", SOURCE.replace('kind = "dicomweb"', 'kind = "dimse" # <-') + "every_seconds = 60\n",
     'sources[1] (name "archive").kind', 'must be one of dicomweb, got "dimse"'),
    ("unknown-key", SOURCE + "every_seconds = 60\nlookback_hour = 3 # <-\n",
     'sources[1] (name "archive").lookback_hour', "unknown key (did you mean 'lookback_hours'?)"),
    ("lookback", SOURCE + "every_seconds = 60\nlookback_hours = 0 # <-\n",
     'sources[1] (name "archive").lookback_hours', "must be a number of hours from 1 to 876000 (the query "
     "matches StudyDate in whole days, so less than 1 looks back no less; over 100 years (876000) is no date "
     "at all), got 0"),
    ("page-size", SOURCE + "every_seconds = 60\npage_size = 0 # <-\n",
     'sources[1] (name "archive").page_size', "must be a whole number 1-10000, got 0"),
    ("query-keyword", SOURCE + 'every_seconds = 60\nquery = { Modalty = "CT" } # <-\n',
     'sources[1] (name "archive").query.Modalty', "\"Modalty\" is not a DICOM keyword; did you mean 'Modality'?"),
    ("query-study-date", SOURCE + 'every_seconds = 60\nquery = { StudyDate = "20240101-" } # <-\n',
     'sources[1] (name "archive").query.StudyDate', "StudyDate is set by the poller"),
    ("query-modality-at-study-level", SOURCE + 'every_seconds = 60\nlevel = "study"\n'
     'query = { Modality = "CT" } # <-\n', 'sources[1] (name "archive").query.Modality',
     'Modality is a series attribute; at level = "study" use ModalitiesInStudy, or level = "series"'),
    ("query-value", SOURCE + "every_seconds = 60\nquery = { Modality = 1.5 } # <-\n",
     'sources[1] (name "archive").query.Modality', "must be a string (QIDO-RS matching value"),
    ("query-empty-value", SOURCE + 'every_seconds = 60\n[sources.query]\nModality = "" # <-\n',
     'sources[1] (name "archive").query.Modality', "must not be empty"),
    ("query-sequence", SOURCE + 'every_seconds = 60\nquery = { ReferencedImageSequence = "x" } # <-\n',
     'sources[1] (name "archive").query.ReferencedImageSequence', "its VR SQ has no text value"),
    ("auth", SOURCE + 'every_seconds = 60\nauth = { kind = "basic", username = "u" } # <-\n',
     'sources[1] (name "archive").auth.password_env', "missing (required)"),
    ("duplicate", SOURCE + "every_seconds = 60\n" + SOURCE.replace('name = "archive"', 'name = "archive" # <-')
     + "every_seconds = 60\n", 'sources[2] (name "archive").name', 'duplicate name "archive" (also at line 28)'),
    ("not-tables", 'sources = "archive" # <-\n', "sources", 'must be an array of tables ([[sources]]), got "archive"'),
]


@pytest.mark.parametrize(("text", "key", "message"), [e[1:] for e in SOURCE_ERRORS], ids=[e[0] for e in SOURCE_ERRORS])
def test_source_error_names_file_line_and_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    text = (text + HEAD + TAIL) if text.startswith("sources =") else (HEAD + TAIL + text)
    path = tmp_path / "node.toml"
    expected_line = marked_line(text)
    error = error_of(tmp_path, text)
    prefix = f"{path}:{expected_line}: {key}: "
    assert error.startswith(prefix), f"\n{error}\ndoes not start with\n{prefix}"
    assert message in error


# --------------------------------------------------------------------------- hospital-grade keys


def test_tls_disk_retention_study_keys(tmp_path: Path) -> None:
    # TLS files are loaded when the config is: a real (self-signed) certificate and key
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", "server.key", "-out", "server.pem", "-days", "1", "-subj", "/CN=node"],
                   cwd=tmp_path, check=True, capture_output=True)
    config = load_text(tmp_path, """
[node]
min_free_disk_mb = 2048
retention_hours = 24
study_settle_seconds = 30
force_complete_seconds = 600
[tls]
port = 2762
cert_file = "server.pem"
key_file = "server.key"
[[pipelines]]
name = "p"
steps = []
[[destinations]]
name = "pacs"
kind = "dicom"
host = "127.0.0.1"
port = 4242
ae_title = "PACS"
tls = true
cert_file = "server.pem"
key_file = "server.key"
[[routes]]
match = {}
pipeline = "p"
destinations = ["pacs"]
trigger = "study"
""")
    assert config.node.min_free_disk_mb == 2048 and config.node.retention_hours == 24
    assert config.node.study_settle_seconds == 30 and config.node.force_complete_seconds == 600
    assert config.tls.port == 2762 and config.tls.cert_file == tmp_path / "server.pem" and config.tls.ca_file is None
    assert config.destinations["pacs"].tls and config.destinations["pacs"].key_file == tmp_path / "server.key"
    assert config.routes[0].trigger == "study"
    assert load_config(None).tls is None and load_config(None).routes[0].trigger == "series"


def test_connection_keys(tmp_path: Path) -> None:
    default = load_config(None).node
    assert (default.association_timeout_seconds, default.max_negotiating_connections,
            default.max_connections_per_address) == (5.0, 64, 0)
    node = load_text(tmp_path, HEAD.replace("settle_seconds = 10.0", "settle_seconds = 10.0\n"
                                            "association_timeout_seconds = 1\nmax_negotiating_connections = 1000\n"
                                            "max_connections_per_address = 4") + TAIL).node
    assert (node.association_timeout_seconds, node.max_negotiating_connections,
            node.max_connections_per_address) == (1.0, 1000, 4)
    node = load_text(tmp_path, HEAD.replace("settle_seconds = 10.0", "settle_seconds = 10.0\n"
                                            "association_timeout_seconds = 300\nmax_negotiating_connections = 1\n"
                                            "max_connections_per_address = 1000") + TAIL).node
    assert (node.association_timeout_seconds, node.max_negotiating_connections,
            node.max_connections_per_address) == (300.0, 1, 1000)


def test_tls_errors_point_at_the_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[tls]\nport = 2762\ncert_file = "missing.pem"\nkey_file = "k"\n')
    assert ":3: tls.cert_file: no such file" in message
    message = error_of(tmp_path, '[[pipelines]]\nname = "p"\nsteps = []\n[[routes]]\nmatch = {}\n'
                                 'pipeline = "p"\ndestinations = []\ntrigger = "patient"\n')
    assert ':8: routes[1].trigger: must be "series" or "study"' in message, message
    (tmp_path / "ca.pem").write_text("ca")
    message = error_of(tmp_path, '[[destinations]]\nname = "d"\nkind = "dicom"\nhost = "h"\nport = 1\n'
                                 'ae_title = "A"\nca_file = "ca.pem"\n')
    assert "destinations[1] (name \"d\").tls: ca_file/cert_file/key_file are for TLS" in message, message


@pytest.mark.parametrize(("value", "message"), [("0", "must be a whole number >= 1, got 0"),
                                                ('"two"', 'must be a whole number >= 1, got "two"'),
                                                ("1.5", "must be a whole number >= 1, got 1.5")])
def test_max_processing_attempts_refused_at_its_line(tmp_path: Path, value: str, message: str) -> None:
    text = HEAD.replace("settle_seconds = 10.0", f"settle_seconds = 10.0\nmax_processing_attempts = {value} # <-") + TAIL
    error = error_of(tmp_path, text)
    prefix = f"{tmp_path / 'node.toml'}:{marked_line(text)}: node.max_processing_attempts: "
    assert error.startswith(prefix), f"\n{error}\ndoes not start with\n{prefix}"
    assert message in error


def test_max_processing_attempts_default_and_set(tmp_path: Path) -> None:
    assert load_config(None).node.max_processing_attempts == 2
    assert load_config(ROOT / "config" / "node.toml").node.max_processing_attempts == 2  # documented default
    text = HEAD.replace("settle_seconds = 10.0", "settle_seconds = 10.0\nmax_processing_attempts = 5") + TAIL
    assert load_text(tmp_path, text).node.max_processing_attempts == 5


# --------------------------------------------------------------------------- configs that cannot start or work


def refusal(tmp_path: Path, text: str, *, check_machine: bool = False) -> str:
    """The message of the ConfigError *text* is refused with (the line marked ``# <-`` is expected)."""
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_machine=check_machine)
    return str(info.value)


def assert_refused_at_mark(tmp_path: Path, text: str, key: str, message: str, *, check_machine: bool = False) -> None:
    error = refusal(tmp_path, text, check_machine=check_machine)
    prefix = f"{tmp_path / 'node.toml'}:{marked_line(text)}: {key}: "
    assert error.startswith(prefix), f"\n{error}\ndoes not start with\n{prefix}"
    assert message in error, f"\n{error}\ndoes not say\n{message}"


SOURCE_60 = SOURCE + "every_seconds = 60\n"


def node_with(lines: str) -> str:
    """HEAD with *lines* added to its [node] table."""
    return HEAD.replace("settle_seconds = 10.0\n", "settle_seconds = 10.0\n" + lines)
DICOMWEB = '[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "http://127.0.0.1:8042/dicom-web"\n'

# (id, text with the faulty line marked "# <-", key as printed, part of the message)
TIME_ERRORS = [
    ("settle-1e-300", HEAD.replace("settle_seconds = 10.0", "settle_seconds = 1e-300 # <-") + TAIL,
     "node.settle_seconds", "must be a number of seconds from 0.1 to 86400 (under 0.1 s a series is split wherever "
     "its sender pauses, and the idle node spends its CPU looking for quiet series; over a day (86400) a finished "
     "series waits that long), got 1e-300"),
    ("settle-over-a-day", HEAD.replace("settle_seconds = 10.0", "settle_seconds = 86401 # <-") + TAIL,
     "node.settle_seconds", "got 86401"),
    ("settle-text", HEAD.replace("settle_seconds = 10.0", 'settle_seconds = "10" # <-') + TAIL,
     "node.settle_seconds", 'got "10"'),
    ("study-settle", node_with("study_settle_seconds = 0.01 # <-\n") + TAIL,
     "node.study_settle_seconds", "from 0.1 to 86400 (under 0.1 s a study is split wherever its sender pauses"),
    ("force-complete-low", node_with("force_complete_seconds = 0.5 # <-\n") + TAIL,
     "node.force_complete_seconds", "from 1 to 604800 (under 1 s series are processed in pieces"),
    ("force-complete-high", node_with("force_complete_seconds = 1e9 # <-\n") + TAIL,
     "node.force_complete_seconds", "got 1000000000.0"),
    ("retention-negative", node_with("retention_hours = -0.5 # <-\n") + TAIL,
     "node.retention_hours", "must be 0 (keep for ever) or a number of hours from 0.000278 (1 s) to 87600 (the "
     "clean-up runs at most once a second; over 10 years (87600): use 0), got -0.5"),
    ("retention-minus-one", node_with("retention_hours = -1 # <-\n") + TAIL, "node.retention_hours", "got -1"),
    ("retention-tiny", node_with("retention_hours = 1e-9 # <-\n") + TAIL, "node.retention_hours", "got 1e-09"),
    ("retention-huge", node_with("retention_hours = 1e6 # <-\n") + TAIL, "node.retention_hours", "got 1000000.0"),
    ("backoff", HEAD + "[delivery]\nbackoff_seconds = 0.001 # <-\n" + TAIL,
     "delivery.backoff_seconds", "under 0.1 s a failing destination is retried in a tight loop"),
    ("max-backoff", HEAD + "[delivery]\nmax_backoff_seconds = 1e7 # <-\n" + TAIL,
     "delivery.max_backoff_seconds", "from 0.1 to 86400"),
    ("destination-timeout", HEAD + DICOMWEB + "timeout_seconds = 0.001 # <-\n" + TAIL,
     'destinations[1] (name "web").timeout_seconds', "from 1 to 3600 (under 1 s requests to a working server "
     "time out"),
    ("source-timeout", HEAD + TAIL + SOURCE_60 + "timeout_seconds = 86400 # <-\n",
     'sources[1] (name "archive").timeout_seconds', "over an hour (3600) a server that hangs holds a sender"),
    ("every-seconds", HEAD + TAIL + SOURCE + "every_seconds = 1e-300 # <-\n",
     'sources[1] (name "archive").every_seconds', "more often than every second floods the archive"),
    ("every-seconds-high", HEAD + TAIL + SOURCE + "every_seconds = 1e6 # <-\n",
     'sources[1] (name "archive").every_seconds', "use cron"),
    ("lookback-high", HEAD + TAIL + SOURCE_60 + "lookback_hours = 1e300 # <-\n",
     'sources[1] (name "archive").lookback_hours', "over 100 years (876000) is no date at all"),
    ("late-arrival-negative", HEAD + TAIL + SOURCE_60 + "late_arrival_hours = -1 # <-\n",
     'sources[1] (name "archive").late_arrival_hours', "from 0 to 87600"),
]


@pytest.mark.parametrize(("text", "key", "message"), [e[1:] for e in TIME_ERRORS], ids=[e[0] for e in TIME_ERRORS])
def test_time_setting_out_of_its_span(tmp_path: Path, text: str, key: str, message: str) -> None:
    assert_refused_at_mark(tmp_path, text, key, message)


def test_time_settings_the_tests_and_the_docs_use_are_accepted(tmp_path: Path) -> None:
    """The floors are low enough for fast tests (settle 0.5 s, retention 1.8 s) and 0 keeps for ever."""
    config = load_text(tmp_path, node_with("study_settle_seconds = 0.5\nforce_complete_seconds = 2.0\n"
                                           "retention_hours = 0.0005\n").replace("settle_seconds = 10.0", "settle_seconds = 0.1")
                       + "[delivery]\nbackoff_seconds = 0.1\nmax_backoff_seconds = 86400\n" + TAIL
                       + SOURCE + "every_seconds = 1\nlookback_hours = 876000\nlate_arrival_hours = 0\n"
                       + "timeout_seconds = 1\n")
    assert (config.node.settle_seconds, config.node.study_settle_seconds) == (0.1, 0.5)
    assert (config.node.force_complete_seconds, config.node.retention_hours) == (2.0, 0.0005)
    assert (config.delivery.backoff_seconds, config.delivery.max_backoff_seconds) == (0.1, 86400.0)
    source = config.sources["archive"]
    assert (source.every_seconds, source.lookback_hours, source.late_arrival_hours, source.timeout_seconds) == (
        1.0, 876000.0, 0.0, 1.0)
    assert load_text(tmp_path, node_with("retention_hours = 0\n") + TAIL).node.retention_hours == 0.0


PORT_ERRORS = [
    ("http-on-the-dicom-port", HEAD.replace("port = 8080", "port = 11112 # <-") + TAIL,
     "http.port", "11112 is also node.port (line 4, the DICOM listener), and their hosts overlap (0.0.0.0 takes "
     "every address, 127.0.0.1 among them): the HTTP listener could not bind it; give each listener its own port"),
    ("dicom-port-written-last", "[http]\nhost = \"127.0.0.1\"\nport = 4000\n[node]\nport = 4000 # <-\n" + TAIL,
     "node.port", "4000 is also http.port (line 3, the HTTP listener), and their hosts overlap (0.0.0.0 takes"),
    ("the-default-dicom-port", "[http]\nport = 11112 # <-\n" + TAIL,
     "http.port", "11112 is also node.port (its default, the DICOM listener)"),
    ("same-address", HEAD.replace('host = "0.0.0.0"', 'host = "127.0.0.1"').replace("port = 8080", "port = 11112 # <-")
     + TAIL, "http.port", "hosts overlap (both on 127.0.0.1)"),
    ("ipv6-any-takes-ipv4-too", HEAD.replace('host = "0.0.0.0"', 'host = "::"').replace("port = 8080",
                                                                                         "port = 11112 # <-") + TAIL,
     "http.port", "hosts overlap (:: takes every address, 127.0.0.1 among them)"),
]


@pytest.mark.parametrize(("text", "key", "message"), [e[1:] for e in PORT_ERRORS], ids=[e[0] for e in PORT_ERRORS])
def test_listeners_on_one_port(tmp_path: Path, text: str, key: str, message: str) -> None:
    assert_refused_at_mark(tmp_path, text, key, message)


@pytest.fixture
def node_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A real self-signed certificate and key for the [tls] listener."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", "server.key", "-out", "server.pem", "-days", "1", "-subj", "/CN=node"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    return tmp_path / "server.pem", tmp_path / "server.key"


def test_tls_listener_port_overlaps(tmp_path: Path, node_certificate: tuple[Path, Path]) -> None:
    tls = '[tls]\nport = {port} # <-\ncert_file = "server.pem"\nkey_file = "server.key"\n'
    assert_refused_at_mark(tmp_path, HEAD + tls.format(port=11112) + TAIL, "tls.port",
                           "11112 is also node.port (line 4, the DICOM listener), and their hosts overlap (both on "
                           "0.0.0.0): the DICOM TLS listener could not bind it")
    assert_refused_at_mark(tmp_path, HEAD + tls.format(port=8080) + TAIL, "tls.port",
                           "8080 is also http.port (line 12, the HTTP listener), and their hosts overlap (0.0.0.0 "
                           "takes every address, 127.0.0.1 among them)")
    # TLS alone (port = 0) on the HTTP port of another address is fine, as are different ports
    text = HEAD.replace("port = 11112", "port = 0").replace('host = "127.0.0.1"', 'host = "127.0.0.2"')
    alone = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"') + tls.format(port=8080) + TAIL
    assert load_text(tmp_path, alone).tls.port == 8080  # type: ignore[union-attr]
    assert load_text(tmp_path, HEAD + tls.format(port=2762) + TAIL).tls.port == 2762  # type: ignore[union-attr]


def test_one_port_on_two_addresses_is_fine(tmp_path: Path) -> None:
    text = HEAD.replace('host = "0.0.0.0"', 'host = "127.0.0.1"').replace('host = "127.0.0.1"\nport = 8080',
                                                                           'host = "127.0.0.2"\nport = 11112')
    config = load_config(write_config(tmp_path, text + TAIL), check_machine=True)
    assert (config.node.port, config.http.port, config.http.host) == (11112, 11112, "127.0.0.2")


def test_host_names_are_compared_once_resolved(tmp_path: Path) -> None:
    """"localhost" and "127.0.0.1" are told apart by their text, and found the same by resolving them."""
    text = (HEAD.replace('host = "0.0.0.0"', 'host = "localhost"').replace("port = 8080", "port = 11112 # <-")
            + TAIL)
    assert load_text(tmp_path, text).http.port == 11112  # without resolving: nothing to compare
    assert_refused_at_mark(tmp_path, text, "http.port", "hosts overlap (both on 127.0.0.1)", check_machine=True)


ROUTE_ERRORS = [
    ("png-to-dicom", HEAD + """\
[[pipelines]]
name = "colour"
steps = [{ op = "channels", windows = ["brain", "subdural", "brain_bone"] }]
output = "png"
[[destinations]]
name = "folder"
kind = "folder"
path = "out"
[[destinations]]
name = "pacs"
kind = "dicom"
host = "127.0.0.1"
port = 4242
ae_title = "PACS"
[[routes]]
match = {}
pipeline = "colour"
destinations = [
    "folder",
    "pacs", # <-
]
""", "routes[1].destinations[2]", 'destination "pacs" (kind = "dicom") takes DICOM only, and pipeline "colour" '
     'writes output = "png": send it to a folder destination, or make the pipeline\'s output "sc", "sc16" or "gsps"'),
    ("png16-to-dicomweb", HEAD + DICOMWEB + """\
[[pipelines]]
name = "grey16"
steps = [{ op = "rescale" }]
output = "png16"
[[routes]]
match = { Modality = "CT" }
pipeline = "grey16"
destinations = ["web"] # <-
""", "routes[1].destinations[1]", 'destination "web" (kind = "dicomweb") takes DICOM only, and pipeline "grey16" '
     'writes output = "png16"'),
]


@pytest.mark.parametrize(("text", "key", "message"), [e[1:] for e in ROUTE_ERRORS], ids=[e[0] for e in ROUTE_ERRORS])
def test_route_output_a_destination_cannot_take(tmp_path: Path, text: str, key: str, message: str) -> None:
    assert_refused_at_mark(tmp_path, text, key, message)


def test_png_to_a_folder_and_secondary_capture_anywhere_are_fine(tmp_path: Path) -> None:
    text = HEAD + DICOMWEB + TAIL.replace('steps = [{ op = "rescale" }]', 'steps = [{ op = "rescale" }]\noutput = "png"')
    text += '[[pipelines]]\nname = "sc"\nsteps = []\noutput = "sc16"\n[[routes]]\nmatch = {}\npipeline = "sc"\n'
    text += 'destinations = ["web", "folder"]\n'
    config = load_text(tmp_path, text)
    assert [r.destinations for r in config.routes] == [("folder",), ("web", "folder")]


URL_ERRORS = [
    ("query", "?token=x", "must be the service root, without ?query or #fragment"),
    ("fragment", "#studies", "must be the service root, without ?query or #fragment"),
    ("port-zero", ":0", "the port must be a whole number 1-65535"),
    ("port-range", ":99999", "the port must be a whole number 1-65535"),
]


@pytest.mark.parametrize(("tail", "message"), [e[1:] for e in URL_ERRORS], ids=[e[0] for e in URL_ERRORS])
def test_url_the_dicomweb_client_cannot_use(tmp_path: Path, tail: str, message: str) -> None:
    url = "http://127.0.0.1" + (tail if tail.startswith(":") else "/dicom-web" + tail)
    text = HEAD + f'[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "{url}" # <-\n' + TAIL
    assert_refused_at_mark(tmp_path, text, 'destinations[1] (name "web").url', message)
    source = HEAD + TAIL + f'[[sources]]\nname = "a"\nkind = "dicomweb"\nurl = "{url}" # <-\nevery_seconds = 60\n'
    assert_refused_at_mark(tmp_path, source, 'sources[1] (name "a").url', message)


def test_url_with_credentials(tmp_path: Path) -> None:
    text = HEAD + '[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "http://u:pw@127.0.0.1/d" # <-\n' + TAIL
    assert_refused_at_mark(tmp_path, text, 'destinations[1] (name "web").url',
                           "must not hold a user name or password (they would be in logs): use auth")


# ---------------------------------------------------------------- on this machine (serve and config check)

# Names glibc refuses itself ("!" is no host name character, a label has at most 63 characters): the
# check fails as for a misspelt name, without asking the name server (the tests talk to no other host).
LONG_LABEL_HOST = "a" * 64 + ".example"

MACHINE_ERRORS = [
    ("destination-host", HEAD + f"""\
[[destinations]]
name = "pacs"
kind = "dicom"
host = "{NO_SUCH_HOST}" # <-
port = 104
ae_title = "PACS"
""" + TAIL, 'destinations[1] (name "pacs").host', f'host "{NO_SUCH_HOST}" does not resolve: Name or service not known'),
    ("dicomweb-url-host", HEAD + DICOMWEB.replace("127.0.0.1", NO_SUCH_HOST).replace("web\"\n", "web\" # <-\n", 1)
     .replace("dicom-web\"\n", "dicom-web\" # <-\n").replace("name = \"web\" # <-", "name = \"web\"") + TAIL,
     'destinations[1] (name "web").url', f'host "{NO_SUCH_HOST}" does not resolve'),
    ("source-url-host", HEAD + TAIL + SOURCE_60.replace('url = "http://127.0.0.1:8042/dicom-web"',
                                                        f'url = "https://{NO_SUCH_HOST}/dicom-web" # <-'),
     'sources[1] (name "archive").url', f'host "{NO_SUCH_HOST}" does not resolve'),
    ("node-host-long-label", HEAD.replace('host = "0.0.0.0"', f'host = "{LONG_LABEL_HOST}" # <-') + TAIL,
     "node.host", f'host "{LONG_LABEL_HOST}" does not resolve: encoding with \'idna\' codec failed'),
    ("http-host", HEAD.replace('host = "127.0.0.1"', f'host = "{NO_SUCH_HOST}" # <-') + TAIL,
     "http.host", "does not resolve"),
    # documentation addresses (RFC 5737, 3849): never this machine's; binding fails locally, nothing is sent
    ("node-host-not-ours", HEAD.replace('host = "0.0.0.0"', 'host = "203.0.113.7" # <-') + TAIL,
     "node.host", 'the DICOM listener cannot listen on "203.0.113.7" (203.0.113.7): not an address of this '
     "machine (a listener can bind 0.0.0.0, :: or one of its own)"),
    ("http-host-not-ours", HEAD.replace('host = "127.0.0.1"', 'host = "2001:db8::1" # <-') + TAIL,
     "http.host", 'the HTTP listener cannot listen on "2001:db8::1" (2001:db8::1): not an address of this machine'),
    ("data-dir-is-a-file", HEAD.replace('data_dir = "var"', 'data_dir = "var.txt" # <-') + TAIL,
     "node.data_dir", "var.txt is a file, not a folder"),
    ("data-dir-under-a-file", HEAD.replace('data_dir = "var"', 'data_dir = "var.txt/spool" # <-') + TAIL,
     "node.data_dir", "cannot create "),
    ("folder-destination-is-a-file", HEAD + TAIL.replace('path = "out"', 'path = "var.txt" # <-'),
     'destinations[1] (name "folder").path', "var.txt is a file, not a folder: nothing can be delivered there"),
]


@pytest.mark.parametrize(("text", "key", "message"), [e[1:] for e in MACHINE_ERRORS], ids=[e[0] for e in MACHINE_ERRORS])
def test_what_this_machine_cannot_do(tmp_path: Path, text: str, key: str, message: str) -> None:
    (tmp_path / "var.txt").write_text("a file where a folder should be")
    load_text(tmp_path, text)  # only the check of this machine can tell
    assert_refused_at_mark(tmp_path, text, key, message, check_machine=True)


def test_data_dir_under_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "var.txt").write_text("x")
    error = refusal(tmp_path, HEAD.replace('data_dir = "var"', 'data_dir = "var.txt/spool"') + TAIL, check_machine=True)
    assert error.endswith(f"node.data_dir: cannot create {tmp_path / 'var.txt' / 'spool'}: "
                          f"{tmp_path / 'var.txt'} is a file, not a folder"), error


def test_data_dir_check_leaves_nothing_behind(tmp_path: Path) -> None:
    text = HEAD.replace('data_dir = "var"', 'data_dir = "a/b/var"') + TAIL
    config = load_config(write_config(tmp_path, text), check_machine=True)
    assert config.node.data_dir == tmp_path / "a" / "b" / "var"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.toml"]  # a/b/var made, written, removed
    (tmp_path / "a").mkdir()
    load_config(tmp_path / "node.toml", check_machine=True)
    assert [p.name for p in (tmp_path / "a").iterdir()] == []  # what was there stays, the probe is gone


def _config_check_cli(config: Path, prefix: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "node", "config", "check", str(config)],
                          capture_output=True, text=True, timeout=120, env=node_env())


def test_data_dir_without_permission(tmp_path: Path) -> None:
    """Run as a user without write permission: root keeps its uid but loses CAP_DAC_OVERRIDE (setpriv)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    config = write_config(tmp_path, HEAD.replace('data_dir = "var"', 'data_dir = "locked/var"') + TAIL)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    result = _config_check_cli(config, prefix)
    assert result.returncode == 2, result.stderr
    assert (f"{config}:5: node.data_dir: cannot create {locked / 'var'} (in {locked}): permission denied "
            "(the node runs as user ") in result.stderr, result.stderr
    assert not (locked / "var").exists()


def test_data_dir_on_a_read_only_file_system(tmp_path: Path) -> None:
    """A read-only tmpfs mounted in a private mount namespace (unshare: gone with the process)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    config = write_config(tmp_path, HEAD.replace('data_dir = "var"', 'data_dir = "ro/var"') + TAIL)
    inner = f"mount -t tmpfs -o ro none {mount} && exec \"$0\" \"$@\""
    result = _config_check_cli(config, ["unshare", "-rm", "sh", "-c", inner])
    assert result.returncode == 2, result.stderr
    assert f"{config}:5: node.data_dir: cannot create {mount / 'var'} (in {mount}): read-only file system" in \
        result.stderr, result.stderr


def test_host_lookup_is_bounded_in_time() -> None:
    from node.config.machine import resolve_hosts

    release = threading.Event()
    try:
        started = time.monotonic()
        found = resolve_hosts(["slow.example", "127.0.0.1"], 0.3,
                              resolve=lambda host: release.wait(30) and () or ("127.0.0.1",))
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert elapsed < 3, elapsed
    assert found["slow.example"] == "no answer within 0.3 s (the name server is slow or cannot be reached)"
    assert found["127.0.0.1"] == "no answer within 0.3 s (the name server is slow or cannot be reached)"
    assert resolve_hosts(["127.0.0.1", "::1", NO_SUCH_HOST], 5) == {
        "127.0.0.1": ("127.0.0.1",), "::1": ("::1",), NO_SUCH_HOST: "Name or service not known"}


def test_tls_destination_with_nothing_to_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = HEAD + """\
[[destinations]]
name = "pacs"
kind = "dicom"
host = "127.0.0.1"
port = 2762
ae_title = "PACS"
tls = true # <-
""" + TAIL
    assert load_config(write_config(tmp_path, text), check_machine=True).destinations["pacs"].tls  # the system's CAs
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))  # OpenSSL's default store: empty
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    assert_refused_at_mark(tmp_path, text, 'destinations[1] (name "pacs").tls',
                           "without ca_file the peer's certificate is checked against the system's CA "
                           "certificates, and this machine has none (see SSL_CERT_FILE, SSL_CERT_DIR): give "
                           "ca_file, the CA that signed the peer's certificate", check_machine=True)


def test_secrets_must_be_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_NODE_STOW_PW", raising=False)
    monkeypatch.setenv("TEST_NODE_QIDO_TOKEN", "")
    text = HEAD + TAIL + DICOMWEB + """\
auth = { kind = "basic", username = "u", password_env = "TEST_NODE_STOW_PW" } # <-
"""
    load_text(tmp_path, text)  # read when used; the check of this machine reads it now, as serve does
    assert_refused_at_mark(tmp_path, text, 'destinations[2] (name "web").auth.password_env',
                           "environment variable TEST_NODE_STOW_PW (password for basic auth) is not set",
                           check_machine=True)
    monkeypatch.setenv("TEST_NODE_STOW_PW", "s3cret")
    source = text + SOURCE_60 + 'auth = { kind = "bearer", token_env = "TEST_NODE_QIDO_TOKEN" } # <-\n'
    source = source.replace('"TEST_NODE_STOW_PW" } # <-', '"TEST_NODE_STOW_PW" }')
    assert_refused_at_mark(tmp_path, source, 'sources[1] (name "archive").auth.token_env',
                           "environment variable TEST_NODE_QIDO_TOKEN (bearer token) is empty", check_machine=True)
    monkeypatch.setenv("TEST_NODE_QIDO_TOKEN", "t")
    assert load_config(tmp_path / "node.toml", check_machine=True).sources["archive"].auth == BearerAuth(
        "TEST_NODE_QIDO_TOKEN")


def test_shipped_configs_pass_the_check_of_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config/node.toml, config/orthanc.toml and the embedded default start here (docker/node.toml names
    the compose service "orthanc" and /data: only its container can tell)."""
    for path in (ROOT / "config" / "node.toml", ROOT / "config" / "orthanc.toml"):
        before = sorted(p.name for p in path.parent.iterdir())
        assert load_config(path, check_machine=True).source == str(path)
        assert sorted(p.name for p in path.parent.iterdir()) == before  # config/var made and removed again
    monkeypatch.chdir(tmp_path)
    assert load_config(None, check_machine=True).node.data_dir == tmp_path / "var"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- decode limits


def test_decode_limits_default_set_and_shipped(tmp_path: Path) -> None:
    from node.imaging.source import DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_FRAME_MB

    default = load_config(None).node
    assert (default.max_decoded_mb, default.max_frame_mb) == (DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_FRAME_MB) == (2048, 256)
    shipped = load_config(ROOT / "config" / "node.toml").node
    assert (shipped.max_decoded_mb, shipped.max_frame_mb) == (2048, 256)
    config = load_text(tmp_path, HEAD.replace("settle_seconds = 10.0", "max_decoded_mb = 4096\nmax_frame_mb = 1") + TAIL)
    assert (config.node.max_decoded_mb, config.node.max_frame_mb) == (4096, 1)


DECODE_LIMIT_ERRORS = [
    ("decoded-zero", "max_decoded_mb = 0 # <-", "node.max_decoded_mb", "must be a whole number >= 1, got 0"),
    ("decoded-float", "max_decoded_mb = 2048.5 # <-", "node.max_decoded_mb", "must be a whole number >= 1, got 2048.5"),
    ("decoded-text", 'max_decoded_mb = "2 GB" # <-', "node.max_decoded_mb", 'must be a whole number >= 1, got "2 GB"'),
    ("frame-negative", "max_frame_mb = -1 # <-", "node.max_frame_mb", "must be a whole number >= 1, got -1"),
    ("frame-bool", "max_frame_mb = true # <-", "node.max_frame_mb", "must be a whole number >= 1, got true"),
    ("frame-misspelt", "max_frame_size_mb = 256 # <-", "node.max_frame_size_mb",
     "unknown key (did you mean 'max_frame_mb'?)"),
]


@pytest.mark.parametrize(("line", "key", "message"), [e[1:] for e in DECODE_LIMIT_ERRORS],
                         ids=[e[0] for e in DECODE_LIMIT_ERRORS])
def test_decode_limit_errors_name_file_line_and_key(tmp_path: Path, line: str, key: str, message: str) -> None:
    text = HEAD.replace("settle_seconds = 10.0", f"settle_seconds = 10.0\n{line}") + TAIL
    error = error_of(tmp_path, text)
    prefix = f"{tmp_path / 'node.toml'}:{marked_line(text)}: {key}: "
    assert error.startswith(prefix), f"\n{error}\ndoes not start with\n{prefix}"
    assert message in error


# --------------------------------------------------------------------------- discard routes, unrouted, retention

DISCARD_ROUTE = '[[routes]]\nmatch = { Modality = ["US", "CR"] }\naction = "discard"\n\n'


def test_discard_route_needs_only_match(tmp_path: Path) -> None:
    config = load_text(tmp_path, HEAD + TAIL.replace("[[routes]]", DISCARD_ROUTE + "[[routes]]", 1))
    discard, process = config.routes
    assert (discard.action, discard.discards, discard.pipeline, discard.destinations) == ("discard", True, "", ())
    assert discard.match == (("Modality", ("US", "CR")),)
    assert (process.action, process.discards, process.pipeline) == ("process", False, "default")


@pytest.mark.parametrize("line", ['pipeline = "default" # <-', 'destinations = ["folder"] # <-',
                                  'destinations = [] # <-', 'trigger = "series" # <-'])
def test_discard_route_naming_a_pipeline_or_destinations_is_refused_at_its_line(tmp_path: Path, line: str) -> None:
    key = line.split(" ")[0]
    text = HEAD + TAIL + DISCARD_ROUTE.replace('action = "discard"\n', f'action = "discard"\n{line}\n')
    assert_refused_at_mark(tmp_path, text, f"routes[2].{key}", 'a route with action = "discard" drops the series '
                           f"it matches: it takes no {key}")


def test_route_action_misspelt_is_refused_at_its_line(tmp_path: Path) -> None:
    text = HEAD + TAIL.replace('destinations = ["folder"]\n', 'destinations = ["folder"]\naction = "drop" # <-\n')
    assert_refused_at_mark(tmp_path, text, "routes[1].action", "must be one of 'process', 'discard', got \"drop\"")


def test_process_route_still_needs_its_pipeline(tmp_path: Path) -> None:
    text = HEAD + TAIL.replace('pipeline = "default"\n', 'action = "process"\n')
    assert "routes[1].pipeline: missing (required)" in error_of(tmp_path, text)


def test_unrouted_and_failed_retention_defaults_and_set(tmp_path: Path) -> None:
    for config in (load_config(None), load_config(ROOT / "config" / "node.toml"), load_text(tmp_path, HEAD + TAIL)):
        assert (config.node.unrouted, config.node.failed_retention_hours) == ("keep", 0.0)
    text = HEAD.replace("settle_seconds = 10.0", 'settle_seconds = 10.0\nunrouted = "discard"\n'
                        "failed_retention_hours = 240") + TAIL
    config = load_text(tmp_path, text)
    assert (config.node.unrouted, config.node.failed_retention_hours) == ("discard", 240.0)


@pytest.mark.parametrize(("line", "key", "message"), [
    ('unrouted = "drop" # <-', "node.unrouted", "must be one of 'keep', 'discard', got \"drop\""),
    ("unrouted = true # <-", "node.unrouted", "must be one of 'keep', 'discard', got true"),
    ("failed_retention_hours = -1 # <-", "node.failed_retention_hours", "must be 0 (keep for ever) or a number"),
    ('failed_retention_hours = "1d" # <-', "node.failed_retention_hours", "must be 0 (keep for ever) or a number"),
])
def test_unrouted_and_failed_retention_refused_at_their_line(tmp_path: Path, line: str, key: str, message: str) -> None:
    text = HEAD.replace("settle_seconds = 10.0", f"settle_seconds = 10.0\n{line}") + TAIL
    assert_refused_at_mark(tmp_path, text, key, message)
