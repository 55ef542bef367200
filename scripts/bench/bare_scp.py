"""A bare pynetdicom C-STORE SCP: the floor the node's ingest is measured against.

``python scripts/bench/bare_scp.py PORT DIR [AET]`` listens on 127.0.0.1:PORT, accepts every
storage SOP class in every transfer syntax pydicom knows (like the node), and writes each
instance's ``event.encoded_dataset()`` bytes (preamble, file meta, dataset as received) to
``DIR/<SOPInstanceUID>.dcm``: no parsing, no fsync, no database. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification


def main() -> int:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    aet = sys.argv[3] if len(sys.argv) > 3 else "BARE"
    folder.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # as the node does

    def on_store(event: evt.Event) -> int:
        sop = event.request.AffectedSOPInstanceUID
        with open(folder / f"{sop}.dcm", "wb") as handle:
            handle.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=aet)
    ae.maximum_associations = 10
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
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
