"""Real clients with real API keys, and the key kept out of everything the server writes.

One server (``auth.mode: required``) exporting spans and metrics through a real collector
(rotel) to an OTLP sink. tritonclient passes the key through its ``headers=`` argument
(gRPC metadata and HTTP headers); Paddle Serving 0.9's real ``PipelineClient`` (the
Python 3.9 venv) sends it as the feed key ``api_key``, over gRPC and over the HTTP
gateway. Each call must be billed to the key's tenant with the key's id. The last test
greps every file under the server's directory (ledger, spool, logs), the OTLP sink, the
Prometheus text and bill exports for the keys and the server secret: 0 hits, while the key
ids are found there (so the grep can find what it looks for).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from imaging import CORPUS, same_text
from support.collector import OtlpSink, RotelCollector
from support.keyed_calls import Credential, call_surface
from support.keys import auth_env, create_key
from support.server import ServerProcess
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[1]
PS39_PYTHON = ROOT / ".venv-ps39" / "bin" / "python"
PS_CLIENT = ROOT / "tests" / "tools" / "ps_pipeline_client.py"
PAPER = CORPUS["english_invoice"]
needs_ps39 = pytest.mark.skipif(
    not PS39_PYTHON.exists() and not os.environ.get("CI"),
    reason="run scripts/setup_ps_client_venv.sh for the real Paddle Serving client",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth-clients")
    config = {
        "models": {"ocr": {"kind": "ocr"}},
        "ledger": {"url": str(workdir / "data" / "ledger.sqlite3")},
        "auth": {"mode": "required", "cache_ttl_s": 1},
    }
    secret = auth_env()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(OtlpSink())
        collector = stack.enter_context(RotelCollector(sink.endpoint))
        env = {**secret, **collector.otel_env("grpc"), "OTEL_METRIC_EXPORT_INTERVAL": "500",
               "OTEL_BSP_SCHEDULE_DELAY": "100"}
        server = stack.enter_context(ServerProcess(workdir, config, env=env))
        keys = {
            tenant: create_key(server, tenant, "caller", name=f"{tenant} client", env=secret)
            for tenant in ("finance", "archive", "legal")
        }
        keys["auditor"] = create_key(server, "*", "auditor", env=secret)
        yield server, sink, keys, secret, workdir


def _ledger_rows(workdir: Path, tenant: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(workdir / "data" / "ledger.sqlite3")) as db:
        return db.execute(
            "SELECT protocol, endpoint, api_key_id, status, characters FROM usage_records"
            " WHERE tenant = ? ORDER BY ts", (tenant,)).fetchall()


def _tensor(module, image: bytes):
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    return tensor


def test_tritonclient_passes_the_key_in_headers_and_the_call_is_billed_to_its_tenant(stack):
    server, _, keys, _, workdir = stack
    key_id, key = keys["finance"]
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_address)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    # A spoofed x-tenant beside a caller key changes nothing.
    answers = [
        grpc_client.infer("ocr", [_tensor(triton_grpc, PAPER.data)],
                          headers={"authorization": f"Bearer {key}", "x-tenant": "legal"}),
        http_client.infer("ocr", [_tensor(triton_http, PAPER.data)],
                          headers={"x-api-key": key, "x-tenant": "legal"}),
    ]
    for answer in answers:
        lines = answer.as_numpy("text")[0].decode().split("\n")
        assert all(same_text(a, b) for a, b in zip(lines, PAPER.lines, strict=True)), lines
    rows = _ledger_rows(workdir, "finance")
    assert [(r[0], r[2], r[3]) for r in rows] == [("grpc", key_id, "ok"), ("http", key_id, "ok")]
    assert _ledger_rows(workdir, "legal") == []


def test_tritonclient_without_a_key_is_refused_unauthenticated(stack):
    server, *_ = stack
    with pytest.raises(InferenceServerException) as grpc_refusal:
        triton_grpc.InferenceServerClient(server.grpc_address).infer(
            "ocr", [_tensor(triton_grpc, PAPER.data)])
    assert grpc_refusal.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "paddle-meter keys create" in grpc_refusal.value.message()
    with pytest.raises(InferenceServerException) as http_refusal:
        triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}").infer(
            "ocr", [_tensor(triton_http, PAPER.data)], headers={"x-api-key": "pmk_guess"})
    assert http_refusal.value.status() == "401"


def _ps_client(server, image: Path, *, http: bool, key: str | None) -> dict:
    args = [str(PS39_PYTHON), str(PS_CLIENT), "--image", str(image)]
    args += ["--addr", f"127.0.0.1:{server.http_port}", "--http"] if http else [
        "--addr", server.grpc_address]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_METER")}
    env["SERVING_LOG_PATH"] = str(image.parent / "ps_logs")
    if key is not None:
        env["PIPELINE_API_KEY"] = key
        args += ["--api-key-env", "PIPELINE_API_KEY"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_ps39
@pytest.mark.parametrize("http", [False, True], ids=["grpc", "http"])
def test_paddle_serving_pipeline_client_sends_the_key_in_its_feed_dict(stack, tmp_path, http):
    server, _, keys, _, workdir = stack
    key_id, key = keys["archive"]
    image = tmp_path / "invoice.png"
    image.write_bytes(PAPER.data)
    before = len(_ledger_rows(workdir, "archive"))
    refused = _ps_client(server, image, http=http, key=None)
    assert refused["err_no"] == 4001 and "api_key" in refused["err_msg"], refused
    wrong = _ps_client(server, image, http=http, key=key[:-4] + "AAAA")
    assert wrong["err_no"] == 4001, wrong
    served = _ps_client(server, image, http=http, key=key)
    assert served["err_no"] == 0 and served["key"] == ["res"], served
    assert "api_key" not in served["key"] and key not in json.dumps(served)
    rows = _ledger_rows(workdir, "archive")[before:]
    assert [(r[0], r[2], r[3]) for r in rows] == [("http" if http else "grpc", key_id, "ok")]
    assert rows[0][4] > 0  # characters recognised and billed


def _grep(haystack: bytes, needles: dict[str, str]) -> set[str]:
    return {name for name, text in needles.items() if text.encode() in haystack}


def test_no_key_and_no_secret_anywhere_the_server_writes(stack, tmp_path):
    server, sink, keys, secret, workdir = stack
    # Every surface once more with each way of sending a key, and failures too.
    for surface in ("oip_grpc", "oip_http", "pipeline_grpc", "pipeline_http"):
        for place in ("bearer", "x-api-key", "feed"):
            call_surface(server, surface, Credential(keys["legal"][1], place),
                         image=PAPER.data, request_id=f"grep-{surface}-{place}")
        call_surface(server, surface, Credential(keys["legal"][1][:-2] + "zz"),
                     image=PAPER.data)
    auditor = {"authorization": f"Bearer {keys['auditor'][1]}"}
    usage = httpx.get(f"{server.http_url}/v1/usage",
                      params={"from": "2000-01-01", "to": "2100-01-01", "by": "tenant"},
                      headers=auditor, timeout=30)
    assert usage.status_code == 200, usage.text
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=30).text
    exports = []
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"bill.{fmt}"
        subprocess.run(
            [str(Path(sys.executable).with_name("paddle-meter")), "bill", "export",
             "--ledger", str(workdir / "data" / "ledger.sqlite3"), "--from", "2000-01-01",
             "--to", "2100-01-01", "--format", fmt, "-o", str(out), "--no-progress"],
            check=True, capture_output=True, timeout=120)
        exports.append(out.read_bytes())
    deadline = time.monotonic() + 30
    while b"grep-pipeline_http-feed" not in sink.received_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    places = {
        "files under the server's directory": b"".join(
            path.read_bytes() for path in sorted(workdir.rglob("*")) if path.is_file()),
        "OTLP export": sink.received_bytes(),
        "/metrics": metrics.encode(),
        "bill exports": b"".join(exports),
        "usage API": usage.content,
    }
    secrets_ = {f"key of {name}": key for name, (_, key) in keys.items()}
    # pmk_<id>_<secret>: the secret (token_urlsafe) may itself hold "_".
    secrets_.update({f"secret part of {name}": key.split("_", 2)[2]
                     for name, (_, key) in keys.items()})
    secrets_["server secret"] = secret["PADDLE_METER_AUTH_SECRET"]
    leaks = {where: _grep(haystack, secrets_) for where, haystack in places.items()}
    assert leaks == {where: set() for where in places}
    key_id = keys["legal"][0]
    for where in ("files under the server's directory", "OTLP export", "bill exports"):
        assert key_id.encode() in places[where], f"the key id should be in the {where}"
    assert f'paddle_meter_api_key_id="{key_id}"' in metrics
