"""The sender of each destination kind: ``[[destinations]] kind`` -> :class:`~node.deliver.sender.Sender`.

======== =================================================== =========================
kind     sender                                              delivers by
======== =================================================== =========================
dicom    :class:`node.deliver.dicom.DicomSender`             C-STORE (optionally TLS)
dicomweb :class:`node.deliver.dicomweb.DicomWebSender`       STOW-RS
folder   :class:`node.deliver.folder.FolderSender`           copy + ``.complete``
======== =================================================== =========================
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from node.config import Destination
from node.deliver.dicom import DicomSender
from node.deliver.dicomweb import DicomWebSender
from node.deliver.folder import FolderSender
from node.deliver.sender import Sender

__all__ = ["SENDER_KINDS", "sender_for"]

#: The sender class of each destination kind.
SENDER_KINDS: Mapping[str, type[Sender]] = MappingProxyType(
    {sender.kind: sender for sender in (DicomSender, DicomWebSender, FolderSender)}
)


def sender_for(destination: Destination) -> Sender:
    """The sender for a configured destination.

    Parameters
    ----------
    destination : Destination
        A ``[[destinations]]`` table as the config loaded it.

    Returns
    -------
    Sender
        The sender of its ``kind``, built from it (a DICOMweb destination's credentials are read
        from their environment variables here, once: a missing one is a
        :class:`~node.config.ConfigError` naming it).

    Raises
    ------
    TypeError
        If no sender delivers to the destination's kind.
    """
    sender = SENDER_KINDS.get(getattr(destination, "kind", None))
    if sender is None:
        raise TypeError(f"no sender for destination {destination!r}")
    return sender.from_destination(destination)
