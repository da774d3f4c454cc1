"""TLS on both listeners (a CA the test makes with openssl) and the auth-off loopback rule.

Two real servers, one per fixture: ``mtls`` (loopback, auth off, server.tls with a client
CA: mutual TLS) is called by tritonclient over gRPC and HTTP with a client certificate,
and must refuse clients without one, with one from another CA, and plaintext clients;
``open_tls`` (bound to 0.0.0.0, auth required, TLS without a client CA) shows that auth
required may listen beyond loopback and that plain server TLS needs no client certificate.
The refusals of ``paddle-meter serve`` (auth off on 0.0.0.0, bad TLS files) are subprocess
runs that must exit 2 before any model loads.
"""

from __future__ import annotations

import contextlib
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from imaging import CORPUS, same_text
from support.server import ServerProcess, free_port
from support.tls_ca import OPENSSL, TestCa, make_ca, make_key_pair
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from serving.config import ConfigError, load_config
from serving.tls import check_exposure, is_loopback, load_tls

PAPER = CORPUS["english_invoice"]
OFF_LOOPBACK_MESSAGE = "auth.mode is off, so any caller could bill any tenant"


class TlsServerProcess(ServerProcess):
    """ServerProcess whose readiness probe speaks TLS (with the client certificate when the
    server asks for one): the base class probes plain http://."""

    def __init__(self, workdir: Path, config: dict, *, ca: TestCa, mutual: bool) -> None:
        super().__init__(workdir, config)
        self.ca = ca
        self.mutual = mutual

    @property
    def http_url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.ca_cert))
        if with_cert:
            context.load_cert_chain(self.ca.client_cert, self.ca.client_key)
        return context

    def is_ready(self) -> bool:
        context = self.client_context(with_cert=self.mutual)
        try:
            reply = httpx.get(f"{self.http_url}/v2/health/ready", verify=context, timeout=1)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200


