"""End to end: the real server process, the real PP-OCRv4 models, real clients on loopback.

All four surfaces (OIP v2 gRPC and REST through the real ``tritonclient``, the pipeline
protocol over gRPC and HTTP), the real Paddle Serving 0.9 ``PipelineClient`` from its own
Python 3.9 venv, concurrency, every bad input of the serving issue, health and reflection.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imaging import CORPUS, render_line, same_text
from support.server import ServerProcess
from tritonclient.utils import InferenceServerException

from serving.proto import pipeline_service_pb2 as pb
from serving.proto import pipeline_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PS39_PYTHON = ROOT / ".venv-ps39" / "bin" / "python"
MAX_BYTES = 2_000_000
MAX_PIXELS = 3_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = {
        "server": {"max_message_bytes": MAX_BYTES},
        "models": {"ocr": {"kind": "ocr", "options": {"max_image_pixels": MAX_PIXELS}}},
    }
    with ServerProcess(tmp_path_factory.mktemp("serve"), config) as proc:
        yield proc


@pytest.fixture(scope="module")
def pipeline_stub(server):
    channel = grpc.insecure_channel(server.grpc_address)
    yield pb_grpc.PipelineServiceStub(channel)
    channel.close()


def _texts_from_pipeline(value: str) -> list[str]:
    # The shape Paddle Serving's example client eval()s: [[text, box_points], ...]
    items = eval(value)  # noqa: S307 - exactly what the reference client does with it
    return [item[0] for item in items]


def ocr_oip_grpc(server, image: bytes) -> list[str]:
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    result = client.infer("ocr", [tensor])
    return result.as_numpy("text")[0].decode("utf-8").split("\n")


def ocr_oip_http(server, image: bytes) -> list[str]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    result = client.infer("ocr", [tensor])
    return result.as_numpy("text")[0].decode("utf-8").split("\n")


def ocr_pipeline_grpc(server, image: bytes) -> list[str]:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.PipelineServiceStub(channel)
        reply = stub.inference(
            pb.Request(key=["image"], value=[base64.b64encode(image).decode()], name="ocr")
        )
    assert reply.err_no == 0, reply.err_msg
    assert list(reply.key) == ["res"]
    return _texts_from_pipeline(reply.value[0])


def ocr_pipeline_http(server, image: bytes) -> list[str]:
    reply = httpx.post(
        f"{server.http_url}/ocr/prediction",
        json={"key": ["image"], "value": [base64.b64encode(image).decode()]},
        timeout=60,
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["err_no"] == 0, body["err_msg"]
    return _texts_from_pipeline(body["value"][0])


SURFACES = {
    "oip_grpc": ocr_oip_grpc,
    "oip_http": ocr_oip_http,
    "pipeline_grpc": ocr_pipeline_grpc,
    "pipeline_http": ocr_pipeline_http,
}


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("name", CORPUS.names())
def test_corpus_recognised_on_every_surface(server, surface, name):
    item = CORPUS[name]
    lines = SURFACES[surface](server, item.data)
    assert len(lines) == len(item.lines), lines
    for got, expected in zip(lines, item.lines, strict=True):
        assert same_text(got, expected), (got, expected)


@pytest.mark.skipif(
    not PS39_PYTHON.exists() and not os.environ.get("CI"),
    reason="run scripts/setup_ps_client_venv.sh for the real Paddle Serving client",
)
def test_real_paddle_serving_pipeline_client(server, tmp_path):
    item = CORPUS["document"]
    image = tmp_path / "document.png"
    image.write_bytes(item.data)
    out = subprocess.run(
        [str(PS39_PYTHON), str(ROOT / "tests/tools/ps_pipeline_client.py"),
         "--addr", server.grpc_address, "--image", str(image), "--logid", "4242"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert reply["err_no"] == 0, reply
    assert reply["key"] == ["res"]
    assert _texts_from_pipeline(reply["value"][0]) == ocr_pipeline_grpc(server, item.data)


def test_sixteen_concurrent_requests_each_get_their_own_answer(server):
    texts = [f"发票号码 {10000 + i} 金额 {i * 7}.50 元" for i in range(16)]
    images = [render_line(text) for text in texts]
    calls = list(SURFACES.values())
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(calls[i % 4], server, image) for i, image in enumerate(images)]
        results = [f.result(timeout=300) for f in futures]
    for text, lines in zip(texts, results, strict=True):
        assert len(lines) == 1 and same_text(lines[0], text), (lines, text)


def _png_header_only() -> bytes:
    return CORPUS["cjk_invoice"].data[:60]


def _oip_http(server, body: bytes, headers=None) -> httpx.Response:
    return httpx.post(f"{server.http_url}/v2/models/ocr/infer", content=body, headers=headers, timeout=60)


def _oip_json(image_b64: str, datatype: str = "BYTES", shape=(1,), name: str = "image") -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": [image_b64]}]}
    ).encode()


def test_bad_inputs_over_oip_http_then_good_request(server):
    b64 = base64.b64encode
    cases = [
        (b"", 400, "empty request body"),
        (b"{not json", 400, "not valid JSON"),
        (_oip_json(b64(b"plain text, not an image").decode()), 400, "could not be decoded"),
        (_oip_json(b64(_png_header_only()).decode()), 400, "could not be decoded"),
        (_oip_json("%%%not-base64%%%"), 400, "not valid base64"),
        (_oip_json(b64(CORPUS["cjk_invoice"].data).decode(), name="img"), 400, "missing input 'image'"),
        (_oip_json(b64(CORPUS["cjk_invoice"].data).decode(), datatype="FLOAT"), 400, "unknown datatype"),
        (_oip_json(b64(CORPUS["cjk_invoice"].data).decode(), shape=(2,)), 400, "needs 2 elements"),
    ]
    for body, status, message in cases:
        reply = _oip_http(server, body)
        assert reply.status_code == status, (message, reply.text)
        assert message in reply.json()["error"], reply.text
    big = render_line("大图", size=32, padding=1100)  # over MAX_PIXELS
    reply = _oip_http(server, _oip_json(b64(big).decode()))
    assert reply.status_code == 413 and "pixel" in reply.json()["error"], reply.text
    reply = _oip_http(server, b"x" * (MAX_BYTES + 10))
    assert reply.status_code == 413 and "max_message_bytes" in reply.json()["error"]
    reply = httpx.post(f"{server.http_url}/v2/models/nope/infer", content=_oip_json("eA=="))
    assert reply.status_code == 404 and "this server serves: ocr" in reply.json()["error"]
    assert same_text(ocr_oip_http(server, CORPUS["cjk_invoice"].data)[0], CORPUS["cjk_invoice"].lines[0])


def test_bad_inputs_over_oip_grpc_then_good_request(server):
    client = triton_grpc.InferenceServerClient(server.grpc_address)

    def infer(model: str, data: list[bytes], name: str = "image"):
        tensor = triton_grpc.InferInput(name, [len(data)], "BYTES")
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_))
        return client.infer(model, [tensor])

    expectations = [
        (lambda: infer("ocr", [b"not an image"]), "StatusCode.INVALID_ARGUMENT", "could not be decoded"),
        (lambda: infer("ocr", [_png_header_only()]), "StatusCode.INVALID_ARGUMENT", "could not be decoded"),
        (lambda: infer("ocr", [b""]), "StatusCode.INVALID_ARGUMENT", "0 bytes"),
        (lambda: infer("ocr", [CORPUS["cjk_invoice"].data], name="img"), "StatusCode.INVALID_ARGUMENT", "missing input"),
        (lambda: infer("nope", [b"x"]), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
        (lambda: infer("ocr", [render_line("大图", padding=1100)]), "StatusCode.RESOURCE_EXHAUSTED", "pixel"),
        (lambda: infer("ocr", [b"x" * (MAX_BYTES + 10)]), "StatusCode.RESOURCE_EXHAUSTED", "larger than max"),
    ]
    for call, code, message in expectations:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == code, (code, str(info.value))
        assert message in info.value.message(), info.value.message()
    assert same_text(ocr_oip_grpc(server, CORPUS["cjk_invoice"].data)[0], CORPUS["cjk_invoice"].lines[0])


def test_bad_inputs_over_pipeline_then_good_request(server, pipeline_stub):
    b64 = base64.b64encode(b"GIF89a broken").decode()
    grpc_cases = [
        (pb.Request(key=["image"], value=[b64], name="ocr"), 5000, "could not be decoded"),
        (pb.Request(key=["img"], value=[b64], name="ocr"), 5000, "missing key 'image'"),
        (pb.Request(key=["image"], value=["***"], name="ocr"), 5000, "not valid base64"),
        (pb.Request(key=["image"], value=[], name="ocr"), 5000, "one value per key"),
        (pb.Request(key=["image"], value=[""], name="ocr"), 5000, "empty"),
        (pb.Request(key=["image"], value=[b64], name="nope"), 3002, "Service name error"),
    ]
    for request, err_no, message in grpc_cases:
        reply = pipeline_stub.inference(request)
        assert reply.err_no == err_no and message in reply.err_msg, reply
    url = f"{server.http_url}/ocr/prediction"
    reply = httpx.post(url, content=b"{oops")
    assert reply.status_code == 400 and reply.json()["err_no"] == 5000
    reply = httpx.post(url, json={"key": ["image"], "value": ["***"]})
    assert reply.json()["err_no"] == 5000 and "base64" in reply.json()["err_msg"]
    reply = httpx.post(f"{server.http_url}/nope/prediction", json={"key": ["image"], "value": [b64]})
    assert reply.json()["err_no"] == 3002
    assert httpx.get(url).status_code == 405
    assert httpx.post(url, content=b"x" * (MAX_BYTES + 10)).status_code == 413
    assert ocr_pipeline_http(server, CORPUS["english_invoice"].data)
    assert ocr_pipeline_grpc(server, CORPUS["english_invoice"].data)


def test_health_reflection_and_metadata(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService",
                        "baidu.paddle_serving.pipeline_serving.PipelineService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService",
                "baidu.paddle_serving.pipeline_serving.PipelineService"} <= names
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("ocr")
    meta = client.get_model_metadata("ocr", as_json=True)
    assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["datatype"] == "BYTES"
    http = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert http.is_server_live() and http.is_model_ready("ocr")
    assert http.get_server_metadata()["name"] == "paddle-meter"
