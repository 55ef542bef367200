"""The service configuration: one TOML file, checked once at start-up into frozen settings classes.

Every error names the file, the line and the key, e.g.::

    config/node.toml:23: destinations[1] (name "pacs").port: must be a whole number 1-65535, got "abc"

The settings in ``[node]``, ``[http]`` and ``[delivery]`` are optional, each defaulting to the value in
the embedded default (``node/config/default.toml``; ``node.workers``: the number of CPUs, at most 4). In
``[[pipelines]]``, ``[[destinations]]`` and ``[[routes]]`` every key is required except
``output``, ``calling_ae_title``, ``auth``, ``timeout_seconds``, ``trigger``, the TLS keys of
dicom destinations, ``associations`` and ``ca_file`` (see ``config/node.toml``). A file without routes is
valid: the node then receives and spools, but processes nothing. Unknown keys are errors, so a
typo is never silently ignored.

Every time setting has a range (:data:`node.config.check.TIME_SPANS`: the refusal says why), two
listeners may not share a port on overlapping addresses, and a route may not send PNG or volume
(NIfTI, NumPy) output to a DICOM or DICOMweb destination. ``load_config(path, check_machine=True)`` (``serve``, ``config check``)
also checks what only the machine can tell: host names, listener addresses, ``data_dir``, secrets.

``[[sources]]`` are DICOMweb archives the node polls (QIDO-RS, then WADO-RS; see
:mod:`node.receive.poller`): ``name``, ``kind = "dicomweb"``, ``url`` and exactly one of ``every_seconds``
and ``cron`` are required; ``level``, ``query``, ``lookback_hours``, ``late_arrival_hours``,
``auth``, ``page_size``, ``timeout_seconds`` and ``ca_file`` (``https://`` only) are optional.

The package, by job:

- :mod:`~node.config.model`: the frozen settings classes (pydantic dataclasses), :class:`Config`,
  :class:`ConfigError`, the states (:class:`Trigger`, :class:`RouteAction`, :class:`Unrouted`,
  :class:`SourceLevel`);
- :mod:`~node.config.check`: the rule of each value and its refusal in words; unknown keys;
- :mod:`~node.config.schema`: the file as one model, and the checks across its tables;
- :mod:`~node.config.lines`: line numbers (tomllib gives none) and ``FILE:LINE: key.path``;
- :mod:`~node.config.machine`: what only this machine can tell;
- :mod:`~node.config.load`: :func:`load_config`;
- :mod:`~node.config.pipeline` (steps as data) and :mod:`~node.config.file_names` (file-name templates).

Which route a series takes is :mod:`node.process.routing`'s (``route_for``).
"""

from node.config.load import EMBEDDED_SOURCE, load_config
from node.config.model import (
    BasicAuth,
    BearerAuth,
    Config,
    ConfigError,
    DeliverySettings,
    Destination,
    DicomDestination,
    DicomWebDestination,
    DicomWebSource,
    FolderDestination,
    HttpSettings,
    NodeSettings,
    Route,
    RouteAction,
    SourceLevel,
    StoreSettings,
    TlsSettings,
    Trigger,
    Unrouted,
)

__all__ = [
    "EMBEDDED_SOURCE",
    "BasicAuth",
    "BearerAuth",
    "Config",
    "ConfigError",
    "DeliverySettings",
    "Destination",
    "DicomDestination",
    "DicomWebDestination",
    "DicomWebSource",
    "FolderDestination",
    "HttpSettings",
    "NodeSettings",
    "Route",
    "RouteAction",
    "SourceLevel",
    "StoreSettings",
    "TlsSettings",
    "Trigger",
    "Unrouted",
    "load_config",
]
