"""The configuration file as one pydantic model, :class:`ConfigFile`, and the checks across its tables.

The top-level keys are the fields of :class:`ConfigFile`: ``[node]``, ``[http]``, ``[tls]``,
``[delivery]``, ``[store]`` and the arrays ``[[pipelines]]``, ``[[destinations]]``, ``[[routes]]``,
``[[sources]]``. pydantic validates the tables in that order, each key by its rule, and collects
every refusal; the loader reports the first. Checks across items and tables:

- names are unique within each array (:class:`~node.config.check.UniqueNames`), and routes name
  pipelines and destinations the file defines (:class:`~node.config.check.Reference`), as the
  arrays are validated;
- once every table has passed (:meth:`ConfigFile._across_tables`): a route sends a pipeline's output
  only where it can be delivered (:func:`output_problem`: the place for the refusals of a new output
  kind), and two listeners do not share a port on overlapping addresses (:func:`listeners_apart`,
  again with resolved host names by the check of this machine).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, ValidationInfo, model_validator

from node.config.check import (
    FLAG, ITEM_NAME, Built, OneOf, Refusal, Steps, Table, TablesArray, UniqueNames, file_context, refuse,
)
from node.config.file_names import PNG_FIELDS, template_fields
from node.config.lines import KeyPath, Locator, show
from node.config.model import (
    DESTINATION, SOURCE, DeliverySettings, Destination, DicomWebSource, FolderDestination, HttpSettings,
    NodeSettings, Route, StoreSettings, TlsSettings, embedded_default,
)
from node.config.pipeline import OutputFormat, Pipeline, PipelineError, parse_steps

__all__ = ["ConfigFile", "Listener", "PipelineTable", "ip_of", "listeners", "listeners_apart", "output_problem",
           "routes_deliverable"]


@dataclass(frozen=True)
class PipelineTable(Table):
    """A ``[[pipelines]]`` table as written; its steps are checked and made into a Pipeline by
    :func:`node.config.pipeline.parse_steps` (a new step is added there)."""

    name: Annotated[str, ITEM_NAME]
    steps: Annotated[tuple[Any, ...], Steps()]
    output: Annotated[OutputFormat, OneOf(OutputFormat)] = OutputFormat.SC
    keep_patient: Annotated[bool, FLAG] = False


def _pipeline(table: PipelineTable) -> Pipeline:
    try:
        pipeline = parse_steps(table.name, table.steps, table.output.value)
    except PipelineError as exc:  # at the step's key when the error names one (a colour map's name)
        at = ("steps",) if exc.step is None else ("steps", exc.step) + ((exc.key,) if exc.key else ())
        refuse(str(exc), *at)
    if not table.keep_patient:
        return pipeline
    if not pipeline.output.is_volume:
        refuse(f"is for volume outputs (nifti, npz) only; pipeline {show(table.name)} writes output = "
               f"{show(table.output.value)}", "keep_patient")
    return dataclasses.replace(pipeline, keep_patient=True)


def _calling_ae_titles(table: dict[str, Any]) -> dict[str, Any]:
    """*table* with ``[node] ae_title`` as the ``calling_ae_title`` of DICOM destinations that give none."""
    node = table.get("node")
    own = node.get("ae_title", embedded_default("node", "ae_title")) if isinstance(node, dict) else None
    destinations = table.get("destinations")
    if own is None or not isinstance(destinations, list):
        return table
    filled = [{"calling_ae_title": own, **item} if isinstance(item, dict) and item.get("kind") == "dicom" else item
              for item in destinations]
    return {**table, "destinations": filled}


@dataclass(frozen=True, kw_only=True)
class ConfigFile(Table):
    """The whole file, its tables in the order they are checked (and listed when a key is unknown)."""

    # pydantic builds the validator at the first load, not at import: worker processes import the
    # package to unpickle their Config and never load a file (building it takes ~15 ms CPU)
    __pydantic_config__ = ConfigDict(defer_build=True)

    node: NodeSettings
    http: HttpSettings
    tls: TlsSettings | None = None
    delivery: DeliverySettings
    store: StoreSettings | None = None
    pipelines: Annotated[tuple[Annotated[Pipeline, Built(PipelineTable, _pipeline)], ...],
                         TablesArray("pipelines"), UniqueNames("pipelines")] = ()
    destinations: Annotated[tuple[Annotated[Destination, DESTINATION], ...],
                            TablesArray("destinations"), UniqueNames("destinations")] = ()
    routes: Annotated[tuple[Route, ...], TablesArray("routes")] = ()
    sources: Annotated[tuple[Annotated[DicomWebSource, SOURCE], ...],
                       TablesArray("sources"), UniqueNames("sources")] = ()

    @classmethod
    def file_form(cls, table: dict[str, Any]) -> dict[str, Any]:
        """``[node]``, ``[http]`` and ``[delivery]`` left out are taken as empty (all defaults)."""
        return _calling_ae_titles({"node": {}, "http": {}, "delivery": {}, **table})

    @model_validator(mode="after")
    def _across_tables(self, info: ValidationInfo) -> ConfigFile:
        try:
            pipelines = {pipeline.name: pipeline for pipeline in self.pipelines}
            destinations = {destination.name: destination for destination in self.destinations}
            routes_deliverable(self.routes, pipelines, destinations)
            listeners_apart(listeners(self.node, self.tls, self.http), file_context(info).locator, {})
            receivers_possible(self.node)
        except Refusal as exc:
            refuse(exc.message, *exc.path)
        return self


# --------------------------------------------------------------------------- outputs and destinations


def output_problem(pipeline: Pipeline, destination: Destination) -> str | None:
    """Why every delivery of *pipeline*'s output to *destination* would fail for good, or None.

    An output kind that some destinations cannot take says so here.
    """
    output = pipeline.output
    if not output.is_dicom and destination.kind in ("dicom", "dicomweb"):
        dicom = [show(f.value) for f in OutputFormat if f.is_dicom]
        return (f"destination {show(destination.name)} (kind = {show(destination.kind)}) takes DICOM only, and "
                f"pipeline {show(pipeline.name)} writes output = {show(output.value)}: send it to a folder "
                f"destination, or make the pipeline's output {', '.join(dicom[:-1])} or {dicom[-1]}")
    if output.is_volume and isinstance(destination, FolderDestination) and destination.file_names:
        return (f"destination {show(destination.name)} names files with file_names, and pipeline "
                f"{show(pipeline.name)} writes volumes (output = {show(output.value)}), which keep their own "
                "names (volume.nii.gz and volume.json): remove file_names or send them elsewhere")
    if not output.is_dicom and isinstance(destination, FolderDestination) and destination.file_names:
        unknown = [f for f in template_fields(destination.file_names) if f not in PNG_FIELDS]
        if unknown:
            return (f"destination {show(destination.name)} names files with {{{unknown[0]}}}, and pipeline "
                    f"{show(pipeline.name)} writes PNG, which carries only {', '.join(PNG_FIELDS)} (of its "
                    "source): use only those in file_names")
    return None


def routes_deliverable(routes: Sequence[Route], pipelines: Mapping[str, Pipeline],
                       destinations: Mapping[str, Destination]) -> None:
    """Refuse (:class:`Refusal`) the first route destination that cannot take its pipeline's output."""
    for index, route in enumerate(routes):
        if route.discards:
            continue
        for n, name in enumerate(route.destinations):
            problem = output_problem(pipelines[route.pipeline], destinations[name])
            if problem is not None:
                raise Refusal(("routes", index, "destinations", n), problem)


