"""Reading the configuration: the file, its TOML, its check, the :class:`~node.config.model.Config`.

A refusal names the file, the line and the key: pydantic reports where it refused as ``loc``, a path
of field names and item indices, plus, for the union of kinds, the tag ``kind=<kind>``; the rule's
``at`` (keys below the value it refused) is appended, the tag left out, and the path is placed by
:class:`~node.config.lines.Locator`::

    ('destinations', 1, 'kind=dicom', 'port')  ->  node.toml:31: destinations[2] (name "pacs").port

Of several refusals, the first in the order of the file's tables and keys is reported.

Cost of pydantic, measured against the hand-written checker it replaced (main 652e770; CPU time,
medians of 11-21 runs on the 2-core test machine): importing the package 58 -> 101 ms (pydantic's
own import), the first load of a process 0.7 -> 27 ms (pydantic builds the validator then; later
loads 0.24 -> 0.30 ms), so a process that loads a configuration starts ~0.1 s later:
``python -c "from node.config import load_config; load_config(None)"`` 360 -> 480 ms,
``dicom-node config check config/node.toml`` 510 -> 580 ms. Accepted: once per process, in place
of a thousand lines of checks by hand. Worker processes import the package to unpickle their
Config but never build the validator.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from node.config.check import FileContext, Refusal
from node.config.lines import KeyPath, Locator
from node.config.machine import check_this_machine
from node.config.model import DEFAULT_TOML, Config, ConfigError, StoreSettings
from node.config.schema import ConfigFile

__all__ = ["EMBEDDED_SOURCE", "load_config"]

EMBEDDED_SOURCE = "<embedded default>"
"""The :attr:`Config.source` of the configuration built into the package (``node/config/default.toml``)."""

_CONFIG_FILE = TypeAdapter(ConfigFile)


def load_config(path: str | os.PathLike[str] | None, *, check_machine: bool = False) -> Config:
    """Read and check the configuration.

    Parameters
    ----------
    path : str or os.PathLike or None
        The TOML file; None for the embedded default (``node/config/default.toml``). Relative paths
        in the file resolve against the file's folder; in the embedded default, against the
        current working directory.
    check_machine : bool
        Also check what depends on this machine (``dicom-node serve`` and ``config check`` do):
        see :mod:`node.config.machine`.

    Returns
    -------
    Config
        The checked configuration.

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or is not a valid configuration. The message
        starts with ``FILE:LINE: KEY:``.
    """
    source, text, base = _read(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(source, text, exc) from None
    locator = Locator(source, text, data)
    try:
        file = _CONFIG_FILE.validate_python(data, context={"file": FileContext(base, locator)})
    except ValidationError as exc:
        path_, message = _first_refusal(exc.errors(), data)
        raise ConfigError(f"{locator.located(path_)}: {message}") from None
    config = _config(file, locator)
    if check_machine:
        try:
            check_this_machine(config, locator)
        except Refusal as exc:
            raise ConfigError(f"{locator.located(exc.path)}: {exc.message}") from None
    return config


def _read(path: str | os.PathLike[str] | None) -> tuple[str, str, Path]:
    """The source's name, its text and the folder its relative paths resolve against."""
    if path is None:
        return EMBEDDED_SOURCE, DEFAULT_TOML, Path.cwd()
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the configuration: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text: {exc.reason}") from None
    return source, text, Path(os.path.abspath(source)).parent


def _syntax_error(source: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    message = str(exc)
    found = re.search(r"\(at line (\d+), column \d+\)", message)
    if found:
        line = int(found.group(1))
    elif "end of document" in message:
        line = text.count("\n") + 1
    else:
        line = 1
    return ConfigError(f"{source}:{line}: TOML syntax error: {message}")


def _first_refusal(errors: list[ErrorDetails], data: dict[str, Any]) -> tuple[KeyPath, str]:
    """The key path and message of pydantic's first error (a rule's own words, or pydantic's)."""
    error = errors[0]
    context = error.get("ctx") or {}
    path = _data_path(error["loc"], data) + tuple(context.get("at", ()))
    if error["type"] == "config":
        return path, context["message"]
    if error["type"] == "missing":
        return path, "missing (required)"
    return path, error["msg"]  # not expected: every key has a rule of its own


def _data_path(loc: tuple[str | int, ...], data: Any) -> KeyPath:
    """*loc* without the tags of unions (``kind=dicom``), which are no keys of the file."""
    path: list[str | int] = []
    for part in loc:
        is_tag = isinstance(data, dict) and part not in data and part == f"kind={data.get('kind')}"
        if is_tag:
            continue
        path.append(part)
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            data = None
    return tuple(path)


def _config(file: ConfigFile, locator: Locator) -> Config:
    """The :class:`Config` of a checked file, its secrets' keys noted for messages at run time."""

    def placed(item: Any, path: KeyPath) -> Any:
        auth = getattr(item, "auth", None)
        if auth is None:
            return item
        secret = "password_env" if hasattr(auth, "password_env") else "token_env"
        where = locator.located(path + ("auth", secret))
        return dataclasses.replace(item, auth=dataclasses.replace(auth, where=where))

    store = file.store or StoreSettings()
    if store.url is not None:
        store = dataclasses.replace(store, where=locator.located(("store", "password_env")))
    return Config(
        node=file.node,
        http=placed(file.http, ("http",)),
        delivery=file.delivery,
        pipelines=MappingProxyType({pipeline.name: pipeline for pipeline in file.pipelines}),
        destinations=MappingProxyType({d.name: placed(d, ("destinations", n)) for n, d in enumerate(file.destinations)}),
        routes=file.routes,
        source=locator.source,
        sources=MappingProxyType({s.name: placed(s, ("sources", n)) for n, s in enumerate(file.sources)}),
        tls=file.tls,
        store=store,
    )