def _tls_block(ca: TestCa, *, mutual: bool) -> dict:
    return {
        "cert_file": str(ca.server_cert),
        "key_file": str(ca.server_key),
        "client_ca_file": str(ca.ca_cert) if mutual else None,
    }


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCa:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def mtls(ca, tmp_path_factory):
    server = TlsServerProcess(
        tmp_path_factory.mktemp("mtls"),
        {"server": {"tls": _tls_block(ca, mutual=True)}},
        ca=ca,
        mutual=True,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def open_tls(ca, tmp_path_factory):
    server = TlsServerProcess(
        tmp_path_factory.mktemp("open-tls"),
        {
            "server": {"host": "0.0.0.0", "tls": _tls_block(ca, mutual=False)},
            "auth": {"mode": "required"},
        },
        ca=ca,
        mutual=False,
    )
    with server:
        yield server


def _ledger_row(server: ServerProcess, request_id: str, timeout_s: float = 20.0) -> dict:
    """The ledger row of ``request_id`` (SQLite in the server's data dir), polled until written."""
    path = server.workdir / "data" / "ledger.sqlite3"
    deadline = time.monotonic() + timeout_s
    while True:
        if path.exists():
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.row_factory = sqlite3.Row
                rows = [
                    dict(r)
                    for r in conn.execute(
                        "SELECT * FROM usage_records WHERE request_id = ?", (request_id,)
                    )
                ]
            if rows:
                assert len(rows) == 1, rows
                return rows[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger row for {request_id} within {timeout_s}s")
        time.sleep(0.1)


def _ledger_has(server: ServerProcess, request_id: str) -> bool:
    path = server.workdir / "data" / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        query = "SELECT count(*) FROM usage_records WHERE request_id = ?"
        return conn.execute(query, (request_id,)).fetchone()[0] > 0


def _image_input(module):
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([PAPER.data], dtype=np.object_))
    return tensor


def _grpc_client(
    server: TlsServerProcess, *, cert: str = "trusted"
) -> triton_grpc.InferenceServerClient:
    ca = server.ca
    chain = {
        "trusted": (ca.client_key, ca.client_cert),
        "other": (ca.other_client_key, ca.other_client_cert),
    }
    key, certificate = chain.get(cert, (None, None))
    return triton_grpc.InferenceServerClient(
        server.grpc_address,
        ssl=True,
        root_certificates=str(ca.ca_cert),
        private_key=str(key) if key else None,
        certificate_chain=str(certificate) if certificate else None,
    )


# --- mutual TLS: tritonclient with a client certificate is served and billed ---------------


def test_grpc_infer_over_mutual_tls_is_served_and_billed(mtls):
    request_id = f"tls-grpc-{uuid.uuid4().hex[:8]}"
    with _grpc_client(mtls) as client:
        result = client.infer(
            "ocr",
            [_image_input(triton_grpc)],
            headers={"x-request-id": request_id, "x-tenant": "legal"},
        )
    (text,) = result.as_numpy("text")[0].decode("utf-8").split("\n")
    assert same_text(text, PAPER.lines[0])
    row = _ledger_row(mtls, request_id)
    assert row["status"] == "ok" and row["tenant"] == "legal" and row["model"] == "ocr"
    assert row["output_tokens"] == len(text)


def test_http_infer_over_mutual_tls_is_served_and_billed(mtls):
    request_id = f"tls-http-{uuid.uuid4().hex[:8]}"
    ca = mtls.ca
    client = triton_http.InferenceServerClient(
        f"127.0.0.1:{mtls.http_port}",
        ssl=True,
        ssl_options={
            "ca_certs": str(ca.ca_cert),
            "certfile": str(ca.client_cert),
            "keyfile": str(ca.client_key),
        },
    )
    try:
        result = client.infer(
            "ocr",
            [_image_input(triton_http)],
            headers={"x-request-id": request_id, "x-tenant": "audit"},
        )
    finally:
        client.close()
    (text,) = result.as_numpy("text")[0].decode("utf-8").split("\n")
    assert same_text(text, PAPER.lines[0])
    row = _ledger_row(mtls, request_id)
    assert row["status"] == "ok" and row["tenant"] == "audit" and row["output_tokens"] == len(text)


def test_server_certificate_names_loopback_and_logs_say_tls_is_on(mtls):
    # The client checks the certificate against 127.0.0.1 (the SAN the CA wrote).
    reply = httpx.get(f"{mtls.http_url}/v2/health/live", verify=mtls.client_context())
    assert reply.status_code == 200
    logs = mtls.logs()
    assert '"tls": "mutual"' in logs
    assert "gRPC speaks TLS only" in logs and "HTTP speaks TLS only" in logs
    assert "auth.mode is off: the tenant is taken from x-tenant" in logs  # loopback: a warning
    key_body = mtls.ca.server_key.read_text().splitlines()[1]
    assert key_body not in logs


# --- refused: no client certificate, another CA's certificate, plaintext --------------------


@pytest.mark.parametrize("cert", ["none", "other"])
def test_grpc_client_without_a_trusted_certificate_is_refused(mtls, cert):
    request_id = f"tls-refused-{cert}-{uuid.uuid4().hex[:8]}"
    with _grpc_client(mtls, cert=cert) as client, pytest.raises(InferenceServerException) as caught:
        client.infer(
            "ocr",
            [_image_input(triton_grpc)],
            headers={"x-request-id": request_id},
            client_timeout=30,
        )
    assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value
    assert not _ledger_has(mtls, request_id)


def test_grpc_plaintext_client_is_refused(mtls):
    with (
        grpc.insecure_channel(mtls.grpc_address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            oip_pb.ServerLiveRequest(), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_with_trusted_certificate_answers_on_the_same_port(mtls):
    """The refusals above are the certificate's doing, not a broken port."""
    with _grpc_client(mtls) as client:
        assert client.is_server_live() and client.is_server_ready()


@pytest.mark.parametrize("cert", ["none", "other"])
def test_http_client_without_a_trusted_certificate_is_refused(mtls, cert):
    context = mtls.client_context(with_cert=False)
    if cert == "other":
        context.load_cert_chain(mtls.ca.other_client_cert, mtls.ca.other_client_key)
    # TLS 1.3: the server checks the client's certificate after the client's side of the
    # handshake, so the refusal (an alert, then a closed connection) arrives on the read.
    with pytest.raises((ssl.SSLError, httpx.TransportError)):
        httpx.get(f"{mtls.http_url}/v2/health/live", verify=context, timeout=10)


def test_tritonclient_http_without_a_certificate_is_refused(mtls):
    client = triton_http.InferenceServerClient(
        f"127.0.0.1:{mtls.http_port}", ssl=True, ssl_options={"ca_certs": str(mtls.ca.ca_cert)}
    )
    try:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - gevent's ssl error or a reset
            client.is_server_live()
    finally:
        client.close()
    assert not isinstance(caught.value, AssertionError)


def test_http_plaintext_client_is_refused(mtls):
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{mtls.http_port}/v2/health/live", timeout=10)


# --- auth required: listening on 0.0.0.0 is allowed; TLS without a client CA ----------------


def test_auth_required_may_listen_on_every_interface(open_tls):
    logs = open_tls.logs()
    assert '"tls": "on"' in logs and "0.0.0.0:" in logs
    assert "auth.mode is off" not in logs
    # No client certificate needed when server.tls has no client_ca_file.
    context = open_tls.client_context(with_cert=False)
    assert httpx.get(f"{open_tls.http_url}/v2/health/ready", verify=context).status_code == 200
    with _grpc_client(open_tls, cert="none") as client:
        assert client.is_server_ready()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{open_tls.http_port}/v2/health/ready", timeout=10)


# --- start-up refusals: `paddle-meter serve` exits 2 before loading a model -----------------


def _run_serve(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess[str]:
    config = {
        "server": {
            "data_dir": str(tmp_path / "data"),
            "grpc_port": free_port(),
            "http_port": free_port(),
            **config.get("server", {}),
        },
        **{k: v for k, v in config.items() if k != "server"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    exe = Path(sys.executable).with_name("paddle-meter")
    return subprocess.run(
        [str(exe), "serve", "--config", str(path), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("host", "workers"), [("0.0.0.0", "1"), ("::", "1"), ("0.0.0.0", "2"), ("192.0.2.7", "1")]
)
def test_serve_with_auth_off_beyond_loopback_refuses_to_start(tmp_path, host, workers):
    done = _run_serve(tmp_path, {}, "--host", host, "--workers", workers)
    assert done.returncode == 2, done.stderr
    assert OFF_LOOPBACK_MESSAGE in done.stderr
    assert f"refusing to listen on {host}" in done.stderr
    assert "paddle-meter keys create --tenant T --role admin" in done.stderr
    assert "auth.mode: required" in done.stderr
    assert "loading model" not in done.stderr  # refused before any model was loaded


def test_serve_with_a_key_that_is_not_the_certificates_refuses_to_start(tmp_path, ca):
    tls = {"cert_file": str(ca.server_cert), "key_file": str(ca.client_key)}
    done = _run_serve(tmp_path, {"server": {"tls": tls}})
    assert done.returncode == 2, done.stderr
    assert f"{ca.client_key} is not the private key of the certificate" in done.stderr
    assert "loading model" not in done.stderr
    for line in ca.client_key.read_text().splitlines()[1:-1]:
        assert line not in done.stderr  # the key's contents are never printed


# --- load_tls and check_exposure directly -----------------------------------------------------


def _config(**tls) -> dict:
    return {"server": {"tls": {"cert_file": None, "key_file": None, "client_ca_file": None, **tls}}}


def test_load_tls_without_a_certificate_is_off():
    assert load_tls(_config()) is None


def test_load_tls_reads_and_describes_the_files(ca):
    tls = load_tls(
        _config(cert_file=ca.server_cert, key_file=ca.server_key, client_ca_file=ca.ca_cert)
    )
    assert tls is not None and tls.mutual and tls.describe() == "mutual"
    options = tls.uvicorn_options()
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED and options["ssl_ca_certs"] == str(
        ca.ca_cert
    )
    assert ca.server_key.read_text().splitlines()[1] not in repr(tls)
    plain = load_tls(_config(cert_file=ca.server_cert, key_file=ca.server_key))
    assert (
        plain is not None
        and not plain.mutual
        and plain.uvicorn_options()["ssl_cert_reqs"] == ssl.CERT_NONE
    )


def _encrypted_copy(key: Path, out: Path) -> Path:
    subprocess.run(
        [
            OPENSSL,
            "pkcs8",
            "-topk8",
            "-in",
            str(key),
            "-out",
            str(out),
            "-passout",
            "pass:secret-pass",
        ],
        check=True,
        capture_output=True,
    )
    return out


def _corrupt_certificate(out: Path) -> Path:
    out.write_text(
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    )
    return out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda ca, d: _config(cert_file=d / "missing.crt", key_file=ca.server_key),
            "server.tls.cert_file: file not found",
        ),
        (
            lambda ca, d: _config(cert_file=ca.server_cert, key_file=d),
            "is a directory, not a PEM file",
        ),
        (
            lambda ca, d: _config(cert_file=ca.server_key, key_file=ca.server_key),
            "holds no PEM certificate",
        ),
        (
            lambda ca, d: _config(cert_file=ca.server_cert, key_file=ca.server_cert),
            "holds no PEM private key",
        ),
        (
            lambda ca, d: _config(cert_file=ca.server_cert, key_file=ca.client_key),
            "is not the private key of the certificate",
        ),
        (
            lambda ca, d: _config(cert_file=make_key_pair(d, "stray")[0], key_file=ca.server_key),
            "is not the private key",
        ),
        (
            lambda ca, d: _config(
                cert_file=ca.server_cert, key_file=_encrypted_copy(ca.server_key, d / "enc.key")
            ),
            "is encrypted",
        ),
        (
            lambda ca, d: _config(
                cert_file=_corrupt_certificate(d / "bad.crt"), key_file=ca.server_key
            ),
            "cannot load the certificate",
        ),
        (
            lambda ca, d: _config(
                cert_file=ca.server_cert, key_file=ca.server_key, client_ca_file=d / "no-ca.pem"
            ),
            "client_ca_file: file not found",
        ),
        (
            lambda ca, d: _config(
                cert_file=ca.server_cert, key_file=ca.server_key, client_ca_file=ca.client_key
            ),
            "client_ca_file",
        ),
        (lambda ca, d: _config(cert_file=ca.server_cert), "set both cert_file and key_file"),
        (lambda ca, d: _config(client_ca_file=ca.ca_cert), "needs cert_file and key_file"),
    ],
)
def test_load_tls_names_the_bad_file(ca, tmp_path, make, message):
    config = make(ca, tmp_path)
    with pytest.raises(ConfigError, match=message) as caught:
        load_tls(config)
    for line in (
        ca.server_key.read_text().splitlines()[1:-1] + ca.client_key.read_text().splitlines()[1:-1]
    ):
        assert line not in str(caught.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("fe80::1", False),
        ("meter.example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_check_exposure_refuses_off_beyond_loopback_and_allows_required():
    off_lan = load_config(None, {"server": {"host": "192.168.1.20"}})
    with pytest.raises(ConfigError, match="refusing to listen on 192.168.1.20"):
        check_exposure(off_lan)
    check_exposure(
        load_config(None, {"server": {"host": "192.168.1.20"}, "auth": {"mode": "required"}})
    )
    check_exposure(load_config(None, {"server": {"host": "localhost"}}), warn=False)


def test_check_exposure_warns_on_loopback_with_auth_off(caplog):
    with caplog.at_level("WARNING", logger="serving.tls"):
        check_exposure(load_config())
    assert any(
        "auth.mode is off: the tenant is taken from x-tenant" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="serving.tls"):
        check_exposure(load_config(None, {"auth": {"mode": "required"}}))
    assert not caplog.records
