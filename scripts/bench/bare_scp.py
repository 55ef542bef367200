"""A bare pynetdicom C-STORE SCP: the floor the node's ingest is measured against.

``python scripts/bench/bare_scp.py PORT DIR [AET]`` listens on 127.0.0.1:PORT, accepts every
storage SOP class in every transfer syntax pydicom knows (like the node), and writes each
instance's ``event.encoded_dataset()`` bytes (preamble, file meta, dataset as received) to
``DIR/<SOPInstanceUID>.dcm``: no parsing, no fsync, no database. Stops on SIGTERM/SIGINT.

A fair floor: stock pynetdicom given every setting the node gives it, so the difference is the
node's own work - what it adds (durable spool, header parse, job store) and what it replaces (its
quicker hot path for its own associations, :mod:`node.net.fastpath`, which is why the node can
come out below 1.0x):

* the same maximum PDU the node's AE advertises (``node.receive.scp.build_application_entity``:
  0, unlimited). pynetdicom's default is 16382, which makes a sender cut a 512x512 CT slice into
  ~32 PDUs instead of ~4 (the floor of the benchmarks before 2026-12 kept that default, so it did
  ~8x the PDU work of the node);
* ``TCP_NODELAY`` on each accepted connection, by the node's own ``node.net.sockets.no_delay``;
* logging set up by the node's ``node.telemetry.logsetup.setup_logging`` at the node's default level (INFO,
  pynetdicom at WARNING), with one INFO line per association as the node writes.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom.uid import AllTransferSyntaxes  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.presentation import AllStoragePresentationContexts  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402

from node.receive.scp import build_application_entity  # noqa: E402
from node.telemetry.logsetup import LogSettings, setup_logging  # noqa: E402
from node.net.sockets import no_delay  # noqa: E402

log = logging.getLogger("bare_scp")


def main() -> int:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    aet = sys.argv[3] if len(sys.argv) > 3 else "BARE"
    folder.mkdir(parents=True, exist_ok=True)
    setup_logging(LogSettings())  # the node's default: INFO, pynetdicom at WARNING

    def on_store(event: evt.Event) -> int:
        sop = event.request.AffectedSOPInstanceUID
        with open(folder / f"{sop}.dcm", "wb") as handle:
            handle.write(event.encoded_dataset())
        return 0x0000

    def on_open(event: evt.Event) -> None:
        no_delay(event.assoc)

    def on_established(event: evt.Event) -> None:
        peer = event.assoc.requestor
        log.info("association from %s at %s:%s (max PDU we accept: %d)", peer.ae_title, peer.address, peer.port,
                 event.assoc.acceptor.maximum_length)

    def on_released(event: evt.Event) -> None:
        log.info("association from %s released", event.assoc.requestor.ae_title)

    ae = AE(ae_title=aet)
    ae.maximum_associations = 10
    ae.maximum_pdu_size = build_application_entity(aet).maximum_pdu_size  # the node's: 0, unlimited
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open), (evt.EVT_ESTABLISHED, on_established),
                (evt.EVT_RELEASED, on_released)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    log.info("bare SCP %s on 127.0.0.1:%d, max PDU %d", aet, port, ae.maximum_pdu_size)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
