"""A throwaway certificate authority for TLS tests, made with the ``openssl`` command.

``make_ca(directory)`` writes a CA, a server certificate for ``localhost`` / ``127.0.0.1`` /
``::1`` (subjectAltName, serverAuth) and a client certificate (clientAuth) signed by it,
plus a second, untrusted CA with its own client certificate (to show that a certificate
the server's CA did not sign is refused). Keys are EC P-256, written 0600. The openssl
CLI is used rather than a Python crypto package so the tests need no extra dependency.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["TestCa", "make_ca", "make_key_pair"]

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
_DAYS = "2"


@dataclasses.dataclass(frozen=True)
class TestCa:
    """Paths of the PEM files ``make_ca`` wrote."""

    __test__ = False  # not a pytest test class despite its name

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a CA the server does not trust
    other_client_cert: Path  # signed by other_ca_cert
    other_client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    result = subprocess.run(
        [OPENSSL, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _key(path: Path) -> Path:
    _openssl(
        *["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"],
        path,
        cwd=path.parent,
    )
    os.chmod(path, 0o600)
    return path


def _self_signed_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key = _key(directory / f"{name}.key")
    cert = directory / f"{name}.crt"
    _openssl(
        *("req", "-x509", "-new", "-key", key, "-out", cert, "-days", _DAYS),
        *("-subj", f"/CN=paddle-meter test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=directory,
    )
    return cert, key


def _signed(
    directory: Path, name: str, common_name: str, extensions: str, ca: tuple[Path, Path]
) -> tuple[Path, Path]:
    key = _key(directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    cert = directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions, encoding="utf-8")
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={common_name}", cwd=directory)
    _openssl(
        *("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial"),
        *("-out", cert, "-days", _DAYS, "-sha256", "-extfile", ext),
        cwd=directory,
    )
    return cert, key


_SERVER_EXT = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
)
_CLIENT_EXT = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
)


def make_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key that belong to no CA (for mismatch tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    return _self_signed_ca(directory, name)


def make_ca(directory: str | Path) -> TestCa:
    """Write a CA, a server and a client certificate (and an untrusted pair) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = _self_signed_ca(directory, "ca")
    server = _signed(directory, "server", "localhost", _SERVER_EXT, ca)
    client = _signed(directory, "client", "test-client", _CLIENT_EXT, ca)
    other_ca = _self_signed_ca(directory, "other-ca")
    other_client = _signed(directory, "other-client", "intruder", _CLIENT_EXT, other_ca)
    return TestCa(
        ca_cert=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca_cert=other_ca[0],
        other_client_cert=other_client[0],
        other_client_key=other_client[1],
    )
