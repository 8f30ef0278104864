"""TLS material for the tests, made with ``openssl`` at test time: a CA, a server certificate it signed for
127.0.0.1 and localhost, and a second CA that signed nothing (a client trusting it must refuse the server)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certs", "make_certs"]

DAYS = "2"


@dataclass(frozen=True)
class Certs:
    """Paths of the PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", cert.name, "-days", DAYS,
             "-subj", f"/CN=fabric test {name}", cwd=directory)
    return key, cert


def make_certs(directory: Path) -> Certs:
    """Make the CA, the server's key and certificate, and the unrelated CA in ``directory``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed (apt-get install -y openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca(directory, "ca")
    _, other_ca = _ca(directory, "other-ca")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=directory)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", ca.name, "-CAkey", ca_key.name, "-CAcreateserial",
             "-out", "server.pem", "-days", DAYS, "-extfile", "san.cnf", cwd=directory)
    return Certs(ca, directory / "server.pem", directory / "server.key", other_ca)
