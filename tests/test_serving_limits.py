"""Serving limits on every surface: the per-request inference limit, and readiness that
follows the ledger.

A server whose limit (server.request_timeout_s) is far below one OCR inference answers
DEADLINE_EXCEEDED / 504 / err_no 6000 with a message naming the setting, records the
failed call unbilled, and keeps serving (health answers; the abandoned inference finishes
in the background).

A server whose ledger can take no record (the database locked by another process and the
spool directory impossible to create) says so on all three readiness surfaces
(/v2/health/ready, gRPC ServerReady, grpc.health.v1) and is ready again once the
database is free, without any traffic.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imaging import CORPUS
from support.server import ServerProcess
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    with ServerProcess(
        tmp_path_factory.mktemp("limits"), {"server": {"request_timeout_s": 0.001}}
    ) as proc:
        yield proc


def test_timeout_on_every_surface_then_server_still_serves(slow_server):
    image = CORPUS["document"].data
    b64 = base64.b64encode(image).decode()
    reply = httpx.post(
        f"{slow_server.http_url}/v2/models/ocr/infer",
        json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]},
        timeout=60,
    )
    assert reply.status_code == 504 and "request_timeout_s" in reply.json()["error"]
    reply = httpx.post(
        f"{slow_server.http_url}/ocr/prediction",
        json={"key": ["image"], "value": [b64]},
        timeout=60,
    )
    assert reply.json()["err_no"] == 6000 and "request_timeout_s" in reply.json()["err_msg"]
    with grpc.insecure_channel(slow_server.grpc_address) as channel:
        response = pb_grpc.PipelineServiceStub(channel).inference(
            pb.Request(key=["image"], value=[b64])
        )
    assert response.err_no == 6000
    client = triton_grpc.InferenceServerClient(slow_server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ocr", [tensor])
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert (
        client.is_server_live()
        and httpx.get(f"{slow_server.http_url}/v2/health/live").status_code == 200
    )


def _until(predicate, what: str, deadline_s: float = 60.0) -> None:
    """Wait for a state of the server; the deadline only ends a wait that would hang."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"never saw: {what}")
        time.sleep(0.05)


def _readiness(server: ServerProcess) -> tuple[int, bool, int]:
    """(HTTP ready status, gRPC ServerReady, grpc.health status) of ``server``."""
    http = httpx.get(f"{server.http_url}/v2/health/ready", timeout=30).status_code
    with grpc.insecure_channel(server.grpc_address) as channel:
        ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            service_pb2.ServerReadyRequest(), timeout=30
        )
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
    return http, ready.ready, health.status


READY = (200, True, health_pb2.HealthCheckResponse.SERVING)
NOT_READY = (503, False, health_pb2.HealthCheckResponse.NOT_SERVING)


def test_not_ready_while_the_ledger_cannot_accept_records(tmp_path):
    (tmp_path / "blocked").write_text("a file where the spool directory should be")
    ledger = {
        "spool_dir": str(tmp_path / "blocked" / "spool"),
        "busy_timeout_ms": 50,
        "retry_interval_s": 0.1,
    }
    with ServerProcess(tmp_path / "server", {"ledger": ledger}) as server:
        assert _readiness(server) == READY
        db = server.workdir / "data" / "ledger.sqlite3"
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            # One call finds out: its record can be neither committed nor spooled.
            b64 = base64.b64encode(CORPUS["document"].data).decode()
            httpx.post(
                f"{server.http_url}/ocr/prediction",
                json={"key": ["image"], "value": [b64]},
                timeout=60,
            )
            _until(lambda: _readiness(server) == NOT_READY, "not ready on every surface")
        finally:
            with contextlib.suppress(sqlite3.Error):
                blocker.execute("ROLLBACK")
            blocker.close()
        # No traffic needed: the writer retries on its own and readiness follows.
        _until(lambda: _readiness(server) == READY, "ready again on every surface")
