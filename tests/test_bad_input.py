"""Bad input on every surface of a real server: each case answers its exact status and
message, and a good call still succeeds afterwards.

- an unknown model name (OIP REST and gRPC, pipeline HTTP and gRPC): NOT_FOUND / 404 /
  err_no 3002, and no ledger row and no ``model`` metric label value for it;
- JSON nested deeper than ``server.max_json_depth`` (OIP, tokenize, pipeline): 400 /
  err_no 5000 naming the limit, never a 500 from RecursionError;
- bytes that are not the method's protobuf message, on every gRPC method the server
  offers: INVALID_ARGUMENT naming the message type, never UNKNOWN;
- a chunked body (no Content-Length) over ``server.max_message_bytes``: one 413;
- a bug (an exception nobody expected) on the OIP and pipeline surfaces: 500 / INTERNAL /
  err_no 10000, logged at ERROR with its traceback and the caller's x-request-id. No input
  reaches one on a real server any more, so this one case runs in-process, with a test
  double for a model whose inference has a bug.

The tests share one server, and the last one ends with good calls on both transports.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import sqlite3
import threading

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from imaging import CORPUS
from support.server import ServerProcess
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from models.base import ModelAdapter
from serving import model_host
from serving.http_app import build_http_app
from serving.oip_grpc import OipGrpcService
from serving.pipeline_grpc import PipelineGrpcService
from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

MAX_BYTES = 1 << 20  # small, so the chunked-body case sends little
UNKNOWN = "Service name error: unknown model 'nosuchmodel'; this server serves: ocr"
TOO_DEEP = (
    "request body nests JSON deeper than the server's limit of 64 levels (server.max_json_depth)"
)
# A truncated varint: no protobuf message can be read from these bytes.
NOT_PROTOBUF = b"\xff\xff\xff"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bad_input")
    with ServerProcess(workdir, {"server": {"max_message_bytes": MAX_BYTES}}) as proc:
        yield proc


def _ledger_models(server: ServerProcess) -> list[str]:
    path = server.workdir / "data" / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT model FROM usage_records")]


def _image_b64() -> str:
    return base64.b64encode(CORPUS["document"].data).decode()


def _good_calls_succeed(server: ServerProcess) -> None:
    """One good call per transport: the server is unharmed by what came before."""
    reply = httpx.post(
        f"{server.http_url}/ocr/prediction",
        json={"key": ["image"], "value": [_image_b64()]},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["err_no"] == 0, reply.text
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([CORPUS["document"].data], dtype=np.object_))
    assert client.infer("ocr", [tensor]).as_numpy("text") is not None


def test_unknown_model_is_not_found_everywhere_without_ledger_row_or_metric_label(server):
    before = _ledger_models(server)
    reply = httpx.post(
        f"{server.http_url}/nosuchmodel/prediction",
        json={"key": ["image"], "value": [_image_b64()]},
        timeout=60,
    )
    assert reply.status_code == 200
    assert reply.json() == {"err_no": 3002, "err_msg": UNKNOWN, "key": [], "value": []}
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]}
    reply = httpx.post(f"{server.http_url}/v2/models/nosuchmodel/infer", json=body, timeout=60)
    assert reply.status_code == 404 and reply.json() == {"error": UNKNOWN}
    with grpc.insecure_channel(server.grpc_address) as channel:
        response = pb_grpc.PipelineServiceStub(channel).inference(
            pb.Request(name="nosuchmodel", key=["image"], value=[_image_b64()])
        )
        assert (response.err_no, response.err_msg) == (3002, UNKNOWN)
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("nosuchmodel", [tensor])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert info.value.message() == UNKNOWN

    _good_calls_succeed(server)
    # The ledger took the good calls (so it is writing) and nothing for the unknown name.
    after = _ledger_models(server)
    assert after[len(before) :] == ["ocr", "ocr"]
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=30).text
    assert 'model="ocr"' in metrics
    assert "nosuchmodel" not in metrics


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v2/models/ocr/infer", b"[" * 100_000, {"error": TOO_DEEP}),
        (
            "/v2/models/ocr/infer",
            b'{"inputs": ' + b"[" * 70 + b"]" * 70 + b"}",
            {"error": TOO_DEEP},
        ),
        (
            "/v1/tokenize",
            b'{"text": ' * 100_000,
            {"error": TOO_DEEP + '; send {"model": "<name>", "text": "..."}'},
        ),
        (
            "/ocr/prediction",
            b"[" * 100_000,
            {"err_no": 5000, "err_msg": TOO_DEEP + '; send {"key": [...], "value": [...]}'},
        ),
    ],
    ids=["oip-100k", "oip-70", "tokenize", "pipeline"],
)
def test_json_nested_deeper_than_the_limit_is_400_naming_it(server, path, body, expected):
    reply = httpx.post(
        f"{server.http_url}{path}",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 400 and reply.json() == expected


def test_json_depth_limit_is_exact(server):
    # 65 levels are refused; 64 (the limit) parse, and the shape is then what is wrong.
    url = f"{server.http_url}/v2/models/ocr/infer"
    reply = httpx.post(url, content=b'{"inputs": [' + b"[" * 63 + b"]" * 63 + b"]}", timeout=60)
    assert reply.status_code == 400 and reply.json() == {"error": TOO_DEEP}
    reply = httpx.post(url, content=b'{"inputs": [' + b"[" * 62 + b"]" * 62 + b"]}", timeout=60)
    assert reply.status_code == 400
    assert reply.json() == {"error": "each input needs 'name', 'datatype' and 'shape'"}


def _grpc_methods() -> list[tuple[str, str, bool, bool]]:
    """(path, request type, client streams, server streams) of every method served."""
    descriptors = [
        service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        pb.DESCRIPTOR.services_by_name["PipelineService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return [
        (
            f"/{service.full_name}/{method.name}",
            method.input_type.full_name,
            method.client_streaming,
            method.server_streaming,
        )
        for service in descriptors
        for method in service.methods
        # Streamed messages are checked as the servicer reads them; this unimplemented
        # method reads none and answers UNIMPLEMENTED.
        if method.name != "ModelStreamInfer"
    ]


@pytest.mark.parametrize(
    ("path", "type_name", "client_streams", "server_streams"),
    _grpc_methods(),
    ids=[m[0].rsplit(".", 1)[-1] for m in _grpc_methods()],
)
def test_undecodable_protobuf_is_invalid_argument_naming_the_type(
    server, path, type_name, client_streams, server_streams
):
    with grpc.insecure_channel(server.grpc_address) as channel:
        kwargs = {"request_serializer": None, "response_deserializer": None}
        with pytest.raises(grpc.RpcError) as info:
            if client_streams:
                list(channel.stream_stream(path, **kwargs)(iter([NOT_PROTOBUF]), timeout=30))
            elif server_streams:
                list(channel.unary_stream(path, **kwargs)(NOT_PROTOBUF, timeout=30))
            else:
                channel.unary_unary(path, **kwargs)(NOT_PROTOBUF, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"request is not a valid {type_name} message (")


def test_chunked_body_over_the_limit_is_one_413(server):
    # A raw socket, so what the server sends is seen byte for byte: one response, no 500.
    head = (
        "POST /ocr/prediction HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.http_port}\r\n"
        "Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    chunk = b"x" * 65536
    parts: list[bytes] = []

    def read(sock: socket.socket) -> None:
        # Read as it arrives: the server closes with our unread body queued, so a reset
        # (which would discard what was not yet read) follows its answer.
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                parts.append(data)

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
        reader = threading.Thread(target=read, args=(sock,))
        reader.start()
        sock.sendall(head.encode())
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(MAX_BYTES // len(chunk) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        reader.join(60)
    received = b"".join(parts)
    assert received.startswith(b"HTTP/1.1 413 ")
    assert received.count(b"HTTP/1.1 ") == 1
    body = received.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body) == {
        "error": f"request body is larger than the server's limit of {MAX_BYTES} bytes "
        "(server.max_message_bytes)"
    }

    # The OIP route reads its body the same way.
    def chunks():
        for _ in range(MAX_BYTES // len(chunk) + 2):
            yield chunk

    reply = httpx.post(f"{server.http_url}/v2/models/ocr/infer", content=chunks(), timeout=60)
    assert reply.status_code == 413 and "server.max_message_bytes" in reply.json()["error"]
    assert "Exception in ASGI application" not in server.logs()
    assert "response already started" not in server.logs()
    _good_calls_succeed(server)


def test_malformed_oip_id_is_refused_not_replaced(server):
    """An OIP ``id`` is the call's billing key when no x-request-id is sent: replacing a
    malformed one with a random id would bill every retry again, so it is refused."""
    from interceptors.request_id import BAD_PROTOCOL_ID_MESSAGE

    before = _ledger_models(server)
    body = {
        "id": "two words",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_image_b64()]}],
    }
    reply = httpx.post(f"{server.http_url}/v2/models/ocr/infer", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json() == {"error": BAD_PROTOCOL_ID_MESSAGE}
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([CORPUS["document"].data], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ocr", [tensor], request_id="x" * 129)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == BAD_PROTOCOL_ID_MESSAGE
    assert _ledger_models(server) == before
    _good_calls_succeed(server)


class BuggyAdapter(ModelAdapter):
    """Test double: a model whose inference raises an exception no code expects."""

    def load(self) -> None:
        pass

    def is_ready(self) -> bool:
        return True

    def infer(self, batch):
        raise RuntimeError("a bug in the model")


def _logged_bug(caplog, request_id: str) -> logging.LogRecord:
    records = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR and getattr(r, "request_id", None) == request_id
    ]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    formatted = logging.Formatter().formatException(records[0].exc_info)
    assert "RuntimeError: a bug in the model" in formatted
    return records[0]


async def test_internal_errors_are_logged_with_traceback_and_request_id(monkeypatch, caplog):
    caplog.set_level(logging.ERROR)
    monkeypatch.setitem(model_host._ADAPTERS, "ocr", (__name__, "BuggyAdapter"))
    host = model_host.ModelHost({"buggy": {"kind": "ocr"}}, {"inference_threads": 1})
    host.load()
    b64 = _image_b64()
    try:
        transport = httpx.ASGITransport(app=build_http_app(host))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}
            reply = await client.post(
                "/v2/models/buggy/infer",
                json={"inputs": [tensor]},
                headers={"x-request-id": "bug-oip-http"},
            )
            assert reply.status_code == 500
            assert reply.json() == {"error": "internal error: RuntimeError"}
            _logged_bug(caplog, "bug-oip-http")
            reply = await client.post(
                "/buggy/prediction",
                json={"key": ["image"], "value": [b64]},
                headers={"x-request-id": "bug-pipeline-http"},
            )
            assert reply.json()["err_no"] == 10000
            _logged_bug(caplog, "bug-pipeline-http")

        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(OipGrpcService(host), server)
        pb_grpc.add_PipelineServiceServicer_to_server(PipelineGrpcService(host), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                request = service_pb2.ModelInferRequest(model_name="buggy")
                request.inputs.add(name="image", datatype="BYTES", shape=[1])
                request.raw_input_contents.append(
                    len(CORPUS["document"].data).to_bytes(4, "little") + CORPUS["document"].data
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                        request, metadata=(("x-request-id", "bug-oip-grpc"),)
                    )
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert info.value.details() == "internal error: RuntimeError"
                _logged_bug(caplog, "bug-oip-grpc")
                response = await pb_grpc.PipelineServiceStub(channel).inference(
                    pb.Request(name="buggy", key=["image"], value=[b64]),
                    metadata=(("x-request-id", "bug-pipeline-grpc"),),
                )
                assert response.err_no == 10000
                _logged_bug(caplog, "bug-pipeline-grpc")
        finally:
            await server.stop(None)
    finally:
        host.close()
