"""TLS for both listeners, and the start-up rule that auth "off" is for loopback only.

``load_tls(config)`` reads ``server.tls`` once, before anything listens: every file must be
readable PEM, the key must belong to the certificate, and the client CA bundle must load,
so a mistake fails at start-up with a ConfigError naming the setting and the file (never
the key's contents), not at the first handshake. The result gives gRPC its
``ssl_server_credentials`` and uvicorn its ``ssl_*`` options; with ``client_ca_file`` both
require a client certificate signed by that bundle (mutual TLS).

``check_exposure(config)``: with ``auth.mode: off`` the tenant billed is whatever the caller
writes in ``x-tenant``, which is only tolerable when nobody but local processes can call.
A non-loopback listen address (0.0.0.0, ::, a LAN address, a host name other than
localhost) is then refused; on loopback it is allowed with a warning.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from serving.config import ConfigError

__all__ = ["ServerTls", "check_exposure", "is_loopback", "load_tls"]

log = logging.getLogger(__name__)

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKER = b"PRIVATE KEY-----"


class _EncryptedKey(Exception):
    """Raised from the password callback: an encrypted key cannot be used unattended."""


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """Validated ``server.tls`` settings: absolute paths and the PEM bytes gRPC needs."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    _cert_pem: bytes = dataclasses.field(repr=False)
    _key_pem: bytes = dataclasses.field(repr=False)  # never printed: repr=False
    _client_ca_pem: bytes | None = dataclasses.field(repr=False)

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate signed by ``client_ca_file``."""
        return self.client_ca_file is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self._key_pem, self._cert_pem)],
            root_certificates=self._client_ca_pem,
            require_client_auth=self.mutual,
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config``: it wraps every listening socket,
        including those handed to ``Server.serve(sockets=...)``, in this context."""
        return {
            "ssl_certfile": str(self.cert_file),
            "ssl_keyfile": str(self.key_file),
            "ssl_ca_certs": str(self.client_ca_file) if self.client_ca_file else None,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if self.mutual else ssl.CERT_NONE,
        }

    def describe(self) -> str:
        """``mutual`` (client certificates required) or ``on``, for logs."""
        return "mutual" if self.mutual else "on"


def _read(setting: str, value: Any) -> tuple[Path, bytes]:
    path = Path(str(value)).expanduser().resolve()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"server.tls.{setting}: file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"server.tls.{setting}: {path} is a directory, not a PEM file") from None
    except OSError as exc:
        raise ConfigError(f"server.tls.{setting}: cannot read {path}: {exc.strerror}") from None
    return path, data


def _refuse_password() -> str:
    raise _EncryptedKey


def _check_pair(cert_file: Path, key_file: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_password)
    except _EncryptedKey:
        raise ConfigError(
            f"server.tls.key_file: {key_file} is encrypted; give the server an unencrypted "
            "key (keep it 0600)"
        ) from None
    except ssl.SSLError as exc:
        # OpenSSL's reason names what failed; it never carries the key's bytes.
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"server.tls.key_file: {key_file} is not the private key of the certificate "
                f"in server.tls.cert_file ({cert_file})"
            ) from None
        raise ConfigError(
            f"server.tls: cannot load the certificate {cert_file} with the key {key_file}: "
            f"{exc.reason or exc.library or 'not valid PEM'}"
        ) from None


def _check_client_ca(ca_file: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls.client_ca_file: {ca_file} is not a PEM CA bundle: "
            f"{exc.reason or exc.library or 'cannot be loaded'}"
        ) from None


def load_tls(config: Mapping[str, Any]) -> ServerTls | None:
    """The validated TLS settings, or None when ``server.tls`` has no certificate."""
    tls = config["server"].get("tls") or {}
    if not tls.get("cert_file") and not tls.get("key_file"):
        if tls.get("client_ca_file"):
            raise ConfigError("server.tls.client_ca_file needs cert_file and key_file as well")
        return None
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise ConfigError("server.tls: set both cert_file and key_file, or neither")
    cert_file, cert_pem = _read("cert_file", tls["cert_file"])
    key_file, key_pem = _read("key_file", tls["key_file"])
    if _CERT_MARKER not in cert_pem:
        raise ConfigError(f"server.tls.cert_file: {cert_file} holds no PEM certificate")
    if _KEY_MARKER not in key_pem:
        raise ConfigError(f"server.tls.key_file: {key_file} holds no PEM private key")
    _check_pair(cert_file, key_file)
    mode = stat.S_IMODE(os.stat(key_file).st_mode)
    if mode & 0o077:
        log.warning(
            "the TLS private key is readable by other users: chmod 600 it",
            extra={"file": str(key_file), "mode": oct(mode)},
        )
    ca_file: Path | None = None
    ca_pem: bytes | None = None
    if tls.get("client_ca_file"):
        ca_file, ca_pem = _read("client_ca_file", tls["client_ca_file"])
        if _CERT_MARKER not in ca_pem:
            raise ConfigError(f"server.tls.client_ca_file: {ca_file} holds no PEM certificate")
        _check_client_ca(ca_file)
    return ServerTls(cert_file, key_file, ca_file, cert_pem, key_pem, ca_pem)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``.

    Other host names count as not loopback without resolving them: a name may resolve
    elsewhere later, and the wildcard addresses (0.0.0.0, ::, "") listen everywhere."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_exposure(config: Mapping[str, Any], *, warn: bool = True) -> None:
    """Refuse auth "off" on a listener other than loopback (ConfigError); on loopback log a
    warning when ``warn`` (the CLI parent checks with ``warn=False``: its workers warn)."""
    if config["auth"]["mode"] != "off":
        return
    host = str(config["server"]["host"])
    if not is_loopback(host):
        raise ConfigError(
            f"auth.mode is off, so any caller could bill any tenant; refusing to listen on "
            f"{host or '*'}. Create a key (paddle-meter keys create --tenant T --role admin), "
            "set auth.mode: required (or listen on 127.0.0.1)"
        )
    if warn:
        log.warning(
            "auth.mode is off: the tenant is taken from x-tenant as the caller writes it, "
            "unchecked; allowed on loopback only. Set auth.mode: required to bill by API key",
            extra={"host": host},
        )
