"""Back-pressure: far more concurrent calls than a small configured bound.

A real server with ``server.max_concurrent_http`` / ``max_concurrent_rpcs`` of 2. The
bound is held deterministically (HTTP: real OCR requests whose bodies are not finished
yet; gRPC: open reflection streams), then a burst of calls arrives at once: every one is
answered at once (none is queued: the held calls would never let it through) with 503 +
``Retry-After: 1`` / RESOURCE_EXHAUSTED + trailing ``retry-after: 1``; the held calls then
finish and succeed, a good call works after, and the server's RSS stays bounded. A free
burst of real OCR calls answers only OK or the overload status.

The model host's bounded pool and the ERNIE batcher's bounded queue are exercised
directly (in-process): a job that keeps running after its caller timed out keeps its slot
until it really ends, and a full pool or queue refuses at once with ``overloaded``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import queue
import socket
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imaging import CORPUS
from support.server import ServerProcess
from tritonclient.utils import InferenceServerException

from models.base import Overloaded
from models.batching import DynamicBatcher
from serving.model_host import BoundedExecutor

BOUND = 2
BURST = 64
HTTP_OVERLOADED = (
    f"the server is at its limit of {BOUND} concurrent HTTP requests "
    "(server.max_concurrent_http); retry later"
)
GRPC_OVERLOADED = (
    f"the server is at its limit of {BOUND} concurrent gRPC calls "
    "(server.max_concurrent_rpcs); retry later"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = {"server": {"max_concurrent_http": BOUND, "max_concurrent_rpcs": BOUND}}
    with ServerProcess(tmp_path_factory.mktemp("overload"), config) as proc:
        yield proc


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def _oip_body() -> bytes:
    b64 = base64.b64encode(CORPUS["document"].data).decode()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}
    return json.dumps({"inputs": [tensor]}).encode()


def _grpc_infer(address: str) -> triton_grpc.InferResult:
    client = triton_grpc.InferenceServerClient(address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([CORPUS["document"].data], dtype=np.object_))
    return client.infer("ocr", [tensor], client_timeout=120)


def _until(predicate, what: str, deadline_s: float = 60.0) -> None:
    """Wait for a state of the server (not a timing assertion: the deadline only ends a
    wait that would otherwise hang)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"never saw: {what}")
        time.sleep(0.05)


