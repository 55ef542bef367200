"""Node configs for the tests: the TOML tables they repeat, written by one set of small functions.

Each function returns TOML text ending in a newline; a config is their sum::

    node_config(tmp_path / "var", port, settle=0.5, extra=pipeline("ct-brain", BRAIN)
                + dicom_destination("pacs", orthanc.dicom_port, orthanc.aet)
                + folder_destination("out", tmp_path / "out")
                + route("ct-brain", ["pacs", "out"], match={"Modality": "CT"}))

Values are Python values (``str``, ``Path``, ``bool``, ``int``, ``float``, lists, and dicts for
inline tables) written by :func:`toml`; a key given ``None`` is left out.  A test that checks the
line an error names keeps a literal text (:data:`HEAD` and ``# <-`` marks, :func:`marked_line`):
there the text is the test, and the helpers at the end of this module load it and read the error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from node.config import Config, ConfigError, load_config
from tests.support.peers import LOCALHOST, free_port

__all__ = [
    "BRAIN", "HEAD", "NO_SUCH_HOST", "RESCALE", "dicom_destination", "dicomweb_destination", "dicomweb_source",
    "discard_route", "dry_run_config", "error_of", "folder_destination", "folder_route", "load_text", "marked_line",
    "node_config", "pipeline", "route", "table", "toml", "write_config",
]

#: Pipeline steps: rescale only (what most tests need), and rescale then the brain window.
RESCALE: list[dict[str, object]] = [{"op": "rescale"}]
BRAIN: list[dict[str, object]] = [{"op": "rescale"}, {"op": "window", "preset": "brain"}]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml(value: object) -> str:
    """*value* as a TOML value (a dict as an inline table, a ``Path`` as its string).

    Strings are written with JSON's escapes, which TOML's basic strings share.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, Mapping):
        pairs = ", ".join(f"{_key(k)} = {toml(v)}" for k, v in value.items())
        return f"{{ {pairs} }}" if pairs else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    raise TypeError(f"no TOML value for {value!r}")


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name)


def table(name: str, keys: Mapping[str, object], *, array: bool = False) -> str:
    """``[name]`` (``[[name]]`` when *array*) and its *keys*; a key whose value is ``None`` is left out."""
    header = f"[[{name}]]" if array else f"[{name}]"
    return header + "\n" + "".join(f"{_key(k)} = {toml(v)}\n" for k, v in keys.items() if v is not None)


def pipeline(name: str, steps: Sequence[Mapping[str, object]] = RESCALE, output: str | None = None,
             **keys: object) -> str:
    """A ``[[pipelines]]`` table (*output* ``None``: the default, Secondary Capture)."""
    if isinstance(steps, str):
        raise TypeError(f"steps is a list of dicts ([{{'op': 'rescale'}}]), not TOML text: {steps!r}")
    return table("pipelines", {"name": name, "steps": steps, "output": output, **keys}, array=True)


def folder_destination(name: str, path: Path | str, **keys: object) -> str:
    """A ``[[destinations]]`` table of kind ``folder`` (more keys: ``file_names``, ...)."""
    return table("destinations", {"name": name, "kind": "folder", "path": path, **keys}, array=True)


def dicom_destination(name: str, port: int, ae_title: str, *, host: str = LOCALHOST, **keys: object) -> str:
    """A ``[[destinations]]`` table of kind ``dicom`` (C-STORE to *ae_title* at *host*:*port*)."""
    return table("destinations", {"name": name, "kind": "dicom", "host": host, "port": port, "ae_title": ae_title,
                                  **keys}, array=True)


def dicomweb_destination(name: str, url: str, **keys: object) -> str:
    """A ``[[destinations]]`` table of kind ``dicomweb`` (STOW-RS to *url*)."""
    return table("destinations", {"name": name, "kind": "dicomweb", "url": url, **keys}, array=True)


def dicomweb_source(name: str, url: str, **keys: object) -> str:
    """A ``[[sources]]`` table of kind ``dicomweb`` (polled with QIDO-RS / WADO-RS)."""
    return table("sources", {"name": name, "kind": "dicomweb", "url": url, **keys}, array=True)


def route(pipeline_name: str, destinations: Sequence[str], *, match: Mapping[str, object] | None = None,
          **keys: object) -> str:
    """A ``[[routes]]`` table: series that *match* (default: every series) through a pipeline to *destinations*."""
    return table("routes", {"match": match or {}, "pipeline": pipeline_name, "destinations": destinations, **keys},
                 array=True)


def discard_route(match: Mapping[str, object]) -> str:
    """A ``[[routes]]`` table that discards the series that *match*."""
    return table("routes", {"match": match, "action": "discard"}, array=True)


