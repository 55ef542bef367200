"""A test PKI made with ``openssl``: two CAs and their certificates for 127.0.0.1, for TLS tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from node.config import TlsSettings
from tests.support.tools import tool

__all__ = ["Pki", "openssl"]


def openssl(*args: str, cwd: Path) -> None:
    """Run ``openssl ARGS`` in *cwd*; the test fails, with its message, when it does."""
    result = subprocess.run([tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


class Pki:
    """Two CAs and certificates, all PEM, RSA 2048, valid two days.

    * ``ca`` signs ``server`` (subjectAltName IP:127.0.0.1), ``named`` (DNS:localhost only) and
      ``client`` (CN=MODALITY, clientAuth);
    * ``other`` (another CA) signs ``rogue`` (a client certificate the node must not accept).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for name, cn in (("ca", "Test Hospital CA"), ("other", "Other CA")):
            openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                     f"{name}.pem", "-days", "2", "-subj", f"/CN={cn}",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
        self._leaf("server", "dicom-node", "ca", "subjectAltName=IP:127.0.0.1", "serverAuth")
        self._leaf("named", "localhost", "ca", "subjectAltName=DNS:localhost", "serverAuth")
        self._leaf("client", "MODALITY", "ca", None, "clientAuth")
        self._leaf("rogue", "ROGUE", "other", None, "clientAuth")

    def _leaf(self, name: str, cn: str, ca: str, san: str | None, usage: str) -> None:
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
                 f"extendedKeyUsage={usage}"] + ([san] if san else [])
        (self.folder / f"{name}.ext").write_text("\n".join(lines) + "\n")
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=self.folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-set_serial", f"0x{os.urandom(8).hex()}", "-days", "2", "-out", f"{name}.pem",
                 "-extfile", f"{name}.ext", cwd=self.folder)

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def tls_args(self, name: str, *, trust: str = "ca") -> list[str]:
        """dcmtk options: TLS with *name*'s key and certificate, trusting CA *trust*."""
        return ["+tls", str(self.key(name)), str(self.cert(name)), "+cf", str(self.cert(trust))]

    def settings(self, port: int, *, cert: str = "server", ca: str | None = "ca") -> TlsSettings:
        return TlsSettings(port=port, cert_file=self.cert(cert), key_file=self.key(cert),
                           ca_file=self.cert(ca) if ca else None)
