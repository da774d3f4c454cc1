"""OIP v2 as Triton's and KServe's own tools expect it, against the real server on loopback.

Triton's real ``perf_analyzer`` (the binary of the tritonclient 2.50.0 wheel) over gRPC and
HTTP, KServe's SDK (``InferenceRESTClient`` / ``InferenceGRPCClient``), and the real
``tritonclient`` for what Triton answers: unknown outputs and versions refused as Triton
refuses them, ``{"error": ...}`` for every error under ``/v2``, the model-configuration and
statistics extensions (the statistics agree with the ledger), UNIMPLEMENTED with a plain
message and no traceback for the Triton methods not offered.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from imaging import render_line, same_text
from support.perf_analyzer import missing, run_perf_analyzer, write_input_data
from support.server import ServerProcess
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[1]
TOOLS_PYTHON = ROOT / ".venv-triton-tools" / "bin" / "python"
MAX_BYTES = 1_000_000
TEXT = "发票号码 20261204 金额 88.00 元"
IMAGE = render_line(TEXT)
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
NOT_OFFERED = "is not offered by paddle-meter"


def _needs_tool(reason: str | None):
    """Skip without the tool, except in CI (where its absence is a failure)."""
    return pytest.mark.skipif(
        reason is not None and not os.environ.get("CI"), reason=reason or "available"
    )


_PERF_MISSING = missing()
_KSERVE_MISSING = (
    None if TOOLS_PYTHON.exists() else "run scripts/setup_triton_tools_venv.sh for kserve"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = {
        "server": {"max_message_bytes": MAX_BYTES},
        "models": {"ocr": {"kind": "ocr"}},
    }
    with ServerProcess(tmp_path_factory.mktemp("triton_tools"), config) as proc:
        yield proc


@pytest.fixture(scope="module")
def grpc_client(server):
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(server):
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


def _ledger(server: ServerProcess) -> list[tuple[str, str]]:
    """(model, status) of every ledger row."""
    path = server.workdir / "data" / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return list(conn.execute("SELECT model, status FROM usage_records"))


def _image_input(module, image: bytes = IMAGE):
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    return tensor


def _texts(result) -> list[str]:
    return result.as_numpy("text")[0].decode("utf-8").split("\n")


def _log_since(server: ServerProcess, start: int) -> str:
    return server.logs()[start:]


# --- server metadata ---------------------------------------------------------------------


def test_server_metadata_advertises_the_extensions_offered(server, grpc_client, http_client):
    assert http_client.get_server_metadata()["extensions"] == EXTENSIONS
    assert list(grpc_client.get_server_metadata().extensions) == EXTENSIONS


# --- unknown outputs ---------------------------------------------------------------------


def test_unknown_requested_output_is_refused_as_triton_does(server, grpc_client, http_client):
    before = _ledger(server)
    message = "unexpected inference output 'nope' for model 'ocr'"
    with pytest.raises(InferenceServerException) as info:
        http_client.infer(
            "ocr", [_image_input(triton_http)], outputs=[triton_http.InferRequestedOutput("nope")]
        )
    assert info.value.status() == "400" and info.value.message() == message
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer(
            "ocr", [_image_input(triton_grpc)], outputs=[triton_grpc.InferRequestedOutput("nope")]
        )
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == message
    # Refused before the model ran; each is a failed attempt of the model, never billed.
    added = _ledger(server)[len(before) :]
    assert added == [("ocr", "400"), ("ocr", "INVALID_ARGUMENT")]
    # A known output alone is what comes back.
    result = grpc_client.infer(
        "ocr", [_image_input(triton_grpc)], outputs=[triton_grpc.InferRequestedOutput("text")]
    )
    assert [o.name for o in result.get_response().outputs] == ["text"]
    assert same_text(_texts(result)[0], TEXT)


# --- versions ----------------------------------------------------------------------------


def test_unknown_version_is_refused_everywhere_without_a_ledger_row(
    server, grpc_client, http_client
):
    before = _ledger(server)
    message = "Request for unknown model: 'ocr' version 7 is not found"
    url = server.http_url
    for method, path in [
        ("POST", "/v2/models/ocr/versions/7/infer"),
        ("GET", "/v2/models/ocr/versions/7"),
        ("GET", "/v2/models/ocr/versions/7/config"),
        ("GET", "/v2/models/ocr/versions/7/stats"),
    ]:
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
        reply = httpx.request(method, url + path, json=body if method == "POST" else None)
        assert (reply.status_code, reply.json()) == (404, {"error": message}), path
    for call in [
        lambda: grpc_client.infer("ocr", [_image_input(triton_grpc)], model_version="7"),
        lambda: grpc_client.get_model_metadata("ocr", "7"),
        lambda: grpc_client.get_model_config("ocr", "7"),
        lambda: grpc_client.get_inference_statistics("ocr", "7"),
    ]:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert info.value.message() == message
    with pytest.raises(InferenceServerException) as info:  # tritonclient decodes our body
        http_client.infer("ocr", [_image_input(triton_http)], model_version="7")
    assert info.value.message() == message
    # Triton's readiness of a version it does not have: not ready, not an error.
    assert not http_client.is_model_ready("ocr", "7")
    assert not grpc_client.is_model_ready("ocr", "7")
    assert _ledger(server) == before
    # The model's own version is served on every route.
    assert http_client.is_model_ready("ocr", "1") and grpc_client.is_model_ready("ocr", "1")
    for client, module in [(http_client, triton_http), (grpc_client, triton_grpc)]:
        result = client.infer("ocr", [_image_input(module)], model_version="1")
        assert same_text(_texts(result)[0], TEXT)
        assert client.get_model_metadata("ocr", "1") is not None
    assert _ledger(server)[len(before) :] == [("ocr", "ok"), ("ocr", "ok")]


# --- error bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/nope", 404),
        ("POST", "/v2/nope", 404),  # once answered by the pipeline's /{name}/{method}
        ("GET", "/v2/models/ocr/bogus/deeper", 404),
        ("GET", "/v2/models/ocr/infer", 405),
        ("PUT", "/v2/models/ocr", 405),
        ("DELETE", "/v2", 405),
        ("GET", "/v2/models/nope/config", 404),
        ("GET", "/v2/models/nope/stats", 404),
        ("POST", "/v2/repository/index", 501),
        ("GET", "/v2/systemsharedmemory/status", 501),
        ("GET", "/v2/trace/setting", 501),
        ("GET", "/v2/logging", 501),
        ("POST", "/v2/models/ocr/infer", 400),
    ],
)
def test_every_error_under_v2_is_oip_shaped(server, method, path, status):
    reply = httpx.request(method, server.http_url + path, content=b"not json")
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    if status == 405:
        assert reply.headers["allow"]
    if status == 501:
        assert NOT_OFFERED in body["error"]


def test_size_refusal_on_an_oip_route_is_oip_shaped(server):
    reply = httpx.post(
        server.http_url + "/v2/models/ocr/infer", content=b"x" * (MAX_BYTES + 1), timeout=60
    )
    assert reply.status_code == 413 and list(reply.json()) == ["error"]


def test_other_surfaces_keep_their_error_shapes(server):
    # FastAPI's own answer outside /v2, the pipeline's GET answer.
    assert httpx.get(server.http_url + "/v1/no/such").json() == {"detail": "Not Found"}
    reply = httpx.get(server.http_url + "/ocr/prediction")
    assert reply.status_code == 405 and "POST" in reply.json()["error"]
    reply = httpx.post(server.http_url + "/nope/prediction", json={"key": [], "value": []})
    assert reply.status_code == 200 and reply.json()["err_no"] == 3002


def test_tritonclient_decodes_unknown_route_errors(server, http_client):
    # tritonclient reads {"error": ...} from any non-200 answer (it failed on {"detail"}).
    with pytest.raises(InferenceServerException) as info:
        http_client.get_model_repository_index()
    assert NOT_OFFERED in info.value.message()


# --- model configuration -----------------------------------------------------------------


def test_model_configuration_extension(server, grpc_client, http_client):
    metadata = http_client.get_model_metadata("ocr")
    for config in [http_client.get_model_config("ocr"), http_client.get_model_config("ocr", "1")]:
        assert config["name"] == "ocr" and config["max_batch_size"] == 0
        assert config["platform"] == metadata["platform"]
        assert config["version_policy"] == {"specific": {"versions": [1]}}
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
            ("image", "TYPE_STRING", [-1])
        ]
        assert [(t["name"], t["dims"]) for t in config["output"]] == [
            (t["name"], t["shape"]) for t in metadata["outputs"]
        ]
        assert {t["data_type"] for t in config["output"]} == {"TYPE_STRING"}
    config = grpc_client.get_model_config("ocr").config
    assert config.name == "ocr" and config.max_batch_size == 0
    assert config.input[0].name == "image"
    assert config.input[0].data_type == model_config_pb2.TYPE_STRING
    assert list(config.input[0].dims) == [-1]
    assert [o.name for o in config.output] == ["text", "result"]


async def test_tritonclient_aio_config_statistics_and_refusals(server):
    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http.aio as http_aio

    grpc_client = grpc_aio.InferenceServerClient(server.grpc_address)
    http_client = http_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        assert (await http_client.get_model_config("ocr"))["input"][0]["data_type"] == "TYPE_STRING"
        config = (await grpc_client.get_model_config("ocr")).config
        assert config.input[0].data_type == model_config_pb2.TYPE_STRING
        for client, module in [(http_client, http_aio), (grpc_client, grpc_aio)]:
            result = await client.infer("ocr", [_image_input(module)])
            assert same_text(_texts(result)[0], TEXT)
            with pytest.raises(InferenceServerException) as info:
                await client.infer(
                    "ocr", [_image_input(module)], outputs=[module.InferRequestedOutput("nope")]
                )
            assert "unexpected inference output 'nope'" in info.value.message()
            with pytest.raises(InferenceServerException) as info:
                await client.infer("ocr", [_image_input(module)], model_version="7")
            assert "version 7 is not found" in info.value.message()
        stats = await http_client.get_inference_statistics("ocr")
        grpc_stats = await grpc_client.get_inference_statistics("ocr")
        assert stats["model_stats"][0]["inference_count"] == grpc_stats.model_stats[0].inference_count
    finally:
        await grpc_client.close()
        await http_client.close()


@pytest.mark.parametrize(("task", "version"), [("text_classification", "2"), ("embeddings", "v1")])
def test_model_config_of_an_ernie_model_is_a_valid_triton_config(task, version):
    """In process (no model loaded): the config an ERNIE model would answer, per task."""
    from types import SimpleNamespace

    from google.protobuf import json_format

    from serving.codecs import codec_for_kind
    from serving.model_host import ServedModel
    from serving.oip_config import model_config

    adapter = SimpleNamespace(
        task=task, version=version, operation=None, runtime_description=lambda: "paddle"
    )
    served = ServedModel("ernie", "ernie", adapter, codec_for_kind("ernie", adapter), None, 1.0)
    config = model_config(served)
    json_format.ParseDict(config, model_config_pb2.ModelConfig())  # a valid ModelConfig
    assert config["platform"] == "paddle_inference"
    types = {t["name"]: (t["data_type"], t["dims"]) for t in config["output"]}
    assert {t["name"]: t["data_type"] for t in config["input"]} == {
        "text": "TYPE_STRING",
        "text_pair": "TYPE_STRING",
    }
    assert types["input_tokens"] == ("TYPE_INT64", [-1])
    assert types["truncated"] == ("TYPE_BOOL", [-1])
    if task == "embeddings":
        assert types["embedding"] == ("TYPE_FP32", [-1, -1])
        assert config["version_policy"] == {"latest": {"num_versions": 1}}
    else:
        assert types["label"] == ("TYPE_STRING", [-1]) and types["logits"][0] == "TYPE_FP32"
        assert config["version_policy"] == {"specific": {"versions": [2]}}


# --- unimplemented -----------------------------------------------------------------------


def test_methods_not_offered_answer_unimplemented_plainly_without_traceback(server, grpc_client):
    start = len(server.logs())
    calls = {
        "RepositoryIndex": grpc_client.get_model_repository_index,
        "RepositoryModelLoad": lambda: grpc_client.load_model("ocr"),
        "RepositoryModelUnload": lambda: grpc_client.unload_model("ocr"),
        "SystemSharedMemoryStatus": grpc_client.get_system_shared_memory_status,
        "CudaSharedMemoryStatus": grpc_client.get_cuda_shared_memory_status,
        "TraceSetting": grpc_client.get_trace_settings,
        "LogSettings": grpc_client.get_log_settings,
    }
    for name, call in calls.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.UNIMPLEMENTED", name
        assert info.value.message() == f"inference.GRPCInferenceService/{name} {NOT_OFFERED}"
    with grpc.insecure_channel(server.grpc_address) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(stream(iter([service_pb2.ModelInferRequest(model_name="ocr")]), timeout=30))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert NOT_OFFERED in raised.value.details()
    log = _log_since(server, start)
    assert "Traceback" not in log and '"level": "error"' not in log, log[-4000:]


# --- statistics --------------------------------------------------------------------------


def _stats_agree_with_ledger(server, grpc_client, http_client) -> dict:
    rows = _ledger(server)
    ok = sum(1 for model, status in rows if model == "ocr" and status == "ok")
    failed = sum(1 for model, status in rows if model == "ocr" and status != "ok")
    rest = http_client.get_inference_statistics("ocr")["model_stats"]
    assert [(s["name"], s["version"]) for s in rest] == [("ocr", "1")]
    stat = rest[0]
    assert stat["inference_count"] == stat["execution_count"] == ok
    assert stat["inference_stats"]["success"]["count"] == ok
    assert stat["inference_stats"]["fail"]["count"] == failed
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stat["inference_stats"][stage]["count"] == ok
    proto = grpc_client.get_inference_statistics("ocr").model_stats[0]
    assert (proto.inference_count, proto.inference_stats.fail.count) == (ok, failed)
    # Every model (no name) over REST and gRPC.
    assert http_client.get_inference_statistics()["model_stats"] == rest
    assert [s.name for s in grpc_client.get_inference_statistics().model_stats] == ["ocr"]
    return stat


def test_statistics_extension_agrees_with_the_ledger(server, grpc_client, http_client):
    for client, module in [(http_client, triton_http), (grpc_client, triton_grpc)]:
        assert same_text(_texts(client.infer("ocr", [_image_input(module)]))[0], TEXT)
    stat = _stats_agree_with_ledger(server, grpc_client, http_client)
    assert stat["inference_count"] >= 2 and stat["last_inference"] > 0
    durations = stat["inference_stats"]
    assert durations["success"]["ns"] >= durations["compute_infer"]["ns"] > 0
    assert durations["compute_input"]["ns"] > 0 and durations["compute_output"]["ns"] > 0


# --- perf_analyzer -----------------------------------------------------------------------


@_needs_tool(_PERF_MISSING)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_against_us_unchanged(
    server, grpc_client, http_client, tmp_path, protocol
):
    url = server.grpc_address if protocol == "grpc" else f"127.0.0.1:{server.http_port}"
    data = write_input_data(tmp_path / "input.json", "image", [IMAGE])
    result = run_perf_analyzer(
        url=url,
        protocol=protocol,
        model="ocr",
        input_data=data,
        concurrency="1",
        request_count=5,
        csv_path=tmp_path / "perf.csv",
        timeout_s=300,
    )
    assert result.returncode == 0, result.output[-4000:]
    assert len(result.throughputs()) == 1 and result.throughputs()[0] > 0, result.output
    (sent,) = result.request_counts()
    (seen,) = result.server_counts()  # read from our statistics extension
    assert sent >= 5 and seen["inference"] == seen["execution"] == seen["success"]
    # Its windows are cut at the client and at the server one snapshot apart: at
    # concurrency 1 at most one request in flight at each end falls on the other side.
    assert abs(seen["inference"] - sent) <= 2, result.output
    _stats_agree_with_ledger(server, grpc_client, http_client)


# --- KServe SDK --------------------------------------------------------------------------


@_needs_tool(_KSERVE_MISSING)
def test_kserve_sdk_readiness_and_infer(server, tmp_path):
    image = tmp_path / "line.png"
    image.write_bytes(IMAGE)
    out = subprocess.run(
        [
            str(TOOLS_PYTHON),
            str(ROOT / "tests/tools/kserve_client.py"),
            server.grpc_address,
            server.http_url,
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    for transport in ("rest", "grpc"):
        assert answer[f"{transport}_server_live"] and answer[f"{transport}_server_ready"]
        assert answer[f"{transport}_model_ready"]
        assert answer[f"{transport}_model_name"] == "ocr"
        assert answer[f"{transport}_id"] == f"kserve-{transport}-1"
        assert same_text(answer[f"{transport}_texts"][0], TEXT), answer


# --- HTTP keep-alive ---------------------------------------------------------------------


async def test_http_listener_answers_keep_alive_without_nagle_delay():
    """perf_analyzer and tritonclient keep their HTTP connection: the server's accepted
    sockets must have TCP_NODELAY (asyncio sets it only when the listening socket says
    IPPROTO_TCP), else each answer after the first waits for the client's delayed ACK."""
    import asyncio
    import socket

    from serving.app import _listen_socket

    sock = _listen_socket("127.0.0.1", 0, reuse_port=False)
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    def connected(reader, writer):
        accepted.set_result(writer.get_extra_info("socket"))

    server = await asyncio.start_server(connected, sock=sock)
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        peer = await asyncio.wait_for(accepted, 30)
        assert peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
