"""The demo behind scripts/demo: the node on its default config, one series pushed, outputs shown."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE, StoragePresentationContexts

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "dicom" / "ct_series" / "ge_head_tilt"


def sample_series() -> list[Path]:
    """The shared real CT series when it is there, else pydicom's bundled CT slice."""
    files = sorted(SHARED_CT.glob("*.dcm")) if SHARED_CT.is_dir() else []
    return files or [Path(get_testdata_file("CT_small.dcm", download=False))]


def push(files: list[Path]) -> int:
    ae = AE(ae_title="DEMO")
    ae.requested_contexts = StoragePresentationContexts
    for _ in range(50):
        assoc = ae.associate("127.0.0.1", 11112, ae_title="DICOMNODE")
        if assoc.is_established:
            break
        time.sleep(0.2)
    else:
        raise SystemExit("the node did not accept an association on 127.0.0.1:11112")
    stored = sum(1 for path in files if assoc.send_c_store(pydicom.dcmread(path)).Status == 0)
    assoc.release()
    return stored


def main() -> int:
    node = subprocess.Popen([str(ROOT / ".venv" / "bin" / "dicom-node"), "serve"], cwd=ROOT)
    try:
        files = sample_series()
        print(f"pushing {len(files)} instances to DICOMNODE@127.0.0.1:11112 ...")
        print(f"{push(files)} stored; the series is processed 10 s after its last instance")
        out = ROOT / "var" / "out"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(out.rglob("*.dcm"))) < len(files):
            time.sleep(1)
        outputs = sorted(out.rglob("*.dcm"))
        print(f"\n{len(outputs)} derived Secondary Captures under {out}")
        for path in outputs[:3]:
            print(f"  {path.relative_to(ROOT)}")
        try:
            urllib.request.urlopen("http://127.0.0.1:8080/healthz", timeout=5)
            if "--keep" in sys.argv:
                print("\nstatus page: http://127.0.0.1:8080/   (Ctrl-C stops the node)")
                node.wait()
            else:
                print("\nstatus page: http://127.0.0.1:8080/ (run scripts/demo --keep to leave the node running)")
        except OSError:
            print("\nthe status page did not answer on 127.0.0.1:8080")
        return 0 if outputs else 1
    except KeyboardInterrupt:
        return 0
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