class _HeldRequest:
    """An OIP infer request whose headers are sent and body is not finished: the server
    is inside the app, waiting for the rest, holding one concurrency slot."""

    def __init__(self, port: int, body: bytes) -> None:
        self.body = body
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        head = (
            "POST /v2/models/ocr/infer HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body[:10])

    def finish(self) -> tuple[int, bytes]:
        self.sock.sendall(self.body[10:])
        received = b""
        while data := self.sock.recv(65536):
            received += data
        self.sock.close()
        head, _, body = received.partition(b"\r\n\r\n")
        return int(head.split()[1]), body


def test_http_burst_over_the_bound_is_503_with_retry_after(server):
    body = _oip_body()
    assert httpx.post(
        f"{server.http_url}/v2/models/ocr/infer", content=body, timeout=120
    ).is_success
    rss_before = _rss_kib(server.proc.pid)
    held = [_HeldRequest(server.http_port, body) for _ in range(BOUND)]
    # GET /v2 passes the limiter too: once it is refused, both slots are held.
    _until(
        lambda: httpx.get(f"{server.http_url}/v2", timeout=30).status_code == 503,
        "the held requests inside the app",
    )

    def call(_: int) -> httpx.Response:
        return httpx.post(f"{server.http_url}/v2/models/ocr/infer", content=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(call, range(BURST)))
    # Every one answered while the bound was still held: refused, not queued.
    for reply in replies:
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "1"
        assert reply.json() == {"error": HTTP_OVERLOADED}
    # Probes are never refused.
    assert httpx.get(f"{server.http_url}/v2/health/live", timeout=30).status_code == 200
    assert httpx.get(f"{server.http_url}/metrics", timeout=30).status_code == 200
    for request in held:
        status, answer = request.finish()
        assert status == 200 and json.loads(answer)["model_name"] == "ocr"
    reply = httpx.post(f"{server.http_url}/v2/models/ocr/infer", content=body, timeout=120)
    assert reply.status_code == 200
    # A burst of refusals holds nothing: RSS stays within a small margin.
    assert _rss_kib(server.proc.pid) < rss_before * 1.2


class _HeldStream:
    """An open reflection stream: one admitted gRPC call until it is closed."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self._responses = stub.ServerReflectionInfo(iter(self._requests.get, None))
        self.first = next(self._responses)  # admitted and answered: it holds a slot now

    def close(self) -> None:
        self._requests.put(None)
        list(self._responses)


def test_grpc_burst_over_the_bound_is_resource_exhausted_with_retry_after(server):
    _grpc_infer(server.grpc_address)
    rss_before = _rss_kib(server.proc.pid)
    with grpc.insecure_channel(server.grpc_address) as channel:
        held = [_HeldStream(channel) for _ in range(BOUND)]
        assert all(h.first.list_services_response.service for h in held)

        def call(_: int) -> InferenceServerException | None:
            try:
                _grpc_infer(server.grpc_address)
            except InferenceServerException as exc:
                return exc
            return None

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            errors = list(pool.map(call, range(BURST)))
        for error in errors:
            assert error is not None
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert error.message() == GRPC_OVERLOADED
        # The trailing metadata says when to retry (tritonclient does not show it).
        metadata = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerMetadata",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as info:
            metadata(b"", timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in tuple(info.value.trailing_metadata())
        # Health is never refused.
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
        )
        assert health(b"", timeout=30) is not None
        for stream in held:
            stream.close()
    assert _grpc_infer(server.grpc_address).as_numpy("text") is not None
    assert _rss_kib(server.proc.pid) < rss_before * 1.2


def test_free_burst_answers_only_ok_or_overloaded(server):
    body = _oip_body()

    def http_call(_: int) -> int:
        return httpx.post(
            f"{server.http_url}/v2/models/ocr/infer", content=body, timeout=120
        ).status_code

    def grpc_call(_: int) -> str:
        try:
            _grpc_infer(server.grpc_address)
        except InferenceServerException as exc:
            return exc.status()
        return "OK"

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        http = pool.map(http_call, range(12))
        rpc = pool.map(grpc_call, range(12))
        http, rpc = list(http), list(rpc)
    assert set(http) <= {200, 503} and 200 in http
    assert set(rpc) <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"} and "OK" in rpc


# -- the model host's pool and the ERNIE batcher's queue, in-process -------------------


def test_bounded_pool_refuses_at_once_and_frees_a_slot_only_when_the_job_ends():
    pool = BoundedExecutor(threads=1, max_queued=1)
    started, release = threading.Event(), threading.Event()

    def hung_job() -> None:
        started.set()
        release.wait()

    try:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            running = loop.run_in_executor(pool, hung_job)
            await asyncio.to_thread(started.wait)
            queued = loop.run_in_executor(pool, release.wait)
            with pytest.raises(Overloaded, match="server.max_queued_inferences"):
                loop.run_in_executor(pool, release.wait)
            # The callers stop waiting (a request timeout): the running job keeps its
            # slot; the queued one is cancelled and gives its slot back.
            for work in (running, queued):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(work, 0)
            for _ in range(5):  # the cancellation reaches the pool via loop callbacks
                await asyncio.sleep(0)
            assert pool.held == 1
            loop.run_in_executor(pool, release.wait)  # the one free slot
            with pytest.raises(Overloaded):  # the hung job still holds the other
                loop.run_in_executor(pool, release.wait)
            release.set()

        asyncio.run(scenario())
        _until(lambda: pool.held == 0, "every slot given back")
        assert pool.submit(int).result() == 0  # and the pool serves again
    finally:
        release.set()
        pool.shutdown()


def test_batcher_queue_is_bounded():
    gate = threading.Event()

    def run_batch(items: list[int]) -> list[int]:
        gate.wait()
        return items

    async def scenario() -> None:
        batcher = DynamicBatcher(run_batch, max_batch_size=1, max_wait_ms=0, max_queue=2)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0)  # the collector takes it into a running batch
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        refused = [w for w in waiting if w.done()]
        assert len(refused) >= 1
        assert all(isinstance(w.exception(), Overloaded) for w in refused)
        assert refused[0].exception().kind == "overloaded"
        gate.set()
        assert await first == 0
        await batcher.aclose()

    asyncio.run(scenario())
