"""pynetdicom's process-wide switches: the one place the node sets them, once at start-up.

pynetdicom keeps some of its behaviour in module-level variables of ``pynetdicom._config``, read
by every association of the process, from every thread.  Flipping one while associations run
(as a sender once did from its delivery threads) changes what the others do half-way, so the
node sets them here, before any association exists: :func:`configure_pynetdicom` is called by
``dicom-node serve`` (:meth:`node.app.service.NodeService.start`) and by any other entry point
that sends C-STOREs (the benchmarks, the tests that send), before the first one.

================================  =====  ====================================================
switch                            value  why
================================  =====  ====================================================
``STORE_SEND_CHUNKED_DATASET``    True   A file given to ``send_c_store`` by its path is sent
                                         as its bytes, read in chunks, when the peer accepted
                                         its own transfer syntax (:mod:`node.deliver.dicom`):
                                         nothing decoded and encoded again, memory one PDU
                                         whatever the file's size (without it: 17% slower for
                                         300 CT slices, a 300 MB file held whole).  It changes
                                         nothing else: data sets given as such are encoded as
                                         before.
================================  =====  ====================================================

The receiving side's process-wide changes are made at the same start-up, where the SCP is built
(:meth:`node.app.service.NodeService.start`): ``STORE_RECV_CHUNKED_DATASET`` (and the names it
uses in ``pynetdicom.dimse_messages``) by :func:`node.receive.scp.enable_streamed_receive`, with the
spool folder it needs; and the ``time`` stand-in of :func:`node.net.fastpath.enable`, which only
changes the associations the SCP attaches.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["PYNETDICOM_SWITCHES", "configure_pynetdicom"]

#: Each switch of ``pynetdicom._config`` the node sets, and its value (see the module's table).
PYNETDICOM_SWITCHES: Mapping[str, object] = MappingProxyType({
    "STORE_SEND_CHUNKED_DATASET": True,
})


def configure_pynetdicom() -> None:
    """Set :data:`PYNETDICOM_SWITCHES` in ``pynetdicom._config`` (process-wide).

    Call it once at start-up, before the first association; calling it again changes nothing.

    Raises
    ------
    AttributeError
        If this pynetdicom has no such switch (a release that renamed one: the node would
        otherwise run without it, silently slower or different).
    """
    from pynetdicom import _config

    for name, value in PYNETDICOM_SWITCHES.items():
        if not hasattr(_config, name):
            raise AttributeError(f"pynetdicom._config has no {name}: this pynetdicom is not one the node knows")
        setattr(_config, name, value)