def folder_route(out: Path, trigger: str | None = "series", *, steps: Sequence[Mapping[str, object]] = RESCALE,
                 output: str | None = "sc", name: str = "plain", match: Mapping[str, object] | None = None,
                 **destination_keys: object) -> str:
    """Config tables: the series that *match* (default: all) through one pipeline *name* (*steps*, *output*)
    to a folder destination ``out`` at *out* (more keys of the destination: *destination_keys*)."""
    return (pipeline(name, steps, output) + folder_destination("out", out, **destination_keys)
            + route(name, ["out"], match=match, trigger=trigger))


def node_config(data_dir: Path, port: int, *, extra: str = "", settle: float = 1.0, ae_title: str = "DICOMNODE",
                allowed: Sequence[str] = (), http_port: int | None = None, workers: int = 2,
                http_keys: Mapping[str, object] | None = None, node_extra: str = "", **node_keys: object) -> str:
    """A node config on 127.0.0.1 with a fast settle time and fast delivery retries.

    Parameters
    ----------
    data_dir, port, ae_title, allowed, settle, workers
        ``[node]`` keys (``allowed_calling_aets``, ``settle_seconds``).  ``min_free_disk_mb`` is 16
        (a small guard: CI disks can be small) unless given.
    http_port
        ``[http] port`` (default: a free port).
    http_keys
        More keys of ``[http]``, or other values for its ``host`` and ``port``.
    extra
        Tables after ``[delivery]`` (pipelines, destinations, routes, sources, ``[store]``, ...).
    node_extra
        More ``[node]`` lines, as TOML text.
    node_keys
        More ``[node]`` keys (or other values for the ones above).
    """
    if isinstance(allowed, str):
        raise TypeError(f"allowed is a list of AE titles, not TOML text: {allowed!r}")
    node = {"ae_title": ae_title, "host": LOCALHOST, "port": port, "data_dir": data_dir,
            "allowed_calling_aets": allowed, "settle_seconds": settle, "workers": workers}
    if "min_free_disk_mb" not in node_extra:
        node["min_free_disk_mb"] = 16
    node.update(node_keys)
    http = {"host": LOCALHOST, "port": http_port or free_port(), **(http_keys or {})}
    delivery = {"max_attempts": 20, "backoff_seconds": 0.5, "max_backoff_seconds": 2.0}
    return (table("node", node) + (node_extra + "\n" if node_extra else "") + table("http", http)
            + table("delivery", delivery) + extra)


def dry_run_config(folder: Path, unrouted: str = "keep") -> Path:
    """``folder/node.toml``: MR discarded, head CT through a brain window (SC), other CT to PNG, the rest no route.

    For ``dicom-node route`` / ``process --config``: its data and destination folders are under ``folder/data``.
    """
    data = folder / "data"
    path = folder / "node.toml"
    path.write_text(
        table("node", {"data_dir": data, "unrouted": unrouted})
        + pipeline("brain", BRAIN, "sc") + pipeline("plainpng", RESCALE, "png")
        + folder_destination("pacs", data / "pacs") + folder_destination("archive", data / "archive")
        + discard_route({"Modality": ["MR"]})
        + route("brain", ["pacs", "archive"], match={"Modality": ["CT"], "BodyPartExamined": ["HEAD"]})
        + route("plainpng", ["archive"], match={"Modality": ["CT"], "PatientName": ["*"]}))
    return path


# --------------------------------------------------------------------------- configs whose errors name a line

#: ``[node]`` and ``[http]``: 12 lines, then a blank line; the sections under test follow from line 14.
HEAD = """\
[node]
ae_title = "DICOMNODE"
host = "0.0.0.0"
port = 11112
data_dir = "var"
allowed_calling_aets = []
max_associations = 10
settle_seconds = 10.0

[http]
host = "127.0.0.1"
port = 8080

"""

#: A host name that cannot resolve (``!`` is no character of a host name): the machine check refuses it.
NO_SUCH_HOST = "no!such-host"


def write_config(folder: Path, text: str) -> Path:
    """*text* written to ``folder/node.toml``."""
    path = folder / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(folder: Path, text: str) -> Config:
    """The config *text* loaded from ``folder/node.toml``, as ``dicom-node`` loads it."""
    return load_config(write_config(folder, text))


def error_of(folder: Path, text: str) -> str:
    """The :class:`ConfigError` that loading *text* from ``folder/node.toml`` raises (the test fails without)."""
    with pytest.raises(ConfigError) as info:
        load_text(folder, text)
    return str(info.value)


def marked_line(text: str) -> int:
    """The line that carries the ``# <-`` marker (found independently of the code under test)."""
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if "# <-" in line]
    assert len(lines) == 1, "mark exactly one line with # <-"
    return lines[0]