# --------------------------------------------------------------------------- listeners


@dataclass(frozen=True)
class Listener:
    """One listening socket of the node, with the keys that set it."""

    what: str
    host: str
    host_key: KeyPath
    port: int
    port_key: KeyPath


def listeners(node: NodeSettings, tls: TlsSettings | None, http: HttpSettings) -> list[Listener]:
    """The node's listening sockets: plain DICOM (unless port 0), DICOM TLS (on [node] host), HTTP."""
    out = []
    if node.port:
        out.append(Listener("the DICOM listener", node.host, ("node", "host"), node.port, ("node", "port")))
    if tls is not None:
        out.append(Listener("the DICOM TLS listener", node.host, ("node", "host"), tls.port, ("tls", "port")))
    out.append(Listener("the HTTP listener", http.host, ("http", "host"), http.port, ("http", "port")))
    return out


def receivers_possible(node: NodeSettings) -> None:
    """``[node] receivers`` above 1 needs ``SO_REUSEPORT`` and the plain listener whose port they share."""
    if node.receivers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise Refusal(("node", "receivers"), f"{node.receivers} receiving processes need SO_REUSEPORT, which this "
                      "platform has not: set 1")
    if node.receivers > 1 and not node.port:
        raise Refusal(("node", "receivers"), f"{node.receivers} receiving processes share the plain listener's "
                      "port, and port = 0 turns it off: set 1, or a port")


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """*host* as an IP address, or None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _overlap(a: str, b: str) -> str | None:
    """How two listeners' hosts share an address (then one port cannot serve both), or None.

    ``0.0.0.0`` takes every IPv4 address, ``::`` every address (Linux binds it dual-stack); a host
    name is compared as text unless it was resolved.
    """
    if a.lower() == b.lower() or (ip_of(a) is not None and ip_of(a) == ip_of(b)):
        return f"both on {a}"
    for wild, other in ((a, b), (b, a)):
        address, other_address = ip_of(wild), ip_of(other)
        if address is None or not address.is_unspecified:
            continue
        if address.version == 6 or other_address is None or other_address.version == 4:
            return f"{wild} takes every address, {other} among them"
    return None


def listeners_apart(sockets: Sequence[Listener], locator: Locator, addresses: Mapping[str, str]) -> None:
    """Refuse two listeners on one port where their addresses overlap: the second could not bind it.

    *addresses* maps resolved host names to the address a listener binds; other hosts are compared
    as written. The refusal is placed at the port written last (a port left at its default is not
    in the file).
    """
    for n, first in enumerate(sockets):
        for second in sockets[n + 1:]:
            how = _overlap(addresses.get(first.host, first.host), addresses.get(second.host, second.host))
            if first.port != second.port or how is None:
                continue
            later, other = sorted((first, second), key=lambda x: (locator.in_file(x.port_key),
                                                                  locator.line(x.port_key)), reverse=True)
            at = f"line {locator.line(other.port_key)}" if locator.in_file(other.port_key) else "its default"
            raise Refusal(later.port_key, f"{later.port} is also {locator.where(other.port_key)} ({at}, "
                          f"{other.what}), and their hosts overlap ({how}): {later.what} could not bind it; "
                          "give each listener its own port")
